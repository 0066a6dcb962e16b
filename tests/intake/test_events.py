"""Deletion-event schema v1: every sample form parses, every malformed event is rejected."""
from __future__ import annotations

import base64
import copy
import io
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from streamer.errors import ConfigError, StreamerError
from streamer.intake.events import (
    ForgetRequest,
    InvalidEvent,
    SampleContext,
    encode_event,
    parse_event,
    request_id_of,
)

SHAPE = (1, 4, 4)  # (C, H, W)
GRAY = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16  # (H, W), distinct values


def _png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt)
    return out.getvalue()


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    """A uri root holding one file of each supported kind plus hostile ones, and a file outside it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    flat = np.full((4, 4), 128, dtype=np.uint8)  # constant: JPEG keeps it (almost) exactly
    (root / "a.png").write_bytes(_png(GRAY))
    (root / "a.jpg").write_bytes(_png(flat, "JPEG"))
    (root / "sub" / "a.jpeg").write_bytes(_png(flat, "JPEG"))
    np.save(root / "a.npy", GRAY[np.newaxis].astype(np.float32) / 255.0)
    torch.save(torch.from_numpy(GRAY[np.newaxis].copy()), root / "a.pt")
    np.save(root / "pickled.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    torch.save({"x": torch.zeros(SHAPE)}, root / "dict.pt")
    (root / "garbage.pt").write_bytes(b"not a torch file")
    (root / "garbage.png").write_bytes(b"not an image")
    (root / "notes.txt").write_text("hello")
    (root / "dir.png").mkdir()
    (outside / "secret.png").write_bytes(_png(GRAY))
    os.symlink(outside / "secret.png", root / "link_out.png")
    return {"root": root, "outside": outside}


@pytest.fixture()
def ctx(files: dict[str, Path]) -> SampleContext:
    images = torch.rand(5, *SHAPE)
    return SampleContext(num_classes=10, input_shape=SHAPE, uri_roots=(files["root"],),
                         datasets={"digits": images})


def _event(**overrides: Any) -> dict[str, Any]:
    x = torch.from_numpy(GRAY[np.newaxis].astype(np.float32) / 255.0)
    event = json.loads(encode_event("req-1", "misclassify", 3, x))
    event.update(overrides)
    return event


def _encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode("utf-8")


def _tensor_sample(array: np.ndarray, dtype: str | None = None, shape: Any = None) -> dict[str, Any]:
    return {"tensor": {"dtype": dtype or str(array.dtype), "shape": list(array.shape) if shape is None else shape,
                       "data_b64": base64.b64encode(array.tobytes()).decode()}}


class TestValidEvents:
    def test_float32_tensor_round_trips_through_encode_event(self, ctx: SampleContext) -> None:
        """encode_event's output parses back to the same request and pixels."""
        x = torch.rand(SHAPE)
        req = parse_event(encode_event("r:1.a_b-c", "relabel", 2, x, target_label=7, subject="user-9"), ctx)
        assert isinstance(req, ForgetRequest)
        assert (req.request_id, req.mode, req.label, req.target_label, req.subject) == ("r:1.a_b-c", "relabel", 2, 7, "user-9")
        assert req.goal.engine_target == 7
        assert req.x.dtype == torch.float32 and torch.equal(req.x, x)

    def test_misclassify_target_is_minus_one(self, ctx: SampleContext) -> None:
        """A misclassify request has no target_label and target -1."""
        req = parse_event(_encode(_event()), ctx)
        assert req.target_label is None and req.goal.engine_target == -1

    def test_uint8_tensor_is_scaled_to_unit_range(self, ctx: SampleContext) -> None:
        """uint8 tensor data is divided by 255."""
        req = parse_event(_encode(_event(sample=_tensor_sample(GRAY[np.newaxis]))), ctx)
        assert torch.allclose(req.x, torch.from_numpy(GRAY[np.newaxis] / 255.0).float())

    def test_gray_png_image(self, ctx: SampleContext) -> None:
        """A grayscale PNG of the input size decodes losslessly to (1, H, W)."""
        sample = {"image_b64": base64.b64encode(_png(GRAY)).decode()}
        req = parse_event(_encode(_event(sample=sample)), ctx)
        assert req.x.shape == SHAPE
        assert torch.allclose(req.x[0], torch.from_numpy(GRAY / 255.0).float())

    def test_rgb_png_image_is_channels_first(self, files: dict[str, Path]) -> None:
        """An RGB PNG becomes (3, H, W) with channel 0 red."""
        rgb = np.zeros((4, 5, 3), dtype=np.uint8)
        rgb[..., 0] = 255
        ctx3 = SampleContext(num_classes=10, input_shape=(3, 4, 5))
        req = parse_event(_encode(_event(sample={"image_b64": base64.b64encode(_png(rgb)).decode()})), ctx3)
        assert req.x.shape == (3, 4, 5)
        assert req.x[0].min() == 1.0 and req.x[1:].max() == 0.0

    @pytest.mark.parametrize("name", ["a.png", "a.jpg", "sub/a.jpeg", "a.npy", "a.pt"])
    def test_uri_file_of_each_type(self, ctx: SampleContext, files: dict[str, Path], name: str) -> None:
        """Every supported file type under a root loads to the expected pixels."""
        uri = (files["root"] / name).as_uri()
        req = parse_event(_encode(_event(sample={"uri": uri})), ctx)
        expected = 128 / 255.0 if "jp" in name else torch.from_numpy(GRAY[np.newaxis] / 255.0).float()
        assert req.x.shape == SHAPE and req.x.dtype == torch.float32
        assert torch.allclose(req.x, torch.as_tensor(expected, dtype=torch.float32).expand(SHAPE), atol=3 / 255)

    def test_dataset_sample_is_a_copy(self, ctx: SampleContext) -> None:
        """A dataset sample equals the indexed image and does not alias it."""
        req = parse_event(_encode(_event(sample={"dataset": "digits", "index": 4})), ctx)
        assert torch.equal(req.x, ctx.datasets["digits"][4])
        req.x.zero_()
        assert not torch.equal(req.x, ctx.datasets["digits"][4])

    def test_the_sample_reference_is_kept_for_the_exclusion_list(self, ctx: SampleContext,
                                                                 files: dict[str, Path]) -> None:
        """{dataset, index} and {uri} samples keep where they came from (a retraining matches on it);
        inline pixels have none."""
        uri = (files["root"] / "a.png").as_uri()
        refs = [parse_event(_encode(_event(sample=sample)), ctx).sample_ref for sample in (
            {"dataset": "digits", "index": 4}, {"uri": uri})]
        assert refs == [{"dataset": "digits", "index": 4}, {"uri": uri}]
        assert parse_event(_encode(_event()), ctx).sample_ref is None

    def test_dataset_sample_label_must_be_the_datasets(self, ctx: SampleContext) -> None:
        """With the dataset's labels known, a dataset sample under another label is invalid whatever the
        mode (misclassify would be 'met' with the model unchanged); its own label passes."""
        labels = dataclasses.replace(ctx, dataset_labels={"digits": torch.tensor([0, 1, 2, 3, 7])})
        assert parse_event(_encode(_event(label=7, sample={"dataset": "digits", "index": 4})), labels).label == 7
        for mode, extra in (("misclassify", {}), ("unseen", {}), ("relabel", {"target_label": 7})):
            bad = _event(label=3, mode=mode, sample={"dataset": "digits", "index": 4}, **extra)
            with pytest.raises(InvalidEvent, match=r"label 3 is not the label dataset 'digits' holds for index 4") as info:
                parse_event(_encode(bad), labels)
            assert "7" not in info.value.reason  # the producer is not told the dataset's label ...
            assert "index 4 (7)" in info.value.detail  # ... the operator is
        with pytest.raises(ConfigError, match=r"dataset_labels\['digits'\] must be \(5,\)"):
            dataclasses.replace(ctx, dataset_labels={"digits": torch.zeros(4, dtype=torch.long)})

    @pytest.mark.parametrize("stamp", ["2024-05-01T12:00:00Z", "2024-05-01t12:00:00.123456789+02:00"])
    def test_optional_fields_are_kept(self, ctx: SampleContext, stamp: str) -> None:
        """subject and an RFC 3339 requested_at are returned as sent."""
        req = parse_event(_encode(_event(subject="s" * 256, requested_at=stamp)), ctx)
        assert req.subject == "s" * 256 and req.requested_at == stamp

    def test_null_optional_fields_mean_absent(self, ctx: SampleContext) -> None:
        """JSON null for an optional key is the same as leaving it out."""
        req = parse_event(_encode(_event(target_label=None, subject=None, requested_at=None)), ctx)
        assert (req.target_label, req.subject, req.requested_at) == (None, None, None)


