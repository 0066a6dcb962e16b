"""The failure policy: what happens to requests when something goes wrong, in one place.

| class          | examples                                              | outcome for the requests                    | the daemon            |
|----------------|-------------------------------------------------------|---------------------------------------------|-----------------------|
| record         | undecodable batch (codec, CRC), not UTF-8/JSON,       | dead letter + ledger row + `rejected`       | keeps going           |
|                | duplicate keys, bad text, failed validation, conflict | receipt (when a request_id can be read)     |                       |
| fragment       | the engine or model raises (incl. CUDA OOM) or gives  | bisection from the last good model: healthy | keeps going; counted  |
|                | NaN/Inf logits on some input                          | requests applied, each culprit `failed`     | and alerted           |
| guard rail     | audit accuracy past the utility budget                | the group's requests `deferred`: owed, in   | keeps going; alerted; |
|                |                                                       | the vault, applied by the next rebase       | retrain advised       |
| unreachable    | an instance misses its goal max_missed_fragments      | `abandoned` in the ledger; leaves the       | keeps going; alerted  |
|                | fragments in a row                                    | retained set                                |                       |
| infrastructure | broker gone past its deadline, disk full, damaged     | none yet: nothing committed past them       | stops with one line;  |
|                | state, ledger unwritable                              |                                             | resumes exactly once  |

Record-level handling lives in collector.py (kafka/undecodable.py finds the undecodable batches);
this module holds the fragment level's failures, which the worker raises; quarantine.py applies
the policy to them (bisection) in the daemon's worker thread.
"""
from __future__ import annotations

from ..errors import StreamerError
from ..intake import storable_text

__all__ = ["EngineFailure", "FragmentFailure", "NonFiniteOutputs", "UtilityFloorBreached"]


class FragmentFailure(StreamerError):
    """A group of requests could not be applied; `bisect`: retrying smaller groups may isolate a culprit."""

    kind = "fragment"
    bisect = True

    def __init__(self, reason: str, numbers: dict[str, float | int | None] | None = None):
        reason = storable_text(reason if len(reason) <= 1000 else f"{reason[:1000]}... ({len(reason)} characters)")
        super().__init__(reason)
        self.reason = reason
        self.numbers = dict(numbers or {})  # what was measured (the operator's log and ledger, not the receipt)


class EngineFailure(FragmentFailure):
    """The engine or the model raised on this group's inputs."""

    kind = "engine_error"


class NonFiniteOutputs(FragmentFailure):
    """After unlearning, the model gives NaN/Inf logits: the version would be broken."""

    kind = "non_finite"


class UtilityFloorBreached(FragmentFailure):
    """After unlearning, audit accuracy would be below the utility budget: the group is refused whole
    (the method's cost, not one input's) and its requests are deferred until a retrained model takes
    over (`streamer rebase`)."""

    kind = "utility_floor"
    bisect = False
