"""The newcomer's path (issue 12): start-up checks with one-line messages, warnings for settings that do nothing,
no clutter after a failed start, resume=auto continuing in the run's own directory, per-command --help pages,
and small confusions (worker cap, W&B wording, the confusion matrix's title, the cluster grid's spacing)."""
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import compress_lit.evaluate  # noqa: F401 - registers the evaluation schemas
import compress_lit.export  # noqa: F401
import compress_lit.reproduce  # noqa: F401
from compress_lit.runtime import startup
from compress_lit.runtime.config import ConfigError, register_configs, warn_queue_vs_data, warn_unused_settings

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
register_configs()
RANDOM_TEACHER = ["teacher.format=random", "teacher.checkpoint=null", "teacher.pretrain_if_missing=false"]


def _cfg(name, *overrides, hydra=False):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides), return_hydra_config=hydra)


class DataWasRead(AssertionError):
    pass


@pytest.fixture
def no_data(monkeypatch):
    """Any data read fails the test: the checks must come first."""
    import compress_lit.training.pretrain as pretrain
    import compress_lit.training.run as train

    def boom(*a, **k):
        raise DataWasRead("data were read before the start-up checks")

    monkeypatch.setattr(train, "build_datamodule", boom)
    monkeypatch.setattr(pretrain, "build_datamodule", boom)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(startup, "visible_cuda_devices", lambda: 0)
    monkeypatch.setattr(startup, "mps_available", lambda: False)


def _cli(module, args, tmp_path, **env):
    e = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1",
         "COMPRESS_LIT_CACHE": str(tmp_path / "cache"), **env}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=e, capture_output=True,
                          text=True, timeout=300)


# -------------------------------------------------------------------------------- 1. the accelerator
@pytest.mark.parametrize("trainer", ["gpu", "ddp"])
def test_gpu_trainer_without_a_gpu_is_refused_before_any_data(trainer, tmp_path, no_gpu, no_data):
    from compress_lit.pretrain import run_pretrain
    from compress_lit.training.run import run_train

    expected = r"trainer\.accelerator=gpu but no CUDA GPU is visible: use trainer=cpu or trainer=default"
    with pytest.raises(ConfigError, match=expected):
        run_train(_cfg("train", f"trainer={trainer}", *RANDOM_TEACHER), tmp_path / "t")
    with pytest.raises(ConfigError, match=expected):
        run_pretrain(_cfg("pretrain", f"trainer={trainer}"), tmp_path / "p")


def test_more_gpus_than_visible_is_refused(monkeypatch):
    monkeypatch.setattr(startup, "visible_cuda_devices", lambda: 1)
    with pytest.raises(ConfigError, match=r"trainer\.devices=4 asks for 4 GPUs but only 1 is visible"):
        startup.check_accelerator(OmegaConf.create({"accelerator": "gpu", "devices": 4}))
    startup.check_accelerator(OmegaConf.create({"accelerator": "gpu", "devices": -1}))  # all of them: fine
    startup.check_accelerator(OmegaConf.create({"accelerator": "auto", "devices": "auto"}))


def test_evaluate_device_cuda_without_a_gpu_is_named(no_gpu):
    with pytest.raises(ConfigError, match=r"device=cuda but no CUDA GPU is visible: use device=auto"):
        startup.check_device("cuda")


# ---------------------------------------------------------------------------- 3. silent no-ops: warnings
def test_queue_larger_than_the_training_set_is_warned_naming_the_key(caplog):
    with caplog.at_level(logging.WARNING):
        msgs = warn_queue_vs_data(_cfg("train", "method.queue_size=128000"), 1437)
    assert len(msgs) == 1 and msgs[0].startswith("method.queue_size=128000 is larger than the training set (1437 "
                                                 "images)")
    assert msgs[0] in caplog.text
    assert warn_queue_vs_data(_cfg("train"), 1437) == []  # the digits preset's 1024
    assert warn_queue_vs_data(_cfg("train", "method=regression"), 10) == []  # no queue
    assert warn_queue_vs_data(_cfg("pretrain", "method.queue_size=8192"), 1437)[0].startswith(
        "method.queue_size=8192")


