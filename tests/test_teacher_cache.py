"""The cached teacher (teacher_cache.py, `compress_lit.cache_features`, `teacher.cached=true`): the cache holds the
teacher's centre-crop embeddings in index order, resumes after an interruption, refuses a cache built for something
else, training looks the features up without any teacher network, K seeded views are reproduced exactly, and the
DDP shards cover every index once."""
import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

import compress_lit.training.checks as training_checks
import compress_lit.training.run as train_mod
import compress_lit.training.teacher as training_teacher
from compress_lit.data import build_datamodule
from compress_lit.methods.build import build_method, build_student
from compress_lit.models import build_backbone
from compress_lit.runtime.config import register_configs
from compress_lit.teachers import FrozenTeacher, build_teacher
from compress_lit.teachers.cache import (FEATURES_FILE, CachedFeatures, SeededViews, TeacherCacheError,
                                        cache_dataset, cache_meta, compute_shard, expected_meta, finalize_cache,
                                        open_cache, prepare_cache, read_meta, shard_range, view_seed)
from compress_lit.teachers.cache_config import cache_path, cache_views, compute_for_config
from compress_lit.training.teacher import run_cache_features

CONF = str(Path(__file__).resolve().parents[1] / "conf")
register_configs()
N = 96  # training images (digits, data.train_subset)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread (conftest.py)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "tiny.pt"
    torch.save(build_backbone("resnet18", small_input=True, width_multiplier=0.25).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def ref(teacher_ckpt, tmp_path_factory):
    """One complete float16 cache (default settings), shared: (cache_dir, cfg, meta)."""
    cache_dir = tmp_path_factory.mktemp("ref")
    cfg, meta = build(teacher_ckpt, cache_dir)
    return cache_dir, cfg, meta


def overrides(ckpt, cache_dir, *extra):
    return ["teacher.name=tiny", "teacher.arch=resnet18", "teacher.format=torchvision", f"teacher.checkpoint={ckpt}",
            "teacher.small_input=true", "teacher.width_multiplier=0.25", "teacher.pretrain_if_missing=false",
            f"data.train_subset={N}", "data.val_subset=32", "data.batch_size=16", "data.eval_batch_size=16",
            f"cache_dir={cache_dir}", "student.width_multiplier=0.125", "method.queue_size=64", "optim.epochs=1",
            "logger=none", "eval.at_end=false", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "trainer.accelerator=cpu", *extra]


def cfg_of(name, *ov):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=list(ov))


def build(ckpt, cache_dir, *extra):
    """Compute a cache in-process (as compress_lit.cache_features does); returns (cfg, meta)."""
    cfg = cfg_of("cache_features", *overrides(ckpt, cache_dir, "cache.progress=false", *extra))
    torch.manual_seed(cfg.seed)
    return cfg, compute_for_config(cfg, progress=False)


def centre_crop_features(cfg, teacher, indices):
    dm = build_datamodule(cfg.data)
    x = torch.stack([dm.train_dataset_eval[int(i)][0] for i in indices])
    return F.normalize(teacher(x), dim=1)


def test_cache_holds_the_teachers_centre_crop_embeddings_in_index_order(teacher_ckpt, tmp_path):
    cfg = cfg_of("cache_features", *overrides(teacher_ckpt, tmp_path, "cache.dtype=float32", "cache.chunk_batches=2",
                                              "cache.progress=false"))
    meta = run_cache_features(cfg)  # the entry point's function (Fabric, one CPU process)
    path = tmp_path / "features" / "tiny_digits"
    assert meta["complete"] and meta["done"] == N and read_meta(path) == meta
    teacher = build_teacher(cfg.teacher)
    feats = np.load(path / FEATURES_FILE)
    assert feats.shape == (N, teacher.embed_dim) and feats.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(feats), centre_crop_features(cfg, teacher, range(N)),
                               rtol=1e-4, atol=1e-5)
    assert meta["teacher"]["fingerprint"] == teacher.fingerprint()
    assert meta["teacher"]["checkpoint"] == str(teacher_ckpt) and meta["teacher"]["checkpoint_size"] > 0
    assert {k: meta["data"][k] for k in ("name", "split", "num_samples", "train_subset", "image_size")} == \
        {"name": "digits", "split": "train", "num_samples": N, "train_subset": N, "image_size": 16}
    assert meta["transform"]["kind"] == "eval centre crop" and meta["views"] == 1

    # the module standing in for the teacher
    cached = open_cache(path, expected_meta(cfg.teacher, cfg.data, N, seed=cfg.seed))
    assert isinstance(cached, CachedFeatures) and cached.is_cached and cached.embed_dim == teacher.embed_dim
    assert list(cached.parameters()) == [] and cached.state_dict() == {}
    assert cached.fingerprint() == teacher.fingerprint()
    cached.assert_frozen()
    cached.train()
    assert not cached.training
    idx = torch.tensor([5, 0, 95, 5])
    out = cached.lookup(idx)
    assert out.dtype == torch.float32 and out.device == idx.device
    torch.testing.assert_close(out, torch.from_numpy(feats[[5, 0, 95, 5]]))
    with pytest.raises(IndexError, match="out of range"):
        cached.lookup(torch.tensor([N]))
    with pytest.raises(TeacherCacheError, match="no network"):
        cached(torch.zeros(1, 3, 16, 16))


