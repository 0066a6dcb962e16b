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
