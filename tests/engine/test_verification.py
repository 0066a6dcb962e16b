"""Each attack of engine.verification on constructed cases whose answer is known.

Memorisation case: random-label noise images (64 pixels) that a small MLP can fit only by
memorising them. `memoriser` was trained on the forgotten instances, `retrained` on the same data
without them; held-out data are fresh random-label images. Learnable case (attack_fixtures):
Gaussian clusters whose class is linearly separable, for the probe and relearning.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from attack_fixtures import K, fit, learnable_case, mlp
from streamer.engine.verification import (attack_report, loss_threshold_auc, mia_efficacy, penultimate_features,
                                          probe_recovery, relearn_accuracy, streisand_auc, true_class_confidence)


def _noise(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(n, 1, 8, 8, generator=gen), torch.randint(K, (n,), generator=gen)


@pytest.fixture(scope="module")
def memorisation():
    gen = torch.Generator().manual_seed(0)
    forget_x, forget_y = _noise(48, gen)
    retain_x, retain_y = _noise(200, gen)
    held_x, held_y = _noise(200, gen)
    torch.manual_seed(0)
    memoriser = fit(mlp(hidden=128), torch.cat([forget_x, retain_x]), torch.cat([forget_y, retain_y]), 150, lr=1e-2)
    torch.manual_seed(0)
    retrained = fit(mlp(hidden=128), retain_x, retain_y, 150, lr=1e-2)
    return memoriser, retrained, (forget_x, forget_y), (retain_x, retain_y), (held_x, held_y)


@pytest.fixture(scope="module")
def learnable():
    return learnable_case()


def _head_scrambled(net: nn.Module) -> nn.Module:
    """A copy whose last Linear is re-drawn: the features still separate the classes, the head does not."""
    import copy

    broken = copy.deepcopy(net)
    torch.manual_seed(7)
    broken[-1].reset_parameters()
    with torch.no_grad():
        broken[-1].weight.mul_(-20)  # confidently wrong rather than near-uniform
    return broken


@pytest.mark.parametrize("auc", [loss_threshold_auc, streisand_auc], ids=["loss_threshold", "streisand"])
class TestAucAttacks:
    def test_memorised_instances_score_near_one(self, memorisation, auc) -> None:
        """Instances the model memorised are told from held-out ones (AUC near 1); for the retrained model, ~0.5."""
        memoriser, retrained, forget, _, held = memorisation
        assert auc(memoriser, *forget, *held) > 0.9
        assert abs(auc(retrained, *forget, *held) - 0.5) < 0.15

    def test_identical_distributions_give_one_half(self, learnable, auc) -> None:
        """Forgotten and held-out drawn from the same distribution, neither trained on: AUC 0.5 within tolerance."""
        trained, forget, held = learnable
        assert abs(auc(trained, *forget, *held) - 0.5) < 0.15


class TestMiaEfficacy:
    def test_svc_separates_members_by_confidence(self) -> None:
        """Confidence 0.95-1 members vs 0-0.5 non-members: high-confidence targets are members, low ones are not."""
        gen = torch.Generator().manual_seed(0)
        members = (0.95 + 0.05 * torch.rand(100, 1, generator=gen)).numpy()
        others = (0.5 * torch.rand(100, 1, generator=gen)).numpy()
        assert mia_efficacy(members, others, members[:20]) == 0.0
        assert mia_efficacy(members, others, others[:20]) == 1.0

    def test_memoriser_vs_retrained(self, memorisation) -> None:
        """Shadow retained vs held-out: the memoriser's forgotten set looks like members, the retrained model's does not."""
        memoriser, retrained, forget, retain, held = memorisation
        report = attack_report(memoriser, retrained, *forget, *held, *retain, relearn_steps=(1,))
        assert report.mia_efficacy.model < 0.2 and report.mia_efficacy.reference > 0.7
        assert report.mia_members == "retained training data" and not any(n.startswith("MIA") for n in report.notes)

    def test_without_retained_data_the_reference_is_the_shadow(self, memorisation) -> None:
        """No retained data: the note says what stands in; a model equal to the reference scores as the reference."""
        memoriser, _, forget, _, held = memorisation
        report = attack_report(memoriser, memoriser, *forget, *held, relearn_steps=(1,))
        assert any("shadow is the reference" in note for note in report.notes)
        assert report.mia_efficacy.model == report.mia_efficacy.reference

    def test_a_retrained_reference_needs_the_original_as_shadow(self, memorisation) -> None:
        """No retained data, reference retrained without the forgotten set: with the memoriser as the
        shadow (it was trained on them), the memoriser's forgotten set looks like members, the retrained
        model's does not."""
        memoriser, retrained, forget, _, held = memorisation
        report = attack_report(memoriser, retrained, *forget, *held, relearn_steps=(1,), shadow=memoriser)
        assert report.mia_efficacy.model < 0.3 and report.mia_efficacy.reference > 0.7
        assert report.mia_members == "forgotten instances under the shadow model"
        assert any("the shadow is a separate model trained on them" in note for note in report.notes)


