"""Tests for streamer.cli.erasure: the data-protection officer's report, from a real checkpoint directory,
ledger and vault (no broker: --offline, so retention comes from the config)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from streamer.cli.erasure import erasure_report, format_report
from streamer.config import parse_config
from streamer.state.checkpoints import CheckpointStore, RetainedRef
from streamer.state.kek import LocalKEK
from streamer.state.ledger import LEDGER_FILE, Ledger
from streamer.state.outcome import RequestOutcome
from streamer.state.manifest import rfc3339
from streamer.state.shreds import ShredLog, ShredRow
from streamer.state.vault import ForgetVault, VaultItem

DAY = 86_400.0
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def _entry(rid: str, offset: int, received: float) -> dict:
    return {"request_id": rid, "status": "forgotten", "reason": None, "topic": "req", "partition": 0,
            "offset": offset, "subject": f"person-{rid}", "mode": "misclassify", "label": 1, "target_label": None,
            "requested_at": None, "received_at": rfc3339(received)}


@pytest.fixture()
def cfg(tmp_path: Path):
    """v1 applied a (shredded since) and b (window open); c was rejected; d has an unknown topic retention."""
    cfg = parse_config({"model": {"weights": "w.pt"}, "checkpoints": {"dir": "ckpt"},
                        "kafka": {"topics": {"requests": "req", "dead_letter": "dlq"}, "dead_letter_payload": True,
                                  "topic_configs": {"requests": {"retention.ms": str(3 * 86_400_000),
                                                                 "segment.ms": str(86_400_000)},
                                                    "dead_letter": {}}},
                        "privacy": {"kek_env": "UNUSED", "verify_window": {"days": 14, "fragments": 3}}}, tmp_path)
    store = CheckpointStore(cfg.checkpoints.dir, clock=lambda: T0)
    store.publish(None, {"w": torch.zeros(1)})
    vault = ForgetVault.open(cfg.privacy.vault_path(cfg.checkpoints.dir), LocalKEK(bytes(32)), clock=lambda: T0)
    entries = {e.request_id: e for e in vault.put([VaultItem(r, torch.zeros(1, 2, 2), 1, -1) for r in ("a", "b")])}
    refs = [RetainedRef(r, entries[r].digest, "v000001", rfc3339(T0), True) for r in ("a", "b")]
    manifest = store.publish("v000000", {"w": torch.ones(1)}, refs,
                             requests=[_entry("a", 0, T0 - 60), _entry("b", 1, T0 - 30)])
    with Ledger(cfg.checkpoints.dir / LEDGER_FILE) as ledger:
        ledger.append([RequestOutcome.from_manifest(e, "v000001", manifest.created_at) for e in manifest.requests])
        ledger.append([RequestOutcome("rejected", "c", None, "label 42 is outside [0, 10)", "req", 0, 2, None,
                               rfc3339(T0 + 10))])
    vault.shred("a", "v000001")
    with ShredLog(cfg.checkpoints.dir / LEDGER_FILE) as log:
        log.append([ShredRow("a", "v000001", "v000001", rfc3339(T0 + DAY), vault.kek.key_id, "window closed")])
    return cfg


class TestErasureReport:
    def test_each_request_with_its_window_shred_and_copies(self, cfg) -> None:
        """Applied, verified, shredded or open window, and where copies remain until when, per request."""
        report = erasure_report(cfg, offline=True, now=T0 + 2 * DAY)
        by_id = {r["request_id"]: r for r in report["requests"]}
        assert list(by_id) == ["a", "b", "c"] and report["current"] == "v000001"
        a, b, c = by_id["a"], by_id["b"], by_id["c"]
        assert (a["applied_in"], a["verified_in"], a["received_at"]) == ("v000001", ["v000001"], rfc3339(T0 - 60))
        assert a["shredded"] == {"at": rfc3339(T0 + DAY), "verified_until": "v000001", "final_check_passed": True,
                                 "key_id": LocalKEK(bytes(32)).key_id}
        assert a["window"]["state"] == "shredded"
        assert [c["where"] for c in a["copies"]] == ["record req[0]@0"]  # no vault copy after the shred
        assert a["copies"][0]["until"] == rfc3339(T0 - 60 + 4 * DAY)  # written + retention.ms + segment.ms
        assert b["window"] == {"opened_at": rfc3339(T0), "closes_by": rfc3339(T0 + 14 * DAY),
                               "closes_after_version": "v000004", "state": "open"}
        assert b["copies"][0]["where"].startswith("forget vault") and b["copies"][0]["until"] == rfc3339(T0 + 14 * DAY)
        assert (a["status"], c["status"]) == ("forgotten", "rejected")
        assert c["applied_in"] is None and c["window"] is None and c["history"][0]["status"] == "rejected"
        wheres = [x["where"] for x in c["copies"]]
        assert wheres[0] == "record req[0]@2" and wheres[1].startswith("its dead letter")
        assert c["copies"][1]["until"] is None and "retention of dlq unknown" in c["copies"][1]["note"]

    def test_records_past_retention_are_gone_and_windows_overdue_say_so(self, cfg) -> None:
        """After retention.ms + segment.ms a record is no longer listed; a window past its time awaits the shred."""
        report = erasure_report(cfg, offline=True, now=T0 + 15 * DAY)
        by_id = {r["request_id"]: r for r in report["requests"]}
        assert by_id["a"]["copies"] == []
        assert by_id["b"]["window"]["state"] == "closed, shred due at the next check"
        assert [c["where"][:12] for c in by_id["b"]["copies"]] == ["forget vault"]

    def test_filters_and_text(self, cfg) -> None:
        """--request-id and --subject narrow the report; the text names the window, the shred and the copies."""
        assert [r["request_id"] for r in erasure_report(cfg, request_id="b", offline=True)["requests"]] == ["b"]
        assert [r["request_id"] for r in erasure_report(cfg, subject="person-a", offline=True)["requests"]] == ["a"]
        assert erasure_report(cfg, subject="nobody", offline=True)["requests"] == []
        text = format_report(erasure_report(cfg, offline=True, now=T0 + 2 * DAY))
        assert "shredded at 2023-11-15T22:13:20.000Z: verified until v000001" in text
        assert "window open: opened 2023-11-14T22:13:20.000Z, closes by 2023-11-28T22:13:20.000Z or after v000004" in text
        assert "copy: record req[0]@1 until 2023-11-18T22:12:50.000Z" in text
        assert "\n3 requests\n" in text and "verified in 1 version: v000001" in text and "1 versions" not in text

    def test_dead_letters_without_payload_hold_no_copy(self, cfg) -> None:
        """With kafka.dead_letter_payload off (the default) a rejected event's only copy is its request record."""
        from dataclasses import replace

        plain = replace(cfg, kafka=replace(cfg.kafka, dead_letter_payload=False))
        (c,) = [r for r in erasure_report(plain, offline=True, now=T0 + 2 * DAY)["requests"] if r["request_id"] == "c"]
        assert [x["where"] for x in c["copies"]] == ["record req[0]@2"]


