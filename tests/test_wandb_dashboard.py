"""W&B dashboards, offline (no credentials: HOME and NETRC point at an empty folder): a tiny `compress_lit.train`
run records its resolved config, per-step/epoch metrics, the end-of-run results (summary + a table with one row per
model), the pictures (wandb.Image) and, with logger.log_model=true, the checkpoint as an artifact; the jobs of a
Hydra multirun share one W&B group.

wandb >= 0.2x (wandb-core) writes an offline run as a transaction log (``run-<id>.wandb``) plus the media files;
``files/config.yaml`` and ``files/wandb-summary.json`` only appear once the run is synced. The log is read back here:
LevelDB-log framing (32 KiB blocks, 7-byte record headers) of ``wandb_internal_pb2.Record`` protobufs.
"""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

from test_entrypoints import TINY

TEACHER = ["teacher.format=random", "teacher.checkpoint=null", "teacher.width_multiplier=0.25"]


def run_train(args, tmp_path, multirun=False):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), NETRC=str(tmp_path / "home" / "netrc"), WANDB_SILENT="true",
               COMPRESS_LIT_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1", PYTORCH_LIGHTNING_DISABLE_TIPS="1")
    (tmp_path / "home").mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "compress_lit.train", *(["-m"] if multirun else []), *TINY, *TEACHER, "logger=wandb"]
    out = subprocess.run([*cmd, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def wandb_records(offline_run_dir: Path):
    """The records of an offline run's transaction log, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    (log_file,) = offline_run_dir.glob("run-*.wandb")
    data = log_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
    return records


def _items(records, kind):
    return [r for r in records if r.WhichOneof("record_type") == kind]


def offline_run(run_dir: Path) -> Path:
    (found,) = (run_dir / "wandb").glob("offline-run-*")
    return found


def test_offline_dashboard_has_config_metrics_results_table_images_and_model(tmp_path):
    run_dir = tmp_path / "run"
    out = run_train(["eval.random_baseline=false", "logger.log_model=true", "trainer.log_every_n_steps=1",
                     "optim.epochs=2", f"hydra.run.dir={run_dir}"], tmp_path)
    assert "student (compress_2q)" in out.stdout
    results = json.loads((run_dir / "results.json").read_text())
    for name in ("cluster_grid.png", "cluster_confusion.png", "learning_curves.png"):  # pictures in the run dir
        assert (run_dir / name).stat().st_size > 1000, name
    wb = offline_run(run_dir)
    records = wandb_records(wb)

    # the full resolved config (logger.log_hyperparams)
    config = {u.key: json.loads(u.value_json) for r in _items(records, "config") for u in r.config.update}
    assert config["method"]["queue_size"] == 128 and config["method"]["name"] == "compress_2q"
    assert config["data"]["train_subset"] == 256 and config["logger"]["name"] == "wandb"

    # metrics per step and per epoch (Lightning)
    history_keys = {"/".join(i.nested_key) or i.key for r in _items(records, "history") for i in r.history.item}
    assert {"train/loss_step", "train/loss_epoch", "train/lr", "trainer/global_step"} <= history_keys

    # end-of-run results as summary metrics
    summary = {}
    for r in _items(records, "summary"):
        for u in r.summary.update:
            summary["/".join(u.nested_key) if u.nested_key else u.key] = u.value_json
    for model, row in results.items():
        for metric, value in row.items():
            assert json.loads(summary[f"eval/{model}/{metric}"]) == value

    # ... and as a table, one row per model
    (table_file,) = (wb / "files" / "media" / "table").rglob("*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"][0] == "model" and "1-NN" in table["columns"] and "linear" in table["columns"]
    assert [row[0] for row in table["data"]] == list(results)
    assert table["data"][1][table["columns"].index("1-NN")] == results["student (compress_2q)"]["1-NN"]

    # the pictures as wandb.Image
    images = sorted(p.name for p in (wb / "files" / "media" / "images").rglob("*.png"))
    for stem in ("cluster_grid", "cluster_confusion", "learning_curves"):
        assert any(n.startswith(stem + "_") for n in images), (stem, images)

    # logger.log_model=true: the checkpoint as a model artifact, offline too
    artifacts = [r.artifact for r in _items(records, "artifact")]
    assert any(a.type == "model" for a in artifacts), [a.type for a in artifacts]
    assert any(a.type == "run_table" for a in artifacts)
    assert _items(records, "exit"), "the W&B run was not finished"


def test_multirun_jobs_share_a_wandb_group(tmp_path):
    sweep = tmp_path / "multirun" / "2030-01-02" / "03-04-05"  # the default layout: <date>/<time>
    run_train(["method=compress_2q,compress_1q", "eval.at_end=false", f"hydra.sweep.dir={sweep}"], tmp_path,
              multirun=True)
    runs = []
    for job in ("0", "1"):
        (run,) = _items(wandb_records(offline_run(sweep / job)), "run")
        runs.append(run.run)
        assert (sweep / job / "learning_curves.png").is_file()
    assert runs[0].run_id != runs[1].run_id  # one W&B run per job
    assert runs[0].run_group == runs[1].run_group == "2030-01-02_03-04-05"
    # run name: the job's value of what the sweep varies
    assert [r.display_name for r in runs] == ["method=compress_2q", "method=compress_1q"]
