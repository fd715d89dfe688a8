"""End-of-run reporting shared by `train` and `pretrain`: dashboards, pictures, progress.

* :func:`log_results`: the end-of-run results (``{model: {metric: value}}``, as in ``results.json``) go to the
  logger: W&B gets them as summary metrics, as a ``wandb.Table`` (one row per model) and the run's pictures as
  ``wandb.Image``; CSV (and any other Lightning logger) gets them as one metrics row, flushed to disk; no logger:
  nothing (``results.json`` and the PNGs in the run directory are the record).
* :func:`cluster_pictures`: the cluster grid and the cluster -> class confusion matrix of a model's embedding
  (one k-means run on the seeded evaluation subsets), written as PNGs to the run directory.
* :class:`HistoryCallback` + :func:`learning_curves`: ``learning_curves.png`` in the run directory (loss per step
  and per epoch, learning rate, in-training evaluations, final results), from the CSV logger's ``metrics.csv``
  when there is one, else from the history the callback kept in memory.
* :func:`hydra_run_identity`: in a Hydra multirun, the W&B group (the sweep's name) and run name (the job's
  overrides).
* :func:`rich_progress_bar`: Lightning's RichProgressBar, or None when ``rich`` is not installed.
* :func:`finish`: close the W&B run (several Hydra multirun jobs run one after another in one process).
"""
from __future__ import annotations

import csv
import logging
import math
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import pytorch_lightning as pl
import torch

log = logging.getLogger("compress_lit.reporting")  # the name it always had

LEARNING_CURVES = "learning_curves.png"
CLUSTER_GRID = "cluster_grid.png"
CLUSTER_CONFUSION = "cluster_confusion.png"
RESULT_METRICS = ("1-NN", "20-NN", "cluster", "linear")  # preferred order in tables and plots


# ------------------------------------------------------------------------------------------ Hydra / progress
def hydra_run_identity() -> tuple[Optional[str], Optional[str]]:
    """``(group, name)`` for the W&B run of a Hydra **multirun** job, else ``(None, None)``.

    group: the sweep directory's name; for the default layout ``multirun/<entry>/<date>/<time>`` it is
    ``<date>_<time>`` (the sweep's timestamp), shared by all jobs of the sweep. name: the job's values of the
    swept overrides (``method=compress_1q``; read from the sweep's ``multirun.yaml``), else all its overrides
    (``hydra.job.override_dirname``), else ``job<N>``."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover - hydra is a dependency
        return None, None
    if not HydraConfig.initialized():
        return None, None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None, None
    sweep = Path(str(hc.sweep.dir))
    group = sweep.name
    if re.fullmatch(r"\d{1,2}-\d{2}-\d{2}", group) and sweep.parent.name:
        group = f"{sweep.parent.name}_{group}"
    name = _swept_overrides(sweep, list(hc.overrides.task)) or str(hc.job.override_dirname or "") \
        or f"job{hc.job.num}"
    return group, name


def _swept_overrides(sweep_dir: Path, job_overrides: list[str]) -> str:
    """The job's overrides of the keys the sweep varies (``a=1,b=x``), from the sweep's ``multirun.yaml``;
    "" when that cannot be told (another sweeper, no file)."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from omegaconf import OmegaConf

        sweep_cfg = OmegaConf.load(sweep_dir / "multirun.yaml")
        parser = OverridesParser.create()
        swept = {o.key_or_group for o in parser.parse_overrides(list(sweep_cfg.hydra.overrides.task))
                 if o.is_sweep_override()}
        job = parser.parse_overrides(job_overrides)
        return ",".join(text for text, o in zip(job_overrides, job) if o.key_or_group in swept)
    except Exception:  # noqa: BLE001 - a name is a nicety: fall back to all overrides
        return ""


def rich_progress_bar() -> Optional[pl.Callback]:
    """Lightning's RichProgressBar, or None when ``rich`` is unavailable (Lightning's default bar then)."""
    try:
        import rich  # noqa: F401
        from pytorch_lightning.callbacks import RichProgressBar

        return RichProgressBar()
    except (ImportError, ModuleNotFoundError):
        return None