def test_interrupted_build_resumes_to_the_same_file(teacher_ckpt, tmp_path, ref):
    # stop after the first chunk (2 batches of 16), as if the job had been killed
    cfg, part = build(teacher_ckpt, tmp_path / "b", "cache.chunk_batches=2", "cache.max_chunks=1")
    path = cache_path(cfg)
    assert not part["complete"] and part["done"] == 32
    with pytest.raises(TeacherCacheError, match=r"cannot be used: complete: cached False \(done 32 of 96"):
        open_cache(path, expected_meta(cfg.teacher, cfg.data, N, seed=cfg.seed))
    mm = np.load(path / FEATURES_FILE, mmap_mode="r+")  # a crash may leave garbage past `done`
    mm[32:40] = 7.0
    mm.flush()
    del mm
    _, final = build(teacher_ckpt, tmp_path / "b", "cache.chunk_batches=2")
    assert final["complete"] and final["done"] == N
    assert (path / FEATURES_FILE).read_bytes() == (cache_path(ref[1]) / FEATURES_FILE).read_bytes()


def test_a_cache_for_something_else_is_refused_naming_each_field(teacher_ckpt, tmp_path, ref):
    cache_dir, cfg, meta = ref
    path = cache_path(cfg)

    def refused(*extra, teacher_cfg=None, n=N):
        c = cfg_of("train", *overrides(teacher_ckpt, tmp_path, *extra))
        with pytest.raises(TeacherCacheError) as e:
            open_cache(path, expected_meta(teacher_cfg or c.teacher, c.data, n, cache_views(c), seed=c.seed))
        assert str(path) in str(e.value)
        return str(e.value)

    open_cache(path, expected_meta(cfg.teacher, cfg.data, N, seed=cfg.seed))  # the matching one opens
    msg = refused("teacher.name=other")
    assert "teacher.name: cached 'tiny' vs expected 'other'" in msg
    assert "teacher.width_multiplier: cached 0.25 vs expected 0.5" in refused("teacher.width_multiplier=0.5")
    st = os.stat(teacher_ckpt)  # the checkpoint file was rewritten (same path, new mtime)
    os.utime(teacher_ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert f"teacher.checkpoint_mtime_ns: cached {st.st_mtime_ns} vs expected {st.st_mtime_ns + 10**9}" \
            in refused()
    finally:
        os.utime(teacher_ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))
    msg = refused("data.train_subset=64", n=64)
    assert "data.num_samples: cached 96 vs expected 64" in msg and "data.train_subset: cached 96 vs expected 64" in msg
    msg = refused("data.image_size=12")
    assert "data.image_size: cached 16 vs expected 12" in msg
    assert "data.mean: cached [0.305, 0.305, 0.305] vs expected [0.5, 0.5, 0.5]" in refused("data.mean=[0.5,0.5,0.5]")
    assert "transform.kind: cached 'eval centre crop' vs expected 'augmented views'" in \
        refused("teacher.cache_views=2")  # 2 views expected: also views, description
    # building into it for another teacher is refused as well (unless cache.overwrite=true)
    shutil.copytree(path, tmp_path / "copy")
    path = tmp_path / "copy"
    with pytest.raises(TeacherCacheError, match="teacher.name: cached 'tiny' vs expected 'other'"):
        build(teacher_ckpt, tmp_path, "teacher.name=other", f"cache.output={path}")
    _, new = build(teacher_ckpt, tmp_path, "teacher.name=other", f"cache.output={path}", "cache.overwrite=true")
    assert new["teacher"]["name"] == "other" and new["complete"]


