"""The frozen prefix: where a network is split, and that the split computes the model's logits."""
import torch
from torch import nn

from streamer.engine.models import Normalized
from streamer.engine.prefix import (cpu_channels_last, frozen_prefix_length, plan_split, rows_independent,
                                    split_frozen_prefix)
from streamer.engine.trainable import select_trainable

from engine_fixtures import tiny_model


def _bn_cnn() -> Normalized:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                        nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3))
    model = Normalized(net, (0.5,), (0.25,))
    with torch.no_grad():  # non-trivial running statistics, so eval mode visibly differs from train mode
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    return model.eval()


class _OwnForward(nn.Sequential):
    def forward(self, x):  # not Sequential's forward: cannot be split
        return super().forward(x) * 2


class TestFrozenPrefixLength:
    def test_head_and_globs(self):
        """The prefix ends at the first top-level child holding a trainable parameter."""
        net = _bn_cnn().net
        assert frozen_prefix_length(net, select_trainable(net, "head")) == 5
        assert frozen_prefix_length(net, select_trainable(net, ["7.*"])) == 7
        assert frozen_prefix_length(net, select_trainable(net, ["1.*", "7.*"])) == 1
        assert frozen_prefix_length(net, select_trainable(net, "all")) == 0

    def test_unsplittable_networks(self):
        """TorchScript, a custom forward and a non-Sequential module are not split."""
        net = tiny_model().net
        names = select_trainable(net, "head")
        assert frozen_prefix_length(torch.jit.script(net), names) is None
        assert frozen_prefix_length(_OwnForward(*net.children()), names) is None
        assert frozen_prefix_length(Normalized(net, (0.0,), (1.0,)), ["net.1.weight"]) is None

    def test_nothing_to_cache(self):
        """A prefix of length 0 (every layer may move) or an unsplittable net gives no split."""
        model = _bn_cnn()
        assert split_frozen_prefix(model, select_trainable(model.net, "all")) is None
        assert split_frozen_prefix(torch.jit.script(model.net), ["5.weight"]) is None


class TestSplit:
    def test_suffix_of_prefix_is_the_model_in_eval_mode(self):
        """suffix(prefix(x)) equals model(x) with BatchNorm running statistics and dropout off."""
        model = _bn_cnn()
        split = split_frozen_prefix(model, select_trainable(model.net, "head"))
        x = torch.rand(10, 1, 4, 4)
        assert split is not None and split.cut == "child 5 of the Sequential"
        feats = split.features(x)
        assert not feats.requires_grad and feats.shape == (10, 64)
        with torch.no_grad():
            assert torch.allclose(split.suffix(feats), model(x), atol=1e-6)

    def test_shares_the_model_parameters(self):
        """The suffix holds the model's own parameters: an update through it is the model's."""
        model = _bn_cnn()
        split = split_frozen_prefix(model, select_trainable(model.net, "head"))
        assert {id(p) for p in split.suffix.parameters()} == {id(p) for p in model.net[5:].parameters()}


class _Viewing(nn.Module):
    """Flattens with .view, which a channels-last activation refuses."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        out = self.conv(x).relu()
        return self.fc(out.view(out.size(0), -1))


class TestChannelsLast:
    def test_copy_computes_the_same_logits(self):
        """A channels-last copy: conv weights in that layout, the same logits, the original untouched."""
        model = _bn_cnn()
        copy = cpu_channels_last(model, torch.rand(2, 1, 4, 4))
        x = torch.rand(9, 1, 4, 4)
        assert copy is not model
        assert copy.net[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert model.net[0].weight.is_contiguous()
        with torch.no_grad():
            assert torch.allclose(copy(x), model(x), atol=1e-6)

    def test_modules_used_as_they_are(self):
        """No 4-D weight, TorchScript, or a forward hook (a copy would call it with other modules):
        the module itself."""
        example = torch.rand(2, 1, 4, 4)
        mlp = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        assert cpu_channels_last(mlp, example) is mlp
        scripted = torch.jit.script(_bn_cnn().net)
        assert cpu_channels_last(scripted, example) is scripted
        wrapped = Normalized(scripted, (0.5,), (0.25,))
        assert cpu_channels_last(wrapped, example) is wrapped
        hooked = _bn_cnn()
        hooked.net[5].register_forward_hook(lambda *_: None)
        assert cpu_channels_last(hooked, example) is hooked

    def test_a_forward_that_fails_or_differs_on_the_copy_keeps_the_module(self):
        """A forward that .views its activations fails on a channels-last copy: the module itself is
        used (and evaluates as before); its mode is restored after the trial."""
        from streamer.engine.evaluate import logits

        viewing = _Viewing().train()
        assert cpu_channels_last(viewing, torch.rand(2, 1, 4, 4)) is viewing and viewing.training
        x = torch.rand(300, 1, 4, 4)  # large enough for logits() to try the copy
        with torch.no_grad():
            assert torch.allclose(logits(viewing, x), viewing.eval()(x), atol=1e-6)

    def test_features_in_chunks_equal_one_batch(self):
        """FrozenPrefix.features computes in chunks; the rows are those of one batch, in the
        default layout whatever the prefix's."""
        model = _bn_cnn()
        split = split_frozen_prefix(model, select_trainable(model.net, "head"))
        x = torch.rand(21, 1, 4, 4)
        assert torch.allclose(split.features(x, chunk=4), split.features(x, chunk=64), atol=1e-6)
        split = split_frozen_prefix(model, select_trainable(model.net, ["1.*", "5.*", "7.*"]))  # the prefix: the conv
        cl = split.__class__(cpu_channels_last(split.prefix, x[:2]), split.suffix, split.cut)
        assert cl.prefix is not split.prefix and cl.prefix(x).dim() == 4
        assert not cl.prefix(x).is_contiguous() and cl.features(x).is_contiguous()
        assert torch.allclose(cl.features(x), split.features(x), atol=1e-6)

    def test_rows_independent(self):
        """Rows may be batched together unless BatchNorm normalises by the batch, or the module is
        TorchScript / torch.export (batch sizes may be bounded)."""
        assert rows_independent(_bn_cnn())
        assert not rows_independent(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False)))
        assert not rows_independent(Normalized(torch.jit.script(_bn_cnn().net), (0.5,), (0.25,)))


