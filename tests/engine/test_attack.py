"""Invariants of the targeted L2-PGD attack (Eq. 1)."""
import pytest
import torch

from streamer.engine.attack import random_targets, targeted_l2_pgd

from engine_fixtures import tiny_data, tiny_model


class TestTargetedL2PGD:
    def test_stays_in_ball_and_pixel_range(self):
        """Every adversarial example is within eps (L2) of its input and inside [0, 1]."""
        model = tiny_model()
        x, y = tiny_data()
        res = targeted_l2_pgd(model, x, (y + 1) % 3, eps=0.5, step_size=0.1, steps=20,
                              generator=torch.Generator().manual_seed(0))
        assert (res.x - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5
        assert res.x.min() >= 0.0 and res.x.max() <= 1.0

    def test_succeeds_on_tiny_model(self):
        """With a generous budget nearly every targeted attack reaches its target."""
        model = tiny_model()
        x, y = tiny_data()
        target = (y + 1) % 3
        res = targeted_l2_pgd(model, x, target, eps=3.0, step_size=0.3, steps=60)
        assert res.success_rate >= 0.9
        assert torch.equal(res.success, model(res.x).argmax(1) == target)

    def test_input_unchanged_and_state_restored(self):
        """The input tensor, the model's train mode and requires_grad flags are left as they were."""
        model = tiny_model().train()
        model.net[1].weight.requires_grad_(False)
        x, y = tiny_data()
        before = x.clone()
        targeted_l2_pgd(model, x, (y + 2) % 3, eps=0.5, step_size=0.1, steps=5, chunk_size=7)
        assert torch.equal(x, before)
        assert model.training
        assert model.net[1].weight.requires_grad is False and model.net[3].weight.requires_grad is True
        assert all(p.grad is None for p in model.parameters())

    def test_chunking_does_not_change_results(self):
        """Chunked attacks give the same examples as one big batch (same generator seed)."""
        model = tiny_model()
        x, y = tiny_data()
        a = targeted_l2_pgd(model, x, (y + 1) % 3, eps=0.5, step_size=0.1, steps=5, chunk_size=5,
                            generator=torch.Generator().manual_seed(3))
        b = targeted_l2_pgd(model, x, (y + 1) % 3, eps=0.5, step_size=0.1, steps=5, chunk_size=100,
                            generator=torch.Generator().manual_seed(3))
        assert torch.allclose(a.x, b.x, atol=1e-5)
        assert torch.equal(a.success, b.success)


class TestRandomTargets:
    @pytest.mark.parametrize("per_instance", [1, 3, 9, 12])
    def test_never_the_label_and_spread(self, per_instance):
        """Targets never equal the label, and N_adv <= C-1 targets of one instance are distinct."""
        y = torch.tensor([0, 3, 9, 5])
        index, target = random_targets(y, per_instance, 10, torch.Generator().manual_seed(1))
        assert len(index) == len(target) == 4 * per_instance
        assert (target != y[index]).all()
        if per_instance <= 9:
            for i in range(4):
                assert len(set(target[index == i].tolist())) == per_instance


class TestEarlyExit:
    def test_successes_kept_failures_unchanged(self):
        """Early exit: every attack that succeeds without it succeeds with it, each early-exited
        example is predicted as its target, and an attack that never reaches its target follows
        exactly the path it follows without early exit."""
        model = tiny_model()
        x, y = tiny_data(40)
        target = (y + 1) % 3
        kwargs = dict(eps=0.2, step_size=0.05, steps=10)
        full = targeted_l2_pgd(model, x, target, generator=torch.Generator().manual_seed(0), **kwargs)
        early = targeted_l2_pgd(model, x, target, generator=torch.Generator().manual_seed(0), early_exit=True, **kwargs)
        assert 0 < int(full.success.sum()) < len(x)  # some succeed, some fail: both cases are exercised
        assert bool(early.success[full.success].all())
        assert torch.equal(early.success, model(early.x).argmax(1) == target)
        failed = ~early.success
        assert torch.allclose(early.x[failed], full.x[failed], atol=1e-6)
        assert (early.x - x).flatten(1).norm(dim=1).max() <= 0.2 + 1e-5


def test_attack_chunks_bound_the_pixels_attacked_at_once():
    """Up to 512 rows at 28 x 28 and 32 x 32 (unchanged there); 13 at 3 x 224 x 224."""
    from streamer.engine.attack import attack_chunk
    assert attack_chunk(torch.zeros(1, 1, 28, 28)) == 512 and attack_chunk(torch.zeros(1, 3, 32, 32)) == 512
    assert attack_chunk(torch.zeros(1, 3, 224, 224)) == 13
