"""The newcomer's second pass: one's own image folder end to end with default options, the demo on a busy machine
and under Ctrl-C, errors that point at the fix (every missing piece at once, Hydra's errors in one line with the
closest keys), where each command wrote, and a folder checker that lists every problem of an image tree."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from compress_lit.runtime.config import ConfigError, register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
register_configs()
TINY = ["teacher.format=random", "teacher.checkpoint=null", "teacher.pretrain_if_missing=false",
        "teacher.width_multiplier=0.25", "student.width_multiplier=0.125", "method.queue_size=64",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "eval.at_end=false"]


def _env(tmp_path, **extra):
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1",
            "COMPRESS_LIT_CACHE": str(tmp_path / "cache"), **extra}


def _cli(module, args, tmp_path, timeout=600):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)


def _last_err(proc) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def own_folder(root: Path, classes=("ant", "bee", "cow"), n_train=20, n_val=6) -> Path:
    """3 classes x 20 photo-like JPEGs (smooth colour fields plus noise), as a user's own small folder."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for k in range(n):
                yy, xx = np.mgrid[0:40, 0:48]
                base = np.stack([(xx * (c + 1) * 3) % 256, (yy * 5 + 60 * c) % 256, (xx + yy + k * 7) % 256], -1)
                img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{name}{k}.jpg", quality=90)
    return root


