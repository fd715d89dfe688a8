"""Progress and pictures: `python -m compress_lit.report` on fake run directories (Markdown, self-contained HTML,
comparison of several runs), the learning-curve plot from a metrics.csv and from the in-memory history, the end-of-run
logging without W&B, and the RichProgressBar (with the fallback to Lightning's default bar)."""
import base64
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, TensorDataset

from compress_lit.reporting import end_of_run as reporting
from compress_lit.reporting import report
import compress_lit.report as report_command
from compress_lit.runtime.config import register_configs
from compress_lit.training.run import build_trainer

CONF = str(Path(__file__).resolve().parents[1] / "conf")
register_configs()

RESULTS = {"teacher (demo)": {"1-NN": 96.39, "20-NN": 94.72, "cluster": 67.89, "cluster_std": 4.1, "linear": 95.28},
           "student (compress_2q)": {"1-NN": 97.5, "20-NN": 96.39, "cluster": 76.28, "cluster_std": 12.0,
                                     "linear": 96.67},
           "student, random init": {"1-NN": 92.5, "20-NN": 89.44, "cluster": 63.11, "cluster_std": 3.7,
                                    "linear": 90.28}}


def config(method="compress_2q", temperature=0.04, queue=1024):
    return {"teacher": {"name": "demo", "arch": "resnet18", "format": "compress_lit", "cached": False},
            "student": {"name": "resnet18_small", "arch": "resnet18", "width_multiplier": 0.25},
            "method": {"name": method, "queue_size": queue, "temperature": temperature, "student_temperature": None},
            "optim": {"epochs": 60, "lr": 0.05}, "data": {"name": "digits", "image_size": 16, "batch_size": 128},
            "seed": 0}


def png(path, seed=0):
    import matplotlib.pyplot as plt

    plt.imsave(path, np.random.default_rng(seed).random((12, 20)))
    return path


