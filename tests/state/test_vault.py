"""Tests for streamer.state.vault: per-request encryption, crypto-shredding, key checks, crash recovery.

Real files, real AES (the `cryptography` package), no mocks."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
import torch
from cryptography.exceptions import InvalidTag
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.errors import StreamerError
from streamer.state.kek import LocalKEK, VaultKeyError, generate_kek_file, kek_from_env, kek_from_file, load_kek
from streamer.state.vault import (
    CHECK_FILE,
    DATA_DIR,
    INDEX_FILE,
    KEYS_DIR,
    ForgetVault,
    ShredRecord,
    VaultEntryMissing,
    VaultError,
    VaultIntegrityError,
    VaultItem,
    read_index,
)

SHAPE = (1, 8, 8)
KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 132))


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _item(request_id: str, seed: int = 0, target: int = -1, shape: tuple[int, ...] = SHAPE) -> VaultItem:
    g = torch.Generator().manual_seed(seed)
    return VaultItem(request_id, torch.rand(shape, generator=g), int(torch.randint(0, 10, (1,), generator=g)), target)


def _distinctive() -> VaultItem:
    """A (3, 8, 8) instance whose uint8 pixels are a pattern no cipher output would repeat."""
    pixels = (torch.arange(192) * 37 % 251 + 2).reshape(3, 8, 8)
    return VaultItem("distinctive", pixels.float() / 255, 7, -1)


def _encodings(x: torch.Tensor) -> list[bytes]:
    """x's float32 bytes and its uint8 bytes (round(255 x)): how pixels would leak."""
    return [x.numpy().astype("<f4").tobytes(), (x * 255).round().to(torch.uint8).numpy().tobytes()]


def _files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _leaks(root: Path, secret: bytes, width: int = 16) -> list[str]:
    """Files under root holding any `width`-byte chunk of `secret`."""
    chunks = [secret[i:i + width] for i in range(0, len(secret) - width + 1, width)]
    return [str(p) for p, data in _files(root).items() if any(c in data for c in chunks)]


def _entry_files(root: Path, request_id: str) -> tuple[Path, Path]:
    fid = hashlib.sha256(request_id.encode()).hexdigest()
    return root / KEYS_DIR / f"{fid}.dek", root / DATA_DIR / f"{fid}.bin"


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    return tmp_path / "vault"


@pytest.fixture()
def vault(root: Path, clock: FakeClock) -> ForgetVault:
    return ForgetVault.open(root, LocalKEK(KEY), clock=clock)


