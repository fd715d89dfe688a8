"""10-crop evaluation (`ten_crop=true`) on an ImageFolder tree: the crops, the k-NN query (mean of the crops'
normalised features) and the linear probe's prediction (mean of the crops' softmax), each against a hand
computation."""
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import functional as TF

from compress_lit.evaluation.ten_crop import (TensorTenCrop, average_crop_probabilities, crop_mean_features,
                                              ten_crop_loader, ten_crop_transform)
from test_per_layer_linear import _compose, make_image_folder, save_student, tree_overrides

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _hand_crops(t: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Corners, centre, then the same of the mirrored image, cut by hand from a C x H x W tensor."""
    out = []
    for img in (t, t.flip(-1)):
        h, w = img.shape[-2:]
        top, left = int(round((h - size) / 2)), int(round((w - size) / 2))
        out += [img[:, :size, :size], img[:, :size, w - size:], img[:, h - size:, :size],
                img[:, h - size:, w - size:], img[:, top:top + size, left:left + size]]
    return out


def test_ten_crops_of_an_image_file_by_hand(tmp_path):
    tree = make_image_folder(tmp_path / "t", n_train=2, n_val=2)
    path = tree / "val" / "class1" / "1.png"  # 20 x 22 px
    cfg = _compose("linear", ["checkpoint=x", "data=places205", f"data.root={tree}", "data.image_size=16",
                              "data.resize_size=18"]).data
    with Image.open(path) as im:
        img = im.convert("RGB")
        crops = ten_crop_transform(cfg)(img)
        resized = TF.normalize(TF.to_tensor(TF.resize(img, 18)), MEAN, STD)  # shorter side 18: 18 x 19
    assert crops.shape == (10, 3, 16, 16) and resized.shape == (3, 18, 19)
    for got, want in zip(crops, _hand_crops(resized, 16)):
        assert torch.allclose(got, want, atol=1e-6)
    # the in-memory data sets: resized by 256/224 first (16 -> 18 px), same crops
    grey = torch.rand(1, 16, 16)
    t = TensorTenCrop(18, 16, [0.5], [0.25])(grey)
    big = F.interpolate(grey[None], size=(18, 18), mode="bilinear", align_corners=False, antialias=True)[0]
    assert t.shape == (10, 1, 16, 16)
    for got, want in zip(t, _hand_crops((big - 0.5) / 0.25, 16)):
        assert torch.allclose(got, want, atol=1e-6)


def test_averages_by_hand():
    x = torch.randn(4, 10, 6)
    hand = np.stack([np.mean([v / np.linalg.norm(v) for v in img], 0) for img in x.numpy()])
    assert np.allclose(crop_mean_features(x).numpy(), hand, atol=1e-6)
    assert torch.equal(crop_mean_features(x[:, 0]), x[:, 0])  # one vector per image: unchanged
    logits = torch.randn(4, 10, 3)
    e = np.exp(logits.numpy() - logits.numpy().max(-1, keepdims=True))
    assert np.allclose(average_crop_probabilities(logits).numpy(), (e / e.sum(-1, keepdims=True)).mean(1), atol=1e-6)


def test_knn_and_linear_ten_crop_agree_with_hand_computations(tmp_path):
    from compress_lit.evaluate import run_evaluate
    from compress_lit.evaluation.knn import knn_evaluate
    from compress_lit.evaluation.linear import linear_probe_on_features

    tree = make_image_folder(tmp_path / "places")
    ckpt = tmp_path / "r18.ckpt"
    model = save_student(ckpt, "resnet18")
    common = tree_overrides(tmp_path, ckpt, tree) + ["linear.mode=features", "linear.epochs=3", "ten_crop=true",
                                                     "cluster.pictures=false", "cluster.seeds=1", "knn.k=[1,3]"]
    res = run_evaluate(_compose("evaluate", common + ["eval=[knn,cluster,linear]"]), tmp_path / "run")
    f = np.load(tmp_path / "run" / "features.npz")
    assert f["train_x"].shape == (18, 64) and f["test_x"].shape == (9, 10, 64)  # ten crops of each val image
    # the crops' features are the model's embeddings of the ten crops, cut by hand from the resized image
    path, label = sorted((tree / "val").glob("*/*.png"))[0], 0
    with Image.open(path) as im:
        resized = TF.normalize(TF.to_tensor(TF.resize(im.convert("RGB"), 18)), MEAN, STD)
    with torch.no_grad():
        hand = model(torch.stack(_hand_crops(resized, 16))).numpy()
    assert f["test_y"][0] == label and np.allclose(f["test_x"][0], hand, atol=1e-4)
    # k-NN: one query per image, the mean of its crops' L2-normalised features
    query = np.stack([np.mean([v / np.linalg.norm(v) for v in img], 0) for img in f["test_x"]])
    assert knn_evaluate(f["train_x"], f["train_y"], query, f["test_y"], ks=[1, 3]) == pytest.approx(res["knn"])
    # linear: the mean of the crops' softmax, scored by hand with the head trained on the same features
    lin = linear_probe_on_features(f["train_x"], f["train_y"], f["test_x"], f["test_y"], 3, epochs=3, lr=0.1,
                                   batch_size=6)
    with torch.no_grad():
        probs = lin["head"](torch.from_numpy(f["test_x"]).flatten(0, 1)).softmax(-1).view(9, 10, 3).mean(1)
    hand_top1 = 100.0 * float((probs.argmax(1).numpy() == f["test_y"]).mean())
    assert res["linear"]["top1"] == pytest.approx(hand_top1) == pytest.approx(lin["top1"])
    table = (tmp_path / "run" / "results.md").read_text()
    assert 0 < res["knn"]["top1_k1"] < 100 and 0 < res["linear"]["top1"] < 100  # neither trivial nor broken
    assert table.count("10-crop") == 7  # every held-out row: 2 k-NN, cluster accuracy, NMI, ARI, linear x 2
    assert "10-crop val" in res["linear"]["protocol"]


def test_lightning_probe_scores_ten_crops_by_their_mean_softmax(tmp_path, capsys):
    from compress_lit.data import build_datamodule
    from compress_lit.evaluation.linear import LinearProbe, standardization_stats
    from compress_lit.evaluation.loading import resolve_data_config
    from compress_lit.evaluation.settings import LinearProbeConfig
    from compress_lit.linear import run_linear

    tree = make_image_folder(tmp_path / "places")
    ckpt = tmp_path / "r18.ckpt"
    model = save_student(ckpt, "resnet18")
    cfg = _compose("linear", tree_overrides(tmp_path, ckpt, tree))
    dm = build_datamodule(resolve_data_config(None, cfg.data))
    loader = ten_crop_loader(dm, dm.cfg)
    torch.manual_seed(3)
    probe = LinearProbe(model, 3, *standardization_stats(torch.randn(18, 64)), LinearProbeConfig())
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(probe, dataloaders=loader)
    hits = []
    with torch.no_grad():
        for x, y, _ in loader:
            for crops, label in zip(x, y):  # one image: its ten crops
                p = probe.head(model(crops)).softmax(-1).mean(0)
                hits.append(int(p.argmax()) == int(label))
    assert probe.history == [pytest.approx(100.0 * np.mean(hits))]
    # through the entry point: trains on augmented crops, validates on the ten crops, says so
    res = run_linear(_compose("linear", tree_overrides(tmp_path, ckpt, tree) + ["ten_crop=true", "linear.epochs=1"]),
                     tmp_path / "lin")
    assert res["ten_crop"] is True and res["epochs"] == 1
    assert "10-crop): top-1" in capsys.readouterr().out