class TestProbeRecovery:
    def test_features_of_the_last_linear_are_hooked(self, learnable) -> None:
        """The penultimate probe reads the input of the last nn.Linear: (N, hidden)."""
        trained, forget, _ = learnable
        assert penultimate_features(trained, forget[0]).shape == (60, 32)

    def test_a_scrambled_head_hides_labels_the_probe_recovers(self, learnable) -> None:
        """The head is wrong on the forgotten set, yet a probe fitted on held-out features reads their labels back."""
        trained, forget, held = learnable
        broken = _head_scrambled(trained)
        assert (broken(forget[0]).argmax(1) == forget[1]).float().mean() < 0.5
        assert probe_recovery(broken, *forget, *held) > 0.95

    def test_no_linear_layer_means_no_probe(self, learnable) -> None:
        """A network without a hookable Linear gives None, not a number."""
        _, forget, held = learnable
        conv = nn.Sequential(nn.Conv2d(1, K, 8), nn.Flatten())
        assert probe_recovery(conv, *forget, *held) is None


class TestRelearning:
    def test_fine_tuning_on_held_out_data_restores_a_perturbed_head(self, learnable) -> None:
        """50 Adam steps on held-out data bring the forgotten set's accuracy back; the model itself is untouched."""
        trained, forget, held = learnable
        broken = _head_scrambled(trained)
        before = [p.detach().clone() for p in broken.parameters()]
        result = relearn_accuracy(broken, *forget, *held)
        assert list(result) == [5, 20, 50] and result[50] > 0.8 and result[50] >= result[5]
        assert (broken(forget[0]).argmax(1) == forget[1]).float().mean() < 0.5
        assert all(torch.equal(a, b) for a, b in zip(before, broken.parameters()))
        assert all(p.requires_grad for p in broken.parameters()) and not broken.training

    def test_random_labels_do_not_come_back(self, memorisation) -> None:
        """The retrained model never saw the random labels: fine-tuning on other data does not find them (~chance)."""
        _, retrained, forget, _, held = memorisation
        assert relearn_accuracy(retrained, *forget, *held)[50] < 0.5


class TestReport:
    def test_deterministic_json(self, memorisation) -> None:
        """Same seed, same report, serialisable to JSON with the reference's value beside each metric."""
        memoriser, retrained, forget, retain, held = memorisation
        first = attack_report(memoriser, retrained, *forget, *held, *retain, seed=3, relearn_steps=(2, 5))
        second = attack_report(memoriser, retrained, *forget, *held, *retain, seed=3, relearn_steps=(2, 5))
        data = json.loads(json.dumps(first.to_json()))
        assert data == second.to_json()
        assert set(data["relearn"]) == {"2", "5"} and set(data["streisand_auc"]) == {"model", "reference"}
        assert data["forget_accuracy"]["model"] == 1.0

    def test_too_few_instances_is_a_value_error(self, memorisation) -> None:
        """One forgotten instance cannot be cross-validated: ValueError naming the counts."""
        memoriser, retrained, forget, _, held = memorisation
        with pytest.raises(ValueError, match=">= 2 forgotten"):
            attack_report(memoriser, retrained, forget[0][:1], forget[1][:1], *held)

    def test_confidence_is_the_true_class_probability(self, learnable) -> None:
        """(N, 1), in [0, 1]."""
        trained, forget, _ = learnable
        conf = true_class_confidence(trained, *forget)
        assert conf.shape == (60, 1) and conf.min() >= 0 and conf.max() <= 1
