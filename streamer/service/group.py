"""Ranks 1.. of a torchrun group: the daemon's followers (engine/distributed.py).

`streamer run` started by torchrun with WORLD_SIZE > 1 joins the process group; rank 0 is the
daemon (Kafka, the checkpoint directory, metrics), every other rank builds the configured model
and retain buffer, then unlearns each fragment alongside rank 0 from the state rank 0 sends with
it (so a rollback, a rebase or a restart on rank 0 needs nothing here). A follower ignores
SIGTERM/SIGINT: it stops when rank 0 says so (its own clean stop) or when rank 0 is gone.
"""
from __future__ import annotations

import signal
from typing import Any

import torch

from ..config import DaemonConfig
from ..engine import Shard, Unlearner, clone_module, follow, leave_group, load_model
from ..intake import load_dataset_ref

__all__ = ["follow_daemon"]


def follow_daemon(cfg: DaemonConfig, shard: Shard, device: torch.device, log: Any) -> int:
    """Rank `shard.rank` > 0: follow rank 0's fragments until it stops; exit status 0. Raises
    GroupLost when rank 0 is gone (torchrun then stops the group and restarts it if told to)."""
    for signum in (signal.SIGTERM, signal.SIGINT):  # rank 0 decides when the group stops
        signal.signal(signum, signal.SIG_IGN)
    base = load_model(cfg.model, device)
    buffer = load_dataset_ref(cfg.data.buffer, cfg.model.input_shape) if cfg.data.buffer else None
    unlearner = Unlearner(clone_module(base), cfg.engine, cfg.model.num_classes, buffer=buffer, teacher=base,
                          shard=shard)
    log.info("follower_started", rank=shard.rank, ranks=shard.world, device=str(device))
    try:
        fragments = follow(unlearner)
    finally:
        leave_group(shard)
    log.info("follower_stopped", rank=shard.rank, fragments=fragments)
    return 0
