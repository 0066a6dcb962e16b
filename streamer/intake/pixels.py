"""Pixels from bytes a producer controls: PNG/JPEG images, .npy arrays, torch .pt tensors.

Every decoder learns the size it would allocate from a header first and refuses a shape other than
the model's input before any pixel is decoded, so decoding takes the bytes it was given plus a
fixed multiple of the model input (its uint8 or float32 pixels and their float32 copy), however
the input is crafted (README "Security", measured in tests/intake/test_bombs.py):

    PNG / JPEG   the header's size (Pillow); a PNG's ancillary chunks are dropped unread, so no
                 compressed text or ICC profile is inflated (they never change the pixels)
    .npy         the header's dtype and shape, then exactly that many bytes (numpy would allocate
                 what the header claims before reading)
    .pt          a torch.save zip archive of stored (uncompressed) entries whose sizes fit in the
                 file, a small pickle, then a tensor of the input's shape (a deflated entry
                 inflates ~1000:1, a stride-0 view would expand on copy)

Each failure raises `InvalidEvent` saying what is wrong with the bytes.
"""
from __future__ import annotations

import io
import struct
import zipfile
import zlib

import numpy as np
import torch
from PIL import Image

from .invalid import InvalidEvent

DTYPES = {"float32": np.dtype("<f4"), "uint8": np.dtype("u1")}  # raw tensor bytes are little-endian
# Single-band modes for C == 1, colour modes for C == 3; anything else (16-bit, CMYK) would need a
# lossy or ambiguous conversion, so it is rejected instead.
_IMAGE_MODES = {1: ("1", "L"), 3: ("RGB", "P", "YCbCr")}
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_KEPT = (b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND")  # what the pixels are made of
MAX_PICKLE_BYTES = 65_536  # a tensor's pickle is a few hundred bytes; a pickle can amplify ~40:1
MAX_ARCHIVE_ENTRIES = 64

__all__ = ["DTYPES", "check_shape", "image_pixels", "npy_pixels", "pt_pixels", "to_pixels"]


def check_shape(shape: tuple[int, ...], input_shape: tuple[int, int, int]) -> None:
    if tuple(shape) != tuple(input_shape):
        raise InvalidEvent(f"sample shape {list(shape)} does not match the model's input shape {list(input_shape)}")


def to_pixels(array: np.ndarray, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """A fresh (C, H, W) float32 tensor: float32 must already be finite and in [0, 1]; uint8 is scaled by 1/255."""
    check_shape(tuple(array.shape), input_shape)
    if array.dtype == np.uint8:
        return torch.from_numpy(array.astype(np.float32) / 255.0)
    if array.dtype != np.float32:
        raise InvalidEvent(f"sample dtype {array.dtype} is not allowed; use float32 or uint8")
    if not np.isfinite(array).all():
        raise InvalidEvent("sample has NaN or infinite values")
    if array.size and (array.min() < 0.0 or array.max() > 1.0):
        raise InvalidEvent(f"float32 sample values must lie in [0, 1], got [{array.min()}, {array.max()}]")
    return torch.from_numpy(array.astype(np.float32, order="C", copy=True))


def image_pixels(data: bytes, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """A PNG or JPEG of exactly H x W (grey for C = 1, colour for C = 3), size checked from its header."""
    channels, height, width = input_shape
    if channels not in _IMAGE_MODES:
        raise InvalidEvent(f"image samples need a model with 1 or 3 input channels, not {channels}")
    try:
        with Image.open(io.BytesIO(_png_pixels_only(data)), formats=["PNG", "JPEG"]) as image:
            # Size is read from the header: reject before decoding pixels (also stops bombs).
            if image.size != (width, height):
                raise InvalidEvent(f"image is {image.size[0]}x{image.size[1]} (WxH), expected {width}x{height}; "
                                   "streamer does not resize")
            transparency = _transparency(image)
            if transparency is not None:
                raise InvalidEvent(f"image has transparency ({transparency}); streamer converts nothing silently: "
                                   "send an opaque image")
            image.info.pop("transparency", None)  # an all-opaque palette tRNS: nothing to convert
            if image.mode not in _IMAGE_MODES[channels]:
                raise InvalidEvent(f"image mode {image.mode} does not match {channels} input channel(s); "
                                   f"expected one of {', '.join(_IMAGE_MODES[channels])}")
            image.load()
            pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except InvalidEvent:
        raise
    except Exception as err:  # untrusted bytes: whatever the decoder raises is a rejection, not a crash
        raise InvalidEvent(f"image cannot be decoded as PNG or JPEG: {err}") from err
    if channels == 1:
        pixels = pixels[np.newaxis]  # (1, H, W)
    else:
        pixels = np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (H, W, 3) -> (3, H, W)
    return to_pixels(pixels, input_shape)


def _transparency(image: Image.Image) -> str | None:
    """How an image lets any of its pixels be non-opaque, or None. One rule for every form PNG
    allows (ISO/IEC 15948, 11.3.2): an alpha channel (colour types 4 and 6, whatever its values), a
    tRNS chunk giving a palette entry an alpha below 255 (used by a pixel or not), or a tRNS colour
    key (grey or RGB: pixels of that colour are transparent). A tRNS whose palette alphas are all
    255 makes nothing transparent. JPEG has no transparency."""
    if image.mode in _ALPHA_MODES:
        return f"an alpha channel, mode {image.mode}"
    key = image.info.get("transparency")
    if key is None:
        return None
    if image.mode == "P" and isinstance(key, bytes):
        return None if all(alpha == 255 for alpha in key) else "a tRNS chunk with transparent palette entries"
    if image.mode == "P":
        return "a tRNS chunk with a transparent palette entry"
    return f"a tRNS colour key, mode {image.mode}"


def _png_pixels_only(data: bytes) -> bytes:
    """A PNG with only the chunks its pixels are made of (anything else: as it is). Pillow inflates
    zTXt, iTXt and iCCP chunks when it opens a file, up to 64 MB of them; no pixel depends on them."""
    if not data.startswith(_PNG_SIGNATURE):
        return data
    kept, at = [_PNG_SIGNATURE], len(_PNG_SIGNATURE)
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        end = at + 12 + length  # length, type, data, crc
        if end > len(data):
            raise InvalidEvent(f"PNG chunk {kind!r} runs past the end of the image")
        if kind in _PNG_KEPT:
            kept.append(data[at:end])
        at = end
        if kind == b"IEND":
            break
    return b"".join(kept)


def npy_pixels(data: bytes, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """A plain .npy array (format 1.0 or 2.0, uint8 or little-endian float32, the input's shape),
    checked from its header before its data is read."""
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f"format version {version} is not supported (1.0 and 2.0 are)")
        shape, fortran_order, dtype = read_header[version](buffer)
    except Exception as err:  # untrusted file: ValueError, EOFError, even tokenize.TokenError
        raise InvalidEvent(f"the file is not a plain .npy array: {err}") from err
    if dtype not in (DTYPES["uint8"], DTYPES["float32"]):
        raise InvalidEvent(f"the file is not a plain .npy array of float32 or uint8: its dtype is {dtype}")
    check_shape(tuple(shape), input_shape)
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - buffer.tell() != expected:
        raise InvalidEvent(f"the .npy data is {len(data) - buffer.tell()} bytes, its header says {expected}")
    flat = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=buffer.tell())
    return to_pixels(flat.reshape(shape, order="F" if fortran_order else "C"), input_shape)


def pt_pixels(data: bytes, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """A tensor saved with torch.save, loaded with weights_only=True once the archive's entries are
    known to be stored, to fit in the file and to hold a small pickle."""
    _check_archive(data)
    try:
        tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # untrusted file: UnpicklingError, RuntimeError, EOFError, ...
        raise InvalidEvent(f"the file cannot be loaded as a tensor with weights_only=True: {err}") from err
    if not isinstance(tensor, torch.Tensor):
        raise InvalidEvent(f"the file holds a {type(tensor).__name__}, expected a tensor")
    check_shape(tuple(tensor.shape), input_shape)  # before any copy: a stride-0 view expands when copied
    if tensor.dtype not in (torch.float32, torch.uint8):
        raise InvalidEvent(f"sample dtype {tensor.dtype} is not allowed; use float32 or uint8")
    return to_pixels(tensor.detach().contiguous().numpy(), input_shape)


def _check_archive(data: bytes) -> None:
    try:
        entries = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error) as err:
        raise InvalidEvent(f"the file cannot be loaded as a tensor: it is not a torch.save archive (zip): {err}") from err
    if len(entries) > MAX_ARCHIVE_ENTRIES:
        raise InvalidEvent(f"the .pt archive has {len(entries)} entries; a tensor needs a few")
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED or entry.file_size != entry.compress_size:
            raise InvalidEvent(f"the .pt archive entry {entry.filename!r} is compressed; torch.save stores entries "
                               "uncompressed")
        if entry.header_offset + entry.compress_size > len(data):
            raise InvalidEvent(f"the .pt archive entry {entry.filename!r} claims more bytes than the file holds")
        if entry.filename.endswith(".pkl") and entry.file_size > MAX_PICKLE_BYTES:
            raise InvalidEvent(f"the .pt archive's pickle is {entry.file_size} bytes; a tensor's is a few hundred")
    if sum(e.file_size for e in entries) > len(data):
        raise InvalidEvent("the .pt archive's entries claim more bytes than the file holds")
