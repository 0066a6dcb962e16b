"""`streamer erasure-report`: for a data-protection officer, where each deletion request stands.

Per request: the record it came in (topic, partition, offset; `requested_at` when the producer set
it), when it was handled and applied, the versions whose weights verified it, its verification
window, when its data key was destroyed, and every place a copy of its instance can still exist
with the latest time it can exist there (Kafka retention left). Read-only: the manifests, the
ledger, the vault's index (no KEK needed) and, unless --offline, the brokers' topic configs.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

from kafka.errors import KafkaError

from ..config import DaemonConfig
from ..kafka import described_topic_configs, topic_configs_by_name
from ..pipeline import deadline_of
from ..state import (APPLIED, LEDGER_FILE, CheckpointStore, Ledger, Manifest, RequestOutcome, ShredLog, Window,
                     parse_rfc3339, read_index, rfc3339, version_number)
from ..text import plural

__all__ = ["erasure_report", "format_report"]

_DAY_MS = 86_400_000


def erasure_report(cfg: DaemonConfig, request_id: str | None = None, subject: str | None = None,
                   offline: bool = False, now: float | None = None) -> dict[str, Any]:
    """{"generated_at", "retention": {topic: {...}}, "requests": [per request, oldest first]}."""
    now = time.time() if now is None else now
    store = CheckpointStore(cfg.checkpoints.dir)
    outcomes: dict[str, list[RequestOutcome]] = {}
    if (store.root / LEDGER_FILE).exists():
        with Ledger(store.root / LEDGER_FILE) as ledger:
            for row in ledger.rows():
                o = row.outcome
                if o.request_id is None or (request_id and o.request_id != request_id):
                    continue
                outcomes.setdefault(o.request_id, []).append(o)
        with ShredLog(store.root / LEDGER_FILE) as log:
            shreds = log.rows()
    else:
        shreds = {}
    if subject is not None:
        outcomes = {rid: rows for rid, rows in outcomes.items() if any(o.subject == subject for o in rows)}
    current = store.current_version()
    lineage = store.lineage(current) if current else []
    written = {(e["topic"], e["partition"], e["offset"]): e["received_at"] for v in store.versions()
               for e in store.manifest(v).requests if e.get("received_at")}
    vault = {e.request_id: e for e in read_index(cfg.privacy.vault_path(store.root))}
    retention = _retention(cfg, offline)
    window = Window.of(cfg.privacy)
    requests = [_request(rid, rows, lineage, written, vault.get(rid), shreds.get(rid), retention, window, now,
                         cfg.kafka.topics.dead_letter if cfg.kafka.dead_letter_payload else None,
                         cfg.privacy.erasure_deadline_days)
                for rid, rows in sorted(outcomes.items(), key=lambda kv: kv[1][0].completed_at)]
    return {"generated_at": rfc3339(now), "current": current, "verify_window_days": window.days,
            "verify_window_fragments": window.fragments, "retention": retention, "requests": requests}


def _request(rid: str, rows: list[RequestOutcome], lineage: list[Manifest], written: Mapping[tuple, str], entry: Any,
             shred: Any, retention: Mapping[str, Mapping[str, Any]], window: Window, now: float,
             dead_letter: str | None, deadline_days: float = 30.0) -> dict[str, Any]:
    standing = [o for o in rows if o.status in APPLIED and o.version is not None]  # in a version: applied
    decisive = [o for o in rows if (o.status in APPLIED and o.version is not None)
                or o.status in ("rolled_back", "abandoned", "deferred", "rebased")] or rows
    entries = {m.version: e for m in lineage for e in m.requests if e["request_id"] == rid}
    refs = [(m.version, r) for m in reversed(lineage) for r in m.retained if r.request_id == rid]
    applied_in = standing[-1].version if standing and decisive[-1].status != "rolled_back" else None
    goal = next((o for o in reversed(rows) if o.mode is not None), None)  # the latest outcome that knows it
    report: dict[str, Any] = {
        "request_id": rid, "status": decisive[-1].status, "subject": next((o.subject for o in rows if o.subject), None),
        "mode": goal.mode if goal else None, "target_class": goal.target_class if goal else None,
        "records": [f"{t}[{p}]@{o}" for t, p, o in sorted({(o.topic, o.partition, o.offset) for o in rows})],
        "requested_at": next((e.get("requested_at") for e in entries.values() if e.get("requested_at")), None),
        "received_at": next((o.received_at or written.get((o.topic, o.partition, o.offset)) for o in rows
                             if o.received_at or (o.topic, o.partition, o.offset) in written), None),
        "handled_at": rows[0].completed_at,
        "history": _history(rows, shred),
        "applied_in": applied_in, "applied_at": standing[-1].completed_at if applied_in else None,
        "verified_in": [v for v, r in refs if r.met],
        "window": None, "shredded": None,
        # owed: deferred by the utility budget and not applied since; erased (applied) by this deadline
        "deadline": (rfc3339(deadline_of({"received_at": rows[0].received_at, "deferred_at": decisive[-1].completed_at},
                                          deadline_days)) if decisive[-1].status == "deferred" else None),
    }
    if refs:
        ref = refs[-1][1]
        closes = window.closes_at(ref)
        report["window"] = {"opened_at": ref.applied_at, "closes_by": rfc3339(closes),
                            "closes_after_version": (None if window.fragments is None else
                                                     _version_after(ref.applied_in, window.fragments)),
                            "state": "shredded" if shred or (entry and entry.shredded) else
                            ("closed, shred due at the next check" if now >= closes else "open")}
    if shred is not None:
        report["shredded"] = {"at": shred.shredded_at, "verified_until": shred.verified_version,
                              "final_check_passed": shred.verified_at_shred, "key_id": shred.key_id}
    report["copies"] = _copies(rows, written, entry, report["window"], retention, now, dead_letter)
    return report


def _history(rows: list[RequestOutcome], shred: Any) -> list[dict[str, Any]]:
    """Every attempt and outcome of the request in order, each with its own time, version and record
    (a re-sent request, a deferral, a rollback and its replay, a rebase), then its shred."""
    story = [{"status": o.status, "version": o.version, "at": o.completed_at, "reason": o.reason,
              "record": f"{o.topic}[{o.partition}]@{o.offset}", "received_at": o.received_at} for o in rows]
    if shred is not None:
        story.append({"status": "shredded", "version": shred.at_version, "at": shred.shredded_at,
                      "reason": shred.reason, "record": None, "received_at": None})
    return story


def _copies(rows: list[RequestOutcome], written: Mapping[tuple, str], entry: Any, window: Mapping[str, Any] | None,
            retention: Mapping[str, Mapping[str, Any]], now: float, dead_letter: str | None) -> list[dict[str, Any]]:
    """Every place the instance can still exist, with the latest time it can be there (`dead_letter`:
    the dead-letter topic when dead letters copy the raw payload, kafka.dead_letter_payload)."""
    copies = []
    if entry is not None and not entry.shredded:
        copies.append({"where": "forget vault (AES-256-GCM, data key wrapped by the KEK)",
                       "until": window["closes_by"] if window else None,
                       "note": "the daemon's memory holds it decrypted while it runs, until the shred"})
    for o in _first_per_record(rows):
        # written when Kafka took it (its timestamp), else no later than when the daemon handled it
        at = written.get((o.topic, o.partition, o.offset), o.completed_at)
        copies.append(_record_copy(o.topic, f"record {o.topic}[{o.partition}]@{o.offset}", at, retention, now))
        if o.status == "rejected" and dead_letter is not None:
            copies.append(_record_copy(dead_letter, f"its dead letter in {dead_letter} (raw payload: "
                                       "kafka.dead_letter_payload is on)", o.completed_at, retention, now))
    return [c for c in copies if c is not None]


def _record_copy(topic: str, where: str, written_by: str, retention: Mapping[str, Mapping[str, Any]],
                 now: float) -> dict[str, Any] | None:
    """A Kafka record written by `written_by` is gone by then + retention.ms + segment.ms."""
    settings = retention.get(topic, {})
    try:
        keep_ms = int(settings["retention.ms"]) + int(settings.get("segment.ms", 7 * _DAY_MS))
    except (KeyError, ValueError):
        return {"where": where, "until": None, "note": f"retention of {topic} unknown: ask the Kafka operator"}
    if int(settings["retention.ms"]) < 0:
        return {"where": where, "until": None, "note": f"{topic} keeps records forever (retention.ms=-1)"}
    until = parse_rfc3339(written_by) + keep_ms / 1000
    if until <= now:
        return None  # deleted by the broker's retention (Kafka deletes whole segments past retention)
    return {"where": where, "until": rfc3339(until),
            "note": f"retention.ms {settings['retention.ms']} + segment.ms {settings.get('segment.ms', '?')} "
                    f"({settings.get('source', 'configured')})"}


def _first_per_record(rows: Iterable[RequestOutcome]) -> list[RequestOutcome]:
    seen, out = set(), []
    for o in rows:
        if (o.topic, o.partition, o.offset) not in seen:
            seen.add((o.topic, o.partition, o.offset))
            out.append(o)
    return out


def _retention(cfg: DaemonConfig, offline: bool) -> dict[str, dict[str, Any]]:
    """{topic name: settings + source}: the brokers' answer, else kafka.topic_configs."""
    configured = topic_configs_by_name(cfg.kafka.topics, cfg.kafka.topic_configs)
    described: dict[str, dict[str, str]] = {}
    if not offline:
        try:
            described = described_topic_configs(cfg.kafka.bootstrap_servers, cfg.kafka.client, list(configured))
        except KafkaError:
            described = {}
    out = {}
    for name, settings in configured.items():
        broker = described.get(name, {})
        source = "reported by the broker" if "retention.ms" in broker else "configured; the broker was not asked"
        out[name] = {**settings, **broker, "source": source}
    return out


