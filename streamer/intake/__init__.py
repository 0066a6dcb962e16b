"""Intake: deletion events (schema v1) parsed and strictly validated; samples decoded; goals typed.

Public API: `parse_event`, `encode_event`, `request_id_of`, `ForgetRequest`, `Goal` (a request's
goal as a typed value), `InvalidEvent`, `SampleContext`, `storable_text`, and `sample_context` /
`load_dataset_ref` / `resolve_device` for what the config points at.
"""
from .events import ForgetRequest, encode_event, parse_event, request_id_of
from .goal import Goal
from .resources import load_dataset_ref, resolve_device, sample_context
from .samples import InvalidEvent, SampleContext, storable_text

__all__ = ["ForgetRequest", "Goal", "InvalidEvent", "SampleContext", "encode_event", "load_dataset_ref", "parse_event",
           "request_id_of", "resolve_device", "sample_context", "storable_text"]
