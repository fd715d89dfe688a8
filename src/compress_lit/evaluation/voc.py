"""PASCAL VOC 2007 transfer classification: a linear classifier on frozen features, mAP over the 20 classes.

Data: the devkit layout ``VOCdevkit/VOC2007/{Annotations,ImageSets/Main,JPEGImages}``; splits from
``ImageSets/Main/{trainval,test}.txt``; multi-label targets parsed from the XML annotations, encoded as VOC does:
``1`` the class has a non-difficult object in the image, ``0`` it has only *difficult* objects ("ignore"), ``-1``
absent. Samples with target 0 are left out of the training of that class's classifier and out of its AP.

Classifier: one-vs-rest linear SVMs (``sklearn.svm.LinearSVC``) on L2-normalised features, one cost or the best of
several per class by 3-fold cross-validated AP on trainval.

AP: implemented here. ``"11point"`` is VOC2007's interpolated AP: the mean over recall thresholds t in {0, 0.1,
…, 1} of the maximal precision at recall >= t (0 when recall t is never reached). ``"area"`` (VOC2010+) is the area
under the monotone (right-to-left running max) precision envelope. Detections are ranked by score, ties kept in
dataset order (stable sort). A class without positives in the scored set has no AP (NaN, left out of the mean).
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.workers import cap_num_workers

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


class VOCError(RuntimeError):
    """A VOC tree that cannot be read; the message names the path."""


# ------------------------------------------------------------------------------------------------- parsing
def find_voc2007(root: str | os.PathLike) -> Path:
    """``root`` itself, ``root/VOC2007`` or ``root/VOCdevkit/VOC2007``: the folder holding ``Annotations``."""
    root = Path(os.path.expanduser(str(root)))
    for cand in (root, root / "VOC2007", root / "VOCdevkit" / "VOC2007"):
        if (cand / "Annotations").is_dir() and (cand / "ImageSets" / "Main").is_dir():
            return cand
    raise VOCError(f"no VOC2007 tree under {root}: expected VOCdevkit/VOC2007/{{Annotations,ImageSets/Main,"
                   f"JPEGImages}}")


def parse_annotation(xml_path: str | os.PathLike, classes: Sequence[str] = VOC_CLASSES) -> np.ndarray:
    """Targets (``len(classes)``, int8) of one image: 1 present, 0 difficult-only, -1 absent."""
    try:
        tree = ET.parse(xml_path)
    except (ET.ParseError, OSError) as e:
        raise VOCError(f"cannot parse annotation {xml_path}: {e}") from e
    pos = {c: False for c in classes}
    diff = {c: False for c in classes}
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in pos:
            raise VOCError(f"{xml_path}: unknown class {name!r}")
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        if difficult:
            diff[name] = True
        else:
            pos[name] = True
    return np.array([1 if pos[c] else (0 if diff[c] else -1) for c in classes], dtype=np.int8)


def read_split(voc_dir: str | os.PathLike, split: str) -> list[str]:
    p = Path(voc_dir) / "ImageSets" / "Main" / f"{split}.txt"
    if not p.is_file():
        raise VOCError(f"split file {p} not found (expected ImageSets/Main/{split}.txt)")
    return [line.split()[0] for line in p.read_text().splitlines() if line.strip()]


class VOC07Dataset(Dataset):
    """VOC2007 ``split`` images with their targets; yields ``(image, target (20,) float tensor, index)``."""

    def __init__(self, root: str | os.PathLike, split: str = "trainval", transform: Optional[Callable] = None):
        self.voc_dir = find_voc2007(root)
        self.split = split
        self.ids = read_split(self.voc_dir, split)
        self.classes = list(VOC_CLASSES)
        self.targets = np.stack([parse_annotation(self.voc_dir / "Annotations" / f"{i}.xml") for i in self.ids]) \
            if self.ids else np.zeros((0, len(VOC_CLASSES)), np.int8)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        from PIL import Image

        path = self.voc_dir / "JPEGImages" / f"{self.ids[index]}.jpg"
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except OSError as e:
            raise VOCError(f"cannot read image {path}: {e}") from e
        if self.transform is not None:
            img = self.transform(img)
        return img, torch.from_numpy(self.targets[index].astype(np.float32)), int(index)


def voc_transform(image_size: int = 224, resize_size: int = 256, mean=(0.485, 0.456, 0.406),
                  std=(0.229, 0.224, 0.225)):
    """Resize + CenterCrop + ToTensor + Normalize (no augmentation: features of a frozen model)."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(resize_size), T.CenterCrop(image_size), T.ToTensor(),
                      T.Normalize(list(mean), list(std))])