# ------------------------------------------------------------ 1. + 4. own folder: train -> evaluate -> export
def test_own_folder_train_evaluate_export_with_default_options_say_where_they_wrote(tmp_path):
    data = own_folder(tmp_path / "my_images")
    run = tmp_path / "runs" / "train"
    train = _cli("compress_lit.train", [*TINY, "data=imagenet", f"data.root={data}", "data.image_size=32",
                                        "data.resize_size=36", "data.batch_size=16", "data.num_workers=0",
                                        "optim.epochs=1", f"hydra.run.dir={run}"], tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    assert train.stdout.strip().splitlines()[-1] == f"compress_lit.train: wrote {run}"
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["epoch0-step3.ckpt", "last.ckpt"]  # no '=': passable as checkpoint= without quoting

    ev_dir = tmp_path / "runs" / "evaluate"
    ev = _cli("compress_lit.evaluate", [f"checkpoint={run}/checkpoints/last.ckpt", f"hydra.run.dir={ev_dir}"],
              tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    out = ev.stdout + ev.stderr
    assert "linear.batch_size=256 is larger than the 60 training images: the probe trains on batches of 60" in out
    assert ev.stdout.strip().splitlines()[-1] == f"compress_lit.evaluate: wrote {ev_dir}"
    assert (ev_dir / "results.json").is_file()

    ex_dir = tmp_path / "runs" / "export"
    ex = _cli("compress_lit.export", [f"checkpoint={run}/checkpoints/last.ckpt", f"hydra.run.dir={ex_dir}"],
              tmp_path)
    assert ex.returncode == 0, ex.stderr[-3000:]
    assert ex.stdout.strip().splitlines()[-1] == f"compress_lit.export: wrote {ex_dir}"


def test_a_failed_evaluate_leaves_no_half_filled_folder(tmp_path, monkeypatch):
    import compress_lit.evaluation.knn as knn
    from compress_lit.evaluate import run_evaluate

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["model_format=pixels", "data=digits", "eval=[knn]",
                                                         "save_features=true"])
    out = tmp_path / "eval"
    (out / ".hydra").mkdir(parents=True)

    def fails(*a, **k):
        raise ConfigError("knn.k=[999] is invalid")

    monkeypatch.setattr(knn, "knn_evaluate", fails)
    with pytest.raises(ConfigError):
        run_evaluate(cfg, out)
    assert sorted(p.name for p in out.iterdir()) == [".hydra"]  # features.npz was written, then removed
    monkeypatch.undo()
    run_evaluate(cfg, out)
    assert (out / "features.npz").is_file() and (out / "results.json").is_file()


# ----------------------------------------------------------------------------- 2. Ctrl-C, the busy machine
def _wait(pred, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not pred():
        time.sleep(0.1)
    assert proc.poll() is None, "the command ended before the test could act"


def test_ctrl_c_during_the_teachers_pretraining_is_one_line_and_the_next_run_continues_it(tmp_path):
    """As `make demo` in a fresh clone: the student's run pretrains its teacher first. Ctrl-C there ends in one
    line and leaves no empty outputs/train folder; the next run continues the teacher from its last epoch."""
    teacher = tmp_path / "cache" / "teachers" / "demo.ckpt"
    args = ["teacher.width_multiplier=0.25", f"teacher.checkpoint={teacher}", "student.width_multiplier=0.125",
            "trainer.enable_progress_bar=false", "eval.at_end=false", "optim.epochs=1",
            "teacher.pretrain_args=['pretrain_experiment=demo_teacher','student.width_multiplier=0.25',"
            "'data.train_subset=256','optim.epochs=12','eval.at_end=false','trainer.enable_model_summary=false']"]
    # SIGINT reset to its default in the child: a test run started in the background (CI scripts, `&`) inherits an
    # ignored SIGINT, and a Python started with SIGINT ignored never turns it into KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "compress_lit.train", *args], cwd=tmp_path, env=_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    pre = tmp_path / "outputs" / "pretrain"
    _wait(lambda: any(pre.glob("*/*/checkpoints/last.ckpt")), proc)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group: train and its pretraining
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert [ln for ln in err.splitlines() if "interrupted" in ln] == [
        "compress_lit.train: interrupted (Ctrl-C); the teacher's pretraining stopped; the same command continues it "
        "from its last epoch (-m compress_lit.pretrain resume=auto)"]
    assert not (tmp_path / "outputs" / "train").exists() or not any((tmp_path / "outputs" / "train").rglob("*.ckpt"))
    assert not any((tmp_path / "outputs" / "train").glob("*/*")) if (tmp_path / "outputs" / "train").exists() else True
    assert not teacher.exists()

    again = subprocess.run([sys.executable, "-m", "compress_lit.train", *args], cwd=tmp_path, env=_env(tmp_path),
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resume=auto: resuming from" in again.stdout + again.stderr  # the pretraining continued its first run
    assert teacher.is_file()


def test_threads_follow_the_free_cores(monkeypatch):
    import torch

    from compress_lit.runtime import threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("COMPRESS_LIT_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(threads, "busy_cores", lambda cpus: 0.9)  # one neighbour keeps a core busy
        assert threads.choose_threads() == 1 and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setattr(threads, "busy_cores", lambda cpus: 0.2)  # a quiet machine: unchanged
        assert threads.choose_threads() is None and torch.get_num_threads() == 2
        monkeypatch.setattr(threads, "busy_cores", lambda cpus: 2.0)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # an explicit setting is kept
        assert threads.choose_threads() is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_busy_cores_measures_another_process():
    from compress_lit.runtime.threads import busy_cores

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = busy_cores(os.sched_getaffinity(0), window=0.5)
    finally:
        spinner.kill()
    assert 0.7 <= busy <= len(os.sched_getaffinity(0)) + 0.05


# -------------------------------------------------------------------- 3. every missing piece at once
def test_the_headline_command_reports_every_missing_piece_with_a_complete_command():
    from compress_lit.training.checks import check_train_startup

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["teacher=resnet50x4", "student=alexnet"])
    with pytest.raises(ConfigError) as e:
        check_train_startup(cfg)
    msg = str(e.value)
    assert msg.startswith("2 missing: teacher.checkpoint (the resnet50x4 teacher's file, teacher.format=simclr_tf; "
                          "docs/teachers.md says where each teacher is downloaded)")
    assert "the paper's setting is data=imagenet data.root=<folder>" in msg
    assert msg.endswith("teacher.checkpoint=/path/to/resnet50x4.pth data=imagenet data.root=/path/to/imagenet")
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["teacher=resnet50x4", "student=alexnet", "data=imagenet",
                                                      "teacher.checkpoint=/nowhere/r50x4.pth",
                                                      "data.root=/nowhere/imagenet"])
    with pytest.raises(ConfigError, match=r"^2 problems: teacher\.checkpoint=/nowhere/r50x4\.pth: no such teacher "
                                          r"checkpoint file .*; data\.root=/nowhere/imagenet: no such folder"):
        check_train_startup(cfg)


# ------------------------------------------------------------------------- 5. Hydra's errors, one line
@pytest.mark.parametrize("arg, line", [
    ("method.temprature=0.1", "compress_lit.train: ConfigError: method.temprature is not an option: did you mean "
                              "method.temperature?"),
    ("student=alexnett", "compress_lit.train: ConfigError: student=alexnett is not an option: did you mean "
                         "student=alexnet? (options: alexnet, alexnet_small,"),
    ("teacher.checkpoint=/runs/x/checkpoints/epoch=0-step=22.ckpt",
     "compress_lit.train: ConfigError: cannot read 'teacher.checkpoint=/runs/x/checkpoints/epoch=0-step=22.ckpt': "
     "Hydra takes '=', ',', spaces, quotes, brackets and non-ASCII characters in a value for syntax; quote the value "
     "for Hydra, and the whole argument for the shell: \"teacher.checkpoint='/runs/x/checkpoints/epoch=0-step=22.ckpt'\""),
])
def test_hydra_errors_are_one_line_pointing_at_the_fix(tmp_path, arg, line):
    proc = _cli("compress_lit.train", [arg], tmp_path, timeout=120)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert _last_err(proc).startswith(line)


def test_a_quoted_value_with_equals_signs_reaches_the_run(tmp_path):
    from compress_lit.runtime.startup import hydra_error_line  # noqa: F401 - the shaping is only for errors

    proc = _cli("compress_lit.train", ["teacher.checkpoint='/nowhere/epoch=0-step=22.ckpt'",
                                       "teacher.format=compress_lit", "teacher.pretrain_if_missing=false"],
                tmp_path, timeout=120)
    assert _last_err(proc) == ("compress_lit.train: ConfigError: teacher.checkpoint=/nowhere/epoch=0-step=22.ckpt: "
                               "no such teacher checkpoint file")


# ----------------------------------------------------------------------------------- 6. the folder checker
def test_the_folder_checker_lists_every_problem_in_one_pass(tmp_path):
    from compress_lit.data.check import main

    root = own_folder(tmp_path / "tree", n_train=2, n_val=1)
    good = root / "train" / "ant" / "ant0.jpg"
    bad = root / "train" / "bee" / "bee0.jpg"
    bad.write_bytes(good.read_bytes()[:200])  # truncated
    (root / "train" / "bee" / "notes.txt").write_text("not an image")
    Image.new("CMYK", (20, 20), (10, 20, 30, 0)).save(root / "train" / "cow" / "cmyk.jpg")
    (root / "train" / "dog").mkdir()  # an empty class
    (root / "val" / "eel").mkdir()
    Image.new("RGB", (20, 20)).save(root / "val" / "eel" / "e.jpg")  # a val class train lacks
    proc = subprocess.run([sys.executable, "-m", "compress_lit.data.check", f"data.root={root}"], cwd=tmp_path,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 1
    assert any(ln.startswith(f"{bad}: cannot be decoded") for ln in lines)
    assert f"{root / 'train' / 'bee' / 'notes.txt'}: not an image file" in proc.stdout
    assert f"{root / 'train' / 'cow' / 'cmyk.jpg'}: colour mode CMYK" in proc.stdout
    assert f"{root / 'train' / 'dog'}: no images" in lines
    assert f"{root / 'val' / 'eel'}: class not in train/" in lines
    assert re.match(rf"compress_lit\.data\.check: 11 images checked under {root}: 3 problem\(s\) that stop "
                    rf"training, 2 note\(s\)$", lines[-1]), lines[-1]
    assert main([f"data.root={own_folder(tmp_path / 'clean', n_train=1, n_val=1)}"]) == 0