class Recorder(pl.Callback):
    """The first batch, the module's state before it, and every step's loss."""

    def __init__(self):
        self.batch, self.state, self.losses = None, None, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.batch is None:
            self.batch, self.state = [t.clone() for t in batch], copy.deepcopy(pl_module.state_dict())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_training_with_the_cached_teacher_never_runs_a_teacher_network(teacher_ckpt, tmp_path, monkeypatch, ref):
    cfg = cfg_of("train", *overrides(teacher_ckpt, ref[0], "teacher.cached=true", "+trainer.max_steps=3"))
    rec = Recorder()

    def no_teacher(*a, **k):
        raise AssertionError("a teacher network was built")

    monkeypatch.setattr(train_mod, "build_teacher", no_teacher)
    monkeypatch.setattr(FrozenTeacher, "__init__", no_teacher)
    monkeypatch.setattr(train_mod, "eval_callbacks", lambda ecfg: [rec])
    train_mod.run_train(cfg, tmp_path / "run")
    monkeypatch.undo()
    assert len(rec.losses) == 3
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    teacher = build_teacher(cfg.teacher)
    assert ckpt["teacher_fingerprint"] == teacher.fingerprint()  # resumable with the online teacher too
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])

    # the first step's loss, recomputed with the online teacher on the centre crops of the same images
    torch.manual_seed(0)
    online = build_method(cfg, build_student(cfg.student), teacher, build_datamodule(cfg.data))
    missing, unexpected = online.load_state_dict(rec.state, strict=False)
    assert not unexpected and all(k.startswith("teacher.") for k in missing)
    online.train()
    x, labels, index, looked_up = rec.batch  # the cached rows travel with the batch (looked up on the host)
    targets = centre_crop_features(cfg, teacher, index).half().float()  # the cache stores float16
    torch.testing.assert_close(looked_up, targets, rtol=0, atol=0)
    loss, _ = online.distill(x, online.student(x), targets, labels=labels, index=index)
    assert abs(loss.item() - rec.losses[0]) < 1e-4 * max(1.0, abs(rec.losses[0]))


def test_missing_cache_names_the_command_or_is_built_when_asked(teacher_ckpt, tmp_path, monkeypatch):
    cfg = cfg_of("train", *overrides(teacher_ckpt, tmp_path, "teacher.cached=true", "+trainer.max_steps=1"))
    with pytest.raises(TeacherCacheError,
                       match="(?s)no teacher feature cache at .*python -m compress_lit.cache_features"):
        train_mod.run_train(cfg, tmp_path / "run1")
    # under Hydra the command repeats the run's own overrides
    monkeypatch.setattr(training_checks, "run_overrides", lambda: ["teacher=resnet50x4", "data.root=/my data"])
    with pytest.raises(TeacherCacheError) as e:
        train_mod.run_train(cfg, tmp_path / "run1")
    assert "python -m compress_lit.cache_features teacher=resnet50x4 'data.root=/my data'" in str(e.value)
    cfg = cfg_of("train", *overrides(teacher_ckpt, tmp_path, "teacher.cached=true", "+trainer.max_steps=1",
                                     "teacher.build_cache_if_missing=true"))
    train_mod.run_train(cfg, tmp_path / "run2")
    assert read_meta(tmp_path / "features" / "tiny_digits")["complete"]
    assert (tmp_path / "run2" / "checkpoints" / "last.ckpt").exists()


