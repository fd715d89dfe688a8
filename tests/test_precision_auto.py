"""``trainer.precision=auto`` (precision.py, issue 29): bf16-mixed where the hardware computes bf16 natively, 32-true
where it does not, resolved before any Trainer / Fabric / autocast exists, logged, warned about when an explicit bf16
meets a CPU that emulates it, and recorded (the run's config and logged hyperparameters, the reproduction's command
lines, step records and table notes) without orphaning the committed progress file's runs."""
from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from compress_lit.runtime import precision as pr
from compress_lit.reproduction import run as rp, runs as rp_runs, tables as rp_tables
from compress_lit.runtime import startup
from compress_lit.runtime.config import ConfigError, register_configs, validate_train
from compress_lit.runtime.precision import CPUInfo
from compress_lit.reproduction.records import load_progress, recorded_precision

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
register_configs()
RANDOM_TEACHER = ["teacher.format=random", "teacher.checkpoint=null", "teacher.pretrain_if_missing=false"]
XEON = CPUInfo("Intel(R) Xeon(R) Processor", "AVX512", ("AMX-BF16", "AVX512-BF16"))
ZEN2 = CPUInfo("AMD EPYC 7B12", "AVX2", ())


@pytest.fixture
def cpu(monkeypatch):
    """``cpu(XEON)`` / ``cpu(ZEN2)``: this machine's CPU as precision.py sees it, with no GPU or MPS."""
    monkeypatch.setattr(startup, "visible_cuda_devices", lambda: 0)
    monkeypatch.setattr(startup, "mps_available", lambda: False)

    def use(info: CPUInfo) -> CPUInfo:
        monkeypatch.setattr(pr, "cpu_info", lambda: info)
        return info
    return use


