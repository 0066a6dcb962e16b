"""The three goals in event schema v1: misclassify, relabel and unseen; an absent mode takes the
config's default (unlearning.default_mode)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from streamer.config import parse_config
from streamer.engine.unseen import UNSEEN
from streamer.errors import ConfigError
from streamer.intake.events import InvalidEvent, SampleContext, encode_event, parse_event
from streamer.intake.resources import sample_context

SHAPE = (1, 4, 4)
CTX = SampleContext(num_classes=10, input_shape=SHAPE)
ROOT = Path(__file__).resolve().parents[2]


def _event(mode: str | None = "unseen", **extra: Any) -> bytes:
    event = json.loads(encode_event("req-1", mode, 3, torch.rand(SHAPE, generator=torch.Generator().manual_seed(0))))
    event.update(extra)
    return json.dumps(event).encode()


class TestUnseen:
    def test_unseen_event_parses_with_the_unresolved_target(self) -> None:
        """mode unseen: no target_label, engine target -2 until the class it resolved to is known."""
        request = parse_event(_event(), CTX)
        assert (request.mode, request.label, request.target_label, request.goal.engine_target) == ("unseen", 3, None, UNSEEN)

    def test_a_resolved_unseen_request_targets_its_class(self) -> None:
        """unseen_class (set when a rolled-back request is replayed) is the target; other modes ignore it."""
        request = parse_event(_event(), CTX)
        assert type(request)(**{**request.__dict__, "unseen_class": 3}).goal.engine_target == 3
        misclassify = parse_event(_event("misclassify"), CTX)
        assert type(misclassify)(**{**misclassify.__dict__, "unseen_class": 5}).goal.engine_target == -1

    def test_unseen_takes_no_target_label(self) -> None:
        """A target_label with mode unseen is rejected in one line naming the mode."""
        with pytest.raises(InvalidEvent) as info:
            parse_event(_event(target_label=4), CTX)
        assert info.value.reason == "mode unseen takes no target_label (use mode relabel)"
        assert info.value.request_id == "req-1"


class TestAbsentMode:
    def test_the_config_default_applies(self) -> None:
        """No mode (or null): misclassify by default, unseen when the context says so."""
        assert parse_event(_event(None), CTX).mode == "misclassify"
        assert parse_event(_event(None), CTX).goal.engine_target == -1
        assert parse_event(_event(mode=None), CTX).mode == "misclassify"  # a JSON null
        unseen = SampleContext(num_classes=10, input_shape=SHAPE, default_mode="unseen")
        assert parse_event(_event(None), unseen).goal.engine_target == UNSEEN
        assert parse_event(_event("misclassify"), unseen).mode == "misclassify"  # a mode given wins

    def test_a_target_label_without_mode_names_the_default(self) -> None:
        """target_label without mode: rejected, saying which default applied and what to set."""
        with pytest.raises(InvalidEvent, match=r"an event without mode \(the default, misclassify\) takes no "
                                               r"target_label \(use mode relabel\)"):
            parse_event(_event(None, target_label=4), CTX)

    def test_encode_event_leaves_mode_out_and_checks_it(self) -> None:
        """mode None writes no mode key; a mode outside the three is a ValueError."""
        assert "mode" not in json.loads(encode_event("r", None, 0, torch.zeros(SHAPE)))
        assert json.loads(encode_event("r", "unseen", 0, torch.zeros(SHAPE)))["mode"] == "unseen"
        with pytest.raises(ValueError, match="mode must be one of misclassify, relabel, unseen"):
            encode_event("r", "forget", 0, torch.zeros(SHAPE))

    @pytest.mark.parametrize("mode", ["relabel", "forget"])
    def test_the_context_refuses_a_default_that_cannot_apply(self, mode: str) -> None:
        """relabel needs a class per request, so it cannot be a default; nor can an unknown mode."""
        with pytest.raises(ConfigError, match=f"default_mode must be one of misclassify, unseen, got '{mode}'"):
            SampleContext(num_classes=10, input_shape=SHAPE, default_mode=mode)


class TestConfigDefault:
    @staticmethod
    def _parse(**unlearning: Any):
        raw = yaml.safe_load((ROOT / "config.yaml").read_text())
        raw["unlearning"].update(unlearning)
        return parse_config(raw, base_dir=Path("/base"))

    def test_default_is_misclassify_and_unseen_can_be_chosen(self) -> None:
        """unlearning.default_mode: misclassify (the paper's) unless set; unseen accepted."""
        raw = yaml.safe_load((ROOT / "config.yaml").read_text())
        del raw["unlearning"]["default_mode"]
        assert parse_config(raw, base_dir=Path("/base")).unlearning.default_mode == "misclassify"
        cfg = self._parse(default_mode="unseen")
        assert cfg.unlearning.default_mode == "unseen" and sample_context(cfg).default_mode == "unseen"

    @pytest.mark.parametrize(("value", "message"), [
        ("relabel", r"^unlearning\.default_mode: cannot be relabel: a relabel names its class per request"),
        ("forget", r"^unlearning\.default_mode: must be one of misclassify, unseen, got 'forget'"),
        (3, r"^unlearning\.default_mode: must be one of misclassify, unseen, got 3"),
    ])
    def test_bad_default_names_the_key(self, value: Any, message: str) -> None:
        """Every bad value is a ConfigError naming unlearning.default_mode."""
        with pytest.raises(ConfigError, match=message):
            self._parse(default_mode=value)
