"""The frozen prefix: where a network is split, and that the split computes the model's logits."""
import torch
from torch import nn

from streamer.engine.models import Normalized
from streamer.engine.prefix import cpu_channels_last, frozen_prefix_length, rows_independent, split_frozen_prefix
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
        assert split is not None and split.length == 5
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
        cl = split.__class__(cpu_channels_last(split.prefix, x[:2]), split.suffix, split.length)
        assert cl.prefix is not split.prefix and cl.prefix(x).dim() == 4
        assert not cl.prefix(x).is_contiguous() and cl.features(x).is_contiguous()
        assert torch.allclose(cl.features(x), split.features(x), atol=1e-6)

    def test_rows_independent(self):
        """Rows may be batched together unless BatchNorm normalises by the batch, or the module is
        TorchScript / torch.export (batch sizes may be bounded)."""
        assert rows_independent(_bn_cnn())
        assert not rows_independent(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False)))
        assert not rows_independent(Normalized(torch.jit.script(_bn_cnn().net), (0.5,), (0.25,)))
