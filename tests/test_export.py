"""`compress_lit.export`: the student's backbone alone as ONNX / TorchScript, checked against PyTorch, and the report.

Tiny CompReSS-2q and -1q checkpoints are built from the real LightningModule (its state_dict minus the teacher, as
`on_save_checkpoint` stores it), so the files hold `student.*` with `student_momentum.*` (2q) or `projection.*`
(1q) and `queues.*` beside it. Nothing is trained.
"""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from compress_lit.runtime.config import ConfigError
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from compress_lit.exporting.run import run_export
from compress_lit.exporting.settings import ExportError
from compress_lit.methods import CompReSS
from compress_lit.models import build_backbone
from compress_lit.teachers import FrozenTeacher

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
STUDENT = {"name": "tiny", "arch": "resnet18", "small_input": True, "width_multiplier": 0.125, "fc_dim": None}
TEACHER = {"name": "tiny_teacher", "arch": "resnet18", "small_input": True, "width_multiplier": 0.25,
           "format": "compress_lit"}
DATA = {"name": "digits", "image_size": 16, "in_channels": 3, "batch_size": 64, "eval_batch_size": 512,
        "num_workers": 0, "crop_scale": [0.6, 1.0], "hflip": False, "mean": [0.305] * 3, "std": [0.376] * 3}
OPTIM = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "epochs": 1, "scheduler": "constant",
         "milestones": [], "gamma": 0.1, "warmup_epochs": 0}
STUDENT_DIM, TEACHER_DIM = 64, 128


