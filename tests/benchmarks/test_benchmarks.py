"""benchmarks/paper_tables.py: rendering merged result files (the runs themselves are benchmarks)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import paper_tables  # noqa: E402


def _rec(method, seed, test):
    return dict(table="single", dataset="mnist5k", method=method, k=64, seed=seed, forget_acc=0.0,
                retain_acc=0.9, test_acc=test, steps=10, seconds=1.0, goal_reached=True)


def test_render_merges_files_later_records_win(tmp_path, capsys):
    """--render prints one table from several files; a later record replaces an earlier one
    with the same (table, dataset, method, k, seed), others are kept."""
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"meta": {}, "records": [_rec("default", 0, 0.5), _rec("neggrad", 0, 0.1)]}))
    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps(_rec("default", 0, 0.9)) + "\n" + json.dumps(_rec("default", 1, 0.7)) + "\n")
    assert paper_tables.main(["--render", str(old), str(new), "--plot-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| default | 64 | 0.000±0.000 | 0.900±0.000 | 0.800±0.141 |" in out  # mean of 0.9 and 0.7
    assert "| neggrad | 64 | 0.000 | 0.900 | 0.100 |" in out


def test_forgetting_attacks_forget_order_and_plot(tmp_path):
    """Every canary is in the single-shot 64 (so the retrained reference never saw any), the
    128 are distinct and drawn by the seed; the PNG renders from records."""
    import torch

    import forgetting_attacks as fa
    from streamer.engine.canaries import CanarySpec, plant_canaries
    from streamer.engine.data import Dataset, Splits

    data = Dataset(torch.rand(600, 1, 4, 4), torch.arange(600) % 10)
    canaries = plant_canaries(data, CanarySpec(interclass=20, source=6, sink=0, random_label=8))
    splits = Splits(data, data.subset(torch.arange(10)), data.subset(torch.arange(10)))
    order = fa.forget_order(splits, canaries, seed=0)
    assert len(order) == 128 and len(set(order.tolist())) == 128
    assert set(canaries.index.tolist()) <= set(order[:64].tolist())
    assert not torch.equal(order, fa.forget_order(splits, canaries, seed=1))
    pair = {"model": 0.5, "reference": 0.1}
    attacks = {"probe_recovery": pair, "probe_recovery_prehead": pair, "relearn": {"50": pair},
               "mia_efficacy": pair, "loss_auc": pair, "streisand_auc": pair}
    recs = [dict(dataset="mnist5k", setting="single", goal=g, method="head", kind=kind, forget_acc=0.1,
                 forget_acc_ref=0.0, true_acc=0.9, true_acc_ref=1.0, test_drop=0.01, seconds_per_fragment=3.0,
                 seed=0, attacks=attacks) for g in fa.GOALS for kind in ("canary", "typical")]
    fa.plot(recs, "mnist5k", tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_forgetting_attacks_buffer_reaches_the_unlearner(tmp_path, capsys):
    """--buffer's Dataset is the Unlearner's retain buffer (the same fragment ends elsewhere with it),
    and --render keeps METHOD+bufferN records under --methods METHOD."""
    import torch
    from torch import nn

    import forgetting_attacks as fa
    from streamer.engine.data import Dataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 4, 4, generator=g), torch.arange(64) % 10
    buffer = Dataset(torch.rand(32, 1, 4, 4, generator=g), torch.arange(32) % 10)
    weights = []
    for buf in (None, buffer):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
        *_, targets = fa.run_unlearning(model, "mnist5k", "head", "misclassify", "single", x, y, y, 0,
                                        {"max_steps": 20, "n_adv": 0}, buf)
        weights.append(model[1].weight.detach().clone())
    assert not torch.allclose(weights[0], weights[1])
    pair = {"model": 0.5, "reference": 0.1}
    attacks = {"probe_recovery": pair, "probe_recovery_prehead": pair, "relearn": {"50": pair},
               "mia_efficacy": pair, "loss_auc": pair, "streisand_auc": pair}
    rec = dict(dataset="mnist5k", setting="single", goal="misclassify", method="head+buffer500", kind="canary",
               forget_acc=0.0, forget_acc_ref=0.0, true_acc=0.9, true_acc_ref=1.0, test_drop=0.01, seed=0,
               seconds_per_fragment=3.0, goal_reached_every_fragment=True, attacks=attacks)
    path = tmp_path / "r.json"
    path.write_text(json.dumps([rec]))
    assert fa.main(["--render", str(path), "--methods", "head", "--out", str(tmp_path)]) == 0
    assert "| head+buffer500 | canary |" in capsys.readouterr().out


def test_horizon_tiny_run_json_references_and_render(tmp_path, monkeypatch, capsys):
    """benchmarks/horizon.py end to end on a slice of MNIST-5k (2 fragments of 8, 1-epoch references):
    the JSON holds every fragment and report point (0, half, end) with RSS, the retrained references
    at 0 (the original), half and end, and the constrained retrain; references are cached by recipe
    (a second request trains nothing); --render re-prints the targets and plots."""
    import pytest
    import torch

    import horizon
    from streamer.engine.data import Splits, load_splits

    full = load_splits("mnist5k")
    small = Splits(full.train.subset(torch.arange(600)), full.buffer.subset(torch.arange(64)),
                   full.audit.subset(torch.arange(200)))
    monkeypatch.setattr(horizon, "load_splits", lambda name: small)
    argv = ["--datasets", "mnist5k", "--seeds", "0", "--goals", "misclassify", "--variants", "data-free",
            "--requests", "16", "--every", "8", "--epochs", "1", "--weights-dir", str(tmp_path / "w"),
            "--out", str(tmp_path / "out")]
    assert horizon.main(argv) == 0
    assert "| mnist5k | every fragment reaches its goal |" in capsys.readouterr().out
    result = tmp_path / "out" / "horizon-mnist5k.json"
    (run,) = json.loads(result.read_text())["runs"]
    assert (run["goal"], run["variant"], run["requests"], run["half"]) == ("misclassify", "data-free", 16, 8)
    assert [f["requests"] for f in run["fragments"]] == [8, 16] and run["fragments"][-1]["retained"] == 16
    checks = run["checkpoints"]
    assert [c["requests"] for c in checks] == [0, 8, 16]
    assert all(c["rss_mb"] > 0 for c in checks) and all("retrained_test_acc" in c for c in checks)
    assert checks[0]["retrained_test_acc"] == run["before"]  # retrained without nothing = the original
    if all(f["goal_reached"] for f in run["fragments"]):  # the engine's goal covers the retained set too
        assert checks[1]["goal_rate"] == checks[2]["goal_rate"] == 1.0
    assert 0 < run["end"]["constrained_test_acc"] <= 1 and run["end"]["sent_to_own_label"] <= 1
    assert len(list((tmp_path / "w").glob("*.pt"))) == 4  # original, half, end, constrained

    monkeypatch.setattr(horizon, "fit", lambda *a, **k: pytest.fail("a cached reference was trained again"))
    index, relabel = horizon.request_order(small.train.y, 16, 0)
    assert len(set(index.tolist())) == 16 and bool((relabel != small.train.y[index]).all())
    _, info = horizon.reference("mnist5k", small, horizon.parse_args(argv), exclude=index[:8])
    assert info["recipe"]["n_exclude"] == 8
    assert horizon.main(["--render", str(result), "--out", str(tmp_path / "r")]) == 0
    assert "| mnist5k | misclassify | data-free | 1 | 16 |" in capsys.readouterr().out
    assert (tmp_path / "r" / "horizon-mnist5k.png").stat().st_size > 10_000
