"""`uri` samples are opened once and checked on the file actually opened, not before.

The attacks: re-point a link inside a root at a file outside between the check and the open (and
the other way round, between the open and the check); name a FIFO inside a root (a reader that
waits for ever); reach a file through /proc/self/fd. Links that stay inside a root still work
(README: symlinks followed)."""
from __future__ import annotations

import io
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from streamer.intake import InvalidEvent, SampleContext
from streamer.intake.samples import decode_sample

SHAPE = (1, 4, 4)


def _png(value: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((4, 4), value, np.uint8)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture()
def tree(tmp_path: Path) -> dict[str, Path]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "inside.png").write_bytes(_png(10))
    (outside / "secret.png").write_bytes(_png(200))
    os.symlink(root / "inside.png", root / "link.png")
    return {"root": root, "outside": outside}


@pytest.fixture()
def ctx(tree: dict[str, Path]) -> SampleContext:
    return SampleContext(num_classes=10, input_shape=SHAPE, uri_roots=(tree["root"],))


@pytest.fixture()
def alarm() -> Iterator[None]:
    """Fail instead of hanging when a decoder blocks."""
    def fail(*_: object) -> None:
        raise TimeoutError("the decoder blocked")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(10)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _repoint(link: Path, target: Path) -> None:
    temp = link.with_name(link.name + ".new")
    os.symlink(target, temp)
    os.replace(temp, link)


def _sample(path: Path) -> dict:
    return {"uri": path.as_uri()}


class TestOpenedOnce:
    def test_a_link_that_stays_inside_a_root_is_followed(self, tree: dict[str, Path], ctx: SampleContext) -> None:
        """The control: root/link.png -> root/inside.png decodes as inside.png."""
        x = decode_sample(_sample(tree["root"] / "link.png"), ctx)
        assert abs(float(x.mean()) - 10 / 255) < 1e-6

    def test_a_link_swapped_out_before_the_open_is_refused(self, tree: dict[str, Path], ctx: SampleContext,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
        """The link points inside when the path is checked and outside when it is opened: the file
        opened is checked, so the secret is refused, and the reason does not name where it is."""
        real_open, link = os.open, tree["root"] / "link.png"

        def swapping_open(path, *args, **kwargs):
            if str(path) == str(link):
                _repoint(link, tree["outside"] / "secret.png")
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", swapping_open)
        with pytest.raises(InvalidEvent, match="outside the allowed roots") as info:
            decode_sample(_sample(link), ctx)
        assert str(tree["outside"]) not in info.value.reason and "secret.png" in info.value.detail

    def test_a_link_swapped_in_after_the_open_is_refused(self, tree: dict[str, Path], ctx: SampleContext,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
        """The link points outside when opened and back inside when its real path is looked up: the
        open file is not the file at that path (device, inode), so it is refused."""
        link = tree["root"] / "link.png"
        _repoint(link, tree["outside"] / "secret.png")
        real_realpath = os.path.realpath

        def swapping_realpath(path, *args, **kwargs):
            if str(path) == str(link):
                _repoint(link, tree["root"] / "inside.png")
            return real_realpath(path, *args, **kwargs)

        monkeypatch.setattr(os.path, "realpath", swapping_realpath)
        with pytest.raises(InvalidEvent, match="outside the allowed roots"):
            decode_sample(_sample(link), ctx)

    def test_a_fifo_inside_a_root_is_refused_without_waiting(self, tree: dict[str, Path], ctx: SampleContext,
                                                           alarm: None) -> None:
        """A named pipe never blocks the daemon: it is opened non-blocking and refused as not a file."""
        os.mkfifo(tree["root"] / "pipe.png")
        with pytest.raises(InvalidEvent, match="not a regular file"):
            decode_sample(_sample(tree["root"] / "pipe.png"), ctx)

    def test_proc_self_fd_never_answers_with_the_path_behind_it(self, tree: dict[str, Path],
                                                               ctx: SampleContext) -> None:
        """A descriptor the daemon holds (its KEK), named directly or through a link in a root: refused,
        and the reason holds neither the file's path nor whether it exists."""
        secret = tree["outside"] / "kek.key"
        secret.write_bytes(os.urandom(32))
        fd = os.open(secret, os.O_RDONLY)
        try:
            os.symlink(f"/proc/self/fd/{fd}", tree["root"] / "fd.png")
            for uri in (f"file:///proc/self/fd/{fd}", (tree["root"] / "fd.png").as_uri(), "file:///proc/self/fd/999"):
                with pytest.raises(InvalidEvent, match="outside the allowed roots") as info:
                    decode_sample({"uri": uri}, ctx)
                assert str(tree["outside"]) not in info.value.reason and "kek.key" not in info.value.reason
        finally:
            os.close(fd)