Mutation = Callable[[dict[str, Any], dict[str, Path]], dict[str, Any]]


def _set(**values: Any) -> Mutation:
    return lambda event, files: {**event, **values}


def _drop(key: str) -> Mutation:
    return lambda event, files: {k: v for k, v in event.items() if k != key}


def _uri(path: Callable[[dict[str, Path]], str]) -> Mutation:
    return lambda event, files: {**event, "sample": {"uri": path(files)}}


def _tensor(edit: Callable[[dict[str, Any]], None]) -> Mutation:
    def mutate(event: dict[str, Any], files: dict[str, Path]) -> dict[str, Any]:
        event = copy.deepcopy(event)
        edit(event["sample"]["tensor"])
        return event
    return mutate


def _image(data: bytes) -> Mutation:
    return _set(sample={"image_b64": base64.b64encode(data).decode()})


_FLOATS = np.zeros(SHAPE, dtype=np.float32)

REJECTED: list[tuple[str, Mutation, str]] = [
    ("schema missing", _drop("schema"), "missing key 'schema'"),
    ("schema unknown", _set(schema=2), "unknown schema 2"),
    ("schema string", _set(schema="1"), "unknown schema '1'"),
    ("schema bool", _set(schema=True), "unknown schema True"),
    ("key missing", _drop("label"), "missing key(s) label"),
    ("key unknown", _set(priority="high"), "unknown key(s) priority"),
    ("request_id empty", _set(request_id=""), "request_id must be"),
    ("request_id space", _set(request_id="a b"), "request_id must be"),
    ("request_id long", _set(request_id="x" * 129), "request_id must be"),
    ("request_id int", _set(request_id=5), "request_id must be"),
    ("mode unknown", _set(mode="forget"), "mode must be one of"),
    ("label string", _set(label="3"), "label must be an integer"),
    ("label float", _set(label=3.0), "label must be an integer"),
    ("label bool", _set(label=True), "label must be an integer"),
    ("label negative", _set(label=-1), "label -1 is outside [0, 10)"),
    ("label too big", _set(label=10), "label 10 is outside [0, 10)"),
    ("relabel no target", _set(mode="relabel"), "needs a target_label"),
    ("relabel same target", _set(mode="relabel", target_label=3), "target_label equals label"),
    ("relabel target range", _set(mode="relabel", target_label=10), "target_label 10 is outside"),
    ("relabel target bool", _set(mode="relabel", target_label=False), "target_label must be an integer"),
    ("misclassify with target", _set(target_label=4), "misclassify takes no target_label"),
    ("sample not object", _set(sample="pixels"), "sample must be exactly one of"),
    ("sample empty", _set(sample={}), "sample must be exactly one of"),
    ("sample two forms", _set(sample={"uri": "file:///x.png", "image_b64": ""}), "sample must be exactly one of"),
    ("sample partial dataset", _set(sample={"dataset": "digits"}), "sample must be exactly one of"),
    ("tensor extra key", _tensor(lambda t: t.update(order="C")), "exactly dtype, shape and data_b64"),
    ("tensor dtype", _set(sample=_tensor_sample(_FLOATS.astype(np.float64))), "dtype must be one of"),
    ("tensor dtype not string", _tensor(lambda t: t.update(dtype=["float32"])), "dtype must be one of"),
    ("tensor shape", _set(sample=_tensor_sample(np.zeros((1, 4, 5), np.float32))), "does not match the model's input shape"),
    ("tensor shape not list", _tensor(lambda t: t.update(shape="1x4x4")), "shape must be a list of integers"),
    ("tensor not base64", _tensor(lambda t: t.update(data_b64="@@@@")), "not valid base64"),
    ("tensor wrong length", _tensor(lambda t: t.update(data_b64=base64.b64encode(b"\0" * 60).decode())), "60 bytes, expected 64"),
    ("tensor nan", _set(sample=_tensor_sample(np.full(SHAPE, np.nan, np.float32))), "NaN or infinite"),
    ("tensor inf", _set(sample=_tensor_sample(np.full(SHAPE, np.inf, np.float32))), "NaN or infinite"),
    ("tensor above one", _set(sample=_tensor_sample(np.full(SHAPE, 1.5, np.float32))), "must lie in [0, 1]"),
    ("tensor below zero", _set(sample=_tensor_sample(np.full(SHAPE, -0.1, np.float32))), "must lie in [0, 1]"),
    ("image undecodable", _image(b"definitely not a png"), "cannot be decoded"),
    ("image not base64", _set(sample={"image_b64": "%%%"}), "not valid base64"),
    ("image gif", _image(_png(GRAY, "GIF")), "cannot be decoded as PNG or JPEG"),
    ("image wrong size", _image(_png(np.zeros((4, 5), np.uint8))), "is 5x4 (WxH), expected 4x4"),
    ("image wrong channels", _image(_png(np.zeros((4, 4, 3), np.uint8))), "image mode RGB does not match 1"),
    ("uri http", _set(sample={"uri": "http://example.com/a.png"}), "scheme must be file"),
    ("uri bare path", _set(sample={"uri": "/etc/passwd"}), "scheme must be file"),
    ("uri not string", _set(sample={"uri": 7}), "uri must be a string"),
    ("uri with host", _set(sample={"uri": "file://evil.example/a.png"}), "no host"),
    ("uri etc passwd", _set(sample={"uri": "file:///etc/passwd"}), "outside the allowed roots"),
    ("uri dotdot", _uri(lambda f: f"file://{f['root']}/../outside/secret.png"), "outside the allowed roots"),
    ("uri encoded dotdot", _uri(lambda f: f"file://{f['root']}/%2e%2e/outside/secret.png"), "outside the allowed roots"),
    ("uri symlink out", _uri(lambda f: (f["root"] / "link_out.png").as_uri()), "outside the allowed roots"),
    ("uri missing", _uri(lambda f: (f["root"] / "nope.png").as_uri()), "file not found"),
    ("uri directory", _uri(lambda f: (f["root"] / "dir.png").as_uri()), "file not found"),
    ("uri extension", _uri(lambda f: (f["root"] / "notes.txt").as_uri()), "'.txt' is not supported"),
    ("uri pickled npy", _uri(lambda f: (f["root"] / "pickled.npy").as_uri()), "not a plain .npy array"),
    ("uri pt dict", _uri(lambda f: (f["root"] / "dict.pt").as_uri()), "holds a dict, expected a tensor"),
    ("uri pt garbage", _uri(lambda f: (f["root"] / "garbage.pt").as_uri()), "cannot be loaded as a tensor"),
    ("uri png garbage", _uri(lambda f: (f["root"] / "garbage.png").as_uri()), "cannot be decoded"),
    ("dataset unknown", _set(sample={"dataset": "mnist", "index": 0}), "unknown dataset 'mnist'"),
    ("dataset index string", _set(sample={"dataset": "digits", "index": "1"}), "index must be an integer"),
    ("dataset index bool", _set(sample={"dataset": "digits", "index": True}), "index must be an integer"),
    ("dataset index range", _set(sample={"dataset": "digits", "index": 5}), "index 5 is outside [0, 5)"),
    ("dataset index negative", _set(sample={"dataset": "digits", "index": -1}), "index -1 is outside"),
    ("subject int", _set(subject=5), "subject must be a string"),
    ("subject long", _set(subject="s" * 257), "at most 256 characters"),
    ("requested_at int", _set(requested_at=1714564800), "requested_at must be an RFC 3339 string"),
    ("requested_at words", _set(requested_at="yesterday"), "not an RFC 3339 date-time"),
    ("requested_at date only", _set(requested_at="2024-05-01"), "not an RFC 3339 date-time"),
    ("requested_at no zone", _set(requested_at="2024-05-01T12:00:00"), "not an RFC 3339 date-time"),
    ("requested_at bad month", _set(requested_at="2024-13-01T12:00:00Z"), "not an RFC 3339 date-time"),
]