def _randomise_bn(model: torch.nn.Module, g: torch.Generator) -> None:
    """Non-trivial BatchNorm statistics, so eval-mode BN is not the identity in the exported graph."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            m.weight.data.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


def _checkpoint(path: Path, one_q: bool, teacher_ckpt: Path) -> Path:
    g = torch.Generator().manual_seed(1 if one_q else 0)
    torch.manual_seed(1 if one_q else 0)
    student = build_backbone("resnet18", small_input=True, width_multiplier=0.125)
    _randomise_bn(student, g)
    teacher = FrozenTeacher(build_backbone("resnet18", small_input=True, width_multiplier=0.25), "tiny_teacher")
    config = {"student": STUDENT, "teacher": {**TEACHER, "checkpoint": str(teacher_ckpt)}, "data": DATA,
              "method": {"name": "compress_1q" if one_q else "compress_2q"}}
    module = CompReSS(student, teacher, OmegaConf.create(OPTIM), queue_size=32, one_queue=one_q,
                      use_momentum_encoder=not one_q, config=config)
    state = {k: v for k, v in module.state_dict().items() if not k.startswith("teacher.")}
    torch.save({"state_dict": state, "hyper_parameters": {"config": config}, "epoch": 0}, path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    # the 2q run's teacher file exists here (a pretraining-layout checkpoint); the 1q run's does not
    t = build_backbone("resnet18", small_input=True, width_multiplier=0.25)
    teacher_file = d / "teacher.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in t.state_dict().items()}}, teacher_file)
    return {"2q": _checkpoint(d / "2q.ckpt", False, teacher_file),
            "1q": _checkpoint(d / "1q.ckpt", True, d / "missing_teacher.ckpt")}


def _cfg(ckpt, fmt, *extra):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="export", overrides=[f"checkpoint={ckpt}", f"format={fmt}", "latency.runs=5",
                                                        "latency.warmup=1", "parity.real_inputs=4", *extra])


def _student_from_file(ckpt):
    sd = torch.load(ckpt, weights_only=False)["state_dict"]
    m = build_backbone("resnet18", small_input=True, width_multiplier=0.125)
    m.load_state_dict({k[len("student."):]: v for k, v in sd.items() if k.startswith("student.")})
    return m.eval(), sd


@pytest.mark.parametrize("method,fmt", [("2q", "onnx"), ("1q", "onnx"), ("2q", "torchscript"),
                                        ("1q", "torchscript")])
def test_export_parity_report_and_dropped_heads(ckpts, tmp_path, method, fmt):
    ckpt = ckpts[method]
    rep = run_export(_cfg(ckpt, fmt), tmp_path)
    out = Path(rep["output"])
    assert out.parent == tmp_path and out.is_file()
    assert out.name == ("student_tiny.onnx" if fmt == "onnx" else "student_tiny.torchscript.pt")
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name], "temporary file left behind"

    # parity within the stated tolerance, on random and real-shaped (digits val) inputs
    p = rep["parity"]
    assert p["passed"] and p["max_abs_diff"] <= p["tolerance"] * p["output_scale"] and p["tolerance"] == 1e-4
    assert p["output_scale"] > 0.1 and len(p["checks"]) == 5
    assert {tuple(c["shape"]) for c in p["checks"]} == {(1, 3, 16, 16), (3, 3, 16, 16), (4, 3, 16, 16)}

    # the backbone alone: the output is the student's embedding, not the 1q projection into teacher space
    assert rep["output_dim"] == rep["student_embed_dim"] == STUDENT_DIM != TEACHER_DIM
    assert rep["input_shape"] == [1, 3, 16, 16] and rep["exported_keys"] == "student.*"
    dropped = {"2q": ["queues.*", "student_momentum.*"], "1q": ["projection.*", "queues.*"]}[method]
    assert rep["dropped_keys"] == dropped

    # an independent check of the written file against the student's weights in the checkpoint
    student, sd = _student_from_file(ckpt)
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        ref = student(x)
    if fmt == "onnx":
        import onnx
        import onnxruntime as ort

        graph = onnx.load(str(out)).graph
        dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
        assert [dims(v) for v in graph.input] == [["batch", 3, 16, 16]]  # dynamic batch axis
        assert len(graph.output) == 1 and dims(graph.output[0])[1:] == [STUDENT_DIM]
        shapes = [tuple(t.dims) for t in graph.initializer]
        assert (TEACHER_DIM, STUDENT_DIM) not in shapes and (STUDENT_DIM, TEACHER_DIM) not in shapes
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still the format asked for
            loaded = torch.jit.load(str(out))
        names = set(loaded.state_dict())
        assert names == set(student.state_dict())  # no projection.*, student_momentum.*, queues.*
        with torch.no_grad():
            got = loaded(x)
    assert got.shape == (5, STUDENT_DIM)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    if method == "1q":
        assert sd["projection.weight"].shape == (TEACHER_DIM, STUDENT_DIM)  # it was in the file, and left out

    # report: fields present and consistent
    s, t = rep["models"]
    assert s["model"] == "student" and t["model"] == "teacher" and t["arch"] == "resnet18"
    assert s["params"] == sum(v.numel() for v in student.parameters())
    assert s["params"] == sum(v.numel() for k, v in sd.items()
                              if k.startswith("student.") and not k.split(".")[-1].startswith(("running_", "num_")))
    teacher = build_backbone("resnet18", small_input=True, width_multiplier=0.25)
    assert t["params"] == sum(v.numel() for v in teacher.parameters())
    assert s["file_bytes"] == out.stat().st_size and t["file_bytes"] > s["file_bytes"]
    assert 0 < s["flops_per_image"] < t["flops_per_image"]
    runtime = "onnxruntime" if fmt == "onnx" else "torchscript"
    for row in (s, t):
        assert set(row["latency_ms"]) == {"pytorch", runtime} and all(v > 0 for v in row["latency_ms"].values())
    assert rep["latency"]["batch"] == 1 and rep["latency"]["runs"] == 5
    note = rep["teacher_note"]
    assert note.startswith("loaded from") if method == "2q" else note.startswith("random weights")
    assert json.loads((tmp_path / "export_report.json").read_text()) == json.loads(json.dumps(rep))
    md = (tmp_path / "export_report.md").read_text()
    assert "| model" in md and "FLOPs / image" in md and f"{s['params']:,}" in md and "teacher / student" in md


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_both_onnx_exporters(ckpts, tmp_path, exporter):
    if exporter == "dynamo":
        pytest.importorskip("onnxscript", reason="the torch.export-based ONNX exporter needs onnxscript")
    rep = run_export(_cfg(ckpts["1q"], "onnx", f"onnx_exporter={exporter}", "compare_teacher=false"), tmp_path)
    assert rep["parity"]["passed"] and rep["output_dim"] == STUDENT_DIM
    assert ("torch.export-based" if exporter == "dynamo" else "legacy") in rep["exporter"]


def test_adaptive_pools_are_exported_as_plain_pools_with_the_same_windows(tmp_path):
    """ONNX has no adaptive max pool: AlexNet's pool5 (6x6 from 13x13) becomes MaxPool2d(3, stride 2)."""
    from compress_lit.exporting.convert import _uniform_windows, export_onnx
    from compress_lit.exporting.run import load_runtime

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveMaxPool2d(6), torch.nn.Flatten()).eval()
    _, notes = export_onnx(net, torch.randn(1, 3, 15, 15), tmp_path / "p.onnx", exporter="legacy")
    assert len(notes) == 1 and "1: AdaptiveMaxPool2d(6x6) on 13x13" in notes[0] and "stride 2x2" in notes[0]
    x = torch.randn(3, 3, 15, 15)
    with torch.no_grad():
        assert torch.allclose(load_runtime("onnx", tmp_path / "p.onnx", 1)(x), net(x), atol=1e-6)
    assert _uniform_windows(13, 6) == (3, 2) and _uniform_windows(7, 2) == (4, 3) and _uniform_windows(5, 1) == (5, 5)
    assert _uniform_windows(10, 4) is None  # windows 3, 3, 3, 3 at starts 0, 2, 5, 7: no plain pooling
    with pytest.raises(ExportError, match="legacy ONNX exporter failed"):
        export_onnx(torch.nn.AdaptiveMaxPool2d(4), torch.randn(1, 3, 10, 10), tmp_path / "q.onnx", exporter="legacy")