def test_train_warns_about_the_queue_once_the_data_are_loaded(tmp_path, monkeypatch, caplog):
    import compress_lit.training.run as train

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(train, "build_teacher", stop)  # the data have been read by then
    cfg = _cfg("train", *RANDOM_TEACHER, "method.queue_size=2000", "logger=none")
    with caplog.at_level(logging.WARNING), pytest.raises(Stop):
        train.run_train(cfg, tmp_path / "run")
    assert "method.queue_size=2000 is larger than the training set (1437 images)" in caplog.text


@pytest.mark.parametrize("overrides,warned", [
    (["method=compress_1q", "method.momentum=0.99"], "method.use_momentum_encoder=false"),
    (["method=compress_2q_nomomentum", "method.momentum=0.9"], "method.use_momentum_encoder=false"),
    (["method=compress_2q", "method.use_momentum_encoder=false", "method.momentum=0.9"],
     "method.use_momentum_encoder=false"),
    (["method=regression", "method.momentum=0.99"], "method=regression"),
    (["method=compress_2q", "method.momentum=0.99"], None),  # the momentum student uses it
    (["method=compress_1q"], None),  # the default: nothing was asked for
])
def test_momentum_without_a_momentum_student_is_warned(overrides, warned, caplog):
    with caplog.at_level(logging.WARNING):
        msgs = warn_unused_settings(_cfg("train", *overrides))
    if warned is None:
        assert msgs == []
    else:
        assert len(msgs) == 1 and msgs[0].startswith(f"method.momentum=") and "is ignored: " + warned in msgs[0]
        assert msgs[0] in caplog.text


# ------------------------------------------------------------------------------ 4. messages, not tracebacks
def test_resume_of_a_missing_checkpoint_fails_at_start_up(tmp_path, no_data):
    from compress_lit.pretrain import run_pretrain
    from compress_lit.training.run import run_train

    missing = tmp_path / "nonexistent.ckpt"
    expected = f"resume={missing}: no checkpoint at {missing}"
    with pytest.raises(ConfigError, match=expected):
        run_train(_cfg("train", *RANDOM_TEACHER, f"resume={missing}"), tmp_path / "t")
    with pytest.raises(ConfigError, match=expected):
        run_pretrain(_cfg("pretrain", f"resume={missing}"), tmp_path / "p")
    with pytest.raises(ConfigError, match=f"no checkpoint at {tmp_path / 'checkpoints' / 'last.ckpt'}"):
        run_train(_cfg("train", *RANDOM_TEACHER, f"resume={tmp_path}"), tmp_path / "t")  # a run dir without one


def test_missing_teacher_file_is_named_before_any_data(tmp_path, no_data):
    from compress_lit.training.run import run_train

    missing = tmp_path / "moco.pth.tar"
    with pytest.raises(ConfigError, match=f"teacher.checkpoint={missing}: no such teacher checkpoint file"):
        run_train(_cfg("train", "teacher=mocov2_resnet50", f"teacher.checkpoint={missing}"), tmp_path / "t")


