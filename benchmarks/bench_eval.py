"""Benchmark of the evaluation hot spots: cluster alignment's matching step and k-NN.

1. Matching step at 1000 clusters x 1000 classes x 100k samples: the vectorised version (one ``np.bincount``
   overlap, similarity ``|C∩Y|/|C|``, Hungarian) against the direct Python formulation of the same computation
   (per cluster, per class ``len(set & set)``, as the official scripts do) followed by the same Hungarian step.
   The set version is timed on a fraction of the cluster rows (``--set-fraction``, default 0.1) and extrapolated
   linearly to all rows; the rows it computed are checked against the vectorised overlap.
2. k-NN (k = 1 and 20, majority vote) with a 60k x 512-d bank and 10k queries of random features, with faiss and
   with the exact torch search: queries per second.

Usage: ``PYTHONPATH=src python benchmarks/bench_eval.py [--quick]``; prints a table, writes
``benchmarks/results/eval.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from compress_lit.evaluation.cluster import cluster_class_similarity, hungarian_mapping, overlap_matrix  # noqa: E402
from compress_lit.evaluation.knn import knn_evaluate, resolve_backend  # noqa: E402


def _timeit(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_matching(n_clusters: int, n_classes: int, n_samples: int, set_fraction: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    clusters = rng.integers(0, n_clusters, n_samples)
    labels = rng.integers(0, n_classes, n_samples)

    def vectorised():
        ov = overlap_matrix(clusters, labels, n_clusters, n_classes)
        return ov, hungarian_mapping(cluster_class_similarity(ov))

    t_overlap, ov = _timeit(lambda: overlap_matrix(clusters, labels, n_clusters, n_classes), repeat=3)
    t_vec, (ov, mapping) = _timeit(vectorised, repeat=3)
    t_hungarian = t_vec - t_overlap

    # the direct formulation: index sets per cluster and per class, then every pairwise intersection
    rows = max(1, int(round(n_clusters * set_fraction)))
    t0 = time.perf_counter()
    cluster_sets = [set(np.flatnonzero(clusters == i).tolist()) for i in range(n_clusters)]
    class_sets = [set(np.flatnonzero(labels == j).tolist()) for j in range(n_classes)]
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    sim_rows = []
    for i in range(rows):
        size = len(cluster_sets[i])
        sim_rows.append([len(cluster_sets[i] & class_sets[j]) / size if size else 0.0 for j in range(n_classes)])
    t_rows = time.perf_counter() - t0
    counts = np.array([[len(cluster_sets[i] & class_sets[j]) for j in range(n_classes)] for i in range(min(rows, 5))])
    assert np.array_equal(counts, ov[: len(counts)]), "set formulation disagrees with the vectorised overlap"
    assert np.allclose(np.array(sim_rows), cluster_class_similarity(ov)[:rows])
    t_set_total = t_build + t_rows * (n_clusters / rows) + t_hungarian
    return {
        "clusters": n_clusters, "classes": n_classes, "samples": n_samples,
        "vectorised_overlap_s": t_overlap, "hungarian_s": t_hungarian, "vectorised_total_s": t_vec,
        "set_build_s": t_build, "set_rows_timed": rows, "set_rows_s": t_rows,
        "set_total_s_extrapolated": t_set_total, "extrapolated": rows < n_clusters,
        "speedup_total": t_set_total / t_vec,
        "speedup_overlap_only": (t_build + t_rows * n_clusters / rows) / t_overlap,
        "mapping_matched": int((mapping >= 0).sum()),
    }


def bench_knn(n_bank: int, n_query: int, dim: int, n_classes: int, ks=(1, 20), seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(n_bank, dim, generator=g)
    queries = torch.randn(n_query, dim, generator=g)
    by = torch.randint(0, n_classes, (n_bank,), generator=g)
    qy = torch.randint(0, n_classes, (n_query,), generator=g)
    out = {"bank": n_bank, "queries": n_query, "dim": dim, "classes": n_classes, "ks": list(ks)}
    backends = ["torch"]
    try:
        if resolve_backend("faiss") == "faiss":
            backends.insert(0, "faiss")
    except ImportError:
        out["faiss"] = "not installed"
    results = {}
    for b in backends:
        t, res = _timeit(lambda: knn_evaluate(bank, by, queries, qy, ks=ks, num_classes=n_classes, backend=b))
        out[f"{b}_s"] = t
        out[f"{b}_queries_per_s"] = n_query / t
        results[b] = res
    if len(results) == 2:
        out["backends_agree"] = results["faiss"] == results["torch"]
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--set-fraction", type=float, default=0.1, help="share of cluster rows the set version runs")
    ap.add_argument("--bank", type=int, default=60_000)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--knn-classes", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="a tenth of every size (smoke test)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "eval.json"))
    a = ap.parse_args(argv)
    if a.quick:
        a.clusters, a.classes, a.samples, a.bank, a.queries = 100, 100, 10_000, 6000, 1000

    env = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "machine": platform.machine()}
    try:
        import faiss

        env["faiss"] = faiss.__version__
    except ImportError:
        env["faiss"] = None
    m = bench_matching(a.clusters, a.classes, a.samples, a.set_fraction)
    k = bench_knn(a.bank, a.queries, a.dim, a.knn_classes)

    print(f"\ncluster alignment matching step: {m['clusters']} clusters x {m['classes']} classes x "
          f"{m['samples']} samples")
    print(f"  {'step':<54}{'seconds':>12}")
    print(f"  {'vectorised overlap (np.bincount)':<54}{m['vectorised_overlap_s']:>12.4f}")
    print(f"  {'Hungarian (linear_sum_assignment)':<54}{m['hungarian_s']:>12.4f}")
    print(f"  {'vectorised total (overlap + similarity + Hungarian)':<54}{m['vectorised_total_s']:>12.4f}")
    print(f"  {'python sets: building index sets':<54}{m['set_build_s']:>12.4f}")
    how = (f"timed on {m['set_rows_timed']} of {m['clusters']} cluster rows ({m['set_rows_s']:.2f} s), "
           f"extrapolated linearly" if m["extrapolated"] else "all rows timed")
    print(f"  {'python sets total (+ same Hungarian)':<54}{m['set_total_s_extrapolated']:>12.2f}   [{how}]")
    print(f"  speed-up: {m['speedup_total']:.0f}x overall, {m['speedup_overlap_only']:.0f}x on the overlap alone")
    print(f"\nk-NN (k = {k['ks']}, majority vote): bank {k['bank']} x {k['dim']}-d, {k['queries']} queries, "
          f"{k['classes']} classes")
    print(f"  {'backend':<10}{'seconds':>10}{'queries/s':>14}")
    for b in ("faiss", "torch"):
        if f"{b}_s" in k:
            print(f"  {b:<10}{k[f'{b}_s']:>10.2f}{k[f'{b}_queries_per_s']:>14.0f}")
    if "backends_agree" in k:
        print(f"  faiss and torch results identical: {k['backends_agree']}")
    result = {"environment": env, "matching": m, "knn": k, "quick": a.quick}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nsaved {out}")
    return result


if __name__ == "__main__":
    main()
