"""Kafka clients configured the way the daemon needs them, and consumer lag.

Delivery: auto-commit is off (offsets are committed only after the state they cover is saved,
so a crash replays rather than loses requests); the producer waits for all in-sync replicas.
`client_settings` is `KafkaConfig.settings(client)`: the config's `kafka.client` (security_protocol,
sasl_*, ssl_*...) merged with `kafka.consumer` / `kafka.producer` / `kafka.admin`, passed to
kafka-python as is. api_version is never set: kafka-python negotiates it with the broker.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, Mapping, TypeVar

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError, for_code
from kafka.structs import OffsetAndMetadata

from ..errors import ConfigError

T = TypeVar("T")

# Join/rebalance time is about session_timeout_ms / 2 on some brokers: keep it short.
SESSION_TIMEOUT_MS = 6000
HEARTBEAT_INTERVAL_MS = 1000
_OWNED_KEYS = ("bootstrap_servers", "group_id", "enable_auto_commit")
_MAX_RETRIES = 2**31 - 1  # as the Java client: retry until delivery_timeout_ms runs out


def make_consumer(bootstrap: str, group_id: str, client_settings: Mapping[str, Any],
                  max_poll_interval_ms: int, **kw: Any) -> KafkaConsumer:
    """A consumer in `group_id` with auto-commit off; subscribe or assign it yourself.

    With no committed offset it starts from the earliest record, so requests produced before
    the first start are not skipped. `kw` overrides any default (e.g. session_timeout_ms).
    """
    _check_settings(client_settings)
    settings: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": SESSION_TIMEOUT_MS,
        "heartbeat_interval_ms": HEARTBEAT_INTERVAL_MS,
        "max_poll_interval_ms": max_poll_interval_ms,
        **client_settings,
        **kw,
    }
    if settings["enable_auto_commit"]:
        raise ConfigError("enable_auto_commit must stay off: offsets are committed with the saved state")
    return KafkaConsumer(**settings)


def make_producer(bootstrap: str, client_settings: Mapping[str, Any]) -> KafkaProducer:
    """A producer that waits for all in-sync replicas and retries until its delivery timeout."""
    _check_settings(client_settings)
    return KafkaProducer(bootstrap_servers=bootstrap, acks="all", retries=_MAX_RETRIES, **client_settings)


def ensure_topics(bootstrap: str, client_settings: Mapping[str, Any], names: Iterable[str],
                  partitions: int = 1, replication_factor: int = -1,
                  configs: Mapping[str, Mapping[str, str]] | None = None) -> list[str]:
    """Create the topics that do not exist yet, each with its `configs[name]` (Kafka topic configs
    such as retention.ms, segment.ms); existing ones are left as they are. Returns the names created.

    replication_factor -1 uses the broker's default.
    """
    _check_settings(client_settings)
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return []
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, **client_settings)
    try:
        response = admin.create_topics(
            [NewTopic(name, partitions, replication_factor, topic_configs=dict((configs or {}).get(name, {})))
             for name in wanted], raise_errors=False
        )
    finally:
        admin.close()
    created = []
    for topic in response["topics"]:
        error = for_code(topic["error_code"])
        if topic["error_code"] == 0:
            created.append(topic["name"])
        elif error is not TopicAlreadyExistsError:
            raise error(f"cannot create topic {topic['name']}: {topic.get('error_message') or error.__name__}")
    return created


def topic_configs_by_name(topics: Any, roles: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
    """kafka.topic_configs keyed by topic name instead of role (requests, receipts, dead_letter, checkpoints)."""
    return {getattr(topics, role): dict(settings) for role, settings in roles.items()}


def consumer_lag(consumer: KafkaConsumer) -> int:
    """Records not yet consumed on the assigned partitions: sum of highwater - position.

    The highwater mark is only known after a fetch from the partition; until then it counts 0.
    (end_offsets() is not used: some Kafka-compatible brokers answer it wrongly.)
    """
    lag = 0
    for tp in consumer.assignment():
        highwater = consumer.highwater(tp)
        if highwater is None:
            continue
        position = consumer.position(tp)
        if position is not None:
            lag += max(0, highwater - position)
    return lag


def _check_settings(client_settings: Mapping[str, Any]) -> None:
    owned = sorted(set(_OWNED_KEYS) & set(client_settings))
    if owned:
        raise ConfigError(f"kafka.client/consumer/producer/admin must not set {', '.join(owned)}: streamer sets them")


def described_topic_configs(bootstrap: str, client_settings: Mapping[str, Any], names: Iterable[str],
                            keys: Iterable[str] = ("retention.ms", "segment.ms", "cleanup.policy"),
                            timeout_ms: int = 5000) -> dict[str, dict[str, str]]:
    """{topic: {config: value}} as the brokers report them (DescribeConfigs); a topic or key the
    broker does not report is left out (some Kafka-compatible brokers report none). Raises KafkaError
    when the brokers cannot be reached."""
    _check_settings(client_settings)
    wanted = set(keys)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms, **client_settings)
    try:
        resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
        try:
            response = admin.describe_configs(resources, config_filter="all")  # kafka-python 3: a parsed dict
        except TypeError:
            response = admin.describe_configs(resources)  # kafka-python 2: the raw responses
    finally:
        admin.close()
    found: dict[str, dict[str, str]] = {}
    if isinstance(response, dict):
        for name, configs in response.get("topic", {}).items():
            found[name] = {k: str(c.get("value")) for k, c in configs.items()
                           if k in wanted and isinstance(c, dict) and c.get("value") is not None}
        return found
    for reply in response:
        for resource in getattr(reply, "resources", None) or []:
            error_code, _, _, name, entries = resource[:5]
            if error_code == 0:
                found[name] = {e[0]: e[1] for e in entries if e[0] in wanted and e[1] is not None}
    return found


def commit_offsets(consumer: KafkaConsumer, offsets: Mapping[str, Mapping[int, int]], log: Any) -> None:
    """Commit {topic: {partition: next offset}} for the assigned partitions (kafka-python commits
    what it is given: the next offset to read, last + 1). A failure (e.g. a rebalance) is logged
    and harmless: CURRENT's manifest, not the group offset, decides where consumption resumes."""
    commit = {tp: OffsetAndMetadata(offsets[tp.topic][tp.partition], "", -1)
              for tp in consumer.assignment() if tp.partition in offsets.get(tp.topic, {})}
    if not commit:
        return
    try:
        consumer.commit(commit)
    except KafkaError as err:
        log.warning("offset_commit_failed", error=repr(err))