def test_evaluate_without_checkpoint_is_one_line_naming_the_key(tmp_path):
    run_dir = tmp_path / "outputs" / "eval"
    r = _cli("compress_lit.evaluate", [f"hydra.run.dir={run_dir}"], tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "MissingMandatoryValue" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("compress_lit.evaluate: ConfigError: checkpoint is required: add "
                                                 "checkpoint=<path to a .ckpt file> to the command line")
    assert not run_dir.exists()


@pytest.mark.parametrize("entry", ["evaluate", "linear", "export"])
def test_every_checkpoint_entry_names_a_missing_checkpoint_key(entry, tmp_path):
    from compress_lit.evaluate import run_evaluate
    from compress_lit.exporting.run import run_export
    from compress_lit.linear import run_linear

    run = {"evaluate": run_evaluate, "linear": run_linear, "export": run_export}[entry]
    with pytest.raises(ConfigError, match=r"^checkpoint is required: add checkpoint=<path to a \.ckpt file>"):
        run(_cfg(entry), tmp_path)


@pytest.mark.parametrize("entry", ["evaluate", "linear"])
def test_a_missing_checkpoint_file_is_named_with_its_key(entry, tmp_path):
    from compress_lit.evaluate import run_evaluate
    from compress_lit.linear import run_linear

    run = {"evaluate": run_evaluate, "linear": run_linear}[entry]
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(ConfigError, match=f"checkpoint={missing}: no such checkpoint file"):
        run(_cfg(entry, f"checkpoint={missing}"), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_reproduce_names_a_failed_step_without_a_traceback(tmp_path, monkeypatch):
    from compress_lit.reproduction import run as rp, runs as rp_runs
    monkeypatch.setattr(rp_runs.subprocess, "run", lambda cmd, **k: SimpleNamespace(returncode=1))
    cfg = _cfg("reproduce", "reproduce_preset=quick", f"out_dir={tmp_path}")
    with pytest.raises(rp_runs.StepFailed, match=r"^step teacher failed \(exit status 1; its message is above\)"):
        rp.run_reproduce(cfg)


def test_report_of_a_missing_run_dir_is_one_line(tmp_path, capsys):
    from compress_lit.report import main

    assert main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == (f"compress_lit.report: FileNotFoundError: {tmp_path / 'nope'}: no "
                                               f"such folder (pass run directories such as "
                                               f"outputs/train/<date>/<time>)")


# ------------------------------------------------------------------------- 5. resume=auto: the original dir
def _fake_run(run_dir: Path, config: dict, log_handler=False):
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config), run_dir / ".hydra" / "config.yaml")
    (run_dir / "train.log").write_text("")
    if log_handler:  # as Hydra's job logging: the root logger writes the job's log in the run dir
        h = logging.FileHandler(run_dir / "train.log")
        h.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger().addHandler(h)
        return h


