"""VOC07: AP against hand computations, annotation parsing with difficult objects, the classification pipeline."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from compress_lit.evaluation.voc import (VOC_CLASSES, VOC07Dataset, VOCError, average_precision, evaluate_voc07,
                                         find_voc2007, mean_average_precision, parse_annotation,
                                         voc07_classification)


def test_ap_hand_computation():
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    targets = [1, -1, 1, 0, -1]  # the 0 ("difficult") is ignored
    # ranked (without the ignored one): TP FP TP FP; npos 2
    # precision 1, 1/2, 2/3, 2/4; recall 1/2, 1/2, 1, 1
    # 11-point: t = 0..0.5 (6 points) max precision 1; t = 0.6..1 (5 points) max precision 2/3
    assert average_precision(scores, targets, "11point") == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    # area: recall 0->0.5 at precision 1, 0.5->1 at the envelope 2/3
    assert average_precision(scores, targets, "area") == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # the ignored sample does not count even when it is ranked first
    assert average_precision([0.1, 0.9, 0.8], [1, 0, -1], "11point") == pytest.approx(6 / 11 * 0.5 + 5 / 11 * 0.5)


def test_ap_edge_cases():
    assert average_precision([0.3, 0.2], [1, 1]) == pytest.approx(1.0)
    assert np.isnan(average_precision([0.3, 0.2], [-1, 0]))  # no positive: undefined
    # all negatives ranked first: 1 positive at rank 3 -> precision 1/3 at recall 1 for every threshold
    assert average_precision([0.9, 0.8, 0.1], [-1, -1, 1]) == pytest.approx(1 / 3)
    assert average_precision([0.9, 0.8, 0.1], [-1, -1, 1], "area") == pytest.approx(1 / 3)
    m, aps = mean_average_precision(np.array([[0.9, 0.1], [0.1, 0.9]]), np.array([[1, -1], [-1, -1]]))
    assert aps[0] == pytest.approx(1.0) and np.isnan(aps[1]) and m == pytest.approx(1.0)
    with pytest.raises(ValueError):
        average_precision([1], [1], "bogus")


def _xml(objects):
    objs = "".join(f"<object><name>{n}</name><difficult>{int(d)}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
                   f"<xmax>5</xmax><ymax>5</ymax></bndbox></object>" for n, d in objects)
    return f"<annotation><filename>x.jpg</filename><size><width>16</width><height>16</height></size>{objs}</annotation>"


COLOURS = {"car": (255, 0, 0), "dog": (0, 0, 255), "person": (0, 255, 0)}


def make_voc(root, trainval, test):
    """``trainval``/``test``: lists of (id, [(class, difficult)...], colour class)."""
    base = root / "VOCdevkit" / "VOC2007"
    for d in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (base / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, items in (("trainval", trainval), ("test", test)):
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i, _, _ in items))
        for i, objs, colour in items:
            (base / "Annotations" / f"{i}.xml").write_text(_xml(objs))
            px = np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(base / "JPEGImages" / f"{i}.jpg")
    return base


def test_parse_annotations_with_difficult(tmp_path):
    p = tmp_path / "a.xml"
    p.write_text(_xml([("car", 0), ("car", 1), ("dog", 1), ("person", 1), ("person", 0)]))
    t = parse_annotation(p)
    c = {n: int(t[i]) for i, n in enumerate(VOC_CLASSES)}
    assert c["car"] == 1  # a non-difficult car exists
    assert c["dog"] == 0  # only a difficult dog: ignore
    assert c["person"] == 1
    assert sum(v == -1 for v in c.values()) == 17
    p.write_text(_xml([("unicorn", 0)]))
    with pytest.raises(VOCError):
        parse_annotation(p)


def _tiny_tree(tmp_path):
    trainval = [(f"00{i:04d}", [("car", 0)] if i % 2 else [("dog", 0), ("bird", 1)], "car" if i % 2 else "dog")
                for i in range(12)]
    test = [(f"01{i:04d}", [("car", 0)] if i % 2 else [("dog", 0), ("person", 1)], "car" if i % 2 else "dog")
            for i in range(8)]
    return make_voc(tmp_path, trainval, test)


def test_dataset_reads_the_tree(tmp_path):
    base = _tiny_tree(tmp_path)
    assert find_voc2007(tmp_path) == base and find_voc2007(base.parent) == base
    ds = VOC07Dataset(tmp_path, "test", transform=lambda im: torch.from_numpy(np.asarray(im).copy()))
    assert len(ds) == 8 and ds.targets.shape == (8, 20)
    img, target, idx = ds[0]
    assert img.shape == (16, 16, 3) and idx == 0
    dog, person, car = VOC_CLASSES.index("dog"), VOC_CLASSES.index("person"), VOC_CLASSES.index("car")
    assert target[dog] == 1 and target[person] == 0 and target[car] == -1
    assert ds.targets[1, car] == 1
    with pytest.raises(VOCError):
        find_voc2007(tmp_path / "nowhere")


class _MeanColour(nn.Module):
    """A 'backbone' whose embedding is the mean colour: red cars and blue dogs are linearly separable."""

    def forward(self, x):
        return x.mean((2, 3))


def test_voc07_pipeline_on_tiny_tree(tmp_path):
    _tiny_tree(tmp_path)
    res = evaluate_voc07(_MeanColour(), tmp_path, image_size=16, resize_size=16, batch_size=4, num_workers=0,
                         costs=[0.1, 1.0, 10.0])
    assert res["num_trainval"] == 12 and res["num_test"] == 8
    # car and dog are the only classes with test positives (person is difficult-only -> no AP)
    assert res["per_class"]["car"] == pytest.approx(100.0) and res["per_class"]["dog"] == pytest.approx(100.0)
    assert res["per_class"]["person"] is None and res["mAP"] == pytest.approx(100.0)


def test_voc07_classification_on_synthetic_features():
    rng = np.random.default_rng(0)
    n, c = 60, 20
    t = np.where(rng.random((n, c)) < 0.3, 1, -1)
    t[rng.random((n, c)) < 0.05] = 0
    x = np.where(t > 0, 1.0, 0.0) + 0.05 * rng.normal(size=(n, c))  # one informative dimension per class
    res = voc07_classification(x[:40], t[:40], x[40:], t[40:])
    assert res["mAP"] == pytest.approx(100.0)
    noisy = voc07_classification(x[:40], t[:40], rng.normal(size=(20, c)), t[40:])
    assert noisy["mAP"] < 90.0