class TestRoundTrip:
    def test_entries_decrypt_bitwise_in_requested_order(self, vault: ForgetVault) -> None:
        """get() returns x, y and target bitwise equal to what put() stored, in the order asked."""
        items = [_item(f"r{i}", i, target=(-1 if i % 2 else 3)) for i in range(4)]
        items[0].x[0, 0, 0] = -0.0  # the sign bit of zero must survive too
        vault.put(items)
        order = [items[i] for i in (2, 0, 3, 1)]
        x, y, target = vault.get([it.request_id for it in order])
        assert x.shape == (4, *SHAPE) and x.dtype == torch.float32 and y.dtype == target.dtype == torch.int64
        assert torch.equal(x.view(torch.int32), torch.stack([it.x for it in order]).view(torch.int32))
        assert y.tolist() == [it.y for it in order] and target.tolist() == [it.target for it in order]

    def test_reopened_vault_decrypts_with_the_key_from_a_file(self, root: Path, vault: ForgetVault,
                                                               tmp_path: Path) -> None:
        """A new process that loads the same KEK from a file reads back what the first one stored."""
        item = _item("a", 5)
        vault.put([item])
        (tmp_path / "kek").write_bytes(base64.b64encode(KEY) + b"\n")
        (tmp_path / "kek").chmod(0o600)  # a KEK file others may read is refused
        x, _, _ = ForgetVault.open(root, kek_from_file(tmp_path / "kek"), writer=False).get(["a"])
        assert torch.equal(x[0], item.x)

    @settings(max_examples=20, deadline=None)
    @given(st.lists(st.floats(0.0, 1.0, width=32, allow_subnormal=True), min_size=12, max_size=12),
           st.integers(0, 2**62), st.integers(-1, 2**62))
    def test_any_pixels_and_labels_round_trip(self, pixels: list[float], y: int, target: int) -> None:
        """Any float32 pixels in [0, 1] (subnormals included) and any labels come back bitwise."""
        x = torch.tensor(pixels, dtype=torch.float32).reshape(3, 2, 2)
        with tempfile.TemporaryDirectory() as directory:
            vault = ForgetVault.open(directory, LocalKEK(KEY))
            vault.put([VaultItem("p", x, y, target)])
            got_x, got_y, got_target = vault.get(["p"])
        assert torch.equal(got_x[0].view(torch.int32), x.view(torch.int32))
        assert (got_y.item(), got_target.item()) == (y, target)

    def test_unsafe_request_ids_never_become_file_names(self, root: Path, vault: ForgetVault) -> None:
        """A request id with path separators is stored under hex file names and reads back."""
        vault.put([_item("../../etc/passwd", 1), _item("ü/ß:1", 2)])
        names = [p.name for p in (root / KEYS_DIR).iterdir()] + [p.name for p in (root / DATA_DIR).iterdir()]
        assert len(names) == 4 and all(len(n.split(".")[0]) == 64 and "/" not in n for n in names)
        assert vault.get(["../../etc/passwd", "ü/ß:1"])[0].shape == (2, *SHAPE)

    def test_absent_ids_are_all_named(self, vault: ForgetVault) -> None:
        """get() with unknown ids raises VaultEntryMissing naming each of them."""
        vault.put([_item("a")])
        with pytest.raises(VaultEntryMissing, match="'nope'") as caught:
            vault.get(["a", "nope", "gone"])
        assert caught.value.missing == {"nope": "absent", "gone": "absent"}

    def test_replayed_put_is_a_no_op_and_other_content_is_refused(self, vault: ForgetVault, clock: FakeClock) -> None:
        """Putting the same fragment again keeps the first entry; the same id with other pixels raises."""
        vault.put([_item("a", 1)])
        clock.now += 50
        vault.put([_item("a", 1)])
        assert [e.created_at for e in vault.entries()] == [clock.now - 50]
        with pytest.raises(VaultError, match="other content"):
            vault.put([_item("a", 2)])

    def test_an_invalid_item_writes_nothing(self, root: Path, vault: ForgetVault) -> None:
        """A fragment with one bad item (pixels above 1) raises ValueError and stores none of it."""
        bad = VaultItem("bad", torch.full(SHAPE, 1.5), 1, -1)
        with pytest.raises(ValueError, match="in \\[0, 1\\]"):
            vault.put([_item("good"), bad])
        assert "good" not in vault and not any((root / DATA_DIR).iterdir())
        with pytest.raises(ValueError, match="y must be an int"):
            vault.put([VaultItem("b", torch.zeros(SHAPE), True, -1)])


