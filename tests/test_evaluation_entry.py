"""`compress_lit.evaluate` / `compress_lit.linear` on a tiny checkpoint, and the training callbacks."""
import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compress_lit.evaluation.callbacks import ClusterAlignmentCallback, KNNCallback
from compress_lit.models import build_backbone

CONF = str(Path(__file__).resolve().parents[1] / "conf")
STUDENT = {"name": "tiny", "arch": "resnet18", "small_input": True, "width_multiplier": 0.125, "fc_dim": None}


def _have_digits():
    try:
        from compress_lit.data import build_datamodule  # noqa: F401
        import sklearn.datasets  # noqa: F401
        return True
    except Exception:
        return False


@pytest.fixture
def tiny_ckpt(tmp_path):
    torch.manual_seed(0)
    m = build_backbone("resnet18", small_input=True, width_multiplier=0.125)
    data = {"name": "digits", "image_size": 16, "batch_size": 64, "eval_batch_size": 512, "num_workers": 0,
            "crop_scale": [0.6, 1.0], "hflip": False, "mean": [0.305] * 3, "std": [0.376] * 3}
    path = tmp_path / "student.ckpt"
    torch.save({"state_dict": {**{"student." + k: v for k, v in m.state_dict().items()},
                               **{"teacher.backbone.x": torch.zeros(1)}},
                "hyper_parameters": {"config": {"student": STUDENT, "data": data, "method": {"name": "compress_2q"}}}},
               path)
    return path, m