class TestRejectedEvents:
    @pytest.mark.parametrize("mutate, reason", [case[1:] for case in REJECTED], ids=[case[0] for case in REJECTED])
    def test_malformed_event_is_rejected_with_reason(
        self, ctx: SampleContext, files: dict[str, Path], mutate: Mutation, reason: str
    ) -> None:
        """Each malformed event raises InvalidEvent naming the problem and carrying the readable id."""
        event = mutate(_event(), files)
        with pytest.raises(InvalidEvent) as info:
            parse_event(_encode(event), ctx)
        assert reason in info.value.reason
        assert str(info.value) == info.value.reason
        assert info.value.request_id == ("req-1" if event.get("request_id") == "req-1" else None)

    @pytest.mark.parametrize(
        "value, reason",
        [(b"\xff\xfe{}", "not UTF-8"), (b"{not json", "not JSON"), (b'{"schema": NaN}', "not JSON"),
         (b"[1, 2]", "JSON list, expected an object"), (b'"text"', "JSON str, expected an object")],
        ids=["not utf8", "not json", "json nan", "array", "string"],
    )
    def test_undecodable_payload_is_rejected(self, ctx: SampleContext, value: bytes, reason: str) -> None:
        """Payloads that are not a UTF-8 JSON object are rejected without a request id."""
        with pytest.raises(InvalidEvent) as info:
            parse_event(value, ctx)
        assert reason in info.value.reason and info.value.request_id is None

    def test_oversized_payload_is_rejected_before_parsing(self, files: dict[str, Path]) -> None:
        """A payload over max_payload_bytes is rejected by size even when it is not JSON."""
        small = SampleContext(num_classes=10, input_shape=SHAPE, max_payload_bytes=100)
        with pytest.raises(InvalidEvent, match="101 bytes, more than the 100 allowed"):
            parse_event(b"\xff" * 101, small)

    def test_oversized_uri_file_is_rejected(self, files: dict[str, Path]) -> None:
        """A uri file larger than max_payload_bytes is not read."""
        small = SampleContext(num_classes=10, input_shape=SHAPE, uri_roots=(files["root"],), max_payload_bytes=100)
        value = _encode(_event(sample={"uri": (files["root"] / "a.npy").as_uri()}))
        with pytest.raises(InvalidEvent, match="more than the 100 allowed"):
            parse_event(value, small)

    def test_image_needs_one_or_three_channels(self) -> None:
        """An image sample is rejected for a model whose input is neither gray nor RGB."""
        ctx2 = SampleContext(num_classes=10, input_shape=(2, 4, 4))
        with pytest.raises(InvalidEvent, match="1 or 3 input channels"):
            parse_event(_encode(_event(sample={"image_b64": base64.b64encode(_png(GRAY)).decode()})), ctx2)

    def test_invalid_event_is_a_streamer_error(self) -> None:
        """InvalidEvent derives from the root exception."""
        assert issubclass(InvalidEvent, StreamerError)