def fake_run(root: Path, results=RESULTS, cfg=None, pictures=("cluster_grid.png",), overrides=("optim.epochs=60",)):
    root.mkdir(parents=True)
    (root / ".hydra").mkdir()
    (root / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg or config()))
    (root / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    (root / "results.json").write_text(json.dumps(results))
    for i, name in enumerate(pictures):
        png(root / name, i)
    return root


def fake_metrics_csv(path: Path, epochs=3, steps_per_epoch=5, eval_keys=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = ["epoch", "step", "train/loss_step", "train/loss_epoch", "train/lr"]
    cols += ["eval/knn_top1_k1", "eval/cluster_acc"] if eval_keys else []
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        for e in range(epochs):
            for s in range(steps_per_epoch):
                step = e * steps_per_epoch + s
                w.writerow({"epoch": e, "step": step, "train/loss_step": 4.0 / (1 + step)})
            row = {"epoch": e, "step": step, "train/loss_epoch": 3.0 / (1 + e), "train/lr": 0.05 * 0.5 ** e}
            if eval_keys:
                row.update({"eval/knn_top1_k1": 80 + 5 * e, "eval/cluster_acc": 50 + 3 * e})
            w.writerow(row)
    return path


def png_size(path: Path) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


# --------------------------------------------------------------------------------------------------- report
def test_single_run_markdown_has_config_results_and_pictures(tmp_path):
    run = fake_run(tmp_path / "outputs" / "train" / "2030-01-02" / "03-04-05",
                   pictures=("cluster_grid.png", "cluster_confusion.png"))
    fake_metrics_csv(run / "csv" / "metrics.csv")
    out = tmp_path / "docs" / "report.md"
    md = report.write_report([run], out)
    assert out.read_text() == md
    # key config
    for text in ("| teacher | demo (resnet18, compress_lit) |", "| method | compress_2q |", "| queue | 1024 |",
                 "| temperature | 0.04 |", "| epochs | 60 |", "| data | digits (16 px) |", "resnet18, ×0.25",
                 "`optim.epochs=60`"):
        assert text in md, text
    # the results table: every number, cluster as mean ± std
    assert "| model | 1-NN | 20-NN | cluster (mean ± std) | linear |" in md
    assert "| student (compress_2q) | 97.50 | 96.39 | 76.28 ± 12.0 | 96.67 |" in md
    assert "| student, random init | 92.50 | 89.44 | 63.11 ± 3.7 | 90.28 |" in md
    # pictures: copied next to the report, referenced relatively; learning curves drawn from metrics.csv
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(refs) == 3 and all(not Path(r).is_absolute() for r in refs)
    assert refs[0].endswith("learning_curves.png") and refs[1].endswith("cluster_grid.png")
    for r in refs:
        assert (out.parent / r).is_file(), r
    assert (out.parent / refs[1]).read_bytes() == (run / "cluster_grid.png").read_bytes()
    assert not (run / "learning_curves.png").exists()  # the run directory is left alone


def test_html_is_self_contained_with_embedded_pngs(tmp_path):
    run = fake_run(tmp_path / "run", pictures=("cluster_grid.png", "learning_curves.png"))
    assert report_command.main([str(run), "--out", str(tmp_path / "r.md"), "--html"]) == 0
    page = (tmp_path / "r.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "97.50" in page and "76.28 ± 12.0" in page
    assert "<code>compress_2q</code>" not in page and "compress_2q" in page
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == 2
    assert base64.b64decode(embedded[0]) == (run / "learning_curves.png").read_bytes()  # known pictures first
    assert base64.b64decode(embedded[1]) == (run / "cluster_grid.png").read_bytes()
    assert not re.search(r'src="(?!data:)', page)  # nothing external


def test_several_runs_get_a_comparison_table(tmp_path):
    sweep = tmp_path / "multirun" / "train" / "2030-01-02" / "03-04-05"
    low = {"student (compress_2q)": {"1-NN": 95.0, "cluster": 70.0, "cluster_std": 2.0, "linear": 93.25}}
    fake_run(sweep / "0", results=low, cfg=config(temperature=0.02), overrides=["method.temperature=0.02"])
    fake_run(sweep / "1", cfg=config(temperature=0.07), overrides=["method.temperature=0.07"])
    md = report.write_report([sweep / "0", sweep / "1"], tmp_path / "cmp.md")
    table = md.split("## Comparison")[1].split("## Run")[0]
    assert "| run | method | temperature | model | 1-NN | cluster | linear | 20-NN |" in table
    assert "| 03-04-05/0 | compress_2q | 0.02 | student (compress_2q) | 95.00 | 70.00 ± 2.0 | 93.25 | — |" in table
    assert ("| 03-04-05/1 | compress_2q | 0.07 | student (compress_2q) | 97.50 | 76.28 ± 12.0 | 96.67 | 96.39 |"
            in table)
    assert md.count("## Run `03-04-05/") == 2
    # the two runs' pictures do not overwrite each other next to the report
    assert sorted(p.name for p in (tmp_path / "cmp_files").iterdir()) == ["03-04-05_0_cluster_grid.png",
                                                                         "03-04-05_1_cluster_grid.png"]


def test_evaluate_results_and_a_bare_directory(tmp_path):
    ev = {"checkpoint": "x.ckpt", "arch": "resnet18", "layer": "pool", "knn": {"top1_k1": 97.5, "top5_k1": 99.0},
          "cluster": {"acc_mean": 76.28, "acc_std": 11.98, "k": 10, "seeds": [0, 1]}, "linear": {"top1": 95.83}}
    assert report.normalize_results(ev) == {"resnet18 (pool)": {"1-NN": 97.5, "cluster": 76.28,
                                                                 "cluster_std": 11.98, "linear": 95.83}}
    bare = tmp_path / "bare"
    bare.mkdir()
    md = report.write_report([bare])
    assert "No `.hydra/config.yaml`" in md and "No `results.json`" in md
    with pytest.raises(FileNotFoundError):
        report.write_report([tmp_path / "missing"])


def test_command_line_prints_markdown(tmp_path):
    run = fake_run(tmp_path / "run")
    out = subprocess.run([sys.executable, "-m", "compress_lit.report", str(run), "--no-copy"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "| student (compress_2q) | 97.50 |" in out.stdout and "](run/cluster_grid.png)" in out.stdout


# --------------------------------------------------------------------------------------------------- pictures
def test_learning_curves_from_metrics_csv(tmp_path):
    rows = reporting.read_metrics_csv(fake_metrics_csv(tmp_path / "csv" / "metrics.csv"))
    assert len(rows) == 18 and rows[5]["train/loss_epoch"] == 3.0 and "train/loss_epoch" not in rows[0]
    path = reporting.plot_learning_curves(tmp_path / "lc.png", rows, RESULTS, title="t")
    assert png_size(path) == (4 * 460, 360)  # loss, lr, evaluation during training, final results
    # panels only for what there is
    rows = reporting.read_metrics_csv(fake_metrics_csv(tmp_path / "b.csv", eval_keys=False))
    assert png_size(reporting.plot_learning_curves(tmp_path / "lc2.png", rows)) == (2 * 460, 360)
    assert reporting.plot_learning_curves(tmp_path / "none.png", []) is None


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def training_step(self, batch, _):
        loss = self.lin(batch[0]).pow(2).mean()
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def on_train_epoch_start(self):
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=False, on_epoch=True)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)}


def test_history_callback_then_end_of_run_without_a_logger(tmp_path):
    history = reporting.HistoryCallback()
    trainer = pl.Trainer(max_epochs=3, logger=False, callbacks=[history], log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Tiny(), DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=4))
    steps = [r for r in history.rows if "train/loss_step" in r]
    epochs = [r for r in history.rows if "train/loss_epoch" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert [r["epoch"] for r in epochs] == [0, 1, 2] and [r["step"] for r in epochs] == [4, 8, 12]
    assert [r["train/lr"] for r in epochs] == pytest.approx([0.1, 0.05, 0.025])  # each epoch's own value
    images = reporting.end_of_run(False, tmp_path, {"student (x)": {"1-NN": 90.0}}, history.rows)
    assert set(images) == {"learning_curves"} and png_size(tmp_path / "learning_curves.png")[0] == 3 * 460


def test_results_reach_the_csv_logger(tmp_path):
    from compress_lit.runtime.config import LoggerConfig
    from compress_lit.runtime.loggers import build_logger
    from omegaconf import OmegaConf

    logger = build_logger(OmegaConf.structured(LoggerConfig(name="csv")), tmp_path)
    other = png(tmp_path.parent / f"{tmp_path.name}_elsewhere.png")
    reporting.log_results(logger, RESULTS, {"x": other}, run_dir=tmp_path)
    text = (tmp_path / "csv" / "metrics.csv").read_text()  # flushed at once
    assert "eval/student (compress_2q)/1-NN" in text.splitlines()[0] and "97.5" in text
    assert (tmp_path / other.name).is_file()  # the run directory holds every picture
    reporting.log_results(False, RESULTS, {})  # no logger: nothing to do, no error


# --------------------------------------------------------------------------------------------------- progress
def _trainer(tmp_path, progress: bool):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"trainer.enable_progress_bar={str(progress).lower()}"])
    return build_trainer(cfg, tmp_path, logger=False)


def test_rich_progress_bar_when_enabled_and_the_default_without_rich(tmp_path, monkeypatch):
    from pytorch_lightning.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
    from pytorch_lightning.trainer.connectors import callback_connector

    bars = [c for c in _trainer(tmp_path, True).callbacks if isinstance(c, ProgressBar)]
    assert len(bars) == 1 and isinstance(bars[0], RichProgressBar)
    assert not any(isinstance(c, ProgressBar) for c in _trainer(tmp_path, False).callbacks)
    # without rich: no RichProgressBar from us, Lightning's default (TQDM) bar instead
    monkeypatch.setitem(sys.modules, "rich", None)  # `import rich` fails
    monkeypatch.setattr(callback_connector, "_RICH_AVAILABLE", False)
    assert reporting.rich_progress_bar() is None
    bars = [c for c in _trainer(tmp_path, True).callbacks if isinstance(c, ProgressBar)]
    assert len(bars) == 1 and isinstance(bars[0], TQDMProgressBar)
