"""The loss terms and goal tests of the unlearning objectives."""
import torch

from streamer.engine.objectives import distillation_loss, forget_loss, goal_gap, goal_met


class TestGoal:
    def test_gap_and_met_agree(self):
        """goal_met holds exactly where the gap is negative, for both modes."""
        logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 4.0], [0.0, 5.0, 1.0]])
        y = torch.tensor([0, 0, 2, 1])
        target = torch.tensor([-1, -1, 1, 1])  # misclassify, misclassify, relabel->1, relabel->1
        assert goal_gap(logits, y, target).tolist() == [2.0, -2.0, 4.0, -4.0]
        assert goal_met(logits, y, target).tolist() == [False, True, False, True]


class TestForgetLoss:
    def test_margin_is_zero_past_the_goal(self):
        """The margin loss stops pulling once an instance is past its goal by the margin."""
        logits = torch.tensor([[0.0, 5.0], [5.0, 0.0]], requires_grad=True)
        loss = forget_loss("margin", logits, torch.tensor([0, 0]), torch.tensor([-1, -1]), margin=1.0)
        assert loss.tolist() == [0.0, 6.0]
        loss.sum().backward()
        assert logits.grad[0].abs().sum() == 0 and logits.grad[1].tolist() == [1.0, -1.0]

    def test_neg_ce_signs(self):
        """neg_ce is -CE to the label for misclassify and +CE to the target for relabel."""
        logits = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
        loss = forget_loss("neg_ce", logits, torch.tensor([0, 0]), torch.tensor([-1, 1]), margin=0.0)
        assert loss[0] < 0 < loss[1]


class TestDistillation:
    def test_zero_for_identical_logits(self):
        """KL distillation is zero when student and teacher agree, positive otherwise."""
        t = torch.randn(5, 4)
        assert abs(float(distillation_loss(t, t, 2.0))) < 1e-6
        assert float(distillation_loss(t + torch.randn(5, 4), t, 2.0)) > 0
