"""PASCAL VOC 2007 detection data and its metric: boxes from the devkit's XML, AP50 per class (VOC07 11-point).

Data: the same devkit layout as the classification transfer (:func:`~compress_lit.evaluation.voc.find_voc2007`,
``ImageSets/Main/<split>.txt``). Each ``<object>`` gives a class, a ``difficult`` flag and a ``bndbox`` of 1-based
inclusive pixel indices; boxes are stored in the continuous frame torchvision's detectors use,
``(xmin - 1, ymin - 1, xmax, ymax)``, so that a box's width ``xmax - xmin + 1`` and every IoU equal the devkit's
(which adds 1 to widths and heights). Labels are 1..20 (0 is the detector's background). Training leaves the
difficult objects out (as Fast R-CNN does, ``use_difficult=false``); the test set keeps them, marked.

Metric (the VOC07 devkit's ``VOCevaldet`` rule, written here): for each class, the detections of every test
image ranked by score (stable order on ties); a detection whose best IoU with a ground-truth box of its class in
its image is **> 0.5** is a true positive if that box is not difficult and not matched yet, is ignored (neither
true nor false) if that box is difficult, and is a false positive if the box was already matched (a duplicate);
below the threshold it is a false positive. Recall is over the non-difficult ground-truth boxes, including
those never detected. AP is the VOC07 11-point interpolated AP of
:func:`~compress_lit.evaluation.voc.average_precision` (the one AP implementation of the package); mAP is the
mean over the classes with ground truth.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .voc import VOC_CLASSES, VOCError, average_precision, find_voc2007, read_split


def parse_boxes(xml_path: str | os.PathLike, classes: Sequence[str] = VOC_CLASSES) -> dict[str, np.ndarray]:
    """The objects of one annotation: ``boxes`` (``M x 4`` float32, ``xmin - 1, ymin - 1, xmax, ymax``),
    ``labels`` (``M`` int64, 1-based class ids) and ``difficult`` (``M`` bool)."""
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as e:
        raise VOCError(f"cannot parse annotation {xml_path}: {e}") from e
    boxes, labels, difficult = [], [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in classes:
            raise VOCError(f"{xml_path}: unknown class {name!r}")
        bb = obj.find("bndbox")
        try:
            x1, y1, x2, y2 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError) as e:
            raise VOCError(f"{xml_path}: object {name!r} has no readable bndbox (xmin, ymin, xmax, ymax)") from e
        boxes.append([x1 - 1.0, y1 - 1.0, x2, y2])
        labels.append(list(classes).index(name) + 1)
        difficult.append((obj.findtext("difficult") or "0").strip() == "1")
    return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "labels": np.asarray(labels, np.int64),
            "difficult": np.asarray(difficult, bool)}


class VOC07DetectionDataset(Dataset):
    """VOC2007 ``split`` for detection: ``(image, target, index)`` with ``image`` a ``3 x H x W`` float tensor in
    [0, 1] at its original size (the detector resizes and normalises) and ``target`` torchvision's dict
    (``boxes``, ``labels``; plus ``difficult``). ``use_difficult=False`` drops difficult objects (training);
    ``hflip`` mirrors image and boxes with probability 0.5 (training). Images left without any object are
    skipped when ``skip_empty`` (training: nothing to learn from them)."""

    def __init__(self, root: str | os.PathLike, split: str = "trainval", use_difficult: bool = True,
                 hflip: bool = False, skip_empty: bool = False, classes: Sequence[str] = VOC_CLASSES):
        self.voc_dir = find_voc2007(root)
        self.split, self.use_difficult, self.hflip = split, use_difficult, hflip
        self.classes = list(classes)
        ids = read_split(self.voc_dir, split)
        self.annotations = {}
        kept = []
        for i in ids:
            ann = parse_boxes(self.voc_dir / "Annotations" / f"{i}.xml", classes)
            if not use_difficult:
                keep = ~ann["difficult"]
                ann = {k: v[keep] for k, v in ann.items()}
            if skip_empty and len(ann["labels"]) == 0:
                continue
            self.annotations[i] = ann
            kept.append(i)
        self.ids = kept

    def __len__(self) -> int:
        return len(self.ids)

    def annotation(self, index: int) -> dict[str, np.ndarray]:
        return self.annotations[self.ids[index]]

    def __getitem__(self, index: int):
        from PIL import Image
        from torchvision.transforms.functional import to_tensor

        path = self.voc_dir / "JPEGImages" / f"{self.ids[index]}.jpg"
        try:
            with Image.open(path) as img:
                image = to_tensor(img.convert("RGB"))
        except OSError as e:
            raise VOCError(f"cannot read image {path}: {e}") from e
        ann = self.annotation(index)
        boxes = torch.from_numpy(ann["boxes"].copy())
        if self.hflip and torch.rand(()) < 0.5:
            image = image.flip(-1)
            w = image.shape[-1]
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        target = {"boxes": boxes, "labels": torch.from_numpy(ann["labels"].copy()),
                  "difficult": torch.from_numpy(ann["difficult"].copy())}
        return image, target, int(index)


def detection_collate(batch):
    """Lists, not stacked tensors: images differ in size (the detector pads them into one batch)."""
    images, targets, indices = zip(*batch)
    return list(images), list(targets), torch.as_tensor(indices)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``(x1, y1, x2, y2)`` box with each row of ``boxes`` (continuous coordinates)."""
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, np.finfo(np.float64).eps)


