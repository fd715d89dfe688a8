"""The reproduce command's bookkeeping: steps are keyed by their full command line and reused, and the table
aggregates seeds into mean ± std in the paper's layout."""
import json
import math

from compress_lit.reproduction.runs import _hash, _run_step
from compress_lit.reproduction.tables import aggregate, markdown_table


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


def _preset(name="full", **over):
    from hydra import compose, initialize_config_dir

    from compress_lit.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="reproduce", overrides=[f"reproduce_preset={name}",
                                                           *[f"{k}={v}" for k, v in over.items()]])


def test_cached_methods_read_the_teacher_cache_and_the_others_do_not():
    from pathlib import Path

    from compress_lit.reproduction.runs import step_command

    cfg = _preset()
    ckpt = Path("results/teacher/full_teacher.ckpt")
    for method in ("regression", "regression_bn", "crd", "compress_2q", "compress_1q"):
        module, args = step_command(cfg, "alexnet_small", method, 0, ckpt)
        assert module == "compress_lit.train" and "teacher.cached=true" in args, method
    for method in ("cc", "supervised"):  # CC runs the teacher once for its k-means; supervised needs no teacher
        module, args = step_command(cfg, "alexnet_small", method, 0, ckpt)
        assert module == "compress_lit.train" and not any(a.startswith("teacher.cached") for a in args), method
    module, args = step_command(cfg, "alexnet_small", "moco_scratch", 1, ckpt)
    assert module == "compress_lit.pretrain" and "seed=1" in args and not any(a.startswith("teacher") for a in args)


def test_ablation_points_vary_one_setting_at_a_time_and_share_the_centre_with_the_table():
    from pathlib import Path

    from compress_lit.reproduction.runs import ablation_points, step_command

    cfg = _preset()
    ab = cfg.ablation
    pts = ablation_points(ab)
    assert pts[0] == ("centre", {})
    assert [c for k, c in pts if k == "temperature"] == [{"temperature": t} for t in (0.02, 0.07, 0.1)]
    assert [c for k, c in pts if k == "queue_size"] == [{"queue_size": q} for q in (1024, 2048, 8192)]
    ckpt = Path("t.ckpt")
    _, args = step_command(cfg, ab.student, ab.method, 0, ckpt, ("method.temperature=0.1",))
    assert args[-1] == "method.temperature=0.1"  # last, so it wins over the preset's values


def test_a_step_is_reused_under_another_tag(tmp_path, capsys):
    args = ["method=compress_2q", "seed=0"]
    done = tmp_path / f"alexnet_small-compress_2q-s0-{_hash(['compress_lit.train', *args])}"
    done.mkdir()
    (done / "results.json").write_text(json.dumps({"student (x)": {"1-NN": 70.0}}))
    got_dir, res = _run_step("compress_lit.train", args, tmp_path, "ablation-centre", dry=False)
    assert got_dir == done and res["student (x)"]["1-NN"] == 70.0


def test_ablation_table_layout(tmp_path, monkeypatch):
    """run_ablation on finished runs: rows sorted by value, the centre in both tables, mean ± std over seeds."""
    from pathlib import Path

    from compress_lit.reproduction import runs as rp_runs, settings as rp_settings
    cfg = _preset(out_dir=str(tmp_path), **{"ablation.seeds": "[0,1]", "ablation.temperatures": "[0.1,0.04]",
                                            "ablation.queue_sizes": "[4096,1024]"})
    scores = {("0.04", "4096"): 80.0, ("0.1", "4096"): 70.0, ("0.04", "1024"): 75.0}

    def fake_step(module, args, runs, tag, dry, **k):
        t = next((a.split("=")[1] for a in args if a.startswith("method.temperature=")), "0.04")
        q = [a.split("=")[1] for a in args if a.startswith("method.queue_size=")][-1]
        seed = int(next(a.split("=")[1] for a in args if a.startswith("seed=")))
        v = scores[(t, q)] + seed  # seeds 0, 1 -> mean +0.5, std sqrt(0.5)
        return runs / tag, {"student": {m: v for m in rp_settings.METRICS}}

    monkeypatch.setattr(rp_runs, "_run_step", fake_step)
    table = rp_runs.run_ablation(cfg, tmp_path, Path("t.ckpt"), tmp_path)
    temp, queue = table.values()
    assert list(temp) == ["T=0.04", "T=0.1"] and list(queue) == ["queue=1024", "queue=4096"]
    assert temp["T=0.04"]["1-NN"][:2] == [80.5, math.sqrt(0.5)] and queue["queue=4096"] == temp["T=0.04"]
    assert queue["queue=1024"]["1-NN"][0] == 75.5
    md = (tmp_path / "ablation_fashion_mnist.md").read_text()
    assert "| T=0.1 | 70.50 ± 0.71 |" in md and "| queue=1024 | 75.50 ± 0.71 |" in md


