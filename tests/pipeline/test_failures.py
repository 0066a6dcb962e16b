"""The fragment-level failure policy as pure logic: bisection, restore, guard rails, aging.

`run_quarantined` is driven with a small fake worker (which requests fail is the fake's rule);
the guard rails and the aging of the retained set run on the real FragmentWorker with a tiny model.
"""
from __future__ import annotations

import threading

import pytest
import structlog
import torch

from engine_fixtures import tiny_model
from streamer.engine.unlearn import method_config
from streamer.intake.events import ForgetRequest
from streamer.pipeline.collector import Accepted
from streamer.pipeline.failures import EngineFailure, NonFiniteOutputs, UtilityFloorBreached
from streamer.pipeline.quarantine import DEFERRED_REASON, run_quarantined
from streamer.pipeline.worker import FragmentWorker
from streamer.state.checkpoints import ForgottenSet

LOG = structlog.get_logger()


def _accepted(n: int) -> list[Accepted]:
    return [Accepted(ForgetRequest(f"r{i}", "misclassify", 0, None, torch.zeros(1, 4, 4)), "t", 0, i, 0.0)
            for i in range(n)]


class _Result:
    def __init__(self, accepted: list[Accepted]):
        self.outcomes = [a.outcome("forgotten", None) for a in accepted]
        self.abandoned: dict[str, str] = {}
        self.evaluate_seconds = 0.0
        self.outcome = type("O", (), {"stage_seconds": {"unlearn": 1.0}})()


class _FakeWorker:
    """Fails any group containing a poisoned id with `error`; counts attempts and restores."""

    def __init__(self, poisoned: set[str], error: type = EngineFailure):
        self.poisoned, self.error = poisoned, error
        self.attempts, self.restores, self.applied = 0, 0, []

    def snapshot(self) -> list[str]:
        return list(self.applied)

    def restore(self, snap: list[str]) -> None:
        self.restores += 1
        self.applied = snap

    def run(self, accepted, cancel=None, progress=None):
        self.attempts += 1
        self.applied += [a.request.request_id for a in accepted]
        if self.poisoned & {a.request.request_id for a in accepted}:
            raise self.error("poisoned group")
        return _Result(accepted)


class TestBisection:
    @pytest.mark.parametrize("poisoned", [set(), {"r3"}, {"r0", "r7"}, {f"r{i}" for i in range(8)}])
    def test_every_healthy_request_is_applied_and_each_culprit_isolated(self, poisoned: set[str]) -> None:
        """Healthy requests end applied, each poisoned one failed alone, in at most 2k - 1 attempts."""
        worker = _FakeWorker(poisoned)
        run = run_quarantined(worker, _accepted(8), threading.Event(), None, LOG)
        assert {o.request_id for o in run.applied} == {f"r{i}" for i in range(8)} - poisoned
        assert {o.request_id for o in run.failed} == poisoned
        assert all(o.status == "failed" and o.version is None for o in run.failed)  # never applied
        assert worker.attempts <= 2 * 8 - 1
        assert sorted(worker.applied) == sorted(o.request_id for o in run.applied)  # failed undone
        assert len(run.trips) == worker.restores

    def test_a_utility_floor_breach_defers_the_whole_group_without_bisection(self) -> None:
        """The budget is the method's doing, not one input's: one attempt, every request deferred (owed),
        none failed, the producer-facing reason without the model's numbers (those go with `numbers`)."""
        worker = _FakeWorker({"r1"}, lambda reason: UtilityFloorBreached(reason, {"audit_drop": 0.3}))
        run = run_quarantined(worker, _accepted(8), threading.Event(), None, LOG)
        assert worker.attempts == 1 and len(run.deferred) == 8 and run.failed == [] and run.trips == ["utility_floor"]
        assert all(o.reason == DEFERRED_REASON and dict(o.numbers) == {"audit_drop": 0.3} for o in run.deferred)
        assert run.refused == {"audit_drop": 0.3} and run.applied == []


class TestGuardRails:
    def _worker(self, **kw) -> FragmentWorker:
        cfg = method_config("default", max_steps=5, n_adv=0, distill_weight=0.0)
        audit = type("D", (), {"x": torch.rand(16, 1, 4, 4), "y": torch.randint(0, 3, (16,))})()
        return FragmentWorker(tiny_model(), cfg, 3, ForgottenSet.empty((1, 4, 4)), audit=audit, **kw)

    def _requests(self, n: int = 2) -> list[Accepted]:
        g = torch.Generator().manual_seed(0)
        return [Accepted(ForgetRequest(f"q{i}", "misclassify", i % 3, None, torch.rand(1, 4, 4, generator=g)), "t", 0, i,
                         0.0) for i in range(n)]

    def test_nan_weights_are_refused_and_restore_brings_the_model_back(self) -> None:
        """A model whose outputs are NaN is never returned as a result; restore() puts the weights back."""
        worker = self._worker()
        snap = worker.snapshot()
        before = {k: v.clone() for k, v in worker.model.state_dict().items()}
        with torch.no_grad():
            for p in worker.model.parameters():
                p.fill_(float("nan"))
        with pytest.raises(NonFiniteOutputs):
            worker.run(self._requests())
        worker.restore(snap)
        assert all(torch.equal(before[k], v) for k, v in worker.model.state_dict().items())

    def test_a_drop_past_the_floor_is_refused_with_the_measured_numbers(self) -> None:
        """With a baseline above any reachable accuracy and a zero floor, the fragment is refused."""
        worker = self._worker(audit_baseline=1.0, max_audit_drop=0.0)
        with pytest.raises(UtilityFloorBreached, match=r"below the base model's 1\.0000"):
            worker.run(self._requests())


class TestAging:
    def test_an_instance_that_keeps_missing_its_goal_leaves_the_retained_set(self) -> None:
        """With one negligible step allowed, a request fails, stays retained one more fragment, then is abandoned."""
        cfg = method_config("default", max_steps=1, lr=1e-12, n_adv=0, distill_weight=0.0)
        worker = FragmentWorker(tiny_model(), cfg, 3, ForgottenSet.empty((1, 4, 4)), max_missed_fragments=2)
        x = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(1))
        label = int(worker.model(x[None]).argmax(1))  # predicted as its label: the goal is missed
        first = worker.run([Accepted(ForgetRequest("a", "misclassify", label, None, x), "t", 0, 0, 0.0)])
        assert first.outcomes[0].status == "failed" and worker.misses == {"a": 1} and not first.abandoned
        second = worker.run([Accepted(ForgetRequest("b", "misclassify", label, None, x.clone()), "t", 0, 1, 0.0)])
        assert set(second.abandoned) == {"a"} and "max_missed_fragments" in second.abandoned["a"]
        assert "a" not in second.forgotten.request_ids and worker.misses == {"b": 1}
