"""`streamer produce`: validate deletion events against the daemon's config, then send them.

Producers' teams can copy this: the value is a schema-v1 JSON event, the key its request_id,
acks=all, and nothing is sent that the daemon would reject.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..config import DEFAULT_MODES, DaemonConfig
from ..intake import InvalidEvent, SampleContext, load_dataset_ref, parse_event
from ..kafka import make_producer


@dataclass(frozen=True)
class Prepared:
    where: str  # "line 3" / "index 17"
    request_id: str | None
    value: bytes
    error: str | None  # None: valid


def dataset_events(cfg: DaemonConfig, dataset: str, indices: Iterable[int], prefix: str,
                   relabel_to: int | None = None,
                   mode: str | None = None) -> Iterator[tuple[str, bytes | InvalidEvent]]:
    """(where, event) per index: events whose samples are `{"dataset": NAME, "index": I}`,
    labelled from the dataset, with request_id PREFIX + NAME-I, + "-relabel-T" or "-MODE" for a
    goal other than the config's default. Their mode: relabel to `relabel_to`, else `mode`, else the config's
    unlearning.default_mode, written into each event. An index outside the dataset gives
    (where, InvalidEvent), so that it is reported beside the others (and a relabel to the
    instance's own label is left for `parse_event` to refuse, as the daemon would). Raises
    InvalidEvent for an unknown dataset, ValueError for a mode other than misclassify / unseen
    or for both given."""
    if mode is not None and (mode not in DEFAULT_MODES or relabel_to is not None):
        raise ValueError(f"mode must be one of {', '.join(DEFAULT_MODES)} without relabel_to, got {mode!r}")
    if dataset not in cfg.data.datasets:
        raise InvalidEvent(f"dataset {dataset!r} is not configured under data.datasets")
    labels = load_dataset_ref(cfg.data.datasets[dataset], cfg.model.input_shape).y
    goal = (f"-relabel-{relabel_to}" if relabel_to is not None
            else f"-{mode}" if mode is not None and mode != cfg.unlearning.default_mode else "")
    for i in indices:
        request_id = f"{prefix}{dataset}-{i}{goal}"  # another goal for the same index is another request
        if not 0 <= i < len(labels):
            yield f"index {i}", InvalidEvent(f"dataset index {i} is outside [0, {len(labels)}) for {dataset!r}",
                                             request_id)
            continue
        event = {"schema": 1, "request_id": request_id, "label": int(labels[i]),
                 "sample": {"dataset": dataset, "index": int(i)}}
        if relabel_to is None:
            event["mode"] = mode or cfg.unlearning.default_mode
        else:
            event.update(mode="relabel", target_label=relabel_to)
        yield f"index {i}", json.dumps(event).encode()


def file_events(path: Path) -> Iterator[tuple[str, bytes]]:
    """(where, value) for each non-blank line of a JSONL file."""
    with open(path, "rb") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                yield f"line {n}", line.strip()


def prepare(items: Iterable[tuple[str, bytes | InvalidEvent]], ctx: SampleContext) -> list[Prepared]:
    """Each event checked as the daemon will (`parse_event`); an InvalidEvent item is kept as is."""
    out = []
    for where, value in items:
        try:
            if isinstance(value, InvalidEvent):
                raise value
            request = parse_event(value, ctx)
            out.append(Prepared(where, request.request_id, value, None))
        except InvalidEvent as err:
            # the operator's account (`detail`): the producer running this command has the config and its data
            out.append(Prepared(where, err.request_id, value if isinstance(value, bytes) else b"", err.detail))
    return out


def send(cfg: DaemonConfig, prepared: list[Prepared], topic: str | None = None) -> list[tuple[Prepared, int, int]]:
    """Send the valid events (key = request_id), wait for every ack; (event, partition, offset)."""
    producer = make_producer(cfg.kafka.bootstrap_servers, cfg.kafka.settings("producer"))
    try:
        futures = [(p, producer.send(topic or cfg.kafka.topics.requests, key=p.request_id.encode() if p.request_id else None,
                                       value=p.value))
                   for p in prepared if p.error is None]
        producer.flush()
        return [(p, meta.partition, meta.offset) for p, fut in futures for meta in [fut.get(timeout=30)]]
    finally:
        producer.close()
