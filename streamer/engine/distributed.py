"""Data-parallel unlearning over torch.distributed: a fragment's optimizer steps split over ranks.

Every rank holds the whole model, draws the same random rows from the same seeded generator and
keeps its share of each term's rows (rows rank, rank + world, ...); gradients are summed over
ranks with one all-reduce per step, so every rank takes the same optimizer step and ends with the
same weights. Each term divides by its count over all ranks, so the summed loss and gradient are
those of one process (Li et al., "PyTorch Distributed", VLDB 2020, on why averaged gradients
equal one process's; here the sum is exact for every term, whatever the shares' sizes). The
attack's rows, the frozen prefix's features and the pool's teacher logits are split and gathered
the same way. Rows that mix (train mode, BatchNorm without running statistics) are not split:
every rank runs them all and counts 1/world of each term. MAS importance and the unseen vote run
on every rank alike, so they stay in step without talking.

Rank 0 alone talks to Kafka and the checkpoint directory. Before each fragment it sends the others
a job (`Shard.send_job`): the model's and the teacher's state, the retained set, the generator's
state and the fragment, as tensors after a JSON header (no pickle crosses the group); the others
run the same `Unlearner.unlearn` on it (`follow`). Stop decisions (caps, cancel) are rank 0's.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import StreamerError
from .fragment import Fragment

__all__ = ["ALONE", "GroupLost", "Shard", "follow", "join_group", "leave_group"]

_STOPS = (None, "goal", "step_cap", "time_cap", "cancelled")
_MAX_HEADER = 1 << 20  # bytes of a job's JSON header (names, dtypes, shapes: ~100 bytes a tensor)


class GroupLost(StreamerError):
    """A collective failed: another rank of the process group died or stopped answering. An
    infrastructure failure (failures.py): the daemon stops and resumes exactly once; no request
    gets an outcome from it."""


@dataclass(frozen=True)
class Shard:
    """This process's place in the group: `rank` of `world`. `ALONE` (world 1) changes nothing and
    talks to no one. `group`: the step collectives' process group (None: the default); `jobs`: a
    gloo group with a long timeout for the job channel (rank 0 may idle for days between fragments)."""

    rank: int = 0
    world: int = 1
    group: Any = None
    jobs: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives' tensors live

    def local(self, pick: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """This rank's rows of a term that uses `pick` ((m,) row indices; None: all n rows): every
        world-th of them from position `rank`. Unchanged when alone."""
        if self.world == 1:
            return pick
        index = torch.arange(n, device=self.device) if pick is None else pick
        return index[self.rank::self.world]

    def gather(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """(n, ...) every rank's `local` values put back at their rows' positions (`local` holds
        positions rank, rank + world, ... of n). Raises GroupLost."""
        if self.world == 1:
            return local
        width = -(-n // self.world)
        padded = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=local.device)
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        self._collective(lambda: dist.all_gather(parts, padded, group=self.group))
        out = torch.empty((n, *local.shape[1:]), dtype=local.dtype, device=local.device)
        for r, part in enumerate(parts):
            out[r::self.world] = part[: len(range(r, n, self.world))]
        return out

    def reduce(self, params: list[nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        """The loss summed over ranks, every parameter's gradient summed over ranks (in place; a
        gradient stays None where no rank made one), in one all-reduce. Raises GroupLost."""
        if self.world == 1:
            return loss.detach()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        made = torch.tensor([p.grad is not None for p in params], dtype=loss.dtype, device=loss.device)
        flat = torch.cat([g.reshape(-1) for g in grads] + [made, loss.detach().reshape(1)])
        self._collective(lambda: dist.all_reduce(flat, group=self.group))
        offset = 0
        for p, g, m in zip(params, grads, flat[-1 - len(params):-1].tolist()):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone() if m > 0 else None
            offset += n
        return flat[-1]

    def agree(self, stop: str | None) -> str | None:
        """Rank 0's stop decision (one of _STOPS), on every rank. Raises GroupLost."""
        if self.world == 1:
            return stop
        code = torch.tensor([_STOPS.index(stop)], dtype=torch.int64, device=self.device)
        self._collective(lambda: dist.broadcast(code, 0, group=self.group))
        return _STOPS[int(code)]

    def stop_signal(self, cancel: Any) -> Callable[[], bool] | None:
        """`should_stop` for the stages every rank runs alike (unseen vote, attack, importance):
        rank 0's cancel event, the same answer on every rank."""
        if self.world == 1:
            return (lambda: cancel.is_set()) if cancel is not None else None
        return lambda: self.agree("cancelled" if cancel is not None and cancel.is_set() else None) == "cancelled"

    def average_buffers(self, model: nn.Module) -> None:
        """Train mode: every rank runs every row, but dropout draws each rank's own masks, so the
        BatchNorm statistics they moved are averaged to keep the ranks equal."""
        if self.world == 1:
            return
        for b in model.buffers():
            if b.is_floating_point():
                self._collective(lambda b=b: dist.all_reduce(b, group=self.group))
                b.div_(self.world)

    # --- the job channel (rank 0 -> the others) ------------------------------------------------

    def send_job(self, op: str, tensors: dict[str, torch.Tensor | None] | None = None) -> None:
        """Rank 0: send `op` ("unlearn" | "stop") and its named tensors to every other rank."""
        tensors = {k: v for k, v in (tensors or {}).items() if v is not None}
        header = {"op": op, "tensors": [[k, str(v.dtype).removeprefix("torch."), list(v.shape)]
                                        for k, v in tensors.items()]}
        raw = torch.frombuffer(bytearray(json.dumps(header).encode()), dtype=torch.uint8)
        self._collective(lambda: dist.broadcast(torch.tensor([len(raw)]), 0, group=self.jobs))
        self._collective(lambda: dist.broadcast(raw, 0, group=self.jobs))
        for v in tensors.values():  # bool as uint8: not every backend broadcasts bool
            out = v.detach().to(self.device, torch.uint8 if v.dtype == torch.bool else v.dtype).contiguous()
            self._collective(lambda: dist.broadcast(out, 0, group=self.group))

    def receive_job(self) -> tuple[str, dict[str, torch.Tensor]]:
        """The other ranks: wait for rank 0's next job; (op, named tensors on this rank's device)."""
        size = torch.zeros(1, dtype=torch.int64)
        self._collective(lambda: dist.broadcast(size, 0, group=self.jobs))
        if not 0 < int(size) <= _MAX_HEADER:
            raise GroupLost(f"rank {self.rank}: a job header of {int(size)} bytes (at most {_MAX_HEADER})")
        raw = torch.empty(int(size), dtype=torch.uint8)
        self._collective(lambda: dist.broadcast(raw, 0, group=self.jobs))
        try:
            header = json.loads(bytes(raw.tolist()).decode())
            op, entries = header["op"], [(str(n), str(d), [int(x) for x in s]) for n, d, s in header["tensors"]]
        except (ValueError, KeyError, TypeError) as err:
            raise GroupLost(f"rank {self.rank}: a job header that is not streamer's ({type(err).__name__})") from err
        tensors = {}
        for name, dtype, shape in entries:
            want = getattr(torch, dtype, None)
            if not isinstance(want, torch.dtype):
                raise GroupLost(f"rank {self.rank}: a job header names no torch dtype; rank 0 is not streamer's")
            t = torch.empty(shape, dtype=torch.uint8 if want == torch.bool else want, device=self.device)
            self._collective(lambda t=t: dist.broadcast(t, 0, group=self.group))
            tensors[name] = t.to(want)
        return op, tensors

    def _collective(self, call: Callable[[], Any]) -> None:
        try:
            call()
        except (RuntimeError, ValueError) as err:  # DistBackendError is a RuntimeError
            raise GroupLost(f"rank {self.rank} of {self.world}: a collective failed ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}); another rank stopped") from err