class TestConfidentiality:
    def test_no_pixel_bytes_anywhere_under_root(self, root: Path, vault: ForgetVault, tmp_path: Path) -> None:
        """Neither the float32 nor the uint8 encoding of a stored instance appears in any file."""
        item = _distinctive()
        vault.put([item, _item("other", 3, shape=(3, 8, 8))])
        control = tmp_path / "control"
        control.mkdir()
        torch.save(item.x, control / "float.pt")  # proves the scan finds pixels where they are
        torch.save((item.x * 255).round().to(torch.uint8), control / "uint8.pt")
        for encoding in _encodings(item.x):
            assert _leaks(control, encoding), "the scan cannot see plaintext pixels"
            assert _leaks(root, encoding) == []

    def test_index_holds_metadata_only(self, root: Path, vault: ForgetVault) -> None:
        """index.json holds request id, time, keyed digest and shape per entry; no plain hash of the pixels."""
        item = _distinctive()
        vault.put([item])
        [entry] = json.loads((root / INDEX_FILE).read_text())["entries"]
        assert set(entry) == {"request_id", "created_at", "digest", "shape", "shredded_at", "verified_version"}
        assert re.fullmatch(r"[0-9a-f]{64}", entry["digest"]) and entry["shape"] == [3, 8, 8]
        for encoding in _encodings(item.x):  # nobody holding the image can find it by its plain sha256
            plain = hashlib.sha256(encoding).hexdigest()
            assert plain != entry["digest"] and all(plain not in data.decode("latin-1")
                                                    for data in _files(root).values())

    def test_digest_is_keyed_by_the_entry_dek(self, tmp_path: Path) -> None:
        """The same instance stored in two vaults (two DEKs) gets two unrelated digests."""
        item = _item("same", 4)
        digests = [ForgetVault.open(tmp_path / name, LocalKEK(KEY)).put([item])[0].digest for name in ("a", "b")]
        assert digests[0] != digests[1]

    def test_index_reads_without_the_kek(self, root: Path, vault: ForgetVault, tmp_path: Path) -> None:
        """read_index lists entries (shredded ones too) with no key at all; a missing vault has none."""
        vault.put([_item("a", 1), _item("b", 2)])
        vault.shred("a", None)
        assert [(e.request_id, e.shredded, e.verified_version) for e in read_index(root)] == [
            ("a", True, None), ("b", False, None)]
        assert read_index(tmp_path / "nowhere") == []