def test_flops_per_image_counts_the_convolutions(ckpts, tmp_path):
    """A hand count for a one-conv network: 2 * MACs (what FlopCounterMode reports) per image."""
    from compress_lit.exporting.measure import count_flops

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 16 * 16, 5))
    macs = 8 * 16 * 16 * 3 * 3 * 3 + 8 * 16 * 16 * 5
    assert count_flops(net, torch.randn(1, 3, 16, 16)) == 2 * macs
    assert count_flops(net, torch.randn(4, 3, 16, 16)) == 2 * macs  # per image


def test_output_path_and_failed_parity_keeps_the_previous_file(ckpts, tmp_path, monkeypatch):
    import compress_lit.exporting.run as ex

    target = tmp_path / "deploy" / "model.onnx"
    cfg = _cfg(ckpts["1q"], "onnx", f"output={target}", "compare_teacher=false")
    rep = run_export(cfg, tmp_path / "run")
    assert Path(rep["output"]) == target and target.is_file() and len(rep["models"]) == 1
    assert (tmp_path / "run" / "export_report.json").is_file()
    good = target.read_bytes()

    real = ex.load_runtime

    def off_by_a_bit(fmt, path, threads):
        run = real(fmt, path, threads)
        return lambda x: run(x) + 1e-2

    monkeypatch.setattr(ex, "load_runtime", off_by_a_bit)
    with pytest.raises(ExportError, match="does not match PyTorch"):
        run_export(cfg, tmp_path / "run2")
    assert target.read_bytes() == good  # untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.onnx"]  # no temporary left


def test_missing_checkpoint_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "last.ckpt"
    with pytest.raises(ConfigError, match=f"checkpoint={missing}: no such file"):
        run_export(_cfg(missing, "onnx"), tmp_path / "run")
    # the command line: exits non-zero with the path in the message, no traceback
    r = subprocess.run([sys.executable, "-m", "compress_lit.export", f"checkpoint={missing}",
                        f"hydra.run.dir={tmp_path / 'cli'}"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=120)
    assert r.returncode != 0 and str(missing) in r.stderr and "Traceback" not in r.stderr


def test_bad_format_and_typo_fail_at_composition(ckpts, tmp_path):
    with pytest.raises(ExportError, match="format='tflite'"):
        run_export(_cfg(ckpts["2q"], "tflite"), tmp_path)
    with pytest.raises(Exception, match="formt"):
        _cfg(ckpts["2q"], "onnx", "formt=onnx")