class VOC07DataModule:
    """Loaders over VOC2007: ``train_eval_dataloader`` (trainval) and ``val_dataloader`` (test), both in order."""

    def __init__(self, root, image_size: int = 224, resize_size: int = 256, mean=(0.485, 0.456, 0.406),
                 std=(0.229, 0.224, 0.225), batch_size: int = 128, num_workers: int = 4):
        t = voc_transform(image_size, resize_size, mean, std)
        self.trainval = VOC07Dataset(root, "trainval", t)
        self.test = VOC07Dataset(root, "test", t)
        self.batch_size, self.num_workers = batch_size, cap_num_workers(num_workers)
        self.class_names = list(VOC_CLASSES)
        self.num_classes = len(VOC_CLASSES)

    def _loader(self, ds) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def train_eval_dataloader(self) -> DataLoader:
        return self._loader(self.trainval)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test)


# ------------------------------------------------------------------------------------------------------ AP
def average_precision(scores, targets, kind: str = "11point", npos: Optional[int] = None) -> float:
    """AP of one class: ``targets`` in {1, 0, -1} (0 ignored); ``kind`` ``"11point"`` (VOC07) or ``"area"``.

    ``npos``: the number of positives recall is measured against; by default the positives among ``targets``
    (classification: every positive image is scored). Detection passes the number of non-difficult ground-truth
    boxes, some of which no detection found (``targets`` then marks each detection true/false positive or
    ignored; :mod:`compress_lit.evaluation.voc_detection`).
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    t = np.asarray(targets).reshape(-1)
    keep = t != 0
    s, t = s[keep], t[keep]
    npos = int((t > 0).sum()) if npos is None else int(npos)
    if npos == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    tp = np.cumsum(t[order] > 0)
    fp = np.cumsum(t[order] < 0)
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if kind == "11point":
        ap = 0.0
        for thr in np.linspace(0.0, 1.0, 11):
            p = prec[rec >= thr - 1e-12]
            ap += (p.max() if p.size else 0.0) / 11.0
        return float(ap)
    if kind == "area":
        mrec = np.concatenate([[0.0], rec, [1.0]])
        mpre = np.concatenate([[0.0], prec, [0.0]])
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        i = np.flatnonzero(mrec[1:] != mrec[:-1])
        return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))
    raise ValueError(f"unknown AP kind {kind!r}; choose '11point' or 'area'")


def mean_average_precision(scores, targets, kind: str = "11point") -> tuple[float, np.ndarray]:
    """mAP over classes (NaN APs left out) and the per-class APs; ``scores``/``targets`` are ``N x C``."""
    scores, targets = np.asarray(scores), np.asarray(targets)
    aps = np.array([average_precision(scores[:, c], targets[:, c], kind) for c in range(targets.shape[1])])
    return (float(np.nanmean(aps)) if np.isfinite(aps).any() else float("nan")), aps


# ---------------------------------------------------------------------------------------------- classifier
def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _svm(C: float):
    from sklearn.svm import LinearSVC

    return LinearSVC(C=C, loss="squared_hinge", max_iter=5000, tol=1e-4, random_state=0)


def train_linear_classifiers(train_x, train_t, costs: Sequence[float] = (1.0,), normalize: bool = True,
                             cv_kind: str = "area") -> list[Any]:
    """One linear SVM per class on the samples with target != 0; with several costs the cost is chosen per class
    by 3-fold CV AP. A class with only one label value gets ``None`` (scores 0)."""
    x = np.asarray(train_x, dtype=np.float32)
    x = _l2(x) if normalize else x
    t = np.asarray(train_t)
    models = []
    for c in range(t.shape[1]):
        keep = t[:, c] != 0
        xc, yc = x[keep], (t[keep, c] > 0).astype(np.int64)
        if yc.min(initial=1) == yc.max(initial=0) or yc.size == 0:
            models.append(None)
            continue
        best_cost = costs[0]
        if len(costs) > 1 and min(np.bincount(yc, minlength=2)) >= 3:
            from sklearn.model_selection import StratifiedKFold

            best = -1.0
            for cost in costs:
                folds = StratifiedKFold(3, shuffle=True, random_state=0).split(xc, yc)
                aps = [average_precision(_svm(cost).fit(xc[a], yc[a]).decision_function(xc[b]),
                                         np.where(yc[b] > 0, 1, -1), cv_kind) for a, b in folds]
                if np.nanmean(aps) > best:
                    best, best_cost = float(np.nanmean(aps)), cost
        models.append(_svm(best_cost).fit(xc, yc))
    return models


def score_linear_classifiers(models: Sequence[Any], x, normalize: bool = True) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    x = _l2(x) if normalize else x
    return np.stack([m.decision_function(x) if m is not None else np.zeros(len(x)) for m in models], 1)


def voc07_classification(train_x, train_t, test_x, test_t, costs: Sequence[float] = (1.0,), ap: str = "11point",
                         normalize: bool = True, class_names: Sequence[str] = VOC_CLASSES) -> dict[str, Any]:
    """Fit on trainval features, score test: ``{"mAP", "ap_kind", "per_class": {class: AP}}`` (AP in %)."""
    models = train_linear_classifiers(train_x, train_t, costs, normalize)
    scores = score_linear_classifiers(models, test_x, normalize)
    m, aps = mean_average_precision(scores, np.asarray(test_t), ap)
    return {"mAP": 100.0 * m, "ap_kind": ap,
            "per_class": {n: (100.0 * float(a) if np.isfinite(a) else None) for n, a in zip(class_names, aps)}}


def evaluate_voc07(model, root, device="cpu", layer: Optional[str] = None, image_size: int = 224,
                   resize_size: int = 256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                   batch_size: int = 128, num_workers: int = 4, costs: Sequence[float] = (1.0,),
                   ap: str = "11point", normalize: bool = True, cache=None, cache_identity: Optional[str] = None,
                   progress: bool = False) -> dict[str, Any]:
    """Frozen features of trainval and test, linear SVMs, mAP (%) over the 20 classes."""
    from .features import describe_loader, extract_features, feature_cache_key

    dm = VOC07DataModule(root, image_size, resize_size, mean, std, batch_size, num_workers)
    out = {}
    for split, loader in (("voc07_trainval", dm.train_eval_dataloader()), ("voc07_test", dm.val_dataloader())):
        key = (feature_cache_key(cache_identity, layer, split, root=str(dm.trainval.voc_dir), **describe_loader(loader))
               if cache is not None and cache_identity else None)
        out[split] = extract_features(model, loader, device, progress, layer=layer, cache=cache, cache_key=key,
                                      desc=split)
    (tx, tt), (vx, vt) = out["voc07_trainval"], out["voc07_test"]
    res = voc07_classification(tx.numpy(), tt.numpy(), vx.numpy(), vt.numpy(), costs, ap, normalize)
    res.update({"num_trainval": len(dm.trainval), "num_test": len(dm.test)})
    return res
