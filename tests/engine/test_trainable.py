"""streamer.engine.trainable: the head in eager, scripted and exported models, `unlearning.trainable`
globs, and the counts logged at start."""
from __future__ import annotations

import pytest
import torch
import torchvision
import torch.nn.functional as F
from torch import nn

from model_fixtures import MEAN, STD, exported_small_cnn, pixels, resnet18, small_cnn
from streamer.engine.models import Normalized
from streamer.engine.trainable import describe_trainable, head_parameter_names, select_trainable
from streamer.errors import ConfigError


class TestHeadParameterNames:
    def test_same_names_eager_scripted_exported(self):
        """The Linear layers are found in the eager, the scripted and the exported CNN alike."""
        expected = ["5.weight", "5.bias", "7.weight", "7.bias"]
        for net in (small_cnn(), torch.jit.script(small_cnn()), exported_small_cnn()):
            assert head_parameter_names(net) == expected

    def test_names_are_relative_to_the_module_given(self):
        """Inside Normalized the names carry 'net.'; resnet18's head is fc."""
        assert head_parameter_names(Normalized(torch.jit.script(small_cnn()), MEAN, STD))[0] == "net.5.weight"
        assert head_parameter_names(resnet18()) == ["fc.weight", "fc.bias"]


class TestSelectTrainable:
    def test_head_all_and_globs_on_resnet18(self):
        """head = fc; all = every parameter; ['layer4.*', 'fc.*'] = exactly those two blocks."""
        net = resnet18()
        every = [n for n, _ in net.named_parameters()]
        assert select_trainable(net, "head") == ["fc.weight", "fc.bias"]
        assert select_trainable(net, "all") == every
        chosen = select_trainable(net, ["layer4.*", "fc.*"])
        assert chosen == [n for n in every if n.startswith(("layer4.", "fc."))] and len(chosen) == 17

    def test_chosen_names_are_the_only_parameters_that_move(self):
        """Mapping the names of ['fc.*'] to parameters and stepping moves fc and nothing else."""
        net = resnet18()
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        x = pixels(2, (3, 32, 32))
        one_step_names = select_trainable(net, ["fc.*"])
        params = dict(net.named_parameters())
        optimizer = torch.optim.SGD([params[n] for n in one_step_names], lr=0.1)
        F.cross_entropy(net(x), torch.tensor([0, 1])).backward()
        optimizer.step()
        moved = sorted(n for n, p in net.named_parameters() if not torch.equal(p, before[n]))
        assert moved == ["fc.bias", "fc.weight"]

    def test_glob_matching_nothing_is_named(self):
        """A glob that matches no parameter raises ConfigError naming the glob."""
        with pytest.raises(ConfigError, match=r"'layer5\.\*' matches no trainable parameter"):
            select_trainable(resnet18(), ["fc.*", "layer5.*"])

    def test_head_without_linear_falls_back_to_all(self):
        """A convolution-only network has no head: 'head' selects every parameter."""
        net = nn.Sequential(nn.Conv2d(3, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        assert select_trainable(net, "head") == ["0.weight", "0.bias"]

    def test_frozen_parameters_are_never_chosen(self):
        """Parameters with requires_grad=False are left out of every spec."""
        net = small_cnn()
        net[7].bias.requires_grad_(False)
        for spec in ("head", "all", ["7.*"]):
            assert "7.bias" not in select_trainable(net, spec)

    def test_bad_spec_is_a_config_error(self):
        """A string other than head/all, or an empty list, is a ConfigError."""
        for spec in ("heads", []):
            with pytest.raises(ConfigError, match="expected 'auto', 'head', 'block', 'all' or a list"):
                select_trainable(small_cnn(), spec)


class TestDescribeTrainable:
    def test_counts_per_top_level_module(self):
        """resnet18 with layer4 and fc: counts per module add up; the total is every parameter."""
        net = resnet18()
        info = describe_trainable(net, select_trainable(net, ["layer4.*", "fc.*"]))
        assert info["by_module"] == {"layer4": sum(p.numel() for p in net.layer4.parameters()), "fc": 5130}
        assert info["trainable_parameters"] == sum(info["by_module"].values())
        assert info["total_parameters"] == sum(p.numel() for p in net.parameters()) and info["trainable_tensors"] == 17

    def test_unknown_name_is_refused(self):
        """A name that is not a parameter of the net raises ValueError naming it."""
        with pytest.raises(ValueError, match="'fc.scale'"):
            describe_trainable(resnet18(), ["fc.scale"])


def test_block_preset_is_the_last_block_and_the_head():
    from streamer.engine.models import fashion_resnet, mnist_cnn
    from streamer.engine.trainable import last_block_parameter_names

    assert select_trainable(fashion_resnet(), "block") == [
        name for name, _ in fashion_resnet().named_parameters() if name.startswith(("layer3.", "fc."))]
    assert select_trainable(mnist_cnn(), "block") == ["3.weight", "3.bias", "7.weight", "7.bias", "9.weight", "9.bias"]
    chosen = select_trainable(resnet18(), "block")
    assert {n.split(".")[0] for n in chosen} == {"layer4", "fc"}
    assert {n.split(".")[1] for n in chosen if n.startswith("layer4.")} == {"1"}  # layer4's last block
    mobilenet = torchvision.models.mobilenet_v2(num_classes=10)  # features: 100% of the backbone, one child
    assert {".".join(n.split(".")[:2]) for n in select_trainable(mobilenet, "block")} == {"features.18", "classifier.1"}

    class Wrapper(nn.Module):  # a user's module around the whole network
        def __init__(self):
            super().__init__()
            self.model = fashion_resnet()

    assert select_trainable(Wrapper(), "block") == ["model." + n for n in select_trainable(fashion_resnet(), "block")]
    only_linear = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert last_block_parameter_names(only_linear) == []
    assert select_trainable(only_linear, "block") == select_trainable(only_linear, "head")


def test_auto_is_the_head_when_it_is_large_else_the_block():
    from streamer.engine.models import fashion_resnet, mnist_cnn

    assert select_trainable(mnist_cnn(), "auto") == select_trainable(mnist_cnn(), "head")  # 95% in Linear layers
    assert select_trainable(fashion_resnet(), "auto") == select_trainable(fashion_resnet(), "block")  # fc: 0.4%
    assert select_trainable(small_cnn(), "auto") == select_trainable(small_cnn(), "head")


def test_a_vision_transformer_moves_its_last_encoder_layer_and_head():
    """A ViT's encoder is full of Linear layers: the head is the trailing one (heads.head), and
    auto (= block: the head holds 0.01%) descends through the encoder wrapper and its layers to the
    last encoder layer, with the final LayerNorm passed over on the way."""
    vit = torchvision.models.vit_b_16(num_classes=10, image_size=32)
    assert head_parameter_names(vit) == ["heads.head.weight", "heads.head.bias"]
    chosen = select_trainable(vit, "auto")
    assert {"encoder_layer_11" if "encoder_layer_11." in n else n.rsplit(".", 1)[0] for n in chosen} == {
        "encoder_layer_11", "encoder.ln", "heads.head"}


def test_tied_weights_and_a_normalised_classifier():
    """A weight tied between two layers (named once) does not break `block`; ConvNeXt's classifier
    (LayerNorm2d + the head) is passed over: the block is the last CNBlock."""
    class Tied(nn.Module):  # the usual tying: an input embedding reused as the output layer
        def __init__(self):
            super().__init__()
            self.emb, self.mix, self.head = nn.Embedding(16, 32), nn.Linear(32, 32), nn.Linear(32, 16)
            self.head.weight = self.emb.weight  # named once, as emb.weight

    for spec in ("head", "block", "auto"):  # used to raise KeyError on the alias head.weight
        assert set(select_trainable(Tied(), spec)) <= {n for n, _ in Tied().named_parameters()}
    convnext = torchvision.models.convnext_tiny(num_classes=10)
    block = select_trainable(convnext, "block")
    assert {".".join(n.split(".")[:3]) for n in block if n.startswith("features")} == {"features.7.2"}
    assert {n for n in block if n.startswith("classifier")} == {
        "classifier.0.weight", "classifier.0.bias", "classifier.2.weight", "classifier.2.bias"}
