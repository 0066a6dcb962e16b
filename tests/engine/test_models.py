"""streamer.engine.models: weights into the user's network inside `Normalized`, and the published
file loaded as its user loads it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from model_fixtures import INPUT, MEAN, STD, pixels, small_cnn
from streamer.engine.formats import save_user_model
from streamer.engine.models import ModelConfig, Normalized, load_net_state, published_model
from streamer.errors import ModelLoadError


class OwnWrapper(nn.Module):
    """A user's network whose own keys look like streamer's old wrapper: net.*, mean, std."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        self.register_buffer("mean", torch.zeros(1))
        self.register_buffer("std", torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


class TestLoadNetState:
    def test_bare_prefixed_and_wrapper_states_fill_the_users_net(self) -> None:
        """A bare, a DataParallel and an old wrapper state_dict all load strictly into Normalized.net."""
        trained = small_cnn(seed=4)
        for state in (trained.state_dict(), nn.DataParallel(trained).state_dict(),
                      Normalized(trained, MEAN, STD).state_dict()):
            model = Normalized(small_cnn(), MEAN, STD)
            load_net_state(model, state)
            assert torch.equal(model.net(pixels()), trained(pixels()))

    def test_wrapper_with_other_normalisation_is_refused(self) -> None:
        """An old wrapper state_dict saved with another mean/std names both and changes nothing."""
        model = Normalized(small_cnn(), MEAN, STD)
        before = model.net[0].weight.clone()
        with pytest.raises(ModelLoadError, match=r"ckpt was saved with mean \[0\.0, 0\.0, 0\.0\]"):
            load_net_state(model, Normalized(small_cnn(seed=4), (0.0,) * 3, STD).state_dict(), where="ckpt")
        assert torch.equal(model.net[0].weight, before)

    def test_users_own_wrapper_like_keys_are_kept(self) -> None:
        """A network whose own keys are net.*, mean, std loads as it is, nothing stripped."""
        theirs = OwnWrapper()
        with torch.no_grad():
            theirs.mean.fill_(0.5)
        model = Normalized(OwnWrapper(), (0.0,), (1.0,))
        load_net_state(model, theirs.state_dict())
        assert float(model.net.mean) == 0.5


class TestPublishedModel:
    @pytest.mark.parametrize("fmt", ["state_dict", "torchscript", "export"])
    def test_each_format_loads_with_the_configured_normalisation(self, fmt: str) -> None:
        """published_model reads a file of each format and predicts as Normalized(trained net) does."""
        trained = small_cnn(seed=6)
        cfg = ModelConfig(source="factory:model_fixtures:small_cnn", num_classes=10, input_shape=INPUT,
                          mean=MEAN, std=STD)
        model = published_model(cfg, save_user_model(trained, fmt, INPUT), fmt)
        assert torch.equal(model(pixels()), Normalized(trained, MEAN, STD)(pixels()))