def test_the_family_methods_are_rows_under_the_same_teacher_budget_and_seeds():
    """SEED, SimReg and DisCo run with every other row's common arguments; SEED and SimReg read the teacher cache,
    DisCo (two views per image) runs the teacher itself."""
    from pathlib import Path

    from compress_lit.runtime.precision import command_precision
    from compress_lit.reproduction.runs import step_command
    from compress_lit.reproduction.settings import METHOD_LABELS

    for name in ("full", "quick"):
        cfg = _preset(name)
        assert {"seed", "simreg", "disco"} <= set(cfg.methods) | set(cfg.family_methods)
        _, reference = step_command(cfg, cfg.students[0], "compress_2q", 0, Path("t.ckpt"))
        for method in ("seed", "simreg", "disco"):
            module, args = step_command(cfg, cfg.students[0], method, 0, Path("t.ckpt"))
            assert module == "compress_lit.train" and f"method={method}" in args
            common = command_precision(list(cfg.common_args))[0]  # trainer.precision=auto as resolved here
            assert set(common) <= set(args) and "teacher.checkpoint=t.ckpt" in args
            assert ("teacher.cached=true" in args) == (method != "disco"), (name, method)
            # the same arguments as CompReSS-2q's run but the method, its own method_args (DisCo's weight, on the
            # command line so that the run hash follows it) and the cache (DisCo runs the teacher itself)
            own = list(cfg.method_args.get(method, []))
            assert own == (["method.disco_weight=32.0"] if method == "disco" else []), (name, method)

            def rest(a, m):
                return [x for x in a if x != f"method={m}" and x not in own
                        and (method != "disco" or x not in cfg.cache_args)]
            assert rest(args, method) == rest(reference, "compress_2q")
    assert [METHOD_LABELS[m] for m in ("seed", "simreg", "disco")] == ["SEED", "SimReg", "DisCo"]


def test_the_quick_table_has_a_row_per_family_method(tmp_path, monkeypatch):
    from compress_lit.reproduction import run as rp, runs as rp_runs, settings as rp_settings
    cfg = _preset("quick", out_dir=str(tmp_path))
    (tmp_path / "teacher").mkdir()
    import torch

    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "teacher" / "quick_teacher.ckpt")
    score = {m: 60.0 + i for i, m in enumerate(cfg.methods)}

    def fake_step(module, args, runs, tag, dry, *a, **k):
        method = next((a.split("=")[1] for a in args if a.startswith("method=")), "moco_scratch")
        return runs / tag, {"student": {m: score.get(method, 70.0) for m in rp_settings.METRICS}}

    monkeypatch.setattr(rp_runs, "_run_step", fake_step)
    monkeypatch.setattr(rp_runs, "build_teacher_cache", lambda step, runs: None)
    table = rp.run_reproduce(cfg)["resnet18_small"]
    assert [table[label]["1-NN"][0] for label in ("SEED", "SimReg", "DisCo")] == [68.0, 69.0, 70.0]
    md = (tmp_path / "table1_fashion_mnist_quick.md").read_text()
    assert "| SEED | 68.00 ± 0.00 |" in md and "| DisCo | **70.00 ± 0.00** |" in md  # the best self-supervised row


def test_the_teacher_check_reads_the_released_teacher_as_a_teacher(tmp_path):
    """The committed teacher is in release form (backbone weights alone): the check evaluates it through its
    preset's format and architecture, not as a training checkpoint (which would need its config)."""
    from omegaconf import OmegaConf

    from compress_lit.reproduction.run import teacher_model_args

    cfg = OmegaConf.create({"teacher_overrides": ["teacher=fashion_mnist"]})
    assert teacher_model_args(cfg) == ["model_format=compress_lit", "model.arch=convnet", "model.name=fashion_mnist",
                                       "model.small_input=true", "model.width_multiplier=1.0"]
    assert teacher_model_args(OmegaConf.create({"teacher_overrides": []})) == []