def _compose(name, overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.mark.skipif(not _have_digits(), reason="data package unavailable")
def test_evaluate_entry_point_on_a_tiny_checkpoint(tiny_ckpt, tmp_path):
    from compress_lit.evaluate import run_evaluate

    ckpt, model = tiny_ckpt
    out = tmp_path / "run"
    cfg = _compose("evaluate", [f"checkpoint={ckpt}", "eval=[knn,cluster,linear]", "cluster.seeds=2",
                                "cluster.rows=3", "cluster.cols=4", "linear.epochs=1", "linear.batch_size=128",
                                f"cache_dir={tmp_path / 'cache'}", "progress=false", "trainer.accelerator=cpu"])
    res = run_evaluate(cfg, out)
    assert res["data"] == "digits" and res["arch"] == "resnet18" and res["layer"] == "pool"
    assert set(res["knn"]) == {"top1_k1", "top5_k1", "top1_k20", "top5_k20"}
    assert len(res["cluster"]["acc_per_seed"]) == 2 and res["linear"]["epochs"] == 1
    assert "best (not the reported number)" in res["linear"]
    for f in ("results.json", "results.md", "features.npz", "cluster_grid.png", "cluster_confusion.png"):
        assert (out / f).is_file(), f
    saved = json.loads((out / "results.json").read_text())
    assert saved["knn"] == pytest.approx(res["knn"])
    feats = np.load(out / "features.npz")
    assert feats["train_x"].shape == (res["num_train"], 64) and feats["test_x"].shape == (res["num_val"], 64)
    # the features are the student's embeddings of the centre-crop (normalised) images
    from compress_lit.data import build_datamodule
    from compress_lit.evaluation.loading import resolve_data_config
    dm = build_datamodule(resolve_data_config(torch.load(ckpt, weights_only=False)["hyper_parameters"]["config"]
                                              ["data"], None))
    x = torch.stack([dm.val_dataset[i][0] for i in range(5)])
    with torch.no_grad():
        assert np.allclose(feats["test_x"][:5], model.eval()(x).numpy(), atol=1e-4)
    from compress_lit.evaluation.knn import knn_evaluate
    assert knn_evaluate(feats["train_x"], feats["train_y"], feats["test_x"], feats["test_y"]) == \
        pytest.approx(res["knn"])
    with Image.open(out / "cluster_grid.png") as im:
        assert im.size == ((4 + 2) * 64, 3 * 64)
    assert "k-NN" in (out / "results.md").read_text()
    # second evaluation: features from the cache, identical numbers; a different layer is a new cache entry
    n_cached = len(list((tmp_path / "cache").glob("*.pt")))
    assert n_cached == 2
    cfg2 = _compose("evaluate", [f"checkpoint={ckpt}", "eval=[knn]", f"cache_dir={tmp_path / 'cache'}",
                                 "progress=false", "save_features=false"])
    res2 = run_evaluate(cfg2, tmp_path / "run2")
    assert res2["knn"] == res["knn"] and len(list((tmp_path / "cache").glob("*.pt"))) == 2
    cfg3 = _compose("evaluate", [f"checkpoint={ckpt}", "eval=[knn]", "layer=layer3", f"cache_dir={tmp_path / 'cache'}",
                                 "progress=false", "knn.k=[1]"])
    res3 = run_evaluate(cfg3, tmp_path / "run3")
    assert res3["layer"] == "layer3" and res3["feature_dim"] == 32 and set(res3["knn"]) == {"top1_k1", "top5_k1"}
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 4


@pytest.mark.skipif(not _have_digits(), reason="data package unavailable")
def test_teacher_format_and_data_preset(tmp_path):
    from compress_lit.evaluate import run_evaluate
    from compress_lit.linear import run_linear

    torch.manual_seed(1)
    m = build_backbone("resnet18", small_input=True, width_multiplier=0.125)
    path = tmp_path / "plain.pth"
    torch.save(m.state_dict(), path)
    common = [f"checkpoint={path}", "model_format=torchvision", "model.arch=resnet18", "model.small_input=true",
              "model.width_multiplier=0.125", "data=digits", "data.val_subset=100", "cache=false",
              "progress=false"]
    res = run_evaluate(_compose("evaluate", common + ["eval=[knn]", "knn.weighting=distance", "knn.backend=torch"]),
                       tmp_path / "ev")
    assert res["num_val"] == 100 and 0 <= res["knn"]["top1_k1"] <= 100
    lin = run_linear(_compose("linear", common + ["linear.mode=features", "linear.epochs=5"]), tmp_path / "lin")
    assert lin["epochs"] == 5 and len(lin["history"]) == 5 and (tmp_path / "lin" / "linear_results.json").is_file()
    # VOC07 transfer through the entry point (a tiny generated tree)
    from test_evaluation_voc import make_voc

    items = [(f"{s}{i:03d}", [("car", 0)] if i % 2 else [("dog", 0)], "car" if i % 2 else "dog")
             for s in "ab" for i in range(6)]
    make_voc(tmp_path / "voc", items[:6], items[6:])
    voc = run_evaluate(_compose("evaluate", common + ["eval=[voc]", f"voc.root={tmp_path / 'voc'}",
                                                      "voc.image_size=16", "voc.resize_size=16"]), tmp_path / "voc_run")
    assert voc["voc"]["num_trainval"] == 6 and voc["voc"]["num_test"] == 6 and 0 <= voc["voc"]["mAP"] <= 100 + 1e-9
    assert "VOC07" in (tmp_path / "voc_run" / "results.md").read_text()
    with pytest.raises(ValueError, match="model.arch"):
        run_evaluate(_compose("evaluate", [f"checkpoint={path}", "model_format=torchvision", "data=digits"]),
                     tmp_path / "bad")
    with pytest.raises(ValueError, match="data"):
        run_evaluate(_compose("evaluate", common[:5] + ["eval=[knn]"]), tmp_path / "bad2")
    with pytest.raises(ValueError, match="unknown"):
        run_evaluate(_compose("evaluate", common + ["eval=[knn,bogus]"]), tmp_path / "bad3")


# ------------------------------------------------------------------------------------------------ callbacks
class _DM(pl.LightningDataModule):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        centres = torch.randn(3, 8, generator=g) * 3
        y = torch.arange(90) % 3
        x = centres[y] + 0.3 * torch.randn(90, 8, generator=g)
        self.ds = TensorDataset(x, y, torch.arange(90))
        self.num_classes = 3

    def train_dataloader(self):
        return DataLoader(self.ds, batch_size=30, shuffle=True)

    def train_eval_dataloader(self):
        return DataLoader(self.ds, batch_size=64)

    def val_dataloader(self):
        return DataLoader(self.ds, batch_size=64)


class _Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
        self.forward_calls = 0

    def forward(self, x):
        self.forward_calls += 1
        return self.net(x)

    def training_step(self, batch, _):
        return self.net(batch[0]).pow(2).mean() * 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_callbacks_log_every_n_epochs(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    knn = KNNCallback(every_n_epochs=2, ks=[1, 5], val_subset=45)
    clu = ClusterAlignmentCallback(every_n_epochs=2, seeds=2, val_subset=45)
    module = _Module()
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", callbacks=[knn, clu], logger=CSVLogger(tmp_path),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0)
    trainer.fit(module, datamodule=_DM())
    # epochs 2 and 3 (the last): twice each; one shared feature extraction per evaluation step
    assert [h["epoch"] for h in knn.history] == [1, 2] and [h["epoch"] for h in clu.history] == [1, 2]
    assert module.forward_calls == 2 * (2 + 1)  # 2 steps x (train loader: 2 batches, val subset: 1 batch)
    for key in ("eval/knn_top1_k1", "eval/knn_top1_k5", "eval/cluster_acc", "eval/cluster_nmi", "eval/cluster_ari"):
        assert key in trainer.callback_metrics, key
    assert trainer.callback_metrics["eval/knn_top1_k1"] > 90.0  # well-separated classes
    metrics = (Path(trainer.logger.log_dir) / "metrics.csv").read_text()
    assert "eval/knn_top1_k1" in metrics and "eval/cluster_acc" in metrics
    assert module.training  # modes restored after each evaluation