class _Branching(nn.Module):
    """A user's own forward: a shape check (traced on a meta row), a skip, a scale."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc1, self.fc2 = nn.Linear(64, 16), nn.Linear(16, 3)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        if x.shape[-2:] != (4, 4):
            raise ValueError("4x4 only")
        z = self.bn(self.conv(x)).relu().flatten(1)
        return self.fc2(self.fc1(z).relu()) * self.scale


class TestTracedSplit:
    """Any network torch.fx can trace is split before its first trainable operation (issue 24)."""

    def _same(self, model, split, x):
        with torch.no_grad():
            return torch.allclose(split.suffix(split.features(x)), model(x), atol=1e-5)

    def test_torchvision_resnet_splits_before_the_last_block(self):
        from torchvision.models import resnet18
        net = resnet18(num_classes=10).eval()
        model = Normalized(net, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).eval()
        names = select_trainable(net, "auto")
        x = torch.rand(5, 3, 32, 32)
        split, why = plan_split(model, names, x[:2])
        assert split is not None and split.path == "traced" and why.startswith("traced:")
        assert split.cut.startswith("layer4_0")  # layer4.0's output: layer4.1 and fc move
        assert not any(p in {id(q) for q in split.prefix.parameters()} for p in map(id, net.layer4[1].parameters()))
        assert self._same(model, split, x)
        own = dict(net.named_parameters())
        assert {id(own[n]) for n in names} <= {id(p) for p in split.suffix.parameters()}
        assert rows_independent(split.suffix)

    def test_shape_checking_forward_traced_on_a_meta_row(self):
        model = Normalized(_Branching(), (0.5,), (0.25,)).eval()
        with torch.no_grad():
            model.net.bn.running_mean.uniform_(-1, 1)
        split = split_frozen_prefix(model, ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"], torch.rand(2, 1, 4, 4))
        assert split is not None and split.path == "traced"
        assert self._same(model, split, torch.rand(7, 1, 4, 4))
        assert split.features(torch.rand(3, 1, 4, 4)).shape == (3, 64)
        assert plan_split(model, ["fc1.weight"])[0] is None  # no rows: nothing traced

    def test_no_split_where_it_would_not_compute_the_model(self):
        """A trainable scale used at the input, a data-dependent branch, two activations across the
        cut, and an in-place write into the cached features: the whole model, with the reason."""
        x = torch.rand(2, 1, 4, 4)
        net = _Branching().eval()
        assert plan_split(net, ["conv.weight"], x) == (None, "whole model: its first operation moves")

        class DataDependent(_Branching):
            def forward(self, x):
                return super().forward(x) if x.sum() > 0 else -super().forward(x)
        split, why = plan_split(DataDependent().eval(), ["fc2.weight"], x)
        assert split is None and why.startswith("whole model: torch.fx cannot trace it")

        class Crossing(_Branching):
            def forward(self, x):
                z = self.conv(x).flatten(1)
                return self.fc2(self.fc1(z)) + z[:, :3]
        split, why = plan_split(Crossing().eval(), ["fc2.weight"], x)
        assert split is None and why == "whole model: 2 activations cross the cut"

        class InPlace(_Branching):
            def forward(self, x):  # an in-place write that changes nothing until `scale` moves
                return self.fc2(self.fc1(self.conv(x).flatten(1).mul_(self.scale)))
        assert plan_split(InPlace().eval(), ["scale"], x) == (None, "whole model: the suffix writes into its input")

    def test_exported_program_splits_and_trains_its_own_parameters(self):
        net = _Branching().eval()
        x = torch.rand(3, 1, 4, 4)
        exported = torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)).module()
        names = [n for n, _ in exported.named_parameters() if n.startswith("fc2")]
        split, why = plan_split(exported, names, x[:2])
        assert split is not None and split.path == "traced", why
        assert self._same(exported, split, x)
        own = dict(exported.named_parameters())
        assert {id(own[n]) for n in names} <= {id(p) for p in split.suffix.parameters()}
        assert not rows_independent(split.suffix)  # an exported graph is not batched freely

    def test_teacher_suffix_shares_the_traced_cut(self):
        from streamer.engine.steps import _same_prefix_suffix
        from streamer.engine.formats import clone_module
        model = Normalized(_Branching(), (0.5,), (0.25,)).eval()
        teacher = clone_module(model).eval()
        names = ["fc2.weight", "fc2.bias"]
        x = torch.rand(4, 1, 4, 4)
        split = split_frozen_prefix(model, names, x[:2])
        suffix = _same_prefix_suffix(teacher, split, names, x[:2])
        with torch.no_grad():
            assert torch.allclose(suffix(split.features(x)), teacher(x), atol=1e-6)

    def test_convolutions_on_one_pixel_become_their_center_tap_with_the_same_gradient(self):
        """At 32 x 32 a ResNet's last stage sees 1 x 1 inputs: its 3 x 3 convolutions run as their
        centre tap, with the same logits and the same weight gradient as the whole model's."""
        from torchvision.models import resnet18

        from streamer.engine.traced import _CenterTap
        net = resnet18(num_classes=10).eval()
        names = select_trainable(net, "auto")
        x = torch.rand(6, 3, 32, 32)
        split = split_frozen_prefix(net, names, x[:2])
        assert sum(isinstance(m, _CenterTap) for m in split.suffix.modules()) == 2  # layer4.1.conv1, conv2
        weight = net.layer4[1].conv1.weight
        split.suffix(split.features(x)).square().sum().backward()
        tapped, weight.grad = weight.grad.clone(), None
        net(x).square().sum().backward()
        assert torch.allclose(tapped, weight.grad, rtol=1e-4, atol=1e-6)
        assert tapped[:, :, 0, 0].abs().max() == 0  # only the centre tap meets a 1 x 1 input