class TestShred:
    def test_shred_destroys_the_key_and_the_ciphertext(self, root: Path, vault: ForgetVault) -> None:
        """After shred, get() raises, and no file holds the wrapped DEK, the ciphertext or the pixels."""
        target = _distinctive()
        vault.put([target, _item("keep", 1, shape=(3, 8, 8))])
        key_file, data_file = _entry_files(root, "distinctive")
        wrapped, ciphertext = key_file.read_bytes(), data_file.read_bytes()
        record = vault.shred("distinctive", "v000003")
        assert record == ShredRecord("distinctive", "v000003", 1_700_000_000.0, LocalKEK(KEY).key_id)
        assert "distinctive" not in vault and not key_file.exists() and not data_file.exists()
        with pytest.raises(VaultEntryMissing) as caught:
            vault.get(["keep", "distinctive"])
        assert caught.value.missing == {"distinctive": "shredded"}
        for secret in (wrapped, ciphertext, *_encodings(target.x)):
            assert _leaks(root, secret, width=8) == []
        assert vault.get(["keep"])[0].shape == (1, 3, 8, 8)

    def test_shred_overwrites_in_place_before_unlinking(self, root: Path, vault: ForgetVault, tmp_path: Path) -> None:
        """A hard link to the entry's files (same inode, as a naive snapshot would keep) reads zeros after shred."""
        vault.put([_item("a")])
        links = []
        for i, path in enumerate(_entry_files(root, "a")):
            links.append(tmp_path / f"link{i}")
            os.link(path, links[-1])
        vault.shred("a", "v000001")
        assert all(set(link.read_bytes()) == {0} for link in links)

    def test_shred_erases_the_content_hash_and_records_the_version(self, vault: ForgetVault, root: Path) -> None:
        """A shredded entry keeps its request id and verified version, not its content hash."""
        [stored] = vault.put([_item("a")])
        digest = stored.digest
        vault.shred("a", "v000002")
        [entry] = ForgetVault.open(root, LocalKEK(KEY), writer=False).entries()
        assert (entry.shredded, entry.verified_version, entry.digest) == (True, "v000002", "")
        assert digest not in (root / INDEX_FILE).read_text()

    def test_shred_is_idempotent(self, root: Path, vault: ForgetVault, clock: FakeClock) -> None:
        """A second shred, even after a restart and with another version, returns the first record."""
        vault.put([_item("a")])
        first = vault.shred("a", "v000001")
        clock.now += 100
        assert vault.shred("a", "v000009") == first
        assert ForgetVault.open(root, LocalKEK(KEY), clock=clock).shred("a", "v000010") == first

    def test_shred_many_is_all_or_none(self, root: Path, vault: ForgetVault) -> None:
        """shred_many shreds a batch with its versions; one unknown id shreds none of the batch."""
        vault.put([_item("a", 1), _item("b", 2), _item("c", 3)])
        with pytest.raises(VaultEntryMissing, match="'ghost'"):
            vault.shred_many([("a", "v000001"), ("ghost", "v000001")])
        assert "a" in vault and len(vault) == 3
        records = vault.shred_many([("a", "v000001"), ("b", None)])
        assert [(r.request_id, r.verified_version) for r in records] == [("a", "v000001"), ("b", None)]
        assert len(vault) == 1 and [p.stem for p in (root / KEYS_DIR).iterdir()] == [_entry_files(root, "c")[0].stem]

    def test_shred_of_an_unknown_id_raises(self, vault: ForgetVault) -> None:
        """Shredding an id that was never stored raises VaultEntryMissing."""
        with pytest.raises(VaultEntryMissing, match="'ghost' \\(absent\\)"):
            vault.shred("ghost", "v000001")

    def test_a_shredded_id_cannot_be_stored_again(self, vault: ForgetVault) -> None:
        """put() refuses an id that was shredded, whatever its content."""
        vault.put([_item("a")])
        vault.shred("a", "v000001")
        with pytest.raises(VaultError, match="was shredded"):
            vault.put([_item("a")])

    def test_a_crash_mid_shred_is_finished_on_open(self, root: Path, vault: ForgetVault, tmp_path: Path) -> None:
        """Files a crash left after the index marked an entry shredded are erased when a writer opens."""
        vault.put([_item("a")])
        saved = {p: p.read_bytes() for p in _entry_files(root, "a")}
        vault.shred("a", "v000001")
        for path, data in saved.items():  # as if the process died between the index write and the erase
            path.write_bytes(data)
        reopened = ForgetVault.open(root, LocalKEK(KEY))
        assert len(reopened.recovered) == 2 and not any(p.exists() for p in saved)