def match_detections(dets: Sequence[tuple[Any, float, np.ndarray]],
                     truth: Mapping[Any, tuple[np.ndarray, np.ndarray]], iou_threshold: float = 0.5
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Scores (ranked, highest first, stable) and targets (1 true positive, -1 false positive, 0 ignored) of one
    class's detections ``(image, score, box)``; ``truth[image] = (boxes, difficult)`` of that class."""
    order = sorted(range(len(dets)), key=lambda k: -float(dets[k][1]))
    matched = {img: np.zeros(len(t[0]), bool) for img, t in truth.items()}
    scores, targets = [], []
    for k in order:
        img, score, box = dets[k]
        gt_boxes, gt_difficult = truth.get(img, (np.zeros((0, 4)), np.zeros(0, bool)))
        t = -1
        if len(gt_boxes):
            ious = box_iou(np.asarray(box, np.float64), np.asarray(gt_boxes, np.float64))
            j = int(np.argmax(ious))
            if ious[j] > iou_threshold:
                if gt_difficult[j]:
                    t = 0
                elif not matched[img][j]:
                    t, matched[img][j] = 1, True
        scores.append(float(score))
        targets.append(t)
    return np.asarray(scores, np.float64), np.asarray(targets, np.int64)


def voc07_detection_ap(detections: Mapping[Any, Mapping[str, Any]], annotations: Mapping[Any, Mapping[str, Any]],
                       classes: Sequence[str] = VOC_CLASSES, iou_threshold: float = 0.5, kind: str = "11point"
                       ) -> dict[str, Any]:
    """Per-class AP (%) and mAP of ``detections[image] = {"boxes", "scores", "labels"}`` against
    ``annotations[image] = {"boxes", "labels", "difficult"}`` (labels 1-based; module docstring for the rule).
    Every image of ``annotations`` is a test image (an image without detections just misses its boxes)."""
    per_class: dict[str, Optional[float]] = {}
    for c, name in enumerate(classes, start=1):
        truth = {}
        npos = 0
        for img, ann in annotations.items():
            sel = np.asarray(ann["labels"]) == c
            diff = np.asarray(ann["difficult"], bool)[sel]
            truth[img] = (np.asarray(ann["boxes"], np.float64).reshape(-1, 4)[sel], diff)
            npos += int((~diff).sum())
        dets = []
        for img, d in detections.items():
            labels = np.asarray(d["labels"]).reshape(-1)
            boxes = np.asarray(d["boxes"], np.float64).reshape(-1, 4)
            scores = np.asarray(d["scores"], np.float64).reshape(-1)
            dets += [(img, scores[k], boxes[k]) for k in np.flatnonzero(labels == c)]
        if npos == 0:
            per_class[name] = None  # no ground truth: no AP
            continue
        s, t = match_detections(dets, truth, iou_threshold)
        per_class[name] = 100.0 * average_precision(s, t, kind, npos=npos)
    aps = [v for v in per_class.values() if v is not None]
    return {"mAP": float(np.mean(aps)) if aps else float("nan"), "per_class": per_class,
            "ap_kind": kind, "iou_threshold": iou_threshold}


__all__ = ["VOC07DetectionDataset", "box_iou", "detection_collate", "match_detections", "parse_boxes",
           "voc07_detection_ap"]