def test_seeded_views_reproduce_the_cached_augmentation(teacher_ckpt, tmp_path):
    dm = build_datamodule(cfg_of("train", *overrides(teacher_ckpt, tmp_path)).data)
    views = SeededViews(dm.train_dataset, 3, base_seed=5)
    assert len(views) == N and views.classes == dm.train_dataset.classes
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = views.view(7, 1)[0]
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    torch.rand(10)  # whatever happened to the global RNG in between
    assert torch.equal(views.view(7, 1)[0], a)
    assert not torch.equal(views.view(7, 2)[0], a) and not torch.equal(views.view(8, 1)[0], a)
    assert not torch.equal(SeededViews(dm.train_dataset, 3, base_seed=6).view(7, 1)[0], a)
    image, label, index, k = views[7]
    assert index == 7 and 0 <= k < 3 and torch.equal(image, views.view(7, k)[0])
    assert len({view_seed(i, k, b) for i in range(300) for k in range(4) for b in range(3)}) == 300 * 4 * 3

    # a 3-view cache: row (i, k) is the teacher's embedding of exactly that augmented image
    cfg, meta = build(teacher_ckpt, tmp_path, "cache.views=3", "cache.view_seed=5", "cache.dtype=float32")
    path = cache_path(cfg)
    assert path.name == "tiny_digits_views3" and meta["transform"]["base_seed"] == 5 and meta["shape"][1] == 3
    feats = torch.from_numpy(np.load(path / FEATURES_FILE))
    teacher = build_teacher(cfg.teacher)
    for i, k in [(0, 0), (7, 1), (95, 2)]:
        torch.testing.assert_close(feats[i, k], F.normalize(teacher(views.view(i, k)[0][None]), dim=1)[0],
                                   rtol=1e-4, atol=1e-5)
    cached = open_cache(path, expected_meta(cfg.teacher, cfg.data, N, 3, seed=cfg.seed))
    assert cached.views == 3 and cached.base_seed == 5
    idx, view = torch.tensor([7, 7, 0]), torch.tensor([1, 2, 0])
    torch.testing.assert_close(cached.lookup(idx, view), feats[idx, view])
    rnd = cached.lookup(torch.arange(N))  # no view given: one of the K rows, chosen at random
    match = (rnd[:, None, :] == feats).all(-1)
    assert match.any(1).all() and len(set(match.float().argmax(1).tolist())) > 1

    # training with teacher.cache_views=3: batches of SeededViews (image, label, index, k)
    tcfg = cfg_of("train", *overrides(teacher_ckpt, tmp_path, "teacher.cached=true", "teacher.cache_views=3",
                                      "+trainer.max_steps=1"))
    rec = Recorder()
    orig = train_mod.eval_callbacks
    train_mod.eval_callbacks = lambda ecfg: [rec]
    try:
        train_mod.run_train(tcfg, tmp_path / "run")
    finally:
        train_mod.eval_callbacks = orig
    x, _, index, k, looked_up = rec.batch  # + the cached rows of view k, looked up on the host before transfer
    assert len(rec.losses) == 1 and k.shape == index.shape and int(k.max()) < 3
    torch.testing.assert_close(looked_up, torch.as_tensor(feats[index, k]).float(), rtol=0, atol=0)
    for b in range(3):
        assert torch.equal(x[b], views.view(int(index[b]), int(k[b]))[0])


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 96, 1437])
def test_shards_cover_every_index_exactly_once(n):
    for world in range(1, 5):
        shards = [shard_range(n, r, world) for r in range(world)]
        covered = [i for lo, hi in shards for i in range(lo, hi)]
        assert covered == list(range(n)), (n, world)
        sizes = [hi - lo for lo, hi in shards]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        shard_range(10, 2, 2)


def test_sharded_computation_equals_one_process(teacher_ckpt, tmp_path, ref):
    _, cfg, ref_meta = ref
    one = (cache_path(cfg) / FEATURES_FILE).read_bytes()
    dm = build_datamodule(cfg.data)
    teacher = build_teacher(cfg.teacher)
    meta = cache_meta(cfg.teacher, cfg.data, teacher, N)
    path = tmp_path / "sharded"
    prepare_cache(path, meta)  # rank 0 (what build_cache does between barriers under torch.distributed)
    kw = dict(world_size=3, batch_size=16, chunk_batches=1, progress=False)
    for rank in (2, 0):  # rank 1 is late
        assert compute_shard(path, teacher, cache_dataset(dm), rank=rank, **kw)
    partial = finalize_cache(path, 3)
    assert not partial["complete"] and partial["done"] == N - 32
    assert sorted(p.name for p in path.glob("progress.*")) == [f"progress.rank{r}-of-3.json" for r in (0, 2)]
    assert compute_shard(path, teacher, cache_dataset(dm), rank=1, **kw)
    assert compute_shard(path, teacher, cache_dataset(dm), rank=0, **kw)  # nothing left: resumed past the end
    final = finalize_cache(path, 3)
    assert final["complete"] and final["done"] == N and not list(path.glob("progress.*"))
    assert (path / FEATURES_FILE).read_bytes() == one
    assert json.loads((path / "meta.json").read_text())["teacher"] == ref_meta["teacher"]


# ---- the identity is complete; a damaged cache is one line and repaired; a full disk leaves nothing trusted ----
def _train_cfg(teacher_ckpt, cache_dir, *extra):
    return cfg_of("train", *overrides(teacher_ckpt, cache_dir, "teacher.cached=true", *extra))


def _dm(cfg):
    dm = build_datamodule(cfg.data)
    dm.setup("fit")
    return dm


def test_the_cache_knows_exactly_which_images_the_teacher_saw(teacher_ckpt, ref):
    """data.val_fraction decides which digits form the train split: the same train_subset size over another
    split is other images, and is refused (the sample fingerprint); the same split opens."""
    cache_dir, cfg, meta = ref
    assert meta["data"]["samples"] == _dm(cfg).train_dataset_eval.fingerprint()
    training_teacher.cached_teacher(_train_cfg(teacher_ckpt, cache_dir), _dm(_train_cfg(teacher_ckpt, cache_dir)))
    other = _train_cfg(teacher_ckpt, cache_dir, "data.val_fraction=0.25")
    dm = _dm(other)
    assert dm.num_train == N  # same size, other images
    with pytest.raises(TeacherCacheError, match=r"data\.samples: cached '[0-9a-f]{64}' vs expected"):
        training_teacher.cached_teacher(other, dm)