class TestKeys:
    def test_wrong_kek_fails_at_open(self, root: Path, vault: ForgetVault) -> None:
        """Opening with another KEK raises VaultKeyError naming the vault's key id."""
        vault.put([_item("a")])
        with pytest.raises(VaultKeyError, match=f"does not match the vault's \\(key id {vault.kek.key_id}") as caught:
            ForgetVault.open(root, LocalKEK(OTHER_KEY))
        assert isinstance(caught.value, StreamerError) and "\n" not in str(caught.value)

    def test_other_key_material_under_the_same_key_id_fails_at_open(self, root: Path, vault: ForgetVault) -> None:
        """The key check is cryptographic: a matching key id with other key bytes still fails."""
        with pytest.raises(VaultKeyError, match="key check does not decrypt"):
            ForgetVault.open(root, LocalKEK(OTHER_KEY, key_id=vault.kek.key_id))

    def test_missing_env_var_and_file(self, tmp_path: Path) -> None:
        """An unset variable, an absent file or no configured source raises VaultKeyError naming it."""
        with pytest.raises(VaultKeyError, match="STREAMER_TEST_KEK is not set"):
            kek_from_env("STREAMER_TEST_KEK", environ={})
        with pytest.raises(VaultKeyError, match="nope\\.key"):
            kek_from_file(tmp_path / "nope.key")
        with pytest.raises(VaultKeyError, match="no KEK configured: set privacy.kek_file"):
            load_kek(None, None)
        env_kek = load_kek(None, "K", environ={"K": KEY.hex()})
        assert env_kek.key_id == LocalKEK(KEY).key_id

    def test_key_encodings_agree(self, tmp_path: Path) -> None:
        """Raw, hex and base64 encodings of one key give one key id; a short key is refused."""
        for name, data in {"raw": KEY, "hex": KEY.hex().encode() + b"\n", "b64": base64.b64encode(KEY)}.items():
            (tmp_path / name).write_bytes(data)
            (tmp_path / name).chmod(0o600)  # a KEK file others may read is refused
            assert kek_from_file(tmp_path / name).key_id == LocalKEK(KEY).key_id
        assert kek_from_env("K", environ={"K": base64.b64encode(KEY).decode()}).key_id == LocalKEK(KEY).key_id
        (tmp_path / "short").write_bytes(base64.b64encode(KEY[:16]))
        (tmp_path / "short").chmod(0o600)
        with pytest.raises(VaultKeyError, match="256-bit"):
            kek_from_file(tmp_path / "short")

    def test_generated_kek_file_is_private_and_never_overwritten(self, tmp_path: Path) -> None:
        """generate_kek_file writes a 0600 file that loads back, and refuses to replace it."""
        kek = generate_kek_file(tmp_path / "kek")
        assert stat.S_IMODE(os.stat(tmp_path / "kek").st_mode) == 0o600
        assert kek_from_file(tmp_path / "kek").key_id == kek.key_id
        with pytest.raises(VaultKeyError, match="refusing to overwrite"):
            generate_kek_file(tmp_path / "kek")
        assert kek_from_file(tmp_path / "kek").key_id == kek.key_id

    def test_repr_hides_the_key(self) -> None:
        """A KEK's repr shows its id and no key bytes."""
        assert KEY.hex() not in repr(LocalKEK(KEY)) and "key_id" in repr(LocalKEK(KEY))


class TestIntegrity:
    def test_tampered_ciphertext(self, root: Path, vault: ForgetVault) -> None:
        """One flipped ciphertext bit makes get() raise VaultIntegrityError caused by InvalidTag."""
        vault.put([_item("a")])
        data_file = _entry_files(root, "a")[1]
        blob = bytearray(data_file.read_bytes())
        blob[40] ^= 1
        data_file.write_bytes(bytes(blob))
        with pytest.raises(VaultIntegrityError, match="AES-GCM authentication") as caught:
            vault.get(["a"])
        assert isinstance(caught.value, StreamerError) and isinstance(caught.value.__cause__, InvalidTag)

    def test_an_entry_moved_to_another_id_fails(self, root: Path, vault: ForgetVault) -> None:
        """Copying one request's key and ciphertext over another's with the same pixels fails on the AAD."""
        x = _item("a", 1).x
        vault.put([VaultItem("a", x, 1, -1), VaultItem("b", x.clone(), 2, -1)])
        for source, dest in zip(_entry_files(root, "a"), _entry_files(root, "b"), strict=True):
            shutil.copyfile(source, dest)
        with pytest.raises(VaultIntegrityError) as caught:
            vault.get(["b"])
        assert isinstance(caught.value.__cause__, InvalidTag)

    def test_tampered_wrapped_key_and_index(self, root: Path, vault: ForgetVault) -> None:
        """A flipped wrapped-key bit, or an edited shape in the index, raises VaultIntegrityError."""
        vault.put([_item("a", 1), _item("b", 2)])
        key_file = _entry_files(root, "a")[0]
        key_file.write_bytes(bytes([key_file.read_bytes()[0] ^ 1]) + key_file.read_bytes()[1:])
        with pytest.raises(VaultIntegrityError, match="RFC 3394"):
            vault.get(["a"])
        index = json.loads((root / INDEX_FILE).read_text())
        index["entries"][1]["shape"] = [1, 64, 1]
        (root / INDEX_FILE).write_text(json.dumps(index))
        with pytest.raises(VaultIntegrityError):
            ForgetVault.open(root, LocalKEK(KEY), writer=False).get(["b"])