def test_resume_auto_continues_in_the_original_run_directory(tmp_path):
    from compress_lit.runtime.loggers import build_logger
    from compress_lit.runtime.resume import prepare_resume

    original, fresh = tmp_path / "outputs" / "train" / "d" / "t1", tmp_path / "outputs" / "train" / "d" / "t2"
    _fake_run(original, {"seed": 0, "resume": None})
    (original / "checkpoints").mkdir()
    torch.save({"state_dict": {}, "global_step": 4, "epoch": 0}, original / "checkpoints" / "last.ckpt")
    (original / "csv").mkdir()
    rows = ["epoch,step,train/loss_epoch,train/loss_step"] + [f"0,{s},,{s}.5" for s in range(4)] + \
        ["0,3,9.0,", "1,4,,4.5", "1,5,,5.5"]  # steps 4 and 5 were logged after the checkpoint, then the run died
    (original / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    (original / "csv" / "hparams.yaml").write_text("seed: 0\n")
    handler = _fake_run(fresh, {"seed": 0, "resume": "auto"}, log_handler=True)
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        resume = prepare_resume("auto", fresh)
        logging.getLogger("compress_lit.test").info("after the move")
    finally:
        root.setLevel(old_level)
        for h in [h for h in root.handlers if isinstance(h, logging.FileHandler)
                  and Path(h.baseFilename).parent in (original, fresh)]:
            root.removeHandler(h)
            h.close()
    assert handler not in root.handlers
    assert resume.checkpoint == str(original / "checkpoints" / "last.ckpt") and resume.run_dir == original
    assert not fresh.exists()  # Hydra's fresh directory held nothing but its start-up files
    log_text = (original / "train.log").read_text()
    assert "resume=auto: continuing the run in" in log_text and "after the move" in log_text
    assert [float(r["step"]) for r in resume.history] == [0, 1, 2, 3, 3]
    # the files stay as they were until the resumed run first logs (a resume that fails there changes nothing)
    assert (original / "csv" / "metrics.csv").read_text() == "\n".join(rows) + "\n"
    assert (original / "csv" / "hparams.yaml").read_text() == "seed: 0\n"
    from compress_lit.runtime import run_folder

    run_folder.release_all()  # prepare_resume claimed the original folder for this process

    # the CSV logger writes the kept rows first, then the resumed run's: every step once
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "logs directory exists and is not empty" warning either
        logger = build_logger(OmegaConf.create({"name": "csv", "flush_every_n_steps": 1}), original,
                              history=resume.history)
        logger.log_metrics({"train/loss_step": 40.5}, step=4)
        logger.save()
    import csv

    steps = [int(r["step"]) for r in csv.DictReader(open(original / "csv" / "metrics.csv"))]
    assert steps == [0, 1, 2, 3, 3, 4]


def test_resume_auto_without_an_earlier_run_starts_fresh_in_its_own_dir(tmp_path):
    from compress_lit.runtime.resume import prepare_resume

    fresh = tmp_path / "outputs" / "train" / "d" / "t2"
    _fake_run(fresh, {"seed": 0, "resume": "auto"})
    resume = prepare_resume("auto", fresh)
    assert resume.checkpoint is None and resume.run_dir == fresh and fresh.exists()


# ------------------------------------------------------------------------------------- 6. --help per command
def _help_groups(entry, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name=entry, overrides=list(overrides), return_hydra_config=True)
        text = cfg.hydra.help.template  # resolved here, as by --help: the group options come from conf/
    return text.split("== Config groups (group=option) ==")[-1].split("== Config ==")[0] if "groups" in text \
        else "", text


def test_train_help_offers_only_trainings_groups_and_points_to_the_docs():
    groups, text = _help_groups("train")
    for g in ("teacher=", "student=", "method=", "data=", "optim=", "trainer=", "logger=", "experiment="):
        assert sum(line.strip().startswith(g) for line in groups.splitlines()) == 1, g
    assert "paper/mocov2_r50_to_alexnet" in groups and "compress_1q" in groups
    assert "reproduce_preset" not in groups and "demo_teacher" not in groups and "mocov2_imagenet" not in groups
    assert "Docs: README.md" in text


def test_pretrain_and_reproduce_help_offer_their_own_groups():
    groups, _ = _help_groups("pretrain")
    assert "pretrain_experiment=" in groups and "demo_teacher" in groups and "paper/mocov2_imagenet" in groups
    assert "teacher=" not in groups and "method=" not in groups and "paper/mocov2_r50" not in groups
    groups, _ = _help_groups("reproduce")
    assert "reproduce_preset=" in groups and "full, quick" in groups


def test_pretraining_experiment_is_not_a_training_option():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="experiment/demo_teacher"):
        _cfg("train", "experiment=demo_teacher")
    cfg = _cfg("pretrain", "pretrain_experiment=demo_teacher")
    assert cfg.student.name == "demo_teacher"


