"""Data-parallel unlearning over torch.distributed (engine/distributed.py): two gloo processes
under torchrun against one process, on continual fragments of real digits; and the shard's pure
parts (rows, gather, reduce) alone."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from daemon_harness import train_digits
from streamer.engine import ALONE, Normalized, load_splits
from streamer.engine.models import digits_cnn

import ddp_job  # its directory is on sys.path (pytest prepends a test file's directory)

JOB = Path(__file__).with_name("ddp_job.py")
# The ranks' sums reorder float additions. In float32 Adam amplifies that rounding into another
# trajectory (measured: 5.6e-5 apart after 189 steps, 262 steps instead of 270 in the next
# fragment, 95% of held-out predictions the same); in float64 the two runs agree to 1.8e-15 with
# the same step counts, which is what shows the split loss is one process's loss. Logits within:
LOGIT_TOL = 1e-9
TRAIN_MODE_TOL = 0.05


@pytest.fixture(scope="module")
def digits_weights(tmp_path_factory) -> Path:
    return train_digits(tmp_path_factory.mktemp("ddp") / "digits.pt")


def _run(weights: Path, out: Path, ranks: int, *flags: str) -> list[dict]:
    out.mkdir()
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                if ranks > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, str(JOB), str(weights), str(out), *flags], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(ranks)]


def _logits(state: dict, x: torch.Tensor) -> torch.Tensor:
    model = Normalized(digits_cnn(), (0.0,), (1.0,)).double()
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(x.double())


@pytest.mark.slow
def test_two_gloo_processes_unlearn_as_one(digits_weights, tmp_path):
    """torchrun with 2 gloo ranks, float64: rank 1 follows all 3 fragments, both ranks end with
    bitwise the same weights, every fragment stops as it does in one process, at the same step,
    with every goal met and the same resolved targets, and the logits on held-out digits are one
    process's to LOGIT_TOL."""
    (one,) = _run(digits_weights, tmp_path / "one", 1, "float64")
    rank0, rank1 = _run(digits_weights, tmp_path / "two", 2, "float64")
    assert rank1["followed"] == 3
    assert rank0["state"].keys() == rank1["state"].keys()
    assert all(torch.equal(rank0["state"][k], rank1["state"][k]) for k in rank0["state"])
    for alone, shared in zip(one["outcomes"], rank0["outcomes"], strict=True):
        assert shared["stopped_by"] == alone["stopped_by"] == "goal"
        assert all(shared["fragment_met"]) and all(alone["fragment_met"])
        assert shared["targets"] == alone["targets"]
        assert shared["steps"] == alone["steps"]
    assert any(g is not None for g in rank0["outcomes"][2]["feature_gaps"])  # the feature goal's path ran
    audit = load_splits("digits").audit.x
    gap = (_logits(rank0["state"], audit) - _logits(one["state"], audit)).abs().max().item()
    assert gap <= LOGIT_TOL, gap


@pytest.mark.slow
@pytest.mark.parametrize("case", ["train_mode", "edges"])
def test_rows_that_mix_and_shares_of_no_row_run_as_one_process(tmp_path, case):
    """float64, 1 process against 2 gloo ranks: the same outcomes, the ranks bitwise equal.
    train_mode: BatchNorm statistics move with every forward (BatchNorm1d refuses a share of one
    row), so every rank runs every row of a step and counts 1/world of it; the attack (eval mode)
    is still split by rows, whose float64 rounding at another batch size Adam amplifies through
    the BatchNorm1d (measured 6.7e-3 apart), so weights are compared to TRAIN_MODE_TOL. edges: a
    retain buffer of one row and a fragment of one (a rank with no row of a term: it had hung, or
    made the loss NaN), a fragment that raises on every rank (rank 0 fails it, rank 1 goes on to
    the next); weights to LOGIT_TOL."""
    (one,) = _run(Path("-"), tmp_path / "one", 1, case, "float64")
    rank0, rank1 = _run(Path("-"), tmp_path / "two", 2, case, "float64")
    assert rank1["followed"] == len(one["outcomes"])
    assert all(torch.equal(rank0["state"][k], rank1["state"][k]) for k in rank0["state"])
    assert rank0["outcomes"] == one["outcomes"]
    assert sum(o.get("steps", 0) for o in one["outcomes"]) > 0
    if case == "edges":
        assert [o.get("raised") for o in one["outcomes"]] == [None, "RuntimeError", None]
    gap = max((rank0["state"][k].double() - one["state"][k].double()).abs().max().item() for k in one["state"])
    assert gap <= (TRAIN_MODE_TOL if case == "train_mode" else LOGIT_TOL), gap


def test_a_follower_gone_mid_fragment_is_group_lost(tmp_path):
    """Rank 1 exits while rank 0 unlearns with it (started as torchrun would, without its agent, so
    nothing stops rank 0 first): rank 0's next collective raises GroupLost, the infrastructure
    failure the daemon stops on, instead of hanging or returning an outcome."""
    codes, errors = _two_ranks(tmp_path, "train_mode", "follower_dies")
    assert codes == [0, 3], errors
    record = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert "another rank stopped" in record["lost"]


@pytest.mark.parametrize("attack", ["dtype", "size"])
def test_a_follower_refuses_a_job_that_is_not_streamers(tmp_path, attack):
    """A rank 0 that is not streamer (anyone who joins the rendezvous first) sends a header naming
    `__import__` as a dtype, or announcing 1 TiB of header: the follower stops with GroupLost
    before it allocates or evaluates anything (no pickle crosses the group)."""
    codes, errors = _two_ranks(tmp_path, "train_mode", "hostile", attack)
    assert codes[0] == 0 and codes[1] != 0, errors
    assert "GroupLost" in errors[1] and ("names no torch dtype" in errors[1] or "bytes (at most" in errors[1])


def _two_ranks(out: Path, *flags: str) -> tuple[list[int], list[str]]:
    """The job as 2 processes started the way torchrun starts them (its environment, without its
    agent, which would stop rank 0 when rank 1 fails): exit codes and stderr tails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    ranks = [subprocess.Popen([sys.executable, str(JOB), "-", str(out), *flags],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    codes = [p.wait(timeout=300) for p in ranks]
    return codes, [p.stderr.read()[-3000:] for p in ranks]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TestShardAlone:
    def test_alone_changes_nothing(self):
        """World 1: every row, values as given, the loss as it is, gradients untouched, no collective."""
        pick = torch.tensor([3, 1])
        assert ALONE.local(pick, 2) is pick and ALONE.local(None, 5) is None
        met = torch.tensor([True, False])
        assert ALONE.gather(met, 2) is met
        p = torch.nn.Parameter(torch.ones(3))
        loss = (p * 2).sum()
        loss.backward()
        assert torch.equal(ALONE.reduce([p], loss), loss.detach()) and torch.equal(p.grad, torch.full((3,), 2.0))
        assert ALONE.agree("step_cap") == "step_cap"
        assert ALONE.stop_signal(None) is None
