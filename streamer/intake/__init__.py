"""Intake: deletion events (schema v1) parsed and strictly validated; samples decoded.

Public API: `parse_event`, `encode_event`, `request_id_of`, `ForgetRequest`, `InvalidEvent`,
`SampleContext`, and `sample_context` / `load_dataset_ref` / `resolve_device` for what the
config points at.
"""
from .events import ForgetRequest, encode_event, parse_event, request_id_of
from .resources import load_dataset_ref, resolve_device, sample_context
from .samples import InvalidEvent, SampleContext

__all__ = ["ForgetRequest", "InvalidEvent", "SampleContext", "encode_event", "load_dataset_ref", "parse_event",
           "request_id_of", "resolve_device", "sample_context"]