def test_a_swapped_teacher_file_of_the_same_size_and_mtime_is_refused(teacher_ckpt, tmp_path):
    ckpt = tmp_path / "teacher.pt"
    shutil.copy(teacher_ckpt, ckpt)
    cfg, meta = build(ckpt, tmp_path / "c")
    st = os.stat(ckpt)
    torch.manual_seed(1)  # other weights, same architecture and archive name: the same file size
    (tmp_path / "other").mkdir()
    torch.save(build_backbone("resnet18", small_input=True, width_multiplier=0.25).state_dict(),
               tmp_path / "other" / teacher_ckpt.name)
    shutil.copyfile(tmp_path / "other" / teacher_ckpt.name, ckpt)
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(ckpt).st_size == st.st_size and os.stat(ckpt).st_mtime_ns == st.st_mtime_ns
    tcfg = _train_cfg(ckpt, tmp_path / "c")
    with pytest.raises(TeacherCacheError, match=r"teacher\.checkpoint_weights: cached '[0-9a-f]{64}' vs expected"):
        training_teacher.cached_teacher(tcfg, _dm(tcfg))


def test_a_truncated_features_file_is_one_line_and_a_rebuild_repairs_it(teacher_ckpt, tmp_path, ref):
    cfg, meta = build(teacher_ckpt, tmp_path / "t")
    path = cache_path(cfg)
    whole = (path / FEATURES_FILE).read_bytes()
    (path / FEATURES_FILE).write_bytes(whole[: len(whole) // 2])
    with pytest.raises(TeacherCacheError, match=r"features\.npy is truncated or damaged .* rebuilds it$"):
        open_cache(path, expected_meta(cfg.teacher, cfg.data, N, seed=cfg.seed))
    _, again = build(teacher_ckpt, tmp_path / "t")  # what `compress_lit.cache_features` does
    assert again["complete"] and (path / FEATURES_FILE).read_bytes() == whole
    open_cache(path, expected_meta(cfg.teacher, cfg.data, N, seed=cfg.seed))


def test_a_truncated_meta_json_is_rebuilt_not_refused_forever(teacher_ckpt, tmp_path):
    cfg, meta = build(teacher_ckpt, tmp_path / "m")
    path = cache_path(cfg)
    whole = (path / FEATURES_FILE).read_bytes()
    text = (path / "meta.json").read_text()
    (path / "meta.json").write_text(text[: len(text) // 3])
    with pytest.raises(TeacherCacheError, match="cannot be read"):
        open_cache(path, expected_meta(cfg.teacher, cfg.data, N, seed=cfg.seed))
    _, again = build(teacher_ckpt, tmp_path / "m")
    assert again["complete"] and (path / FEATURES_FILE).read_bytes() == whole


def test_a_full_disk_while_building_is_one_line_and_leaves_nothing_trusted(teacher_ckpt, tmp_path, monkeypatch):
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(TeacherCacheError, match=r"disk full: the teacher feature cache .*features\.npy needs "
                                                r"0\.00 GiB, [0-9.]+ GiB are free"):
        build(teacher_ckpt, tmp_path / "f")
    monkeypatch.undo()
    cfg = cfg_of("cache_features", *overrides(teacher_ckpt, tmp_path / "f"))
    with pytest.raises(TeacherCacheError, match=r"complete: cached False"):
        open_cache(cache_path(cfg), expected_meta(cfg.teacher, cfg.data, N, seed=cfg.seed))


def test_a_cache_computed_in_one_precision_is_not_another_precisions(teacher_ckpt, ref):
    """bf16 features are not an fp32 run's teacher (the fp32 reruns of the table build their own cache)."""
    cache_dir, cfg, meta = ref
    assert meta["precision"] == "fp32"  # the tests' trainer runs 32-true
    open_cache(cache_path(cfg), expected_meta(cfg.teacher, cfg.data, N, seed=cfg.seed, precision="32-true"))
    with pytest.raises(TeacherCacheError, match="precision: cached 'fp32' vs expected 'bf16'"):
        open_cache(cache_path(cfg), expected_meta(cfg.teacher, cfg.data, N, seed=cfg.seed, precision="bf16-mixed"))
