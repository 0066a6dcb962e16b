"""Partition ownership (kafka.own_all_partitions): a consumer owns every partition of the requests
topic, including ones added later. The embedded broker cannot add partitions to a topic (Tansu
answers CreatePartitions with "not supported"), so the addition is driven here through a small
stand-in for the consumer; the two-daemons end-to-end test runs on the real broker."""
from __future__ import annotations

from kafka import TopicPartition

from streamer.kafka import own_all_partitions

T = "requests"


class _Consumer:
    """What own_all_partitions uses of a KafkaConsumer: metadata, assign, position, seek."""

    def __init__(self, partitions: set[int]):
        self.partitions, self.assigned, self.positions = set(partitions), [], {}

    def topics(self) -> set[str]:
        return {T}

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(self.partitions) if topic == T else set()

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned = list(partitions)
        self.positions = {tp: self.positions.get(tp, 0) for tp in partitions}

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset


def test_every_partition_then_the_added_ones_without_moving_the_others() -> None:
    consumer = _Consumer({0, 1, 2})
    owned, sources = own_all_partitions(consumer, T, frozenset(), {T: {0: 5, 1: 7}})
    assert owned == {TopicPartition(T, p) for p in (0, 1, 2)}
    assert sources == {f"{T}/0": 5, f"{T}/1": 7, f"{T}/2": "group offset, else earliest"}
    assert own_all_partitions(consumer, T, owned, {T: {0: 5, 1: 7}}) is None  # nothing changed
    consumer.seek(TopicPartition(T, 0), 9)  # read on since
    consumer.partitions.add(3)
    owned2, sources2 = own_all_partitions(consumer, T, owned, {T: {0: 5, 1: 7}})
    assert owned2 == owned | {TopicPartition(T, 3)}
    assert consumer.positions[TopicPartition(T, 0)] == 9 and sources2[f"{T}/0"] == 9  # kept where it was
    assert own_all_partitions(_Consumer(set()), T, frozenset(), {}) is None  # no partition yet
