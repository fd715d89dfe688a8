"""The end-of-run comparison that `train` and `pretrain` print: for each model, on its frozen embedding,
k-NN top-1, cluster alignment (mean ± std over k-means seeds) and the linear probe on precomputed features."""
from __future__ import annotations

from pathlib import Path

from ..data.datamodule import bank_loader
from .cluster import cluster_alignment
from .features import extract_features, save_features
from .knn import knn_evaluate
from .linear import linear_probe_on_features


def evaluate_models(models: dict, dm, ks=(1, 20), device="cpu", cluster_seeds: int = 5, linear: bool = True,
                    out_dir: Path | None = None) -> dict[str, dict[str, float]]:
    """Scores per named model on the held-out split (train split as k-NN bank / k-means / probe training)."""
    results = {}
    for name, model in models.items():
        tr_x, tr_y = extract_features(model, bank_loader(dm), device)
        te_x, te_y = extract_features(model, dm.val_dataloader(), device)
        knn = knn_evaluate(tr_x, tr_y, te_x, te_y, ks=list(ks), num_classes=dm.num_classes)
        row = {f"{k}-NN": knn[f"top1_k{k}"] for k in ks}
        if cluster_seeds:
            c = cluster_alignment(tr_x, tr_y, te_x, te_y, num_classes=dm.num_classes, seeds=cluster_seeds)
            row["cluster"], row["cluster_std"] = c.acc_mean, c.acc_std
        if linear:
            row["linear"] = linear_probe_on_features(tr_x, tr_y, te_x, te_y, dm.num_classes)["top1"]
        results[name] = row
        if out_dir is not None:
            tag = name.split(" ")[0].replace(",", "")
            save_features(Path(out_dir) / f"features_{tag}.npz", tr_x.numpy(), tr_y.numpy(), te_x.numpy(),
                          te_y.numpy())
    return results


def format_table(results: dict[str, dict[str, float]], cluster_seeds: int | None = None) -> str:
    """A plain-text table: one row per model; cluster alignment as mean ± std."""
    first = next(iter(results.values()))
    cols = [c for c in first if c != "cluster_std"]
    heads = {c: (f"cluster({cluster_seeds} seeds)" if c == "cluster" and cluster_seeds else c) for c in cols}
    width = max(len(n) for n in results) + 2
    cw = {c: max(9, len(heads[c]) + 2) for c in cols}
    lines = ["".join([f"{'model':<{width}}", *[f"{heads[c]:>{cw[c]}}" for c in cols]])]
    for name, row in results.items():
        cells = []
        for c in cols:
            v = f"{row[c]:.2f}" + (f" ± {row['cluster_std']:.1f}" if c == "cluster" else "")
            cells.append(f"{v:>{cw[c]}}")
        lines.append("".join([f"{name:<{width}}", *cells]))
    return "\n".join(lines)
