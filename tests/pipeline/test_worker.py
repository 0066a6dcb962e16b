"""Tests for streamer.service.fragments: one fragment through the engine, each request's status decided."""
from __future__ import annotations

import re
import threading

import pytest
import torch
from torch import nn

from streamer.state.checkpoints import ForgottenSet
from streamer.engine.data import Dataset
from streamer.intake.events import ForgetRequest
from streamer.pipeline.collector import Accepted
from streamer.pipeline.worker import FragmentWorker
from engine_fixtures import constant_classifier
from streamer.engine.models import Normalized
from streamer.engine.unlearn import method_config

SHAPE = (1, 2, 2)
ENGINE = dict(n_adv=0, distill_weight=0.0, lr=1e-4, seed=0)

def _accepted(requests: list[ForgetRequest]) -> list[Accepted]:
    """Requests as the collector hands them over (read from one partition, in order)."""
    return [Accepted(r, "t", 0, i, 0.0) for i, r in enumerate(requests)]



def _model(bias: float) -> Normalized:
    return constant_classifier(bias, SHAPE)


def _request(rid: str, label: int, target: int | None = None) -> ForgetRequest:
    return ForgetRequest(request_id=rid, mode="relabel" if target is not None else "misclassify", label=label,
                         target_label=target, x=torch.full(SHAPE, 0.5))


def _worker(model: nn.Module, max_steps: int = 5, audit: Dataset | None = None) -> FragmentWorker:
    return FragmentWorker(model, method_config("default", max_steps=max_steps, **ENGINE), 3,
                          ForgottenSet.empty(SHAPE), audit=audit, audit_baseline=1.0)


class TestFragmentWorker:
    def test_goals_met_give_forgotten_and_relabelled(self) -> None:
        """Instances already at their goal are forgotten / relabelled, with accuracies and the retained set."""
        audit = Dataset(torch.zeros((2, *SHAPE)), torch.tensor([0, 1]))
        worker = _worker(_model(5.0), audit=audit)
        result = worker.run(_accepted([_request("m", label=1), _request("r", label=2, target=0)]))
        assert result is not None
        assert [(s.status, s.reason) for s in result.outcomes] == [("forgotten", None), ("relabelled", None)]
        assert result.forgotten.request_ids == ("m", "r") and worker.forgotten is result.forgotten
        assert result.accuracies == {"fragment": 0.0, "forgotten": 0.0, "audit": 0.5}
        assert result.metrics["audit_baseline_accuracy"] == 1.0 and result.metrics["stopped_by"] == "goal"

    def test_step_cap_gives_failed_with_the_margin(self) -> None:
        """An instance still at its label when the step cap hits is failed, saying which cap and by how much."""
        result = _worker(_model(50.0), max_steps=2).run(_accepted([_request("m", label=0), _request("r", label=1, target=2)]))
        assert result is not None and result.outcome.stopped_by == "step_cap"
        (m, r) = result.outcomes
        assert m.status == "failed" and r.status == "failed"
        assert m.reason is not None and m.reason.startswith("step cap 2 hit: instance still predicted as its label 0")
        assert re.search(r"logit margin 49\.9\d+ above the next class", m.reason)
        assert r.reason is not None and "predicted as 0, not its target 2" in r.reason

    def test_failed_requests_stay_in_the_retained_set(self) -> None:
        """A failed instance is retained, so later fragments keep pushing it to its goal."""
        worker = _worker(_model(50.0), max_steps=1)
        worker.run(_accepted([_request("a", label=0)]))
        result = worker.run(_accepted([_request("b", label=1)]))
        assert result is not None and result.forgotten.request_ids == ("b", "a")

    def test_each_retained_instance_is_checked_after_the_fragment(self) -> None:
        """retained_met holds the goal of every retained instance on the new weights, in retained order."""
        worker = _worker(_model(50.0), max_steps=1)
        worker.run(_accepted([_request("a", label=1)]))  # predicted 0 != 1: its goal holds
        result = worker.run(_accepted([_request("b", label=0)]))  # still predicted 0 after one step: missed
        assert result is not None and result.forgotten.request_ids == ("b", "a")
        assert result.retained_met == (False, True)
        assert worker.check(["a", "b"]) == [True, False]

    def test_drop_takes_shredded_instances_out_of_the_objective(self) -> None:
        """After drop, neither the retained set nor the engine's anti-resurrection set holds the instance."""
        worker = _worker(_model(5.0))
        worker.run(_accepted([_request("a", label=1), _request("b", label=2)]))
        worker.drop({"a"})
        assert worker.forgotten.request_ids == ("b",)
        assert worker._unlearner.forgotten is not None and len(worker._unlearner.forgotten) == 1
        with pytest.raises(KeyError):
            worker.check(["a"])
        worker.drop({"b"})
        assert worker._unlearner.forgotten is None and len(worker.forgotten) == 0

    def test_cancel_returns_none_and_keeps_the_retained_set(self) -> None:
        """A cancelled fragment yields nothing to publish and does not join the retained set."""
        worker = _worker(_model(50.0), max_steps=1000)
        cancel = threading.Event()
        cancel.set()
        assert worker.run(_accepted([_request("a", label=0)]), cancel=cancel) is None
        assert len(worker.forgotten) == 0

    @pytest.mark.parametrize("bias", [5.0, 50.0])
    def test_requests_are_not_modified(self, bias: float) -> None:
        """The request tensors are the same after the fragment (the engine works on copies)."""
        request = _request("a", label=0)
        before = request.x.clone()
        _worker(_model(bias), max_steps=2).run(_accepted([request]))
        assert torch.equal(request.x, before)