ALONE = Shard()

STEP_TIMEOUT = timedelta(minutes=10)  # a collective inside a fragment: a rank this late is gone
IDLE_TIMEOUT = timedelta(days=365)  # the others wait for rank 0's next fragment this long


def join_group(device: torch.device) -> tuple[Shard, torch.device]:
    """This process's shard when torchrun started it (WORLD_SIZE > 1 in the environment), else
    ALONE; and the device it computes on (cuda:LOCAL_RANK for a cuda `device`). Joins the default
    process group (NCCL on CUDA, else gloo; torchrun's MASTER_ADDR/PORT rendezvous) and a gloo
    group for the job channel. Raises GroupLost when the rendezvous fails."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return ALONE, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    try:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=STEP_TIMEOUT)
        jobs = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    except (RuntimeError, ValueError) as err:
        raise GroupLost(f"could not join the process group of {world}: {err}") from err
    return Shard(dist.get_rank(), dist.get_world_size(), None, jobs, device), device


def leave_group(shard: Shard) -> None:
    """Rank 0 tells the others to stop (their `follow` returns); every rank then leaves the group."""
    if shard.world == 1:
        return
    try:
        if shard.rank == 0:
            shard.send_job("stop")
    except GroupLost:
        pass  # the others are gone already: nothing to tell them
    finally:
        dist.destroy_process_group()


def job_tensors(unlearner: Any, fragment: Fragment) -> dict[str, torch.Tensor | None]:
    """What a follower needs to run `fragment` exactly as rank 0 does: the weights and buffers of
    the model and the teacher, the retained set, the generator's state and the fragment."""
    out: dict[str, torch.Tensor | None] = {f"model/{k}": v for k, v in unlearner.model.state_dict().items()}
    out.update({f"teacher/{k}": v for k, v in unlearner.teacher.state_dict().items()})
    out["generator"] = unlearner.generator.get_state()
    for prefix, part in (("fragment", fragment), ("forgotten", unlearner.forgotten)):
        if part is not None:
            out.update({f"{prefix}/x": part.x, f"{prefix}/y": part.y, f"{prefix}/target": part.target,
                        f"{prefix}/unseen": part.unseen_mask()})
    return out