# ------------------------------------------------------------------------------------------------- history
class HistoryCallback(pl.Callback):
    """Keeps, in memory, rows shaped like the CSV logger's: per logged step ``train/loss_step``; per epoch the
    ``*_epoch`` metrics, ``train/lr`` and ``eval/*``. Used for the learning curves when no ``metrics.csv`` is
    written (``logger=wandb`` or ``none``). Rank 0 only."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._epochs_done: set[int] = set()
        self._last_epoch: Optional[int] = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        every = max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1))
        if step % every and batch_idx:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        row: dict[str, float] = {"step": float(step), "epoch": float(trainer.current_epoch)}
        if torch.is_tensor(loss) and loss.numel() == 1:
            row["train/loss_step"] = float(loss.detach())
            self.rows.append(row)

    def _epoch_row(self, trainer, epoch: Optional[int]) -> None:
        if epoch is None or epoch in self._epochs_done or not trainer.is_global_zero:
            return
        self._epochs_done.add(epoch)
        row: dict[str, float] = {"step": float(trainer.global_step), "epoch": float(epoch)}
        for k, v in trainer.callback_metrics.items():
            if k.endswith("_epoch") or k.startswith("eval/") or k == "train/lr":
                try:
                    row[k] = float(v)
                except (TypeError, ValueError):
                    pass
        self.rows.append(row)

    # the epoch's aggregated metrics reach callback_metrics only after on_train_epoch_end
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._last_epoch = trainer.current_epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch > 0:
            self._epoch_row(trainer, trainer.current_epoch - 1)

    def on_train_end(self, trainer, pl_module) -> None:
        self._epoch_row(trainer, self._last_epoch)


def read_metrics_csv(path: str | Path) -> list[dict[str, float]]:
    """The rows of a CSV logger's ``metrics.csv`` with their non-empty numeric cells as floats."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for k, v in raw.items():
                if k is None or v in (None, ""):
                    continue
                try:
                    row[k] = float(v)
                except ValueError:
                    pass
            if row:
                rows.append(row)
    return rows


def find_metrics_csv(run_dir: str | Path) -> Optional[Path]:
    """The run's CSV logger file (``csv/metrics.csv``; else a ``*/metrics.csv`` one level down)."""
    run_dir = Path(run_dir)
    first = run_dir / "csv" / "metrics.csv"
    if first.is_file():
        return first
    found = sorted(p for p in run_dir.glob("*/metrics.csv") if p.parent.name != "linear")
    return found[0] if found else None


