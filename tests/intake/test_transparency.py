"""One rule for transparency (issue 22 item 6): an image any of whose pixels can be non-opaque is
rejected, whichever of PNG's ways carries it, and through every route a sample takes (image_b64 and
uri); opaque images of every accepted mode decode to their pixels unchanged."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from streamer.intake.events import InvalidEvent, parse_event
from streamer.intake.pixels import image_pixels
from streamer.intake.samples import SampleContext

H, W = 4, 5
RGB = np.arange(H * W * 3, dtype=np.uint8).reshape(H, W, 3) * 4
GREY = np.arange(H * W, dtype=np.uint8).reshape(H, W) * 10


def _png(image: Image.Image, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", **options)
    return out.getvalue()


def _palette() -> Image.Image:
    return Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)


TRANSPARENT_RGB = {  # every way PNG lets a colour image carry transparency
    "RGBA, opaque alpha values": _png(Image.fromarray(np.dstack([RGB, np.full((H, W), 255, np.uint8)]))),
    "RGBA, a transparent pixel": _png(Image.fromarray(np.dstack([RGB, np.eye(H, W, dtype=np.uint8) * 255]))),
    "palette, tRNS alpha per entry": _png(_palette(), transparency=bytes([255, 128] + [255] * 14)),
    "palette, tRNS on an unused entry": _png(_palette(), transparency=bytes([255] * 15 + [0])),
    "palette, tRNS one transparent index": _png(_palette(), transparency=3),
    "RGB, tRNS colour key": _png(Image.fromarray(RGB), transparency=(0, 4, 8)),
    "RGB, tRNS colour key no pixel has": _png(Image.fromarray(RGB), transparency=(1, 2, 3)),
}
TRANSPARENT_GREY = {
    "LA, grey and alpha": _png(Image.fromarray(np.dstack([GREY, np.full((H, W), 255, np.uint8)]), mode="LA")),
    "L, tRNS grey key": _png(Image.fromarray(GREY), transparency=0),
    "1 bit, tRNS key": _png(Image.fromarray(GREY > 100).convert("1"), transparency=0),
}


@pytest.mark.parametrize("name", sorted(TRANSPARENT_RGB))
def test_every_colour_form_of_transparency_is_rejected(name: str) -> None:
    with pytest.raises(InvalidEvent, match=r"image has transparency \(.+\); streamer converts nothing silently"):
        image_pixels(TRANSPARENT_RGB[name], (3, H, W))


@pytest.mark.parametrize("name", sorted(TRANSPARENT_GREY))
def test_every_grey_form_of_transparency_is_rejected(name: str) -> None:
    with pytest.raises(InvalidEvent, match=r"image has transparency"):
        image_pixels(TRANSPARENT_GREY[name], (1, H, W))


def test_opaque_images_decode_to_their_pixels() -> None:
    """RGB, a palette (with and without an all-opaque tRNS), grey and 1-bit: accepted, exact."""
    palette = _palette()
    expected = np.asarray(palette.convert("RGB")).transpose(2, 0, 1) / 255.0  # no tRNS: no conversion warning
    for data in (_png(palette), _png(palette, transparency=bytes([255] * 16))):
        assert np.allclose(image_pixels(data, (3, H, W)).numpy(), expected)
    assert np.allclose(image_pixels(_png(Image.fromarray(RGB)), (3, H, W)).numpy(), RGB.transpose(2, 0, 1) / 255.0)
    assert np.allclose(image_pixels(_png(Image.fromarray(GREY)), (1, H, W)).numpy(), GREY[None] / 255.0)
    jpeg = io.BytesIO()
    Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(jpeg, format="JPEG")
    assert image_pixels(jpeg.getvalue(), (3, H, W)).shape == (3, H, W)


def test_both_routes_reject_it_with_the_same_reason(tmp_path: Path) -> None:
    """An event's image_b64 and a uri file go through the same rule."""
    data = TRANSPARENT_RGB["palette, tRNS one transparent index"]
    (tmp_path / "t.png").write_bytes(data)
    ctx = SampleContext(num_classes=10, input_shape=(3, H, W), uri_roots=(tmp_path,))
    reasons = []
    for sample in ({"image_b64": base64.b64encode(data).decode()}, {"uri": (tmp_path / "t.png").as_uri()}):
        event = {"schema": 1, "request_id": "t", "label": 1, "sample": sample}
        with pytest.raises(InvalidEvent) as err:
            parse_event(json.dumps(event).encode(), ctx)
        reasons.append(err.value.reason)
    assert all("image has transparency (a tRNS chunk with a transparent palette entry)" in r for r in reasons)
