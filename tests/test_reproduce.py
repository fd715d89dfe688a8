"""The reproduce command's bookkeeping: steps are keyed by their full command line and reused, and the table
aggregates seeds into mean ± std in the paper's layout."""
import json
import math

from compress_lit.reproduce import _hash, _run_step, aggregate, markdown_table


def test_step_is_reused_when_its_results_exist(tmp_path, capsys):
    args = ["student=resnet18_small", "seed=0"]
    run_dir = tmp_path / f"tag-{_hash(['compress_lit.train', *args])}"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps({"student (x)": {"1-NN": 80.0}}))
    got_dir, res = _run_step("compress_lit.train", args, tmp_path, "tag", dry=False)  # would fail if it ran
    assert got_dir == run_dir and res == {"student (x)": {"1-NN": 80.0}}
    assert "reusing" in capsys.readouterr().out
    assert _hash(args) != _hash(["student=resnet18_small", "seed=1"])


def test_aggregate_mean_and_sample_std_over_seeds():
    rows = {"CompReSS-2q": [{"1-NN": 84.0, "linear": 86.0, "cluster": 50.0, "20-NN": 85.0},
                            {"1-NN": 86.0, "linear": 86.0, "cluster": 54.0, "20-NN": 85.0}]}
    a = aggregate(rows)["CompReSS-2q"]
    assert a["1-NN"] == [85.0, math.sqrt(2.0), 2]
    assert a["linear"] == [86.0, 0.0, 2]
    md = markdown_table({"resnet18_small": aggregate(rows)},
                        {"data": "fashion_mnist", "command": "c", "teacher": "t", "student_args": "s", "seeds": [0, 1]})
    assert "| CompReSS-2q | 85.00 ± 1.41 | 85.00 ± 0.00 | 52.00 ± 2.83 | 86.00 ± 0.00 | 2 |" in md