class TestRecovery:
    def test_a_killed_write_is_erased_by_the_writer_only(self, root: Path, vault: ForgetVault) -> None:
        """Temp files and unindexed entry files survive a reader's open and are erased by a writer's."""
        vault.put([_item("a")])
        leftovers = [root / ".tmp-index.json-1234abcd", root / KEYS_DIR / ".tmp-x.dek-00000000",
                     *_entry_files(root, "never-indexed")]
        for path in leftovers:
            path.write_bytes(b"partial")
        ForgetVault.open(root, LocalKEK(KEY), writer=False)
        assert all(p.exists() for p in leftovers)
        reopened = ForgetVault.open(root, LocalKEK(KEY))
        assert not any(p.exists() for p in leftovers) and len(reopened.recovered) == 4
        assert reopened.get(["a"])[0].shape == (1, *SHAPE)

    def test_remove_orphans(self, root: Path, vault: ForgetVault) -> None:
        """Entries no manifest references are deleted with their files; referenced and shredded ones stay."""
        vault.put([_item(r, i) for i, r in enumerate("abcd")])
        vault.shred("d", "v000001")
        assert vault.remove_orphans({"a", "unrelated"}) == ["b", "c"]
        reopened = ForgetVault.open(root, LocalKEK(KEY))
        assert [(e.request_id, e.shredded) for e in reopened.entries()] == [("a", False), ("d", True)]
        assert len(list((root / DATA_DIR).iterdir())) == 1 and reopened.get(["a"])[0].shape == (1, *SHAPE)
        reopened.put([_item("b", 1)])  # the replayed fragment can be stored again
        assert "b" in reopened

    def test_a_reader_cannot_write(self, root: Path, vault: ForgetVault) -> None:
        """A vault opened with writer=False refuses put, shred and remove_orphans."""
        reader = ForgetVault.open(root, LocalKEK(KEY), writer=False)
        for call in (lambda: reader.put([_item("a")]), lambda: reader.shred("a", "v1"),
                     lambda: reader.remove_orphans(set())):
            with pytest.raises(VaultError, match="writer=True"):
                call()

    def test_a_damaged_vault_is_not_recreated(self, root: Path, vault: ForgetVault, tmp_path: Path) -> None:
        """No vault for a reader, or entries without a key check, raise VaultError instead of a new vault."""
        with pytest.raises(VaultError, match="not a forget vault"):
            ForgetVault.open(tmp_path / "empty", LocalKEK(KEY), writer=False)
        vault.put([_item("a")])
        (root / CHECK_FILE).unlink()
        with pytest.raises(VaultError, match="not a forget vault"):
            ForgetVault.open(root, LocalKEK(KEY))
        assert any((root / DATA_DIR).iterdir())


class TestAges:
    def test_oldest_age_follows_the_clock_and_shreds(self, vault: ForgetVault, clock: FakeClock) -> None:
        """oldest_age_seconds counts from the oldest unshredded entry and is 0.0 when none is left."""
        assert vault.oldest_age_seconds() == 0.0
        clock.now = 1000.0
        vault.put([_item("a")])
        clock.now = 1600.0
        vault.put([_item("b")])
        clock.now = 2000.0
        assert vault.oldest_age_seconds() == 1000.0 and vault.oldest_age_seconds(now=2500.0) == 1500.0
        vault.shred("a", "v000001")
        assert vault.oldest_age_seconds() == 400.0
        vault.shred("b", "v000002")
        assert vault.oldest_age_seconds() == 0.0
        assert [(e.created_at, e.shredded_at) for e in vault.entries()] == [(1000.0, 2000.0), (1600.0, 2000.0)]