class TestWholeStory:
    def test_failed_resent_applied_rolled_back_replayed_shredded_each_line(self, tmp_path: Path) -> None:
        """A request refused first (failed, never applied), re-sent and applied in v000001, rolled back by
        v000002 and replayed in v000003, then shredded; another deferred, then covered by a rebase. Each
        attempt is a line of its own with its own time, version and record; records in numeric order;
        received is the record's own time; applied names the version that holds it now."""
        cfg = parse_config({"model": {"weights": "w.pt"}, "checkpoints": {"dir": "ckpt"},
                            "kafka": {"topics": {"requests": "req"}}, "privacy": {"kek_env": "UNUSED"}}, tmp_path)
        at = lambda minutes: rfc3339(T0 + 60 * minutes)  # noqa: E731

        def outcome(status, version, offset, minutes, reason=None, rid="s"):
            return RequestOutcome(status, rid, version, reason, "req", 0, offset, "person", at(minutes),
                                  received_at=at(minutes - 1))
        (tmp_path / "ckpt").mkdir()
        with Ledger(tmp_path / "ckpt" / LEDGER_FILE) as ledger:
            ledger.append([outcome("failed", None, 3, 0, "the engine raised ValueError"),
                           outcome("forgotten", "v000001", 23, 10), outcome("rolled_back", "v000001", 23, 20, "rollback"),
                           outcome("forgotten", "v000003", 23, 30),
                           outcome("deferred", None, 4, 5, "deferred: budget", rid="d"),
                           outcome("rebased", "v000004", 4, 40, "covered by the rebase", rid="d")])
        with ShredLog(tmp_path / "ckpt" / LEDGER_FILE) as log:
            log.append([ShredRow("s", "v000003", "v000004", at(50), "local:1", "window closed")])
        report = erasure_report(cfg, offline=True, now=T0 + 3600)
        s, d = ({r["request_id"]: r for r in report["requests"]}[k] for k in ("s", "d"))
        assert s["records"] == ["req[0]@3", "req[0]@23"]  # numeric, not text, order
        assert (s["received_at"], s["applied_in"], s["applied_at"]) == (at(-1), "v000003", at(30))
        assert [(e["at"], e["status"], e["version"], e["record"]) for e in s["history"]] == [
            (at(0), "failed", None, "req[0]@3"), (at(10), "forgotten", "v000001", "req[0]@23"),
            (at(20), "rolled_back", "v000001", "req[0]@23"), (at(30), "forgotten", "v000003", "req[0]@23"),
            (at(50), "shredded", "v000004", None)]
        assert [e["status"] for e in d["history"]] == ["deferred", "rebased"] and d["status"] == "rebased"
        text = format_report(report).splitlines()
        story = [line.split()[:3] for line in text if line.startswith("  20")]
        assert story[:5] == [[at(0), "failed", "-"], [at(10), "forgotten", "v000001"],
                             [at(20), "rolled_back", "v000001"], [at(30), "forgotten", "v000003"],
                             [at(50), "shredded", "v000004"]]
        assert any(line.startswith("s  subject person  record req[0]@3, req[0]@23") for line in text)
        assert any(f"applied in v000003 at {at(30)}" in line for line in text)