# --------------------------------------------------------------------------------------------------- plots
def _series(rows: Iterable[Mapping[str, float]], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        xs.append(float(r.get(x, len(xs))))
        ys.append(float(v))
    return xs, ys


def _result_metrics(results: Mapping[str, Mapping[str, float]]) -> list[str]:
    keys: list[str] = []
    for row in results.values():
        keys += [k for k in row if k not in keys]
    ordered = [k for k in RESULT_METRICS if k in keys]
    ordered += [k for k in keys if k not in ordered and k != "cluster_std"]
    if "cluster_std" in keys:  # right after its mean
        ordered.insert(ordered.index("cluster") + 1 if "cluster" in ordered else len(ordered), "cluster_std")
    return ordered


def plot_learning_curves(path: str | Path, rows: list[Mapping[str, float]] | None,
                         results: Mapping[str, Mapping[str, float]] | None = None,
                         title: Optional[str] = None) -> Optional[Path]:
    """One PNG with the panels the data allows: training loss (per logged step and per epoch), learning rate,
    in-training evaluations (``eval/<metric>`` per epoch) and the final results per model (bars; cluster
    alignment with its std over seeds). Returns the path, or None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = list(rows or [])
    keys = {k for r in rows for k in r}
    panels = []
    if {"train/loss_step", "train/loss_epoch", "train/loss"} & keys:
        panels.append("loss")
    if "train/lr" in keys:
        panels.append("lr")
    eval_keys = sorted(k for k in keys if k.startswith("eval/") and k.count("/") == 1)
    if eval_keys:
        panels.append("eval")
    if results:
        panels.append("results")
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), dpi=100, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "loss":
            xs, ys = _series(rows, "train/loss_step")
            if not xs:  # a logger that wrote the step value under the plain name
                xs, ys = _series([r for r in rows if "train/loss_epoch" not in r], "train/loss")
            if xs:
                ax.plot(xs, ys, lw=0.8, alpha=0.7, label="per step")
            xe, ye = _series(rows, "train/loss_epoch")
            if xe:
                ax.plot(xe, ye, "o-", lw=1.5, ms=4, label="per epoch")
            ax.set(title="training loss", xlabel="step", ylabel="loss")
            ax.legend(fontsize=8)
        elif panel == "lr":
            xs, ys = _series(rows, "train/lr")
            ax.plot(xs, ys, ".-", lw=1, ms=3)
            ax.set(title="learning rate", xlabel="step", ylabel="lr")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        elif panel == "eval":
            for k in eval_keys:
                xs, ys = _series(rows, k, x="epoch")
                ax.plot([x + 1 for x in xs], ys, "o-", ms=4, label=k.split("/", 1)[1])
            ax.set(title="evaluation during training", xlabel="epoch")
            ax.legend(fontsize=7)
        else:
            metrics = [m for m in _result_metrics(results) if m != "cluster_std"]
            width = 0.8 / max(1, len(results))
            for i, (model, row) in enumerate(results.items()):
                vals = [row.get(m, float("nan")) for m in metrics]
                err = [row.get("cluster_std", 0.0) if m == "cluster" else 0.0 for m in metrics]
                ax.bar([j + i * width for j in range(len(metrics))], vals, width, yerr=err, capsize=2,
                       label=model)
            ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(metrics))], metrics)
            ax.set(title="final results (held-out split)", ylabel="top-1 (%)", ylim=(0, 100))
            ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def learning_curves(run_dir: str | Path, history: list[Mapping[str, float]] | None = None,
                    results: Mapping[str, Mapping[str, float]] | None = None, logger: Any = None,
                    title: Optional[str] = None) -> Optional[Path]:
    """``<run_dir>/learning_curves.png`` from the run's ``metrics.csv`` (flushed first) or else ``history``."""
    for lg in _loggers(logger):
        if type(lg).__name__ == "CSVLogger":
            lg.save()
    csv_path = find_metrics_csv(run_dir)
    rows = read_metrics_csv(csv_path) if csv_path is not None else list(history or [])
    try:
        return plot_learning_curves(Path(run_dir) / LEARNING_CURVES, rows, results, title)
    except Exception as e:  # a picture must never fail a finished run
        log.warning("learning curves not written: %s", e)
        return None


def _subset(loader, size: Optional[int], seed: int):
    from torch.utils.data import DataLoader, Subset

    if size is None or size >= len(loader.dataset):
        return loader
    idx = torch.randperm(len(loader.dataset), generator=torch.Generator().manual_seed(seed))[:size].sort()
    return DataLoader(Subset(loader.dataset, idx.values.tolist()), batch_size=loader.batch_size, shuffle=False,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn)


def cluster_pictures(model, dm, out_dir: str | Path, device="cpu", train_subset: Optional[int] = None,
                     val_subset: Optional[int] = None, seed: int = 0, tag: str = "") -> dict[str, Path]:
    """``cluster_grid.png`` and ``cluster_confusion.png`` in ``out_dir`` for ``model``'s embedding: k-means
    (seed ``seed``, k = number of classes) on the train features, the val images by cluster (the paper's
    picture) and the cluster -> class confusion of the val split. Features of seeded subsets of at most
    ``train_subset`` / ``val_subset`` images (the in-training evaluation's sizes) keep it cheap on big data."""
    from ..data.datamodule import bank_loader
    from ..evaluation.cluster import cluster_alignment, plot_cluster_grid, plot_confusion
    from ..evaluation.features import extract_features
    from ..evaluation.loading import denormalizer

    out_dir = Path(out_dir)
    train = _subset(bank_loader(dm), train_subset, seed)
    val = _subset(dm.val_dataloader(), val_subset, seed + 1)
    tx, ty = extract_features(model, train, device)
    vx, vy = extract_features(model, val, device)
    res = cluster_alignment(tx, ty, vx, vy, num_classes=dm.num_classes, seeds=[seed])
    cfg = dm.cfg
    plot_cluster_grid(out_dir / CLUSTER_GRID, res.val_clusters, res.mapping, dm.class_names, dataset=val.dataset,
                      denormalize=denormalizer(cfg.mean, cfg.std), seed=seed)
    title = (f"cluster -> class (val), k-means seed {seed}: alignment {res.accs[0]:.2f}%\n"
             f"(one seed; the results table: mean over seeds)")
    title = f"{tag}\n{title}" if tag else title
    plot_confusion(out_dir / CLUSTER_CONFUSION, res.val_clusters, vy.numpy(), res.mapping, dm.class_names,
                   k=res.k, title=title)
    return {"cluster_grid": out_dir / CLUSTER_GRID, "cluster_confusion": out_dir / CLUSTER_CONFUSION}


# ----------------------------------------------------------------------------------------------- loggers
def _loggers(logger) -> list:
    if not logger:
        return []
    return list(logger) if isinstance(logger, (list, tuple)) else [logger]


def _is_wandb(lg) -> bool:
    from pytorch_lightning.loggers import WandbLogger

    return isinstance(lg, WandbLogger)


def flat_results(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``{"eval/<model>/<metric>": value}``."""
    return {f"eval/{m}/{k}": float(v) for m, row in results.items() for k, v in row.items()}


def results_table(results: Mapping[str, Mapping[str, float]]) -> tuple[list[str], list[list[Any]]]:
    """Columns ``["model", <metrics>...]`` and one row per model (None where a model lacks a metric)."""
    metrics = _result_metrics(results)
    return ["model", *metrics], [[model, *[row.get(m) for m in metrics]] for model, row in results.items()]


def log_results(logger, results: Mapping[str, Mapping[str, float]] | None,
                images: Mapping[str, str | Path] | None = None, run_dir: str | Path | None = None) -> None:
    """Record the end-of-run ``results`` and ``images`` (name -> PNG path) with ``logger`` (a Lightning logger,
    a list of them, or False/None).

    W&B: summary metrics ``eval/<model>/<metric>``, the table ``eval/results`` (one row per model) and each
    image as ``pictures/<name>`` (a wandb.Image). Other loggers (CSV): one metrics row, flushed to disk. With
    ``run_dir``, an image kept elsewhere is copied into it (the run directory holds every picture)."""
    results = dict(results or {})
    imgs: dict[str, Path] = {}
    for name, p in (images or {}).items():
        if p is None or not Path(p).is_file():
            continue
        p = Path(p)
        if run_dir is not None and p.resolve().parent != Path(run_dir).resolve():
            dest = Path(run_dir) / p.name
            shutil.copyfile(p, dest)
            p = dest
        imgs[name] = p
    flat = flat_results(results)
    for lg in _loggers(logger):
        if _is_wandb(lg):
            import wandb

            payload: dict[str, Any] = dict(flat)
            if results:
                columns, rows = results_table(results)
                payload["eval/results"] = wandb.Table(columns=columns, data=rows)
            for name, p in imgs.items():
                payload[f"pictures/{name}"] = wandb.Image(str(p), caption=name)
            if payload:
                lg.experiment.log(payload)
            if flat:
                lg.experiment.summary.update(flat)
        else:
            if flat:
                lg.log_metrics(flat)
            if hasattr(lg, "save"):
                lg.save()


def finish(logger) -> None:
    """Close the W&B run of ``logger`` (if one was started), so the next run in this process gets its own."""
    for lg in _loggers(logger):
        if _is_wandb(lg) and getattr(lg, "_experiment", None) is not None:
            lg.experiment.finish()


def end_of_run(logger, run_dir: str | Path, results: Mapping[str, Mapping[str, float]] | None,
               history: list[Mapping[str, float]] | None = None, pictures_of: Any = None, dm: Any = None,
               device="cpu", eval_cfg: Any = None, seed: int = 0, title: Optional[str] = None) -> dict[str, Path]:
    """Everything after training on rank 0: the cluster pictures of ``pictures_of`` (a model; skipped when
    None, or ``eval.cluster_seeds=0``), ``learning_curves.png``, then :func:`log_results` and :func:`finish`.
    Returns the pictures written (name -> path)."""
    images: dict[str, Path] = {}
    try:
        if pictures_of is not None and dm is not None and (eval_cfg is None or eval_cfg.cluster_seeds):
            try:
                images.update(cluster_pictures(
                    pictures_of, dm, run_dir, device, seed=seed, tag=title or "",
                    train_subset=getattr(eval_cfg, "train_subset", None),
                    val_subset=getattr(eval_cfg, "val_subset", None)))
            except Exception as e:  # a picture must never fail a finished run
                log.warning("cluster pictures not written: %s", e)
        curves = learning_curves(run_dir, history, results, logger, title)
        if curves is not None:
            images["learning_curves"] = curves
        log_results(logger, results, images, run_dir)
    finally:
        finish(logger)
    return images


__all__ = ["HistoryCallback", "cluster_pictures", "end_of_run", "finish", "flat_results", "find_metrics_csv",
           "hydra_run_identity", "learning_curves", "log_results", "plot_learning_curves", "read_metrics_csv",
           "results_table", "rich_progress_bar"]