class TestRequestIdOf:
    def test_reads_the_id_from_the_value(self) -> None:
        """A valid request_id in the JSON wins over the key."""
        assert request_id_of(_encode(_event(label="bad")), b"from-key") == "req-1"

    def test_falls_back_to_the_key(self) -> None:
        """Undecodable values and invalid ids fall back to a valid key."""
        assert request_id_of(b"\xff not json", b"from-key") == "from-key"
        assert request_id_of(_encode(_event(request_id="bad id")), b"from-key") == "from-key"

    def test_none_when_nothing_is_valid(self) -> None:
        """No valid id anywhere gives None."""
        assert request_id_of(b"[]", None) is None
        assert request_id_of(b"{}", b"bad key!") is None
        assert request_id_of(b"{}", b"\xff") is None


class TestEncodeEvent:
    def test_rejects_a_batch(self) -> None:
        """encode_event takes one (C, H, W) image, not a batch."""
        with pytest.raises(ValueError, match=r"\(C, H, W\)"):
            encode_event("r", "misclassify", 0, torch.zeros(2, *SHAPE))

    def test_omits_absent_optional_keys(self) -> None:
        """Only the keys that have values are written."""
        event = json.loads(encode_event("r", "misclassify", 0, torch.zeros(SHAPE)))
        assert set(event) == {"schema", "request_id", "mode", "label", "sample"}


class TestSampleContext:
    def test_dataset_shape_must_match_input_shape(self) -> None:
        """A configured dataset of the wrong image shape is a configuration error."""
        with pytest.raises(ConfigError, match="dataset 'd'"):
            SampleContext(num_classes=10, input_shape=SHAPE, datasets={"d": torch.zeros(3, 1, 8, 8)})
