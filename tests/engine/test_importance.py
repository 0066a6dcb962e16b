"""Invariants of MAS importance (Eq. 2) and the IMP penalty (Eq. 7)."""
import torch

from streamer.engine.importance import ImportancePenalty, mas_importance

from engine_fixtures import tiny_data, tiny_model


class TestMasImportance:
    def test_in_unit_range_without_nan(self):
        """Each tensor's importance is min-max normalised into [0, 1], with no NaN."""
        model = tiny_model()
        x, _ = tiny_data(8)
        omega = mas_importance(model, x, batch_size=3)
        assert set(omega) == {n for n, _ in model.named_parameters()}
        for t in omega.values():
            assert torch.isfinite(t).all() and t.min() >= 0 and t.max() <= 1
        assert any(float(t.max()) == 1.0 for t in omega.values())

    def test_constant_tensor_maps_to_zero(self):
        """A tensor whose gradients are all zero (dead units) gets importance 0, not NaN."""
        model = tiny_model()
        with torch.no_grad():
            model.net[1].bias.fill_(-100.0)  # every hidden unit dead: zero gradient for layer 3
        omega = mas_importance(model, tiny_data(4)[0])
        assert torch.equal(omega["net.3.weight"], torch.zeros_like(omega["net.3.weight"]))

    def test_mode_restored(self):
        """The model's train mode is restored after computing importance."""
        model = tiny_model().train()
        mas_importance(model, tiny_data(4)[0])
        assert model.training


class TestImportancePenalty:
    def test_zero_at_anchor_positive_away(self):
        """The penalty is exactly 0 at the anchor and > 0 once a held weight moves."""
        model = tiny_model()
        imp = ImportancePenalty(model, mas_importance(model, tiny_data(8)[0]))
        assert imp.penalty(model).item() == 0.0
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        assert imp.penalty(model).item() > 0.0

    def test_most_important_weight_is_free(self):
        """Moving only the weight with importance 1 costs nothing; moving one with importance 0 does."""
        model = tiny_model()
        omega = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        omega["net.3.bias"][0] = 1.0
        imp = ImportancePenalty(model, omega)
        with torch.no_grad():
            model.net[3].bias[0] += 1.0
        assert imp.penalty(model).item() == 0.0
        with torch.no_grad():
            model.net[3].bias[1] += 1.0
        assert imp.penalty(model).item() == 1.0
