"""Every engine knob does what its name says: each `UnlearnConfig` field has a test here or elsewhere.

The unit under test is the component the knob configures (`attack.adversarial_examples`,
`steps.distill_inputs`, `steps.StepInputs`, `terms.FragmentLoss`, `unseen.FeatureGoal`), on tiny
models; `TestEveryKnobIsTested` fails when a new field arrives without a test.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine_fixtures import tiny_data, tiny_model
from streamer.engine.attack import adversarial_examples, targeted_l2_pgd
from streamer.engine.data import Dataset
from streamer.engine.fragment import Fragment
from streamer.engine.methods import UnlearnConfig, method_config
from streamer.engine.objectives import distillation_loss, forget_loss
from streamer.engine.steps import Sampler, StepInputs, distill_inputs
from streamer.engine.terms import FragmentLoss
from streamer.engine.unseen import FeatureGoal, class_prototypes

TESTS = Path(__file__).resolve().parents[1]


def _sampler(seed: int = 0) -> Sampler:
    return Sampler(torch.Generator().manual_seed(seed), torch.device("cpu"))


def _loss(cfg: UnlearnConfig, k: int = 4, n_adv: int = 6, buffer: Dataset | None = None) -> FragmentLoss:
    model = tiny_model()
    x, y = tiny_data(k)
    adv_x, adv_y = tiny_data(n_adv, seed=3)
    fragment = Fragment(x, y, torch.full_like(y, -1))
    inputs = StepInputs.build(cfg, model, tiny_model(), ["net.3.weight", "net.3.bias"], x, adv_x, adv_y, buffer,
                              _sampler())
    return FragmentLoss(cfg, model, tiny_model(), fragment, k, inputs, _sampler(), buffer)


class TestAdversarialKnobs:
    def test_adv_only_successful_keeps_only_attacks_that_reached_their_target(self) -> None:
        """With a one-step attack in a tiny ball nothing succeeds: True keeps no example, False all n_adv per instance."""
        model, (x, _) = tiny_model(), tiny_data(4)
        y = model(x).argmax(1)  # targets are other classes than the prediction: none is met from the start
        for keep_all in (False, True):
            cfg = method_config("default", n_adv=3, pgd_steps=1, pgd_eps=1e-4, adv_only_successful=not keep_all)
            adv_x, adv_y, rate = adversarial_examples(model, x, y, cfg, 3, torch.Generator().manual_seed(0))
            assert rate == 0.0 and len(adv_x) == len(adv_y) == (12 if keep_all else 0)

    @pytest.mark.parametrize(("overrides", "eps"), [
        ({"pgd_eps": 0.05}, lambda x: 0.05),
        ({"pgd_eps": 0.0, "pgd_eps_ratio": 0.02}, lambda x: 0.02 * float(x.flatten(1).norm(dim=1).mean())),
    ], ids=["pgd_eps", "pgd_eps_ratio"])
    def test_the_ball_bounds_every_perturbation(self, overrides, eps) -> None:
        """pgd_eps, or when 0 pgd_eps_ratio x the mean input norm, bounds ||x_adv - x||."""
        model, (x, y) = tiny_model(), tiny_data(4)
        cfg = method_config("default", n_adv=2, adv_only_successful=False, **overrides)
        adv_x, _, _ = adversarial_examples(model, x, y, cfg, 3, torch.Generator().manual_seed(0))
        moved = (adv_x - x.repeat_interleave(2, 0)).flatten(1).norm(dim=1)
        assert bool((moved <= eps(x) + 1e-5).all()) and bool((moved > 0).any())

    def test_pgd_step_size_is_the_step_and_zero_means_its_default(self) -> None:
        """pgd_step_size 0 is 2.5 x eps / pgd_steps (Madry et al.'s choice); another size moves elsewhere."""
        model, (x, y) = tiny_model(), tiny_data(4)

        def attack(step_size: float) -> torch.Tensor:
            cfg = method_config("default", n_adv=2, adv_only_successful=False, pgd_eps=0.5, pgd_steps=4,
                                pgd_step_size=step_size)
            return adversarial_examples(model, x, y, cfg, 3, torch.Generator().manual_seed(0))[0]
        assert torch.equal(attack(0.0), attack(2.5 * 0.5 / 4))
        assert not torch.allclose(attack(0.0), attack(0.01))

    def test_pgd_early_exit_stops_examples_at_their_target(self) -> None:
        """Early exit forwards fewer rows in all (examples predicted as their target stop) and still
        succeeds wherever the full attack does."""
        model, (x, _) = tiny_model(), tiny_data(8)
        target = (model(x).argmax(1) + 1) % 3
        rows = {}
        for early in (False, True):
            seen = []
            hook = model.register_forward_hook(lambda _m, i, _o: seen.append(len(i[0])))
            result = targeted_l2_pgd(model, x, target, eps=3.0, step_size=0.5, steps=30, early_exit=early,
                                     generator=torch.Generator().manual_seed(0))
            hook.remove()
            rows[early] = (sum(seen), result.success)
        assert rows[True][0] < rows[False][0]
        assert bool((rows[True][1] | ~rows[False][1]).all())


class TestDistillationKnobs:
    def test_distill_warp_shift_adds_noise_affine_does_not(self) -> None:
        """On black images mixups and affine warps stay black; `shift` rolls and adds noise."""
        black = torch.zeros(4, 1, 4, 4)
        affine = distill_inputs(black, black[:0], 64, "affine", _sampler())
        shift = distill_inputs(black, black[:0], 64, "shift", _sampler())
        assert float(affine.abs().max()) == 0.0 and float(shift.max()) > 0.0
        assert affine.shape == shift.shape == (64, 1, 4, 4) and float(shift.min()) >= 0.0

    def test_distill_halve_every_halves_the_weight(self) -> None:
        """The distillation weight halves every distill_halve_every steps; 0 never halves it."""
        loss = _loss(method_config("default", distill_weight=8.0, distill_halve_every=10))
        assert [loss.distill_weight(s) for s in (0, 9, 10, 25)] == [8.0, 8.0, 4.0, 2.0]
        assert _loss(method_config("default", distill_weight=8.0, distill_halve_every=0)).distill_weight(10_000) == 8.0

    @pytest.mark.parametrize("temperature", [1.0, 4.0])
    def test_distill_temperature_is_the_kl_temperature(self, temperature: float) -> None:
        """The distillation term is Hinton's KL at distill_temperature, on the pool rows the step drew."""
        loss = _loss(method_config("default", distill_temperature=temperature, distill_pool=16, distill_batch=8))
        logits = loss.inputs.logits(loss.cfg, loss.sampler, objective=True)
        student, pick, *_ = logits["distill"]
        expected = distillation_loss(student, loss.inputs.pool_teacher[pick], temperature)
        assert torch.allclose(loss.distillation(logits), expected)


class TestObjectiveKnobs:
    @pytest.mark.parametrize("adv_weight", [0.0, 2.5])
    def test_weighting_and_adv_weight(self, adv_weight: float) -> None:
        """`fragment`: forget term / k + adv_weight x the adversarial batch's mean CE; `proportional`
        (Eq. 6): one mean over D_f and D_adv, the adversarial sum weighted by adv_weight."""
        for weighting in ("fragment", "proportional"):
            loss = _loss(method_config("default", weighting=weighting, adv_weight=adv_weight, adv_batch=4))
            logits = loss.inputs.logits(loss.cfg, loss.sampler, objective=True)
            (z, *_), (adv, pick, *_) = logits["objective"], logits["adv"]
            forget = forget_loss("margin", z, loss.objective.y, loss.objective.target, loss.cfg.margin)
            if weighting == "fragment":
                assert pick is not None and len(pick) == 4  # adv_batch of the 6 examples
                expected = forget.sum() / 4 + adv_weight * F.cross_entropy(adv, loss.inputs.adv_y[pick])
            else:
                assert pick is None and len(adv) == 6  # every example
                expected = (forget.sum() + adv_weight * F.cross_entropy(adv, loss.inputs.adv_y, reduction="sum")) / 10
            assert torch.allclose(loss.forget_and_adversarial(logits), expected)

    def test_buffer_weight_scales_the_buffer_cross_entropy(self) -> None:
        """The retain buffer adds buffer_weight x the cross-entropy of the buffer batch to its labels."""
        bx, by = tiny_data(20, seed=5)
        totals = {}
        for weight in (0.0, 3.0):
            loss = _loss(method_config("default", buffer_weight=weight, distill_weight=0.0, buffer_batch=8),
                         buffer=Dataset(bx, by))
            logits = loss.inputs.logits(loss.cfg, _sampler(1), objective=True)
            totals[weight] = loss(logits, 0)
            if weight:
                out, pick, *_ = logits["buffer"]
                ce = F.cross_entropy(out, by[pick])
        assert torch.allclose(totals[3.0] - totals[0.0], 3.0 * ce, atol=1e-5)

    def test_unseen_feature_weight_scales_the_feature_term_and_zero_turns_it_off(self) -> None:
        """The feature goal's loss is unseen_feature_weight x the mean squared relative distance of the
        row's penultimate features to its class prototype; weight 0: no goal at all."""
        student, teacher, buffer = tiny_model(seed=1), tiny_model(), Dataset(*tiny_data(30, seed=2))
        y, target, unseen = torch.tensor([0]), torch.tensor([1]), torch.tensor([True])  # memorised: class != label
        assert FeatureGoal.build(student, teacher, buffer, 3, y, target, unseen, 0.25, 0.0) is None
        goal = FeatureGoal.build(student, teacher, buffer, 3, y, target, unseen, 0.25, 2.0)
        assert goal is not None
        caught = []
        handle = goal.head.register_forward_hook(lambda _m, i, _o: caught.append(i[0]))
        with goal:
            goal.clear()
            student(tiny_data(1, seed=9)[0])
            met, term = goal.check()
        handle.remove()
        prototype = class_prototypes(teacher, buffer, 3)[1]
        gap = (caught[0][0] - prototype).pow(2).sum() / prototype.pow(2).sum()
        assert torch.allclose(term, 2.0 * gap) and met == bool(gap.sqrt() <= 0.25)


    def test_unseen_confidence_weight_and_neighbours_set_the_confidence_term(self) -> None:
        """check(logits) adds unseen_confidence_weight x relu(phi_y - cap) (phi: the label confidence
        of the row on the label it was trained with; cap: the teacher's median over the buffer's
        images of its class, or over its `unseen_confidence_neighbours` nearest ones); weight 0: none."""
        from streamer.engine.methods import UnlearnConfig
        from streamer.engine.unseen import confidence_caps, label_confidence

        student, teacher, buffer = tiny_model(seed=1), tiny_model(), Dataset(*tiny_data(30, seed=2))
        x = tiny_data(1, seed=9)[0]
        with torch.no_grad():
            y = student(x).argmax(1)  # memorised: sure of y, which is not its class
        target, unseen = (y + 1) % 3, torch.tensor([True])
        assert UnlearnConfig().unseen_confidence_weight == 1.0 and UnlearnConfig().unseen_confidence_neighbours == 8
        terms = {}
        for weight, neighbours in ((0.0, 0), (2.0, 0), (2.0, 3)):
            goal = FeatureGoal.build(student, teacher, buffer, 3, y, target, unseen, 0.25, 1.0, weight, x, neighbours)
            with goal:
                goal.clear()
                logits = student(x)
                _, terms[weight, neighbours] = goal.check(logits)
            cap = confidence_caps(teacher, buffer, target, y, x, neighbours)
            assert (goal.caps is None) == (weight == 0) and (weight == 0 or torch.allclose(goal.caps, cap))
        for neighbours in (0, 3):
            cap = confidence_caps(teacher, buffer, target, y, x, neighbours)
            excess = F.relu(label_confidence(logits, y) - cap).mean()
            assert excess > 0.1
            assert torch.allclose(terms[2.0, neighbours] - terms[0.0, 0], 2.0 * excess, atol=1e-6)
        low = FeatureGoal.build(student, teacher, buffer, 3, y, target, unseen, 0.25, 1.0, 1.0, x, 0, quantile=0.1)
        assert torch.allclose(low.caps, confidence_caps(teacher, buffer, target, y, x, 0, quantile=0.1))
        assert bool((low.caps < confidence_caps(teacher, buffer, target, y, x, 0)).all())  # unseen_confidence_quantile


class TestAnchor:
    def test_anchor_weight_adds_the_l2_distance_to_the_original(self) -> None:
        """anchor_weight x sum((p - p0)^2) over the trainable parameters (L2-SP); 0 adds nothing."""
        totals = {}
        for weight in (0.0, 2.0):
            loss = _loss(method_config("default", anchor_weight=weight, distill_weight=0.0))
            p = loss.model.net[3].weight
            loss.anchor = ((p, p.detach() + 0.5),)  # the original's value, 0.5 away in every element
            totals[weight] = loss(loss.inputs.logits(loss.cfg, _sampler(2), objective=True), 0)
        assert torch.allclose(totals[2.0] - totals[0.0], torch.tensor(2.0 * 0.25 * p.numel()), rtol=1e-5)


class TestEveryKnobIsTested:
    def test_each_engine_field_is_named_in_a_test(self) -> None:
        """A knob no test names is untested (or should be deprecated): every UnlearnConfig field
        appears in a test file other than this check."""
        text = "".join(p.read_text() for p in TESTS.rglob("test_*.py") if p.name != "test_knobs.py")
        text += Path(__file__).read_text().split("class TestEveryKnobIsTested")[0]
        assert [f.name for f in fields(UnlearnConfig) if f.name not in text] == []
