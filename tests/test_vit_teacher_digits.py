"""A tiny ViT teacher in the DINO release layout distils into a small student on the digits data, end to end, with
the teacher run at every step and with its features read from the cache (`compress_lit.cache_features`), and every
end-of-run evaluation (k-NN, k-means, linear probe) runs on the ViT teacher."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from timm.models.vision_transformer import VisionTransformer

import compress_lit.training.run as train_mod
from compress_lit.teachers.cache_config import cache_path, compute_for_config
from compress_lit.runtime.config import register_configs
from compress_lit.data import build_datamodule
from compress_lit.teachers import build_teacher
from compress_lit.teachers.cache import FEATURES_FILE, read_meta

CONF = str(Path(__file__).resolve().parents[1] / "conf")
N = 96  # training images (data.train_subset)
register_configs()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread (conftest.py)


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory):
    """A DINO ViT-S/16-layout file at tiny size: timm's VisionTransformer with DINO's config (qkv bias, LayerNorm
    eps 1e-6, no head), 4-pixel patches and a 16 px position table; random weights."""
    torch.manual_seed(0)
    src = VisionTransformer(img_size=16, patch_size=4, num_classes=0, embed_dim=32, depth=2, num_heads=2)
    sd = src.state_dict()
    assert not any(k.startswith("head") for k in sd) and sd["pos_embed"].shape == (1, 17, 32)
    path = tmp_path_factory.mktemp("teacher") / "dino_deitsmall16_pretrain.pth"
    torch.save(sd, path)
    return path


def overrides(ckpt, tmp, *extra):
    return ["teacher=dino_vits16", "teacher.name=dino_tiny", f"teacher.checkpoint={ckpt}", "teacher.vit.patch_size=4",
            "teacher.vit.img_size=16", "teacher.vit.embed_dim=32", "teacher.vit.depth=2", "teacher.vit.num_heads=2",
            "student=resnet18_small", "student.width_multiplier=0.125", f"data.train_subset={N}",
            "data.val_subset=48", "data.batch_size=16", "data.eval_batch_size=48", f"cache_dir={tmp}",
            "method.queue_size=64", "optim.epochs=1", "logger=none", "eval.cluster_seeds=1",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.accelerator=cpu",
            *extra]


def cfg_of(name, *ov):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=list(ov))


def test_dino_vit_teacher_distils_on_digits_online_and_cached(dino_file, tmp_path):
    # the teacher run at every step; the end-of-run evaluations include the ViT teacher
    cfg = cfg_of("train", *overrides(dino_file, tmp_path))
    results = train_mod.run_train(cfg, tmp_path / "online")
    teacher_row = results["teacher (dino_tiny)"]
    student_row = results["student (compress_2q)"]
    assert {"1-NN", "20-NN", "linear"} <= set(teacher_row) and all(np.isfinite(v) for v in teacher_row.values())
    assert {"1-NN", "20-NN", "linear"} <= set(student_row) and teacher_row["1-NN"] > 20  # 10 classes: chance 10
    assert (tmp_path / "online" / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((tmp_path / "online" / "results.json").read_text()) == results

    # the cached path: compute the teacher's centre-crop features once, then train reading them by index
    cfg_c = cfg_of("cache_features", *overrides(dino_file, tmp_path, "cache.progress=false", "cache.dtype=float32"))
    meta = compute_for_config(cfg_c, progress=False)
    path = cache_path(cfg_c)
    assert meta["complete"] and read_meta(path)["teacher"]["embedding"] == "cls"
    assert meta["teacher"]["vit"] == {"patch_size": 4, "img_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}
    teacher = build_teacher(cfg_c.teacher)
    dm = build_datamodule(cfg_c.data)
    x = torch.stack([dm.train_dataset_eval[i][0] for i in range(N)])
    with torch.no_grad():
        want = F.normalize(teacher(x), dim=1)
    torch.testing.assert_close(torch.from_numpy(np.load(path / FEATURES_FILE)), want, rtol=1e-4, atol=1e-5)

    cfg_t = cfg_of("train", *overrides(dino_file, tmp_path, "teacher.cached=true", "eval.at_end=false"))
    train_mod.run_train(cfg_t, tmp_path / "cached")
    ckpt = torch.load(tmp_path / "cached" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["teacher_fingerprint"] == teacher.fingerprint()
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])

    # a cache built for another embedding of the same teacher is refused
    cfg_m = cfg_of("train", *overrides(dino_file, tmp_path, "teacher.cached=true", "teacher.embedding=mean_patch",
                                       f"teacher.cache_path={path}", "eval.at_end=false"))
    with pytest.raises(Exception, match=r"teacher\.embedding: cached 'cls' vs expected 'mean_patch'"):
        train_mod.run_train(cfg_m, tmp_path / "mismatch")
