"""The unseen goal in the service layer: the fragment worker applies the class the engine resolved,
conflicts with other goals for the same instance are found at intake, a replay keeps the resolved
class, and receipts carry the mode and the class. Real engine, vault and checkpoint store; no broker."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from engine_fixtures import constant_classifier
from streamer.engine.models import Normalized
from streamer.engine.unlearn import method_config
from streamer.intake.events import ForgetRequest
from streamer.pipeline.collector import Accepted
from streamer.pipeline.worker import FragmentWorker
from streamer.pipeline.goals import GoalIndex
from streamer.kafka.records import receipt
from streamer.pipeline.keeper import replay_batch
from streamer.state.checkpoints import CheckpointStore, ForgottenSet
from streamer.state.kek import LocalKEK
from streamer.intake.goal import Goal
from streamer.state.outcome import RequestOutcome
from streamer.state.sealed import VaultIntegrityError
from streamer.state.vault import ForgetVault, VaultItem

SHAPE = (1, 2, 2)
ENGINE = dict(n_adv=0, distill_weight=0.0, lr=1e-4, seed=0)
X = torch.full(SHAPE, 0.5)

def _accepted(requests: list[ForgetRequest]) -> list[Accepted]:
    """Requests as the collector hands them over (read from one partition, in order)."""
    return [Accepted(r, "t", 0, i, 0.0) for i, r in enumerate(requests)]



def _request(rid: str, mode: str, label: int, target: int | None = None, x: torch.Tensor = X,
             unseen_class: int | None = None) -> ForgetRequest:
    return ForgetRequest(rid, mode, label, target, x.clone(), unseen_class=unseen_class)


def _predicting(cls: int, bias: float = 50.0) -> Normalized:
    """A classifier that predicts `cls` for every input, by `bias` logits."""
    model = constant_classifier(bias, SHAPE)
    with torch.no_grad():
        model.net[1].bias.copy_(torch.roll(model.net[1].bias, cls))
    return model


def _worker(model: Normalized, teacher: Normalized | None = None, max_steps: int = 5) -> FragmentWorker:
    return FragmentWorker(model, method_config("default", max_steps=max_steps, **ENGINE), 3, ForgottenSet.empty(SHAPE),
                          teacher=teacher)


class TestFragmentWorker:
    def test_unseen_requests_take_the_resolved_class(self) -> None:
        """The teacher's vote (class 0 here) becomes each unseen request's goal: met, `forgotten`, its
        status and the retained set hold the class (never -2) and the set marks it unseen."""
        worker = _worker(_predicting(0, 5.0))
        result = worker.run(_accepted([_request("u", "unseen", 1), _request("k", "unseen", 0), _request("m", "misclassify", 1)]))
        assert result is not None
        assert [(s.status, s.reason, s.goal.engine_target) for s in result.outcomes] == [
            ("forgotten", None, 0), ("forgotten", None, 0), ("forgotten", None, -1)]
        assert result.forgotten.target.tolist() == [0, 0, -1] and result.forgotten.unseen == {"u", "k"}
        assert worker._unlearner.forgotten is not None and worker._unlearner.forgotten.target.tolist() == [0, 0, -1]

    def test_a_missed_unseen_goal_names_the_class(self) -> None:
        """Failed: the reason says which class the unseen goal resolved to and what is predicted."""
        result = _worker(_predicting(0), teacher=_predicting(2), max_steps=1).run(_accepted([_request("u", "unseen", 0)]))
        assert result is not None
        (status,) = result.outcomes
        assert status.status == "failed" and status.goal.engine_target == 2
        assert status.reason is not None and "instance predicted as 0, not class 2, its unseen goal" in status.reason

    def test_a_capped_feature_goal_is_said_on_the_receipt_and_in_the_manifest(self) -> None:
        """A memorised instance (its label is not the warp vote) with a retain buffer: capped after 2
        steps, its class goal is met (`forgotten`) but its features are still off the prototype --
        the receipt's reason, the outcome's numbers and the fragment's manifest metrics say so
        (issue 21); an instance whose goal needs nothing says nothing."""
        from engine_fixtures import tiny_data
        from streamer.engine.data import Dataset
        from streamer.engine.unseen import unseen_classes

        def _smooth_model() -> Normalized:  # tanh features: any prototype is reachable (as in test_unseen_features)
            torch.manual_seed(0)
            return Normalized(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.Tanh(),
                                                  torch.nn.Linear(32, 3)), (0.5,), (0.25,)).eval()

        teacher = _smooth_model()
        bx, _ = tiny_data(120, seed=1)
        with torch.no_grad():
            buffer = Dataset(bx, teacher(bx).argmax(1))
        x, _ = tiny_data(1, seed=2)
        label = (int(unseen_classes(teacher, x)[0]) + 1) % 3
        worker = FragmentWorker(_smooth_model(), method_config("default", max_steps=2, n_adv=0), 3,
                                ForgottenSet.empty((1, 4, 4)), teacher=teacher, buffer=buffer)
        result = worker.run(_accepted([_request("mem", "unseen", label, x=x[0])]))
        assert result is not None and result.outcome.stopped_by == "goal"
        (out,) = result.outcomes
        assert out.status == "forgotten" and out.numbers["feature_gap"] > 0.25
        assert "feature goal not met" in out.reason and "step cap 2 hit" in out.reason
        assert json.loads(receipt(out.settled("v000001", "2026-12-07T00:00:00Z"))[1])["reason"] == out.reason
        assert result.metrics["feature_goal_met"] is False
        plain = _worker(_predicting(0, 5.0)).run(_accepted([_request("u", "unseen", 1)]))
        assert plain.metrics["feature_goal_met"] is None and plain.outcomes[0].reason is None

    def test_a_capped_confidence_part_is_said_on_its_own(self) -> None:
        """Features within tolerance but the label confidence still above its cap at the cap: the
        reason names the confidence part and the numbers carry confidence_excess; both parts met,
        or no feature goal: nothing to say."""
        from streamer.engine import FragmentOutcome
        from streamer.pipeline.worker import _feature_unmet
        from streamer.intake.goal import Goal

        cfg = method_config("default", max_steps=10)
        goal = Goal("unseen", label=3, target_class=5)
        base = dict(goal_reached=True, stopped_by="goal", steps=10, seconds=1.0, fragment_met=[True, True], missed=0,
                    resurrected_at_start=0, attack_success_ratio=1.0, feature_gaps=[0.1, 0.1], feature_tol=0.25)
        outcome = FragmentOutcome(**base, confidence_excess=[2.5, -1.0])
        reason, numbers = _feature_unmet(outcome, 0, goal, cfg)
        assert numbers == {"confidence_excess": 2.5} and "2.500 nats above" in reason and "class 5" in reason
        assert "step cap 10 hit" in reason and "prototype" not in reason
        assert _feature_unmet(outcome, 1, goal, cfg) is None
        assert outcome.feature_goal_met is False and FragmentOutcome(**base).feature_goal_met is True

    def test_a_replayed_unseen_request_keeps_its_class(self) -> None:
        """unseen_class set (a replay from the vault): no new vote, the stored class is the goal."""
        result = _worker(_predicting(0, 5.0), max_steps=1).run(_accepted([_request("u", "unseen", 2, unseen_class=1)]))
        assert result is not None and result.outcomes[0].goal.engine_target == 1 and result.forgotten.target.tolist() == [1]


class TestConflicts:
    @staticmethod
    def _index(retained: ForgottenSet | None = None) -> GoalIndex:
        retained = retained if retained is not None else ForgottenSet.empty(SHAPE)
        return GoalIndex(lambda: retained, 3)

    @pytest.mark.parametrize(("first", "second", "conflict"), [
        (("unseen", 1, None), ("misclassify", 1, None), True),
        (("unseen", 1, None), ("relabel", 1, 2), True),
        (("relabel", 1, 2), ("unseen", 1, None), True),
        (("unseen", 1, None), ("unseen", 1, None), False),
        (("misclassify", 1, None), ("relabel", 1, 2), False),  # the existing policy: 2 meets both
    ], ids=["unseen-misclassify", "unseen-relabel", "relabel-unseen", "unseen-unseen", "misclassify-relabel"])
    def test_pending(self, first: tuple, second: tuple, conflict: bool) -> None:
        """Against a pending request for the same pixels: unseen conflicts with any other mode."""
        a, b = _request("a", *first), _request("b", *second)
        rejected = self._index().conflict(b, [(a.request_id, a.goal, a.x)])
        assert (rejected is not None) == conflict
        if conflict:
            reason = rejected.reason  # what goes back to the producer: never the other request's id or goal
            assert reason.startswith("conflicts with a goal already asked for the same instance")
            assert "request a" not in reason and f"({first[0]}" not in reason and rejected.request_id == "b"
            assert rejected.detail.startswith(f"conflicts with request a for the same instance ({first[0]}")
            assert "unseen goal" in reason and "cannot be combined with a misclassify or relabel" in reason
            assert f"this request is {second[0]}" in reason  # the rejected request's own goal is named
        assert self._index().conflict(b, [(a.request_id, a.goal, torch.zeros(SHAPE))]) is None

    def test_applied(self) -> None:
        """Against the retained set, an applied unseen request (resolved to 1) is still unseen."""
        retained = ForgottenSet.empty(SHAPE).prepend(X[None], torch.tensor([0]), torch.tensor([1]), ["a"], ["a"])
        index = self._index(retained)
        rejected = index.conflict(_request("b", "relabel", 0, 1))
        assert rejected is not None and "(unseen, label 0, resolved to class 1)" in rejected.detail
        assert "resolved to class 1" not in rejected.reason and "request a" not in rejected.reason
        assert index.conflict(_request("c", "misclassify", 0)) is not None
        assert index.conflict(_request("d", "unseen", 0)) is None


    @pytest.mark.parametrize(("again", "what", "was"), [
        (("misclassify", 0, None, torch.zeros(SHAPE)), "another instance (other pixels)", ""),
        (("misclassify", 2, None, X), "another label", " (2, was 0)"),
        (("relabel", 0, 2, X), "another goal", " (relabel 0 -> 2, was misclassify, label 0)"),
        (("unseen", 0, None, X), "another goal", " (unseen, label 0, was misclassify, label 0)"),
    ], ids=["pixels", "label", "relabel", "unseen"])
    def test_a_request_id_reused_for_other_content_is_refused(self, again: tuple, what: str, was: str) -> None:
        """Pending or applied, a request_id sent again with other pixels, label or goal is refused
        (not a duplicate), saying what differs but not what the first request had (the operator's
        detail does); the same content again is a duplicate (None here)."""
        mode, label, target, x = again
        first = _request("r", "misclassify", 0)
        retained = ForgottenSet.empty(SHAPE).prepend(X[None], torch.tensor([0]), torch.tensor([-1]), ["r"])
        for index, pending in ((self._index(), [(first.request_id, first.goal, first.x)]),
                               (self._index(retained), [])):
            rejected = index.reused(_request("r", mode, label, target, x), pending)
            assert rejected is not None and f"already used by a request for {what}:" in rejected.reason, rejected
            assert f"already used by a request for {what}{was}:" in rejected.detail
            assert index.reused(_request("r", "misclassify", 0), pending) is None
            assert index.reused(_request("other", mode, label, target, x), pending) is None
        unseen = ForgottenSet.empty(SHAPE).prepend(X[None], torch.tensor([0]), torch.tensor([1]), ["u"], ["u"])
        assert self._index(unseen).reused(_request("u", "unseen", 0)) is None  # applied target: the resolved class


class TestReplay:
    def test_an_unseen_request_comes_back_with_its_resolved_class(self, tmp_path: Path) -> None:
        """replay_batch rebuilds an unseen request with the class of its manifest entry (target_class),
        checked against the vault; a mismatch is a VaultIntegrityError."""
        store = CheckpointStore(tmp_path / "ckpt")
        vault = ForgetVault.open(tmp_path / "ckpt" / "vault", LocalKEK(bytes(32)))
        vault.put([VaultItem("u", X.clone(), 2, 1)])
        entry = {"request_id": "u", "status": "forgotten", "topic": "req", "partition": 0, "offset": 0,
                 "mode": "unseen", "label": 2, "target_label": None, "target_class": 1}
        (accepted,) = replay_batch(vault, store.publish(None, {"w": torch.zeros(1)}, replay=[entry]), 1)
        assert (accepted.request.mode, accepted.request.unseen_class, accepted.request.goal.engine_target) == ("unseen", 1, 1)
        forged = store.publish("v000000", {"w": torch.zeros(1)}, replay=[{**entry, "target_class": 0}])
        with pytest.raises(VaultIntegrityError, match="has label/target 2/1, its request 2/0"):
            replay_batch(vault, forged, 1)


class TestReceipt:
    def test_mode_and_class_when_the_request_was_read(self) -> None:
        """An applied unseen request's receipt says its mode and the class it now goes to."""
        outcome = RequestOutcome(status="forgotten", request_id="u", version="v000001", reason=None, topic="t", partition=0,
                          offset=0, subject=None, completed_at="2024-05-01T12:00:00.000Z", goal=Goal("unseen", None, 4))
        body = json.loads(receipt(outcome)[1])
        assert (body["status"], body["mode"], body["target_class"]) == ("forgotten", "unseen", 4)
        assert "mode" not in json.loads(receipt(dataclasses.replace(outcome, goal=None))[1])
