"""streamer: continual instance-wise unlearning for pre-trained image classifiers."""

__version__ = "0.1.0"