def poll_while(consumer: KafkaConsumer, work: Callable[[], T], poll_ms: int, tick: Callable[[], None],
               take: Callable[[Any], int] | None = None) -> T:
    """Run `work()` in a thread while this thread keeps polling: intake goes on while a fragment
    unlearns (minutes on a CPU). `take(batch)`, when given, receives each poll's records and returns
    how many more it can hold (0: the partitions are paused until the work is done); without it, the
    partitions stay paused. `tick()` runs after every poll. Returns work's result, or re-raises what
    it raised; the partitions are resumed either way."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = work()
        except BaseException as err:  # re-raised in the calling thread
            box["error"] = err

    room = 0 if take is None else take({})
    if room <= 0:
        consumer.pause(*consumer.assignment())
    thread = threading.Thread(target=run, name="fragment", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            batch = consumer.poll(timeout_ms=poll_ms, max_records=max(1, room))
            if batch and take is not None and room > 0:
                room = take(batch)
                if room <= 0:
                    consumer.pause(*consumer.assignment())
            tick()
            thread.join(timeout=0.01)
    finally:
        consumer.resume(*consumer.paused())
    if "error" in box:
        raise box["error"]
    return box["result"]


def all_partitions(consumer: KafkaConsumer, topic: str) -> set[TopicPartition]:
    """Every partition of `topic` as the brokers report it now (empty while the topic is unknown)."""
    consumer.topics()  # refreshes the cluster metadata
    return {TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()}


def seek_to_offsets(consumer: KafkaConsumer, offsets: Mapping[str, Mapping[int, int]]) -> dict[str, int | str]:
    """Seek every assigned partition to CURRENT's offset; where the manifest has none, the
    consumer keeps the group offset (else earliest). Returns where each partition reads from."""
    sources: dict[str, int | str] = {}
    for tp in consumer.assignment():
        offset = offsets.get(tp.topic, {}).get(tp.partition)
        if offset is not None:
            consumer.seek(tp, offset)
        sources[f"{tp.topic}/{tp.partition}"] = offset if offset is not None else "group offset, else earliest"
    return sources


def own_all_partitions(consumer: KafkaConsumer, topic: str, assigned: frozenset[TopicPartition],
                       offsets: Mapping[str, Mapping[int, int]]) -> tuple[frozenset[TopicPartition], dict] | None:
    """Assign every partition of `topic` to `consumer` (no group management: a second consumer in
    the same group gets them all too, never a share), when they differ from `assigned`. A new
    partition reads from `offsets` (CURRENT's), else the group's, else the earliest; one already
    assigned keeps its position. Returns (the partitions, where each reads from), or None when
    nothing changed or the topic has no partition yet."""
    partitions = frozenset(all_partitions(consumer, topic))
    if not partitions or partitions == assigned:
        return None
    kept = {tp: consumer.position(tp) for tp in assigned}
    consumer.assign(list(partitions))
    sources = seek_to_offsets(consumer, offsets)
    for tp, position in kept.items():
        consumer.seek(tp, position)
        sources[f"{tp.topic}/{tp.partition}"] = position
    return partitions, sources