def test_train_help_on_the_command_line(tmp_path):
    r = _cli("compress_lit.train", ["--help"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("python -m compress_lit.train [group=option ...]")
    teacher_line = next(line for line in r.stdout.splitlines() if line.startswith("  teacher=     the frozen teacher: "))
    assert {"demo", "fashion_mnist", "mocov2_resnet50"} <= set(teacher_line.split(": ", 1)[1].split(", "))
    assert "reproduce_preset" not in r.stdout and "Docs: README.md" in r.stdout


# ---------------------------------------------------------------------------- 7. no clutter after an error
def test_a_bad_value_fails_in_one_line_and_leaves_no_run_dir(tmp_path):
    """trainer=gpu where no GPU is visible (CUDA_VISIBLE_DEVICES=""): the message, no traceback, no empty
    outputs/train/<date>/<time>/ left behind."""
    run_dir = tmp_path / "outputs" / "train" / "x"
    r = _cli("compress_lit.train", ["trainer=gpu", f"hydra.run.dir={run_dir}"], tmp_path, CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "compress_lit.train: ConfigError: trainer.accelerator=gpu but no CUDA GPU is visible: use trainer=cpu or "
        "trainer=default (accelerator=auto: the GPU when there is one, else the CPU)")
    assert not run_dir.exists() and run_dir.parent.exists()


def test_a_run_dir_with_work_in_it_keeps_the_error_in_its_log(tmp_path):
    run_dir = tmp_path / "run"
    handler = _fake_run(run_dir, {}, log_handler=True)
    (run_dir / "checkpoints").mkdir()
    try:
        with pytest.raises(SystemExit) as e:
            startup.run_entry("train", lambda: (_ for _ in ()).throw(ConfigError("x=1 is invalid")), run_dir)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert str(e.value) == "compress_lit.train: ConfigError: x=1 is invalid"
    assert run_dir.exists() and "compress_lit.train: ConfigError: x=1 is invalid" in (run_dir / "train.log").read_text()


def test_only_hydra_files_means_only_hydra_files(tmp_path):
    d = tmp_path / "r"
    _fake_run(d, {})
    assert startup.holds_only_hydra_files(d)
    (d / "results.json").write_text("{}")
    assert not startup.holds_only_hydra_files(d) and not startup.remove_if_only_hydra_files(d) and d.exists()
    assert not startup.holds_only_hydra_files(tmp_path / "empty")  # not a Hydra run dir at all


# ---------------------------------------------------------------------------------------- 9. small confusions
def test_loader_workers_are_capped_at_the_cpus_once(monkeypatch, caplog):
    from compress_lit.data import workers
    from compress_lit.data.datamodule import CompressDataModule

    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(workers, "_reported", set())
    with caplog.at_level(logging.INFO, logger="compress_lit.data.workers"):
        assert workers.cap_num_workers(8) == 2 and workers.cap_num_workers(8) == 2 and workers.cap_num_workers(1) == 1
    assert caplog.text.count("data.num_workers=8 capped at 2: only 2 CPUs are available") == 1
    dm = CompressDataModule(OmegaConf.create({"num_workers": 8}))
    assert dm._loader(list(range(4)), 2, False, False, False).num_workers == 2


def test_wandb_offline_line_says_why():
    from compress_lit.runtime.loggers import wandb_mode_message

    auto = wandb_mode_message("auto", "offline")
    assert auto.startswith("W&B runs offline: no W&B credentials were found") and "logger.mode" not in auto
    assert wandb_mode_message("offline", "offline").startswith("W&B runs offline (logger.mode=offline)")
    assert wandb_mode_message("auto", "online") is None


def test_confusion_title_names_the_seed_and_the_mean():
    from compress_lit.evaluation.run import confusion_title

    res = SimpleNamespace(seeds=[0, 1, 2, 3, 4], accs=[78.61, 70, 75, 80, 68.6], acc_mean=74.44, acc_std=5.42)
    title = confusion_title(res)
    assert title.startswith("cluster -> class (val), k-means seed 0: alignment 78.61%")
    assert "mean over the 5 seeds 74.44 ± 5.42%" in title


def test_cluster_grid_tiles_do_not_touch(tmp_path):
    from PIL import Image

    from compress_lit.evaluation.cluster import plot_cluster_grid

    images = np.zeros((40, 8, 8), dtype=np.float32)  # black tiles on the white figure
    plot_cluster_grid(tmp_path / "g.png", np.repeat(np.arange(4), 10), np.arange(4), list("abcd"), images=images,
                      rows=4, cols=5, cell_px=32, label_cells=2)
    px = np.asarray(Image.open(tmp_path / "g.png").convert("L"), dtype=np.float32)
    for j in range(1, 5):  # the boundary between tiles j-1 and j, and the one between rows
        x = (2 + j) * 32
        assert px[:, x - 1:x + 1].min() > 200, j
    assert px[32 - 1:32 + 1, 2 * 32:].min() > 200
    assert px[16, 2 * 32 + 16] < 50  # a tile itself is black


def test_known_noise_is_quiet(caplog):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        startup.quiet_known_noise()
        warnings.warn("Found 1 module(s) in eval mode at the start of training.", UserWarning)
    assert not caught
    assert logging.getLogger("faiss.loader").getEffectiveLevel() >= logging.WARNING
    from pytorch_lightning.utilities.rank_zero import rank_zero_info

    with caplog.at_level(logging.INFO):
        rank_zero_info("💡 Tip: For seamless cloud logging, try installing something")
        rank_zero_info("GPU available: False, used: False")
    assert "Tip" not in caplog.text and "GPU available" in caplog.text
