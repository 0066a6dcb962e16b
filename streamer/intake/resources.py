"""What the config points at, loaded: labelled image sets and the torch device."""
from __future__ import annotations

import torch

from ..config import DaemonConfig, DatasetRef
from ..engine import Dataset, load_splits
from ..errors import ConfigError, DataError
from .events import SampleContext

__all__ = ["load_dataset_ref", "resolve_device", "sample_context"]


def load_dataset_ref(ref: DatasetRef, input_shape: tuple[int, int, int]) -> Dataset:
    """The images (N, C, H, W) in [0, 1] and int64 labels (N,) a dataset reference names."""
    if ref.builtin is not None:
        data = getattr(load_splits(ref.builtin), ref.split)
    else:
        try:
            state = torch.load(ref.path, map_location="cpu", weights_only=True)
        except Exception as err:  # OSError, UnpicklingError, RuntimeError: all mean "unusable file"
            raise DataError(f"cannot load dataset {ref.path}: {err}") from err
        if not isinstance(state, dict) or not isinstance(state.get("x"), torch.Tensor) \
                or not isinstance(state.get("y"), torch.Tensor):
            raise DataError(f"dataset {ref.path} must hold a dict with tensors 'x' (N, C, H, W) and 'y' (N,)")
        data = Dataset(state["x"].to(torch.float32), state["y"].to(torch.int64))
    if data.x.dim() != 4 or tuple(data.x.shape[1:]) != tuple(input_shape):
        raise DataError(f"dataset {ref.describe()} has images of shape {tuple(data.x.shape)}, "
                        f"expected (N, {', '.join(map(str, input_shape))})")
    if data.y.dim() != 1 or len(data.y) != len(data.x):
        raise DataError(f"dataset {ref.describe()} has {len(data.x)} images but labels of shape {tuple(data.y.shape)}")
    if len(data.x) and (not torch.isfinite(data.x).all() or data.x.min() < 0 or data.x.max() > 1):
        raise DataError(f"dataset {ref.describe()}: pixels must be finite and in [0, 1]")
    return data


def resolve_device(name: str) -> torch.device:
    """auto: cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


def sample_context(cfg: DaemonConfig) -> SampleContext:
    """What samples are validated against (the daemon and `streamer produce` alike)."""
    shape = cfg.model.input_shape
    sets = {name: load_dataset_ref(ref, shape) for name, ref in cfg.data.datasets.items()}
    return SampleContext(
        num_classes=cfg.model.num_classes, input_shape=shape, uri_roots=cfg.data.uri_roots,
        datasets={name: d.x for name, d in sets.items()}, dataset_labels={name: d.y for name, d in sets.items()},
        max_payload_bytes=cfg.data.max_payload_bytes, default_mode=cfg.unlearning.default_mode,
    )