class TestTracedSplitRefuses:
    """Found by trying it (issue 24): splits that gave the right logits but the wrong gradients or
    features are refused or marked; the whole model runs instead."""

    def test_a_tied_weight_used_before_the_cut_and_a_no_grad_block(self):
        x = torch.rand(2, 1, 4, 4)

        class Tied(nn.Module):
            def __init__(self):
                super().__init__()
                self.head = nn.Linear(16, 16)  # registered first: the shared weight is named head.weight
                self.conv, self.proj = nn.Conv2d(1, 1, 3, padding=1), nn.Linear(16, 16)
                self.proj.weight = self.head.weight

            def forward(self, x):
                return self.head(self.proj(self.conv(x).flatten(1)).relu())  # the tied weight before the cut

        torch.manual_seed(0)
        split, why = plan_split(Tied().eval(), ["head.weight", "head.bias"], x)
        assert split is None and why == "whole model: a trainable parameter is used before the cut"

        class NoGrad(_Branching):
            def forward(self, x):
                z = self.bn(self.conv(x)).relu().flatten(1)
                with torch.no_grad():
                    z = self.fc1(z).relu()
                return self.fc2(z)
        split, why = plan_split(NoGrad().eval(), ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"], x)
        assert split is None and why == "whole model: the traced split gives other gradients"

    def test_an_in_place_write_in_an_exported_graph(self):
        class InPlace(_Branching):
            def forward(self, x):
                return self.fc2(self.fc1(self.conv(x).flatten(1).mul_(self.scale)))
        x = torch.rand(3, 1, 4, 4)
        exported = torch.export.export(InPlace().eval(), (x,),
                                       dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)).module()
        assert plan_split(exported, ["scale"], x[:2]) == (None, "whole model: the suffix writes into its input")

    def test_a_batch_statistic_in_the_prefix_is_never_chunked(self):
        class BatchStat(_Branching):
            def forward(self, x):
                z = self.conv(x).flatten(1)
                return self.fc2(self.fc1(z - z.mean(0)).relu())
        model = BatchStat().eval()
        x = torch.rand(300, 1, 4, 4)
        split = split_frozen_prefix(model, ["fc1.weight", "fc2.weight"], x[:2])
        assert split is not None and not rows_independent(split.prefix)
        with torch.no_grad():
            assert torch.allclose(split.suffix(split.features(x)), model(x), atol=1e-5)