def _cfg(name, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def _preset(name, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="reproduce", overrides=[f"reproduce_preset={name}", *overrides])


# ------------------------------------------------------------------------------------------------ the choice
def test_auto_is_bf16_where_the_cpu_computes_bf16_natively_and_fp32_where_it_does_not(cpu):
    cpu(XEON)
    native = pr.choose_precision("auto", "cpu")
    assert (native.precision, native.device) == ("bf16-mixed", "cpu")
    assert "natively" in native.reason and "AMX-BF16" in native.reason
    cpu(ZEN2)
    avx2 = pr.choose_precision("auto", "cpu")
    assert avx2.precision == "32-true"
    assert "no native bf16" in avx2.reason and "AVX2" in avx2.reason
    assert avx2.line().startswith("trainer.precision=auto -> 32-true on the cpu: ")
    for explicit in ("bf16-mixed", "32-true", "16-mixed"):  # anything but auto is kept as set
        assert pr.choose_precision(explicit, "cpu").precision == explicit


@pytest.mark.parametrize("caps,native", [
    ({"avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_bf16": False}, False),  # Zen2 / Zen3
    ({"avx2": True, "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}, False),  # Skylake-SP: emulated
    ({"avx2": True, "avx512_f": True, "avx512_bf16": True, "amx_bf16": False}, True),  # Cooper Lake, Zen4
    ({"avx2": True, "avx512_f": True, "avx512_bf16": True, "amx_bf16": True}, True),  # Sapphire Rapids
    ({"architecture": "arm64", "neon": True, "bf16": True}, True),  # ARMv8.6 BF16
    ({"architecture": "arm64", "neon": True, "bf16": False}, False),
])
def test_native_bf16_is_read_from_torchs_cpu_capabilities(monkeypatch, caps, native):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps, raising=False)
    pr.cpu_info.cache_clear()
    try:
        assert pr.cpu_info().native_bf16 is native
        assert pr.cpu_info().capability == torch.backends.cpu.get_cpu_capability()
    finally:
        pr.cpu_info.cache_clear()


def test_without_torchs_capabilities_the_flags_of_proc_cpuinfo_decide(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    try:
        monkeypatch.setattr(pr, "_proc_cpuinfo", lambda: ("AMD EPYC 7B12", {"avx2", "fma", "sse4_2"}))
        pr.cpu_info.cache_clear()
        assert not pr.cpu_info().native_bf16 and pr.cpu_info().name == "AMD EPYC 7B12"
        monkeypatch.setattr(pr, "_proc_cpuinfo", lambda: ("Intel Xeon", {"avx2", "avx512f", "amx_bf16"}))
        pr.cpu_info.cache_clear()
        assert pr.cpu_info().native_bf16 and pr.cpu_info().bf16_features == ("AMX-BF16",)
    finally:
        pr.cpu_info.cache_clear()


def test_onednn_capped_below_bf16_counts_as_no_native_bf16(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True, "amx_bf16": True},
                        raising=False)
    try:
        for isa, native in (("AVX2", False), ("avx512_core", False), ("AVX512_CORE_AMX", True)):
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
            pr.cpu_info.cache_clear()
            assert pr.cpu_info().native_bf16 is native, isa
        assert "capped by ONEDNN_MAX_CPU_ISA" not in pr.cpu_info().describe()
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
        pr.cpu_info.cache_clear()
        assert "capped by ONEDNN_MAX_CPU_ISA=AVX2" in pr.cpu_info().describe()
    finally:
        pr.cpu_info.cache_clear()


@pytest.mark.parametrize("bf16_gpu,expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_on_a_gpu_is_bf16_where_the_gpu_supports_it(monkeypatch, cpu, bf16_gpu, expected):
    cpu(ZEN2)  # the CPU must not decide for the GPU
    monkeypatch.setattr(startup, "visible_cuda_devices", lambda: 1)
    monkeypatch.setattr(pr, "cuda_bf16_supported", lambda: bf16_gpu)
    for accel in ("auto", "gpu", "cuda"):
        choice = pr.choose_precision("auto", accel)
        assert (choice.device, choice.precision) == ("cuda", expected), accel
    assert pr.choose_precision("auto", "cpu").precision == "32-true"  # trainer=cpu on a GPU machine: the CPU's
    cpu(XEON)
    assert pr.choose_precision("auto", "cpu").precision == "bf16-mixed"


def test_auto_on_apple_mps_is_fp32(monkeypatch, cpu):
    cpu(XEON)
    monkeypatch.setattr(startup, "mps_available", lambda: True)
    assert pr.choose_precision("auto", "auto").precision == "32-true"
    assert pr.choose_precision("auto", "auto").device == "mps"


# ------------------------------------------------------------------------------------------------ warnings
def test_explicit_bf16_on_a_cpu_without_native_bf16_runs_as_asked_and_warns_with_the_measured_slowdown(
        cpu, monkeypatch, caplog):
    cpu(ZEN2)
    monkeypatch.setattr(pr, "measure_bf16_slowdown", lambda: 17.63)
    cfg = _cfg("train", "trainer=cpu", "trainer.precision=bf16-mixed")
    with caplog.at_level(logging.INFO, logger="compress_lit.precision"):
        choice = pr.apply_precision(cfg.trainer)
    assert choice.precision == cfg.trainer.precision == "bf16-mixed"  # as asked
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("trainer.precision=bf16-mixed on a CPU without native bf16 (AMD EPYC 7B12")
    assert "17.6x slower under bf16 autocast than in fp32" in warnings[0]
    assert "trainer.precision=auto or trainer.precision=32-true avoids it" in warnings[0]


@pytest.mark.parametrize("info,requested", [(XEON, "bf16-mixed"), (ZEN2, "auto"), (ZEN2, "32-true")])
def test_no_warning_where_bf16_is_native_or_not_used(cpu, monkeypatch, caplog, info, requested):
    cpu(info)
    monkeypatch.setattr(pr, "measure_bf16_slowdown", lambda: pytest.fail("measured without a reason"))
    with caplog.at_level(logging.INFO, logger="compress_lit.precision"):
        pr.apply_precision(_cfg("train", "trainer=cpu", f"trainer.precision={requested}").trainer)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([r for r in caplog.records if r.getMessage().startswith("precision: trainer.precision=")]) == 1


def test_the_slowdown_measurement_is_short_and_positive():
    import time

    t0 = time.perf_counter()
    ratio = pr.measure_bf16_slowdown()
    assert 0 < ratio < 1000 and time.perf_counter() - t0 < 20


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="oneDNN's ISA cap is x86's")
def test_an_avx2_capped_process_resolves_auto_to_fp32_and_measures_emulated_bf16_as_slower():
    """Not mocked: a process whose oneDNN is capped at AVX2 (what an AVX2-only CPU runs) picks 32-true, and its
    start-up measurement finds bf16 autocast slower than fp32 there."""
    code = ("from compress_lit.runtime.precision import choose_precision, measure_bf16_slowdown; "
            "print(choose_precision('auto', 'cpu').precision, measure_bf16_slowdown())")
    env = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()
    assert out[0] == "32-true"
    assert float(out[1]) > 2, out  # 13-20x measured on an AMX Xeon capped at AVX2 (docs/reproduction.md)


# ------------------------------------------------------------------------------------------------ the config
def test_validation_accepts_auto_and_names_the_key_of_a_bad_precision():
    validate_train(_cfg("train", *RANDOM_TEACHER, "trainer.precision=auto"))
    with pytest.raises(ConfigError, match=r"^trainer\.precision='bf17' is invalid: choose one of \['auto', "):
        validate_train(_cfg("train", *RANDOM_TEACHER, "trainer.precision=bf17"))


def test_presets_use_auto_except_the_checked_demo():
    assert _cfg("train", "trainer=cpu").trainer.precision == "auto"
    assert _cfg("pretrain", "pretrain_experiment=fashion_mnist_teacher").trainer.precision == "auto"
    # the embedded default keeps 32-true: `make check-demo` compares its numbers character for character
    assert _cfg("train").trainer.precision == "32-true"
    for name in ("full", "calibrate", "quick"):
        cfg = _preset(name)
        assert "trainer.precision=auto" in cfg.common_args, name
        assert not any(a.startswith("trainer.precision=") and a != "trainer.precision=auto"
                       for a in cfg.common_args), name


def test_the_trainer_gets_the_resolved_precision(cpu, tmp_path):
    from compress_lit.training.run import build_trainer

    for info, expected in ((XEON, "bf16-mixed"), (ZEN2, "32-true")):
        cpu(info)
        cfg = _cfg("train", *RANDOM_TEACHER, "trainer=cpu", "trainer.enable_progress_bar=false")
        assert cfg.trainer.precision == "auto"  # not resolved yet: build_trainer must do it itself
        trainer = build_trainer(cfg, tmp_path, logger=False)
        assert trainer.precision == expected


def test_the_in_training_cache_build_uses_autocast_only_where_auto_picks_bf16(cpu):
    from compress_lit.teachers.cache_config import local_device_and_autocast

    cpu(XEON)
    device, autocast = local_device_and_autocast({"accelerator": "cpu", "precision": "auto"})
    assert device.type == "cpu" and autocast is not None
    with autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    cpu(ZEN2)
    assert local_device_and_autocast({"accelerator": "cpu", "precision": "auto"})[1] is None


@pytest.mark.parametrize("entry", ["train", "pretrain"])
def test_a_run_records_the_precision_it_runs_in_before_its_logger_and_trainer_exist(cpu, monkeypatch, tmp_path,
                                                                                      entry, caplog):
    import compress_lit.training.pretrain as pretrain
    import compress_lit.training.run as train

    class Stop(Exception):
        pass

    logged = []

    def capture(logger_cfg, run_dir, name, config=None, **kw):
        logged.append(config)
        raise Stop

    monkeypatch.setattr(train, "build_logger", capture)
    for info, expected in ((XEON, "bf16-mixed"), (ZEN2, "32-true")):
        cpu(info)
        if entry == "train":
            cfg = _cfg("train", *RANDOM_TEACHER, "trainer=cpu", "logger=none")
            run = lambda: train.run_train(cfg, tmp_path / f"run-{expected}")  # noqa: E731
        else:
            cfg = _cfg("pretrain", "trainer=cpu", "logger=none")
            run = lambda: pretrain.run_pretrain(cfg, tmp_path / f"run-{expected}")  # noqa: E731
        with caplog.at_level(logging.INFO, logger="compress_lit.precision"), pytest.raises(Stop):
            run()
        assert cfg.trainer.precision == expected  # the run's config: its checkpoint's hyperparameters
        assert logged[-1]["trainer"]["precision"] == expected  # the logged hyperparameters
        assert f"trainer.precision=auto -> {expected} on the cpu" in caplog.text


# ------------------------------------------------------------------------------------------------ reproduce
def test_a_command_line_gets_its_precision_resolved_in_place(cpu):
    cpu(XEON)
    args = ["seed=0", "trainer.precision=auto", "eval.cluster_seeds=5"]
    assert pr.command_precision(args)[0] == ["seed=0", "trainer.precision=bf16-mixed", "eval.cluster_seeds=5"]
    assert pr.command_precision(args, "32-true")[0] == ["seed=0", "trainer.precision=32-true", "eval.cluster_seeds=5"]
    assert pr.command_precision(["seed=0"], "auto")[0] == ["seed=0", "trainer.precision=bf16-mixed"]
    assert pr.command_precision(["seed=0"]) == (["seed=0"], None)
    cpu(ZEN2)
    assert pr.command_precision(args)[0][1] == "trainer.precision=32-true"
    assert pr.args_accelerator(["trainer=gpu"]) == "gpu" and pr.args_accelerator(["trainer=cpu"]) == "cpu"
    assert pr.args_accelerator(["trainer=gpu", "trainer.accelerator=cpu"]) == "cpu"


def _command_precision(record: dict) -> str | None:
    """The trainer.precision= of a progress record's command."""
    return next((w.split("=", 1)[1] for w in record["step.json"]["command"].split()
                 if w.startswith("trainer.precision=")), None)


def _committed_records():
    records = load_progress(ROOT / "results" / "progress_fashion_mnist.json")
    ident = json.loads((ROOT / "results" / "teacher" / "full_teacher.json").read_text())["weights_sha256"]
    return records, ident


def _full_run_names(ident):
    steps = rp_runs.plan_steps(_preset("full"), Path("results/teacher/full_teacher.ckpt"), ident)
    return [f"{s.tag}-{rp_runs.step_key(s.module, s.args, s.teacher)}" for s in steps]


def _calibration_run_names(ident):
    cfg, ckpt, names = _preset("calibrate"), Path("results/teacher/full_teacher.ckpt"), set()
    for c in cfg.candidates:
        for seed in cfg.seeds:
            module, args = rp_runs.step_command(cfg, c.student, c.method, seed, ckpt, tuple(c.overrides))
            names.add(f"calibrate-{c.student}-{c.method}-{rp_runs._hash(list(c.overrides))}-s{seed}-"
                      f"{rp_runs.step_key(module, args, ident)}")
    return names


def test_the_committed_runs_are_still_found_where_auto_resolves_to_bf16(cpu):
    """The table's 66 runs and the calibration's 13 were recorded under trainer.precision=bf16-mixed; the presets now
    say auto, which resolves to bf16-mixed on a CPU with native bf16, so every record is found under its key."""
    records, ident = _committed_records()
    cpu(XEON)
    full = _full_run_names(ident)
    assert len(full) == 66 and set(full) <= set(records)
    calibration = _calibration_run_names(ident)
    assert len(calibration) == 13 and calibration <= set(records)
    assert all(_command_precision(records[n]) == "bf16-mixed" for n in full)
    cpu(ZEN2)  # where auto is fp32 they are other runs: none of the bf16 records may stand in for them
    assert not set(_full_run_names(ident)) & set(records)


def test_a_finished_step_records_the_precision_it_ran_in(tmp_path, monkeypatch):
    def fake_run(cmd, env=None, **kw):
        run_dir = Path(next(a.split("=", 1)[1] for a in cmd if a.startswith("hydra.run.dir=")))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "results.json").write_text(json.dumps({"student (x)": {"1-NN": 50.0}}))
        return types.SimpleNamespace(returncode=0)

    monkeypatch.setattr(rp_runs.subprocess, "run", fake_run)
    run_dir, _ = rp_runs._run_step("compress_lit.train", ["seed=1", "trainer.precision=32-true"], tmp_path, "t", dry=False)
    assert json.loads((run_dir / "step.json").read_text())["precision"] == "32-true"
    assert recorded_precision(run_dir) == "32-true"
    old = tmp_path / "old"  # a record from before precision was kept: its command says it
    old.mkdir()
    (old / "step.json").write_text(json.dumps({"seconds": 1, "command": "python -m x trainer.precision=bf16-mixed a=b"}))
    assert recorded_precision(old) == "bf16-mixed"
    (old / "step.json").write_text(json.dumps({"seconds": 1, "command": "python -m x a=b"}))
    assert recorded_precision(old) is None


def test_the_table_states_the_precision_its_runs_ran_in(tmp_path):
    runs = tmp_path / "runs"
    steps, results = [], []
    for i, p in enumerate(["bf16-mixed", "bf16-mixed", "32-true"]):
        st = rp_runs.Step(f"s{i}", "compress_lit.train", [f"seed={i}", f"trainer.precision={p}"], True)
        d = runs / f"{st.tag}-{rp_runs.step_key(st.module, st.args)}"
        d.mkdir(parents=True)
        (d / "results.json").write_text("{}")
        (d / "step.json").write_text(json.dumps({"seconds": 1, "command": "c", "precision": p}))
        steps.append(st)
        results.append({})
    assert rp.precision_note(steps[:2], results[:2], runs) == "bf16-mixed (all 2 runs, as each run's record states)"
    note = rp.precision_note(steps, results, runs)
    assert note == "32-true: 1 runs; bf16-mixed: 2 runs (as each run's record states)"
    md = rp_tables.markdown_table({}, {"data": "d", "command": "c", "teacher": "t", "student_args": "s", "seeds": [0],
                                "precision": note})
    assert f"Precision: {note}." in md


def test_a_bad_reproduce_precision_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match=r"^precision='fp32' is invalid: choose one of \['auto'"):
        rp.announce_precision(_preset("full", "precision=fp32"))


def test_the_fp32_preset_reruns_the_alexnet_compress_rows_with_only_the_precision_and_cache_changed(cpu):
    cpu(XEON)
    ckpt = Path("results/teacher/full_teacher.ckpt")
    fp32, full = _preset("fp32"), _preset("full")
    steps = rp_runs.plan_steps(fp32, ckpt, "aa" * 32)
    assert [s.tag for s in steps] == [f"alexnet_small-{m}-s{s}" for m in ("compress_2q", "compress_1q")
                                      for s in (0, 1, 2)]
    table = {s.tag: s for s in rp_runs.plan_steps(full, ckpt, "aa" * 32)}
    for st in steps:
        same = table[st.tag]
        changed = [(a, b) for a, b in zip(same.args, st.args) if a != b]
        assert len(st.args) == len(same.args) and changed == [
            ("trainer.precision=bf16-mixed", "trainer.precision=32-true"),
            ("teacher.cache_path=results/teacher/full_teacher_views8",
             "teacher.cache_path=results/teacher/full_teacher_views8_fp32")]
        assert not st.references
    assert fp32.teacher_name == "full" and not fp32.teacher_check.enabled
