"""Strict text in events: duplicate keys, unpaired surrogates and control characters are rejected,
and no byte string makes the parser raise anything but InvalidEvent (structure-aware fuzzing)."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer.intake.events import InvalidEvent, SampleContext, encode_event, parse_event, request_id_of

SHAPE = (1, 4, 4)
CTX = SampleContext(num_classes=10, input_shape=SHAPE)
X = torch.from_numpy((np.arange(16, dtype=np.float32) / 16).reshape(SHAPE))
VALID = encode_event("req-1", "misclassify", 3, X).decode()


def _with(fragment: str) -> bytes:
    """VALID with `fragment` (raw JSON text, e.g. '"label": 5') inserted as the first member."""
    return ("{" + fragment + "," + VALID[1:]).encode()


class TestDuplicateKeys:
    @pytest.mark.parametrize("member", ['"label": 5', '"request_id": "other"', '"mode": "relabel"', '"schema": 1'])
    def test_a_repeated_top_level_key_is_rejected(self, member: str) -> None:
        """A key given twice is ambiguous: rejected naming the key, never last-value-wins."""
        key = member.split(":")[0].strip('"')
        with pytest.raises(InvalidEvent, match=f"duplicate key '{key}'"):
            parse_event(_with(member), CTX)

    def test_a_repeated_nested_key_is_rejected(self) -> None:
        """Duplicates inside the sample object are rejected too."""
        event = VALID.replace('"dtype":"float32"', '"dtype":"uint8","dtype":"float32"')
        with pytest.raises(InvalidEvent, match="duplicate key 'dtype'"):
            parse_event(event.encode(), CTX)

    def test_an_ambiguous_request_id_is_not_guessed_for_the_receipt(self) -> None:
        """With two request_ids the rejected receipt falls back to the record key, not the last value."""
        value = _with('"request_id": "other"')
        assert request_id_of(value, b"key-1") == "key-1"
        assert request_id_of(value, None) is None


class TestUnstorableText:
    @pytest.mark.parametrize("escape", ["\\ud83d", "\\udfff", "\\u0000", "\\u001b", "\\u007f", "\\u0085"])
    def test_a_subject_that_no_store_could_show_is_rejected(self, escape: str) -> None:
        """Unpaired surrogates and control characters (JSON escapes) in a string are rejected with the code point."""
        value = _with(f'"subject": "user-{escape}"')
        with pytest.raises(InvalidEvent, match=r"U\+[0-9A-F]{4}") as err:
            parse_event(value, CTX)
        err.value.reason.encode("utf-8")  # the reason itself is storable

    def test_a_bad_key_name_is_rejected_and_the_reason_is_storable(self) -> None:
        """An unknown key holding a surrogate is rejected; the reason quotes it escaped."""
        with pytest.raises(InvalidEvent) as err:
            parse_event(_with('"x\\ud800": 1'), CTX)
        err.value.reason.encode("utf-8")

    def test_a_paired_surrogate_is_ordinary_text(self) -> None:
        """A valid astral character (a surrogate pair in JSON) is accepted."""
        request = parse_event(_with('"subject": "user-\\ud83d\\ude00"'), CTX)
        assert request.subject == "user-\U0001F600"


def _mutations() -> st.SearchStrategy[bytes]:
    """Valid events with one field replaced by arbitrary JSON, raw bytes, or a truncated value."""
    event = json.loads(VALID)
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                                                 inner, max_size=4),
                          max_leaves=10)
    keys = st.sampled_from(sorted(event) + ["sample.tensor.shape", "sample.tensor.data_b64", "sample.tensor.dtype",
                                            "extra"])

    def replace(key: str, value: object) -> bytes:
        mutated = json.loads(VALID)
        target, *path = key.split(".")
        holder = mutated
        for part in path:
            holder, target = holder[target], part
        holder[target] = value
        return json.dumps(mutated).encode()

    replaced = st.builds(replace, keys, values)
    truncated = st.integers(0, len(VALID)).map(lambda n: VALID.encode()[:n])
    noise = st.binary(max_size=200)
    b64 = st.binary(max_size=80).map(lambda raw: _with('"subject": "' + base64.b64encode(raw).decode() + '"'))
    return st.one_of(replaced, truncated, noise, b64)


class TestFuzz:
    @settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(_mutations())
    def test_any_value_parses_or_is_rejected_with_a_storable_reason(self, value: bytes) -> None:
        """parse_event either returns a request or raises InvalidEvent whose reason encodes to UTF-8."""
        try:
            request = parse_event(value, CTX)
        except InvalidEvent as err:
            assert err.reason and err.reason.encode("utf-8")
        else:
            assert request.x.shape == SHAPE and 0 <= request.label < 10
        rid = request_id_of(value, None)
        assert rid is None or rid.encode("utf-8")
