"""VOC07 detection transfer: boxes from the devkit XML, the VOC07 AP50 of a hand-made prediction set against a
hand computation, the student in Faster R-CNN training with the loss falling, and `compress_lit.detect` on a
tiny VOCdevkit tree, in one process and in two (DDP)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compress_lit.runtime.config import ConfigError
from compress_lit.evaluation.settings import DetectSettings
from compress_lit.evaluation.voc import VOC_CLASSES
from compress_lit.evaluation.voc_detection import (VOC07DetectionDataset, box_iou, parse_boxes,
                                                   voc07_detection_ap)
from compress_lit.models import build_backbone
from test_per_layer_linear import _compose, save_student

CAR, DOG = VOC_CLASSES.index("car") + 1, VOC_CLASSES.index("dog") + 1
COLOUR = {"car": (230, 30, 30), "dog": (30, 30, 230)}


def _xml(objects, size=48):
    objs = "".join(f"<object><name>{n}</name><difficult>{int(d)}</difficult><bndbox><xmin>{b[0]}</xmin>"
                   f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                   for n, b, d in objects)
    return (f"<annotation><filename>x.jpg</filename><size><width>{size}</width><height>{size}</height>"
            f"<depth>3</depth></size>{objs}</annotation>")


def make_detection_voc(root: Path, n_trainval: int = 4, n_test: int = 3, size: int = 48) -> Path:
    """``VOCdevkit/VOC2007`` with JPEG images of a red car and/or a blue dog (filled boxes) on grey noise."""
    base = root / "VOCdevkit" / "VOC2007"
    for d in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (base / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("trainval", n_trainval), ("test", n_test)):
        ids = [f"{split[:2]}{i:04d}" for i in range(n)]
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for k, i in enumerate(ids):
            px = rng.integers(90, 140, (size, size, 3))
            objects = []
            for name, x0 in (("car", 3), ("dog", 26)):
                if name == "dog" and k % 2:
                    continue
                y0 = int(rng.integers(2, size - 22))
                w, h = int(rng.integers(14, 20)), int(rng.integers(14, 20))
                px[y0:y0 + h, x0:x0 + w] = COLOUR[name]
                objects.append((name, (x0 + 1, y0 + 1, x0 + w, y0 + h), False))  # 1-based inclusive
            if k == 0:
                objects.append(("dog", (40, 40, 46, 46), True))  # a difficult object (not drawn)
            (base / "Annotations" / f"{i}.xml").write_text(_xml(objects, size))
            Image.fromarray(px.astype(np.uint8)).save(base / "JPEGImages" / f"{i}.jpg", quality=95)
    return base


def test_boxes_are_read_in_the_devkit_frame(tmp_path):
    p = tmp_path / "a.xml"
    p.write_text(_xml([("car", (1, 1, 10, 10), False), ("car", (1, 1, 10, 5), True), ("dog", (5, 6, 7, 8), False)]))
    ann = parse_boxes(p)
    assert ann["boxes"].tolist() == [[0, 0, 10, 10], [0, 0, 10, 5], [4, 5, 7, 8]]
    assert ann["labels"].tolist() == [CAR, CAR, DOG] and ann["difficult"].tolist() == [False, True, False]
    # the devkit's IoU, widths + 1: (1,1,10,10) vs (1,1,10,5) = 50 / 100
    assert box_iou(ann["boxes"][0], ann["boxes"][1:2])[0] == pytest.approx(0.5)


def test_voc07_ap50_of_a_hand_made_prediction_set():
    b = lambda *v: np.array(v, np.float64)  # noqa: E731
    annotations = {
        0: {"boxes": [b(0, 0, 10, 10), b(20, 20, 30, 30)], "labels": [CAR, CAR], "difficult": [False, True]},
        1: {"boxes": [b(0, 0, 10, 10), b(40, 40, 50, 50), b(5, 5, 15, 15)], "labels": [CAR, CAR, DOG],
            "difficult": [False, False, False]},
        2: {"boxes": np.zeros((0, 4)), "labels": [], "difficult": []},
    }
    det = {  # (box, score, label) per image
        0: [((0, 0, 10, 10), 0.9, CAR),     # true positive (IoU 1)
            ((0, 0, 10, 10), 0.8, CAR),     # duplicate of the same box: false positive
            ((20, 20, 30, 30), 0.7, CAR),   # on a difficult box: ignored
            ((0, 0, 10, 10), 0.95, DOG)],   # no dog here: false positive
        1: [((0, 0, 10, 7), 0.5, CAR),      # IoU 0.7: true positive
            ((40, 40, 50, 45), 0.45, CAR),  # IoU exactly 0.5: not > 0.5, false positive
            ((5, 5, 15, 15), 0.3, DOG),     # true positive
            ((0, 0, 3, 3), 0.9, DOG)],      # false positive
        2: [((0, 0, 5, 5), 0.6, CAR)],      # an image without objects: false positive
    }
    detections = {i: {"boxes": np.array([d[0] for d in v], float), "scores": np.array([d[1] for d in v]),
                      "labels": np.array([d[2] for d in v])} for i, v in det.items()}
    res = voc07_detection_ap(detections, annotations)
    # car, 3 non-difficult boxes; ranked without the ignored one: TP .9, FP .8, FP .6, TP .5, FP .45
    # precision 1, 1/2, 1/3, 2/4, 2/5 at recall 1/3, 1/3, 1/3, 2/3, 2/3
    # 11 points: t = 0, .1, .2, .3 -> 1; t = .4, .5, .6 -> 1/2; t = .7 ... 1 -> 0 (recall never reached)
    car = (4 * 1 + 3 * 0.5 + 4 * 0) / 11
    # dog, 1 box: FP .95, FP .9, TP .3 -> precision 1/3 at recall 1 for every t
    dog = 1 / 3
    assert res["per_class"]["car"] == pytest.approx(100 * car) and res["per_class"]["dog"] == pytest.approx(100 * dog)
    assert res["per_class"]["cat"] is None and res["mAP"] == pytest.approx(100 * (car + dog) / 2)
    # area AP (VOC2010+) of the same car ranking: recall 1/3 at precision 1, 2/3 at 1/2
    area = voc07_detection_ap(detections, annotations, kind="area")
    assert area["per_class"]["car"] == pytest.approx(100 * (1 / 3 * 1 + 1 / 3 * 0.5))


def test_dataset_drops_difficult_for_training_and_flips_boxes(tmp_path):
    make_detection_voc(tmp_path)
    test = VOC07DetectionDataset(tmp_path, "test")
    train = VOC07DetectionDataset(tmp_path, "trainval", use_difficult=False)
    assert len(test) == 3 and test.annotation(0)["difficult"].tolist() == [False, False, True]
    assert train.annotation(0)["difficult"].tolist() == [False, False]
    image, target, idx = test[0]
    assert image.shape == (3, 48, 48) and 0 <= image.min() and image.max() <= 1 and idx == 0
    x1, y1, x2, y2 = target["boxes"][0].int().tolist()  # the red car fills its box
    assert image[0, y1:y2, x1:x2].mean() > 0.8 and image[2, y1:y2, x1:x2].mean() < 0.2
    flipping = VOC07DetectionDataset(tmp_path, "trainval", use_difficult=False, hflip=True)
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        im, t, _ = flipping[0]
        x1, y1, x2, y2 = t["boxes"][0].int().tolist()
        assert im[0, y1:y2, x1:x2].mean() > 0.8  # the box follows the car, flipped or not
        seen.add(x1)
    assert len(seen) == 2


@pytest.mark.parametrize("arch", ["alexnet", "resnet18"])
def test_student_in_faster_rcnn_trains_with_the_loss_falling(arch, tmp_path):
    import pytorch_lightning as pl

    from compress_lit.evaluation.detector import DetectionModule, VOCDetectionData, build_detector
    from compress_lit.evaluation.voc_detection import detection_collate

    make_detection_voc(tmp_path, n_trainval=4)
    torch.manual_seed(0)
    student = build_backbone(arch, small_input=True, width_multiplier=0.25,
                             **({"fc_dim": 64} if arch == "alexnet" else {})).eval()
    bn_before = {k: v.clone() for k, v in student.state_dict().items() if "running" in k}
    settings = DetectSettings(root=str(tmp_path), min_size=48, max_size=48, anchor_sizes=[8, 16, 32],
                              lr=0.02, epochs=4, milestones=[], batch_size=2, num_workers=0, hflip=False,
                              rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, box_batch_size_per_image=32)
    detector = build_detector(student, arch, settings, [0.5] * 3, [0.25] * 3)
    assert all(p.requires_grad for p in detector.parameters())  # all layers fine-tuned
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in detector.modules())  # frozen BatchNorm
    dm = VOCDetectionData(settings)
    dm.setup()
    images, targets, _ = detection_collate([dm.train[i] for i in range(4)])
    targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]

    def fixed_loss() -> float:  # the same images and the same anchor/RoI sampling (seeded) before and after
        detector.train()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(123)
            return float(sum(detector(images, targets).values()))

    before = fixed_loss()
    module = DetectionModule(detector, settings)
    trainer = pl.Trainer(max_epochs=settings.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)
    after = fixed_loss()
    assert len(module.loss_history) == 8 and all(np.isfinite(module.loss_history))
    assert after < 0.9 * before and module.loss_history[-1] < module.loss_history[0], (before, after)
    bn_after = {k: v for k, v in student.state_dict().items() if "running" in k}
    assert all(torch.equal(bn_before[k], bn_after[k]) for k in bn_before)  # frozen statistics untouched


def test_detect_entry_point_on_a_tiny_voc_tree(tmp_path, capsys):
    from compress_lit.detect import run_detect

    make_detection_voc(tmp_path / "voc")
    ckpt = tmp_path / "student.ckpt"
    save_student(ckpt, "alexnet", fc_dim=32)
    common = [f"checkpoint={ckpt}", f"detect.root={tmp_path / 'voc'}", "detect.min_size=48", "detect.max_size=48",
              "detect.anchor_sizes=[8,16,32]", "detect.epochs=1", "detect.milestones=[]", "detect.num_workers=0",
              "detect.lr=0.01", "trainer.accelerator=cpu", "progress=false"]
    res = run_detect(_compose("detect", common), tmp_path / "run")
    out = tmp_path / "run"
    assert res["steps"] == 2 and res["num_train"] == 4 and res["num_test"] == 3 and res["ap_kind"] == "11point"
    assert set(k for k, v in res["per_class"].items() if v is not None) == {"car", "dog"}
    assert 0 <= res["mAP"] <= 100
    # the AP is exactly the metric of the detections written to disk
    d = np.load(out / "detections.npz")
    dets = {i: {"boxes": d["box"][d["image"] == i], "scores": d["score"][d["image"] == i],
                "labels": d["label"][d["image"] == i]} for i in range(3)}
    anns = {i: VOC07DetectionDataset(tmp_path / "voc", "test").annotation(i) for i in range(3)}
    assert voc07_detection_ap(dets, anns)["per_class"] == pytest.approx(res["per_class"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["mAP"] == pytest.approx(res["mAP"]) and len(saved["loss_history"]) == 2
    table = (out / "results.md").read_text()
    assert "| car " in table and "**mAP**" in table and "| AP50 (11-point, %) |" in table
    assert "**mAP**" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"^detect.root is required: add detect.root=<folder holding VOCdevkit"):
        run_detect(_compose("detect", [f"checkpoint={ckpt}"]), tmp_path / "bad")
    with pytest.raises(ConfigError, match=r"^detect.root=.*nowhere: no VOC2007 tree"):
        run_detect(_compose("detect", [f"checkpoint={ckpt}", f"detect.root={tmp_path / 'nowhere'}"]), tmp_path / "b2")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "b2").exists()


def test_detect_under_ddp_scores_every_test_image_once(tmp_path):
    """Two CPU processes (gloo): each trains on its half of the global batch of 2 and scores its shard of the
    test images; the detections are gathered and the sampler's padding (3 images over 2 processes) dropped."""
    make_detection_voc(tmp_path / "voc")
    ckpt = tmp_path / "student.ckpt"
    save_student(ckpt, "alexnet", fc_dim=32)
    cmd = [sys.executable, "-m", "compress_lit.detect", f"checkpoint={ckpt}", f"detect.root={tmp_path / 'voc'}",
           "detect.min_size=48", "detect.max_size=48", "detect.anchor_sizes=[8,16,32]", "detect.epochs=1",
           "detect.milestones=[]", "detect.num_workers=0", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.strategy=ddp", "progress=false", f"hydra.run.dir={tmp_path / 'run'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(29700 + os.getpid() % 200))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["processes"] == 2 and res["images_scored"] == 3 and res["num_test"] == 3
    assert res["steps"] == 2  # 4 images, 1 per process per step
    assert "**mAP**" in proc.stdout
