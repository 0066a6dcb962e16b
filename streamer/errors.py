"""One root exception; each subclass has one handling policy."""


class StreamerError(Exception):
    """Root of every error streamer raises on purpose."""


class ConfigError(StreamerError):
    """The configuration is invalid: fail at start-up with the message."""


class ModelLoadError(StreamerError):
    """The model or its weights cannot be loaded: fail at start-up."""


class DataError(StreamerError):
    """A dataset cannot be loaded or is malformed: fail at start-up."""


class Interrupted(StreamerError):
    """A stop was requested in the middle of a computation (attack, importance, unlearning):
    the partial result is discarded, nothing is published."""
