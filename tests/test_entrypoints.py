"""End to end through the command line: `python -m compress_lit.train` builds its demo teacher with
`compress_lit.pretrain` when missing, distils, evaluates; a second run reuses the teacher."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

TINY = ["data.train_subset=256", "data.val_subset=128", "data.batch_size=64", "method.queue_size=128",
        "optim.epochs=1", "eval.knn_k=[1]", "eval.cluster_seeds=2", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
TEACHER_ARGS = ["pretrain_experiment=demo_teacher", "optim.epochs=1", "data.train_subset=256", "data.batch_size=64",
                "method.queue_size=128", "student.width_multiplier=0.25", "trainer.enable_progress_bar=false",
                "eval.at_end=false"]
TINY_TEACHER = "teacher.pretrain_args=[" + ",".join(f"'{a}'" for a in TEACHER_ARGS) + "]"


def run(module, args, cwd, cache):
    env = dict(os.environ, COMPRESS_LIT_CACHE=str(cache), PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_train_builds_the_demo_teacher_then_reuses_it(tmp_path):
    cache = tmp_path / "cache"
    args = [*TINY, "teacher.width_multiplier=0.25", TINY_TEACHER]
    first = run("compress_lit.train", [*args, f"hydra.run.dir={tmp_path}/run1"], tmp_path, cache)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "pretraining it first" in first.stdout
    teacher_ckpt = cache / "teachers" / "demo_resnet18_digits.ckpt"
    assert teacher_ckpt.exists()
    results = json.loads((tmp_path / "run1" / "results.json").read_text())
    assert set(results) == {"teacher (demo)", "student (compress_2q)", "student, random init"}
    assert all(set(row) == {"1-NN", "cluster", "cluster_std", "linear"} for row in results.values())
    assert all(0 <= row[m] <= 100 for row in results.values() for m in ("1-NN", "cluster", "linear"))
    assert "1-NN" in first.stdout and "student (compress_2q)" in first.stdout
    ckpt = torch.load(tmp_path / "run1" / "checkpoints" / "last.ckpt", weights_only=False)
    assert "queues.bank_teacher" in ckpt["state_dict"] and "student_momentum.conv1.weight" in ckpt["state_dict"]
    assert ckpt["hyper_parameters"]["config"]["method"]["queue_size"] == 128

    mtime = teacher_ckpt.stat().st_mtime
    second = run("compress_lit.train", [*args, "method=compress_1q", "eval.every_n_epochs=1",
                                         f"hydra.run.dir={tmp_path}/run2"], tmp_path, cache)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "pretraining it first" not in second.stdout
    assert teacher_ckpt.stat().st_mtime == mtime
    assert "student (compress_1q)" in json.loads((tmp_path / "run2" / "results.json").read_text())
    # the in-training evaluation callbacks logged their metrics
    header = (tmp_path / "run2" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "eval/knn_top1_k1" in header and "eval/cluster_acc" in header


def test_bad_value_fails_at_start_up_naming_the_key(tmp_path):
    out = run("compress_lit.train", ["method.queue_size=-1", f"hydra.run.dir={tmp_path}/r"], tmp_path, tmp_path)
    assert out.returncode != 0
    assert "method.queue_size=-1" in out.stderr
    assert not (tmp_path / "cache").exists()  # nothing was built


def test_missing_teacher_file_is_named(tmp_path):
    missing = tmp_path / "nope" / "moco_v2_800ep_pretrain.pth.tar"
    out = run("compress_lit.train", ["teacher=mocov2_resnet50", f"teacher.checkpoint={missing}",
                                     "student=resnet18_small", f"hydra.run.dir={tmp_path}/r"], tmp_path, tmp_path)
    assert out.returncode != 0
    assert str(missing) in out.stderr


def test_a_vit_teacher_whose_patch_does_not_divide_the_image_fails_in_one_line(tmp_path):
    """teacher=dinov2_vits14 on the default 16-px digits used to print a 127-line traceback at the first step."""
    out = run("compress_lit.train", ["teacher=dinov2_vits14", f"teacher.checkpoint={tmp_path}/t.pth",
                                     f"hydra.run.dir={tmp_path}/r"], tmp_path, tmp_path)
    assert out.returncode != 0
    assert "data.image_size=16 is not a multiple of the patch size of teacher.arch=vit_small_patch14_dinov2" \
        in out.stderr
    assert f"teacher.checkpoint={tmp_path}/t.pth: no such teacher checkpoint file" in out.stderr  # both at once
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) <= 3, out.stderr
