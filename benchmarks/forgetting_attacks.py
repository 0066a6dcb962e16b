"""Forgetting attacks after unlearning (issue 11, first part): a skeleton.

  python benchmarks/forgetting_attacks.py --quick --json bench-out/attacks-quick.json

--quick: MNIST-5k, seed 0, the default method, single-shot k=64 (misclassify), then every attack
of streamer.engine.verification on the unlearned model next to the ORIGINAL model (no retrained
reference yet), held-out data = the audit split, retained data = a 1,000-image sample of D_r.
Not yet done (see issue 11): Fashion, 3 seeds, retrained references, canaries, continual runs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from paper_tables import _forget_order, _model, _setup  # noqa: E402
from streamer.engine.unlearn import Fragment, Unlearner, method_config  # noqa: E402
from streamer.engine.verification import attack_report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", required=True, help="the only mode so far")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights-dir", type=Path, default=Path("bench-out/weights"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    dataset, device = "mnist5k", torch.device("cpu")
    splits, state = _setup(dataset, args.weights_dir, device)
    index, _ = _forget_order(splits, args.seed)
    index = index[: args.k]
    original, model = _model(dataset, state, device), _model(dataset, state, device)
    x, y = splits.train.x[index], splits.train.y[index]
    start = time.perf_counter()
    outcome = Unlearner(model, method_config("default", seed=args.seed), 10).unlearn(
        Fragment(x, y, torch.full_like(y, -1)))
    seconds = time.perf_counter() - start
    keep = torch.ones(len(splits.train), dtype=torch.bool)
    keep[index] = False
    retained = torch.randperm(int(keep.sum()), generator=torch.Generator().manual_seed(args.seed))[:1000]
    report = attack_report(model, original, x, y, splits.audit.x, splits.audit.y,
                           splits.train.x[keep][retained], splits.train.y[keep][retained], seed=args.seed)
    record = {"dataset": dataset, "method": "default", "goal": "misclassify", "k": args.k, "seed": args.seed,
              "reference": "original", "goal_reached": outcome.goal_reached, "steps": outcome.steps,
              "seconds": round(seconds, 1), **report.to_json()}
    print(f"{dataset} default k={args.k} seed {args.seed}: goal reached {outcome.goal_reached} after "
          f"{outcome.steps} steps, {seconds:.0f} s; reference = the original model (no retrained one yet)")
    print("| attack | unlearned | original |\n|---|---|---|")
    rows = [("forget accuracy", report.forget_accuracy), ("probe recovery", report.probe_recovery),
            *((f"relearn {s} steps", p) for s, p in report.relearn.items()), ("MIA-efficacy", report.mia_efficacy),
            ("loss-threshold AUC", report.loss_auc), ("Streisand AUC", report.streisand_auc)]
    for name, pair in rows:
        print(f"| {name} | {pair.model:.3f} | {pair.reference:.3f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([record], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