def _fragment(tensors: dict[str, torch.Tensor], prefix: str) -> Fragment | None:
    if f"{prefix}/x" not in tensors:
        return None
    return Fragment(*(tensors[f"{prefix}/{n}"] for n in ("x", "y", "target", "unseen")))


def follow(unlearner: Any) -> int:
    """The loop of every rank but 0: take rank 0's jobs and unlearn them alongside it until it says
    stop; the fragments run here. Returns the number of fragments run. Raises GroupLost when rank
    0 is gone."""
    shard, done = unlearner.shard, 0
    while True:
        op, tensors = shard.receive_job()
        if op == "stop":
            return done
        if op != "unlearn":
            raise GroupLost(f"rank {shard.rank}: a job that is neither unlearn nor stop; rank 0 is not streamer's")
        for role in ("model", "teacher"):
            module = getattr(unlearner, role)
            state = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{role}/")}
            module.load_state_dict(state)
        unlearner.generator.set_state(tensors["generator"].cpu())
        unlearner.forgotten = _fragment(tensors, "forgotten")
        fragment = _fragment(tensors, "fragment")
        assert fragment is not None  # every unlearn job carries its fragment
        try:
            unlearner.unlearn(fragment)
        except GroupLost:
            raise
        except Exception:  # noqa: BLE001
            # Rank 0 raised the same on the same inputs: it fails the fragment (EngineFailure,
            # bisection) and sends the next job. An error of this rank alone leaves the ranks in
            # different collectives, which ends in GroupLost on both.
            pass
        done += 1
