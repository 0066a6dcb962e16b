"""Probe recovery on two feature sets (engine.probes): penultimate and pre-head.

Pre-head = the input of the classifier head's first Linear: on the MNIST CNN (`Flatten, Linear,
ReLU, Linear`) the flattened convolutional features, on a one-Linear head (torchvision's ResNet,
fashion_resnet) the pooled features, i.e. the penultimate ones.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from attack_fixtures import K, learnable_case
from model_fixtures import resnet18, small_cnn
from streamer.engine.models import Normalized, fashion_resnet, mnist_cnn
from streamer.engine.probes import classifier_head, head_features, probe_recoveries, probe_recovery
from streamer.engine.verification import attack_report, penultimate_features, prehead_features


@pytest.fixture(scope="module")
def learnable():
    return learnable_case()


def _images(n: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(0))


class TestFeatures:
    def test_mnist_cnn_prehead_is_the_flatten_output(self) -> None:
        """MNIST CNN: pre-head (N, 3136) = the flattened conv features, penultimate (N, 128) = the hidden layer."""
        torch.manual_seed(0)
        net = mnist_cnn().eval()
        model, x = Normalized(net, (0.1307,), (0.3081,)).eval(), _images(5, (1, 28, 28))
        pre, pen = prehead_features(model, x), penultimate_features(model, x)
        assert pre.shape == (5, 3136) and pen.shape == (5, 128)
        with torch.no_grad():
            inputs = (x - 0.1307) / 0.3081
            assert torch.allclose(pre, net[:7](inputs)) and torch.allclose(pen, net[:9](inputs))
        assert classifier_head(model, x).describe() == ("pre-head = input of net.7 (3136 features), penultimate = "
                                                        "input of net.9 (128 features)")

    @pytest.mark.parametrize("build, shape, width", [(fashion_resnet, (1, 28, 28), 128), (resnet18, (3, 16, 16), 512)],
                             ids=["fashion_resnet", "torchvision_resnet18"])
    def test_a_one_linear_head_has_one_feature_set(self, build, shape, width) -> None:
        """ResNets end in pooling, then `fc`: pre-head and penultimate are the same (N, width) tensor."""
        torch.manual_seed(0)
        model = build().eval()
        features = head_features(model, _images(3, shape))
        assert features["prehead"] is features["penultimate"] and features["prehead"].shape == (3, width)
        head = classifier_head(model, _images(3, shape))
        assert head.single and "one probe, reported under both" in head.describe()

    def test_the_head_runs_through_activations_and_dropout_only(self) -> None:
        """Linear, ReLU, Dropout, BatchNorm1d join head layers; a Flatten before them ends the head."""
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(144, 20), nn.BatchNorm1d(20), nn.ReLU(),
                            nn.Dropout(0.2), nn.Linear(20, 12), nn.GELU(), nn.Linear(12, K)).eval()
        head = classifier_head(net, _images(2, (3, 8, 8)))
        assert [name for name, _ in head.layers] == ["2", "6", "8"]
        assert classifier_head(small_cnn(), _images(2, (3, 8, 8))).layers[0][1].in_features == 32

    def test_torchscript_has_no_hookable_head(self, learnable) -> None:
        """A scripted network: no head, no features, None probes (not a number)."""
        trained, forget, held = learnable
        scripted = torch.jit.script(copy.deepcopy(trained))
        assert classifier_head(scripted, forget[0]) is None and head_features(scripted, forget[0]) is None
        assert probe_recoveries(scripted, *forget, *held) == {"penultimate": None, "prehead": None}


class TestProbeRecovery:
    def test_prehead_probe_reads_what_a_wiped_hidden_layer_hides(self, learnable) -> None:
        """The head's hidden Linear zeroed: penultimate features are constant (probe at chance), the
        pre-head features (the pixels) still hold the labels (probe > 0.95)."""
        trained, forget, held = learnable
        wiped = copy.deepcopy(trained)
        with torch.no_grad():
            wiped[1].weight.zero_()
            wiped[1].bias.zero_()
        scores = probe_recoveries(wiped, *forget, *held)
        assert scores["penultimate"] < 0.5 and scores["prehead"] > 0.95
        assert probe_recovery(wiped, *forget, *held, features="prehead") == scores["prehead"]

    def test_unknown_feature_set_is_a_key_error(self, learnable) -> None:
        trained, forget, held = learnable
        with pytest.raises(KeyError, match="expected some of"):
            probe_recovery(trained, *forget, *held, features="logits")


class TestReport:
    def test_two_linear_head_reports_both_probes(self, learnable) -> None:
        """attack_report: both probe pairs, a note naming the layers, both in to_json and summary()."""
        trained, forget, held = learnable
        report = attack_report(trained, trained, *forget, *held, relearn_steps=(1, 2))
        assert report.probe_recovery_prehead.model == report.probe_recovery_prehead.reference > 0.9
        assert "probe: pre-head = input of 1 (64 features), penultimate = input of 3 (32 features)" in report.notes
        assert set(report.to_json()["probe_recovery_prehead"]) == {"model", "reference"}
        summary = report.summary()
        assert list(summary) == ["forget_accuracy", "probe_recovery", "probe_recovery_prehead", "relearn_2",
                                 "mia_efficacy", "loss_auc", "streisand_auc"]
        assert summary["probe_recovery_prehead"] == {"model": report.probe_recovery_prehead.model,
                                                     "reference": report.probe_recovery_prehead.reference}

    def test_one_linear_head_says_the_probes_coincide(self) -> None:
        """A one-Linear head: one probe, the same number under both names, and a note saying so."""
        one = nn.Sequential(nn.Flatten(), nn.Linear(64, K))
        trained, forget, held = learnable_case(one)
        report = attack_report(trained, trained, *forget, *held, relearn_steps=(1,))
        assert report.probe_recovery == report.probe_recovery_prehead
        assert any("one probe, reported under both" in note for note in report.notes)