def _version_after(version: str, n: int) -> str:
    return f"v{version_number(version) + n:06d}"


def format_report(report: Mapping[str, Any]) -> str:
    """The report as text, one block per request."""
    fragments = report["verify_window_fragments"]
    lines = [f"erasure report at {report['generated_at']}: CURRENT {report['current']}, verification window "
             + plural(report["verify_window_days"], "day") + (f" or {plural(fragments, 'version')}" if fragments else ""),
             plural(len(report["requests"]), "request"), ""]
    for r in report["requests"]:
        window, shredded = r["window"], r["shredded"]
        lines.append(f"{r['request_id']}  subject {r['subject'] or '-'}  record {', '.join(r['records'])}")
        lines.append(f"  requested_at {r['requested_at'] or '-'}  received {r['received_at'] or '-'}  "
                     f"handled {r['handled_at']}  "
                     + (f"applied in {r['applied_in']} at {r['applied_at']}" if r["applied_in"] else
                        "not applied: " + r["status"]))
        for event in r["history"]:
            lines.append(f"  {event['at']}  {event['status']:<11} {event['version'] or '-':<8} "
                         f"{event['record'] or ''}" + (f"  {event['reason']}" if event["reason"] else ""))
        if r.get("deadline"):
            lines.append(f"  owed: to be applied (erased) by {r['deadline']}")
        if r["verified_in"]:
            lines.append(f"  verified in {plural(len(r['verified_in']), 'version')}: {_span(r['verified_in'])}")
        if window:
            lines.append(f"  window {window['state']}: opened {window['opened_at']}, closes by {window['closes_by']}"
                         + (f" or after {window['closes_after_version']}" if window["closes_after_version"] else ""))
        if shredded:
            lines.append(f"  shredded at {shredded['at']}: verified until {shredded['verified_until'] or 'never'}"
                         f"{'' if shredded['final_check_passed'] else ' (final check did not pass)'}, "
                         f"data key destroyed (KEK {shredded['key_id']})")
        copies = r["copies"] or [{"where": "nowhere streamer knows of", "until": None, "note": ""}]
        for c in copies:
            lines.append(f"  copy: {c['where']} until {c['until'] or '?'}" + (f"  ({c['note']})" if c["note"] else ""))
        lines.append("")
    return "\n".join(lines)


def _span(versions: list[str]) -> str:
    return versions[0] if len(versions) == 1 else f"{versions[0]} .. {versions[-1]}"


def report_json(report: Mapping[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=True)
