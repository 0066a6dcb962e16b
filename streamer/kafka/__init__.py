"""Kafka: the clients as the daemon configures them, what it writes, undecodable batches, and the
embedded broker the demo and the tests run.

Public API: clients (`make_consumer`, `all_partitions`, `make_producer`, `ensure_topics`, `commit_offsets`,
`consumer_lag`, `poll_while`, `topic_configs_by_name`, `described_topic_configs`), the record
encoders (`records`: `receipt`, `dead_letter`, `checkpoint_record`), `find_undecodable`, and the
embedded broker (`Broker`, `BrokerError`, `free_port`).
"""
from . import records
from .broker import Broker, BrokerError, free_port
from .clients import (all_partitions, commit_offsets, consumer_lag, described_topic_configs, ensure_topics, make_consumer,
                      make_producer, own_all_partitions, poll_while, seek_to_offsets, topic_configs_by_name)
from .undecodable import find_undecodable

__all__ = ["Broker", "BrokerError", "all_partitions", "commit_offsets", "consumer_lag", "described_topic_configs", "ensure_topics",
           "find_undecodable", "free_port", "make_consumer", "make_producer", "own_all_partitions", "poll_while", "records", "seek_to_offsets",
           "topic_configs_by_name"]
