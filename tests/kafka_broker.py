"""The tests' broker is the package's embedded one (streamer.service.broker), used by `streamer demo` too."""
from streamer.kafka.broker import Broker, BrokerError, create_topics, tansu_executable  # noqa: F401
