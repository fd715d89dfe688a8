"""The cached teacher: run the frozen teacher once over the training set, store its features by dataset index,
and look them up during training instead of running the teacher (docs/paper.md, "Cached teacher").

The paper used the SimCLR ResNet-50x4 teacher only this way: the teacher sees the *centre crop* of each training
image (the datamodule's evaluation transform: ``Resize(resize_size) + CenterCrop(image_size)`` for image folders,
the plain normalised image for the small tensor datasets), so the target is a fixed embedding per image while the
student sees random crops. With ``views = K > 1`` the cache instead holds K *augmented* views per image, each
produced under a deterministic seed; training wraps its dataset in :class:`SeededViews`, which draws one of the K
views per sample and reproduces exactly that augmentation, so student and teacher see the same crop again.

Building: ``python -m compress_lit.cache_features <the training run's overrides>`` (or ``teacher.cached=true
teacher.build_cache_if_missing=true`` in training). Using: ``python -m compress_lit.train ... teacher.cached=true``
(no teacher network is built; ``teacher.cache_views=K`` for the augmented-view cache).

On-disk format (a directory, default ``${cache_dir}/features/<teacher.name>_<data.name>``, ``_views<K>`` appended
for K > 1):

* ``features.npy``: a numpy ``.npy`` file opened as a memory map, shape ``(N, D)`` (``(N, K, D)`` for K views),
  ``float16`` by default (``float32`` on request), each row L2-normalised (the losses normalise anyway); row ``i``
  belongs to dataset index ``i`` of the (possibly ``train_subset``-ed) train split.
* ``meta.json`` (written atomically: temporary file + ``os.replace``): the teacher's identity (name, arch,
  format, checkpoint path, its size and mtime in ns, the SHA-256 of the tensors in the file, small_input,
  width_multiplier; for ``format=random`` the seed it was initialised under) plus its weight fingerprint
  (:meth:`FrozenTeacher.fingerprint`, informational: a training run does not build the network, so it checks the
  identity instead), ``embed_dim``, the data (name, root, split ``"train"``, ``num_samples``, the fingerprint of the
  resolved sample list, image/resize size, channels, mean/std, train_subset, split_seed), the
  transform (kind ``"eval centre crop"`` or ``"augmented views"``, its repr, K, the view seed and formula),
  ``dtype``, ``shape``, and progress: ``done`` (samples written), ``prefix_done`` (rows ``[0, prefix_done)`` written
  by single-process runs) and ``complete``.

Building is resumable: samples are processed in dataset order in chunks of ``chunk_batches`` batches; after each
chunk the memory map is flushed and the progress recorded (``done`` in meta.json; with several processes, one
``progress.rank<r>-of-<w>.json`` per process), so a re-run continues where the last one stopped (a multi-process
run resumes its shards when re-run with the same number of processes; otherwise shards restart, after the prefix a
single-process run finished). Under
torch.distributed each rank computes a contiguous shard (:func:`shard_range`) into the shared file: rank 0
creates it, all ranks open it read-write after a barrier, and rank 0 marks the cache complete after the final
barrier.

:func:`open_cache` refuses (:class:`TeacherCacheError`, naming the path and every mismatched field with its cached
and expected value) an incomplete cache or one built for another teacher, data set, size, normalisation or
transform. It returns :class:`CachedFeatures`, an ``nn.Module`` that stands in for the frozen teacher
(``embed_dim``, ``is_cached = True``, ``fingerprint()``, ``assert_frozen()``, no parameters) and whose
``lookup(index, view)`` reads the rows of a batch.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import shlex
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FEATURES_FILE = "features.npy"
META_FILE = "meta.json"
DTYPES = ("float16", "float32")
MAX_VIEWS = 256  # view_seed packs k into 8 bits
SEED_MIX = 0x9E3779B1  # spreads the base seeds over the 32-bit seed space
EVAL_KIND = "eval centre crop"
VIEWS_KIND = "augmented views"
SEED_FORMULA = "(index * 256 + k + base_seed * 0x9E3779B1) mod 2**32"
# meta keys that are progress or bookkeeping, never compared
_UNCOMPARED = {"done", "prefix_done", "complete", "created", "updated", "format_version", "command"}


class TeacherCacheError(RuntimeError):
    """A teacher feature cache that cannot be used: missing, incomplete or built for something else."""


class CacheMissingError(TeacherCacheError):
    """There is no usable cache at the path: no meta.json, or one that cannot be read (truncated by a crash or a
    full disk); either way it is built (again) from the start."""


# ------------------------------------------------------------------------------------------------------------
# seeds, shards, paths
# ------------------------------------------------------------------------------------------------------------
def view_seed(index: int, k: int, base_seed: int = 0) -> int:
    """The torch seed of augmented view ``k`` of dataset image ``index``: ``(index * 256 + k + base_seed *
    0x9E3779B1) mod 2**32``. torch seeds its CPU generator from the low 32 bits only, so the seed is kept there;
    within one base seed it is distinct for every (index, k) with k < 256 and index < 2**24."""
    if not 0 <= k < MAX_VIEWS:
        raise ValueError(f"view k={k} out of range [0, {MAX_VIEWS})")
    return (int(index) * MAX_VIEWS + int(k) + int(base_seed) * SEED_MIX) % (1 << 32)


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous shard ``[lo, hi)`` of ``range(n)`` computed by ``rank`` of ``world_size`` processes (sizes
    differ by at most one; together the shards cover every index exactly once)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world size {world_size} is invalid")
    return n * rank // world_size, n * (rank + 1) // world_size


def default_cache_path(cache_dir: str | os.PathLike, teacher_name: str, data_name: str, views: int = 1) -> Path:
    """``<cache_dir>/features/<teacher>_<data>`` (``_views<K>`` appended for K > 1)."""
    suffix = f"_views{views}" if views > 1 else ""
    return Path(cache_dir) / "features" / f"{teacher_name}_{data_name}{suffix}"


# ------------------------------------------------------------------------------------------------------------
# meta: what a cache was built for
# ------------------------------------------------------------------------------------------------------------
def _floats(v: Iterable) -> list[float]:
    return [float(x) for x in v]


def teacher_identity(tcfg: Any, seed: Optional[int] = None) -> dict:
    """What identifies the teacher without building it: name/arch/format/architecture options, the checkpoint's
    absolute path, size and mtime (ns) (``None`` when the file is missing), and for ``format=random`` the seed
    the network was initialised under. ViT teachers add what changes their features: the embedding (``cls`` when
    unset) and the ``vit.*`` size overrides that are set (a CNN teacher's identity is unchanged, so its existing
    caches stay valid)."""
    path = getattr(tcfg, "checkpoint", None) if tcfg.format != "random" else None
    size = mtime = weights = None
    if path:
        path = os.path.abspath(os.path.expanduser(str(path)))
        if os.path.isfile(path):
            st = os.stat(path)
            size, mtime = int(st.st_size), int(st.st_mtime_ns)
            weights = checkpoint_weights_sha256(path)
    wm = getattr(tcfg, "width_multiplier", None)
    out = {"name": str(getattr(tcfg, "name", None) or tcfg.arch), "arch": str(tcfg.arch), "format": str(tcfg.format),
           "small_input": bool(getattr(tcfg, "small_input", False)),
           "width_multiplier": None if wm is None else float(wm),
           "checkpoint": path, "checkpoint_size": size, "checkpoint_mtime_ns": mtime,
           **({"checkpoint_weights": weights} if weights is not None else {}),
           "random_seed": int(seed) if tcfg.format == "random" and seed is not None else None}
    from ..models import backbone_options, is_vit
    from ..models.vit import OVERRIDABLE

    if str(tcfg.format) == "timm":  # the timm name (with its tag) is the architecture and the weights' source
        out["embedding"] = getattr(tcfg, "embedding", None) or "default"
    elif is_vit(str(tcfg.arch)):
        opts = backbone_options(tcfg)
        out["embedding"] = opts.get("embedding", "cls")
        out["vit"] = {k: opts[k] for k in OVERRIDABLE if k in opts}
    return out


def checkpoint_weights_sha256(path: str) -> str:
    """SHA-256 of every tensor in the checkpoint file (names, dtypes, shapes and bytes, in key order), read
    weights-only and memory-mapped: what the teacher *is*, whatever its size and mtime say. Another file with the
    same size and mtime (a swapped teacher) has another hash."""
    import hashlib

    from ..runtime.safety import load_torch_file

    h = hashlib.sha256()

    def walk(obj: Any, name: str) -> None:
        if torch.is_tensor(obj):
            t = obj.detach().contiguous().reshape(-1)
            h.update(f"{name}\0{t.dtype}\0{tuple(obj.shape)}\0".encode())
            h.update(memoryview(t.view(torch.uint8).numpy()))
        elif isinstance(obj, Mapping):
            for k in sorted(obj, key=str):
                walk(obj[k], f"{name}.{k}" if name else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{name}[{i}]")

    walk(load_torch_file(path, "teacher.checkpoint", mmap=True), "")
    return h.hexdigest()


def data_identity(dcfg: Any, num_samples: int, samples: Optional[str] = None) -> dict:
    """The data the teacher saw. ``samples``: the fingerprint of the resolved sample list (``dataset.fingerprint()``:
    the selected images' bytes, or their files' paths, sizes and mtimes, with their labels and order), which covers
    everything that decides which pixels form the split (``data.val_fraction``, ``holdout``, subsets, seeds)."""
    root = getattr(dcfg, "root", None)
    return {**({"samples": samples} if samples is not None else {}),"name": str(dcfg.name), "root": os.path.abspath(os.path.expanduser(str(root))) if root else None,
            "split": "train", "num_samples": int(num_samples), "image_size": int(dcfg.image_size),
            "resize_size": int(dcfg.resize_size), "in_channels": int(dcfg.in_channels),
            "mean": _floats(dcfg.mean), "std": _floats(dcfg.std),
            "train_subset": None if dcfg.train_subset is None else int(dcfg.train_subset),
            "split_seed": int(dcfg.split_seed),
            # data.holdout changes which images form the train split; recorded only when set, so that caches built
            # before the key existed stay valid
            **({"holdout": int(dcfg.holdout)} if getattr(dcfg, "holdout", None) is not None else {})}


def transform_identity(dcfg: Any, views: int = 1, base_seed: Optional[int] = None) -> dict:
    """The transform the teacher saw: the evaluation transform (K = 1) or K seeded training augmentations.
    ``base_seed`` (K > 1) is only recorded when given: a training run takes it from the cache."""
    from ..data.transforms import eval_transform, train_transform

    if views == 1:
        return {"kind": EVAL_KIND, "description": repr(eval_transform(dcfg)), "views": 1}
    out = {"kind": VIEWS_KIND, "description": repr(train_transform(dcfg)), "views": int(views),
           "seed_formula": SEED_FORMULA}
    if base_seed is not None:
        out["base_seed"] = int(base_seed)
    return out


def compute_precision(precision: Any) -> str:
    """The arithmetic a trainer precision computes the teacher's features in: ``bf16``, ``fp16`` or ``fp32``."""
    p = str(precision)
    return "bf16" if p.startswith("bf16") else "fp16" if p.startswith("16") else "fp32"


def expected_meta(tcfg: Any, dcfg: Any, num_samples: int, views: int = 1, *, base_seed: Optional[int] = None,
                  seed: Optional[int] = None, samples: Optional[str] = None,
                  precision: Optional[str] = None) -> dict:
    """What a cache for this teacher and data config must record (what :func:`open_cache` checks). ``samples``:
    the train split's sample fingerprint; ``precision``: what the features are computed in (:func:`compute_precision`
    of the resolved ``trainer.precision``: a bf16 cache is not an fp32 run's). Each is compared when given: a
    training run passes both."""
    return {"teacher": teacher_identity(tcfg, seed), "data": data_identity(dcfg, num_samples, samples),
            "transform": transform_identity(dcfg, views, base_seed), "views": int(views),
            **({"precision": compute_precision(precision)} if precision is not None else {})}


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


_ABSENT = object()


def compare_meta(cached: Mapping, expected: Mapping) -> list[str]:
    """``"<field>: cached <value> vs expected <value>"`` for every field of ``expected`` that differs."""
    have = _flatten(cached)
    problems = []
    for key, want in _flatten(expected).items():
        if key in _UNCOMPARED:
            continue
        got = have.get(key, _ABSENT)
        if got is _ABSENT or got != want:
            got_s = "<not recorded>" if got is _ABSENT else repr(got)
            problems.append(f"{key}: cached {got_s} vs expected {want!r}")
    want_all = _flatten(expected)
    for key in ("data.holdout",):  # recorded only when set: a cache of a held-out train split must not pass as whole
        if key in have and key not in want_all:
            problems.append(f"{key}: cached {have[key]!r} vs expected <not set>")
    return problems


def read_meta(path: str | os.PathLike) -> dict:
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise CacheMissingError(f"no teacher feature cache at {path} ({META_FILE} not found)")
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        return meta
    except (OSError, ValueError) as e:
        raise CacheMissingError(f"teacher feature cache {path}: {meta_path} cannot be read ({e}), so the cache "
                                f"is rebuilt from the start") from e


def write_meta(path: str | os.PathLike, meta: Mapping) -> dict:
    """Write ``meta.json`` atomically (temporary file beside it, fsync, ``os.replace``); returns what was written
    (``meta`` with ``updated`` set)."""
    meta_path = Path(path) / META_FILE
    tmp = meta_path.with_name(f".{META_FILE}.tmp{os.getpid()}")
    out = dict(meta, updated=_now())
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, meta_path)
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------------------
# seeded augmented views
# ------------------------------------------------------------------------------------------------------------
class _Wrapper(Dataset):
    def __init__(self, dataset: Dataset, views: int, base_seed: int = 0):
        if not 1 <= views <= MAX_VIEWS:
            raise ValueError(f"views must be in [1, {MAX_VIEWS}], got {views}")
        self.dataset = dataset
        self.views = int(views)
        self.base_seed = int(base_seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):  # classes, labels, ... of the wrapped dataset
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def view(self, index: int, k: int):
        """``dataset[index]`` with torch's RNG seeded by :func:`view_seed` (the caller's RNG state is untouched).
        The tensor and PIL transforms of ``data/transforms.py`` draw only from torch's global generator."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(view_seed(index, k, self.base_seed))
            return self.dataset[index]


class SeededViews(_Wrapper):
    """Training data for a K-view cache: ``__getitem__(i)`` draws a view ``k`` uniformly (from the worker's RNG),
    applies the wrapped dataset's training transform under the seed of ``(i, k)`` and returns
    ``(image, label, index, k)``, the exact augmentation whose teacher feature the cache holds."""

    def __getitem__(self, index: int):
        k = int(torch.randint(self.views, ()))
        image, label, idx = self.view(index, k)
        return image, label, idx, k


class AllViews(_Wrapper):
    """Cache building: ``(K x C x H x W views, label, index)``, view ``k`` as :class:`SeededViews` makes it."""

    def __getitem__(self, index: int):
        images = []
        for k in range(self.views):
            image, label, idx = self.view(index, k)
            images.append(image)
        return torch.stack(images), label, idx


# ------------------------------------------------------------------------------------------------------------
# building
# ------------------------------------------------------------------------------------------------------------
def _progress_file(path: Path, rank: int, world: int) -> Path:
    return path / f"progress.rank{rank}-of-{world}.json"


def _feature_shape(n: int, views: int, dim: int) -> tuple[int, ...]:
    return (n, dim) if views == 1 else (n, views, dim)


def prepare_cache(path: str | os.PathLike, meta: Mapping, overwrite: bool = False) -> dict:
    """Rank 0: create the cache (meta.json with ``done = 0``, then ``features.npy``), or check that an existing
    one was started for the same ``meta`` (then it is resumed). A mismatch raises :class:`TeacherCacheError`
    unless ``overwrite``, which starts over. Returns the meta now on disk."""
    path = Path(path)
    try:
        old = read_meta(path)
    except CacheMissingError:
        old = None
    if old is not None and (path / FEATURES_FILE).is_file():
        problems = compare_meta(old, meta)
        damage = features_problem(path, old)
        if not problems and damage is None:
            return old
        if not problems:  # the right cache, but its features file is damaged: built again, whatever was recorded
            overwrite, problems = True, [damage]
        if not overwrite:
            raise TeacherCacheError(f"teacher feature cache {path} was built for something else: "
                                    + "; ".join(problems)
                                    + " (use another output path, delete it, or pass cache.overwrite=true)")
        log.warning("overwriting teacher feature cache %s (%s)", path, "; ".join(problems))
    path.mkdir(parents=True, exist_ok=True)
    for p in path.glob("progress.rank*.json"):
        p.unlink()
    new = dict(meta, format_version=FORMAT_VERSION, done=0, prefix_done=0, complete=False, created=_now())
    new = write_meta(path, new)  # first: a features file without meta is never taken for a started cache
    mm = np.lib.format.open_memmap(path / FEATURES_FILE, mode="w+", dtype=np.dtype(meta["dtype"]),
                                   shape=tuple(meta["shape"]))
    mm.flush()
    del mm
    reserve(path / FEATURES_FILE)
    return new


def reserve(file: Path) -> None:
    """Allocate the (sparse) features file's blocks now: a disk too small fails here, in one line, instead of a
    SIGBUS at some write into the memory map. The cache stays incomplete (``complete`` false) and is rebuilt."""
    size = file.stat().st_size
    try:
        with open(file, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, size)
    except OSError as e:
        import errno
        import shutil

        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate: written as it goes
                return
            raise
        free = shutil.disk_usage(file.parent).free / 2**30
        raise TeacherCacheError(f"disk full: the teacher feature cache {file} needs {size / 2**30:.2f} GiB, "
                                f"{free:.2f} GiB are free; free space (or set cache_dir / teacher.cache_path) and "
                                f"run again") from None


def features_problem(path: Path, meta: Mapping) -> Optional[str]:
    """Why ``features.npy`` cannot hold ``meta``'s shape (truncated, wrong header), or None when it can."""
    file = path / FEATURES_FILE
    try:
        arr = np.load(file, mmap_mode="r")
        shape = tuple(arr.shape)
        del arr
    except (OSError, ValueError) as e:
        have = file.stat().st_size if file.is_file() else 0
        return f"{FEATURES_FILE} is truncated or damaged ({have} bytes; {type(e).__name__}: {e})"
    if shape != tuple(meta.get("shape", ())):
        return f"{FEATURES_FILE} has shape {shape}, meta.json says {tuple(meta.get('shape', ()))}"
    return None


def _start_for(path: Path, meta: Mapping, rank: int, world: int, lo: int, hi: int) -> int:
    start = lo
    done = int(meta.get("prefix_done", 0))  # single-process runs wrote the prefix [0, prefix_done)
    if done > lo:
        start = min(hi, done)
    if world > 1:
        pf = _progress_file(path, rank, world)
        if pf.is_file():
            rec = json.loads(pf.read_text())
            if (rec.get("lo"), rec.get("hi")) == (lo, hi):
                start = max(start, int(rec["next"]))
    return start


def _record_progress(path: Path, rank: int, world: int, lo: int, hi: int, nxt: int) -> None:
    if world == 1:
        meta = read_meta(path)
        meta["done"] = meta["prefix_done"] = int(nxt)
        write_meta(path, meta)
    else:
        pf = _progress_file(path, rank, world)
        tmp = pf.with_name(f".{pf.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"lo": lo, "hi": hi, "next": int(nxt)}))
        os.replace(tmp, pf)


def compute_shard(path: str | os.PathLike, teacher: nn.Module, dataset: Dataset, *, rank: int = 0,
                  world_size: int = 1, batch_size: int = 256, num_workers: int = 0,
                  device: str | torch.device = "cpu", chunk_batches: int = 50, max_chunks: Optional[int] = None,
                  autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
                  progress: bool = True) -> bool:
    """Compute this rank's shard of a prepared cache, resuming after its recorded progress; returns whether the
    shard is finished. ``dataset`` yields ``(image, label, index)`` in index order (images ``K x C x H x W`` for
    K views, see :class:`AllViews`)."""
    path = Path(path)
    meta = read_meta(path)
    n, views = int(meta["data"]["num_samples"]), int(meta["views"])
    if len(dataset) != n:
        raise TeacherCacheError(f"teacher feature cache {path}: the dataset has {len(dataset)} samples, the cache "
                                f"{n}")
    lo, hi = shard_range(n, rank, world_size)
    start = _start_for(path, meta, rank, world_size, lo, hi)
    if start >= hi:
        return True
    mm = np.load(path / FEATURES_FILE, mmap_mode="r+")
    loader = DataLoader(Subset(dataset, range(start, hi)), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, drop_last=False)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=hi - lo, initial=start - lo, desc=f"teacher features (rank {rank})" if world_size > 1
                   else "teacher features", unit="img", position=rank, leave=world_size == 1, dynamic_ncols=True)
    nxt, chunks, in_chunk = start, 0, 0
    teacher.eval()
    try:
        for x, _, idx in loader:
            idx = torch.as_tensor(idx, dtype=torch.long)
            if idx[0] != nxt or idx[-1] != nxt + len(idx) - 1:
                raise TeacherCacheError(f"teacher feature cache {path}: expected dataset indices {nxt}.."
                                        f"{nxt + len(idx) - 1} in order, got {idx[0]}..{idx[-1]}")
            x = x.to(device, non_blocking=True)
            flat = x.flatten(0, 1) if views > 1 else x
            with torch.inference_mode(), (autocast() if autocast is not None else contextlib.nullcontext()):
                f = teacher(flat)
            f = F.normalize(f.float(), dim=1)
            if views > 1:
                f = f.view(len(idx), views, -1)
            mm[nxt:nxt + len(idx)] = f.cpu().numpy().astype(mm.dtype)
            nxt += len(idx)
            in_chunk += 1
            if bar is not None:
                bar.update(len(idx))
            if in_chunk == chunk_batches or nxt == hi:
                mm.flush()
                _record_progress(path, rank, world_size, lo, hi, nxt)
                in_chunk = 0
                chunks += 1
                if max_chunks is not None and chunks >= max_chunks and nxt < hi:
                    log.info("teacher feature cache %s: stopping after %d chunks at sample %d of %d "
                             "(a re-run resumes)", path, chunks, nxt, hi)
                    return False
    finally:
        if bar is not None:
            bar.close()
        mm.flush()
        del mm
    return nxt >= hi


def finalize_cache(path: str | os.PathLike, world_size: int = 1) -> dict:
    """Rank 0 after every shard: set ``done`` (from the progress records) and ``complete``; returns the meta."""
    path = Path(path)
    meta = read_meta(path)
    n = int(meta["data"]["num_samples"])
    if world_size > 1:
        meta["done"] = sum(_start_for(path, meta, r, world_size, *shard_range(n, r, world_size))
                           - shard_range(n, r, world_size)[0] for r in range(world_size))
    meta["complete"] = int(meta["done"]) >= n
    if meta["complete"]:
        meta["done"] = meta["prefix_done"] = n
        for p in path.glob("progress.rank*.json"):
            p.unlink()
    return write_meta(path, meta)


def _dist() -> tuple[int, int, Callable[[], None]]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist.barrier
    return 0, 1, lambda: None


def build_cache(path: str | os.PathLike, teacher: nn.Module, dataset: Dataset, meta: Mapping, *,
                batch_size: int = 256, num_workers: int = 0, device: str | torch.device = "cpu",
                chunk_batches: int = 50, max_chunks: Optional[int] = None, overwrite: bool = False,
                autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
                progress: bool = True) -> dict:
    """Create or resume the cache at ``path`` and compute it (every rank its shard under torch.distributed).

    ``meta``: :func:`expected_meta` plus ``teacher.fingerprint``, ``embed_dim``, ``dtype``, ``shape`` (see
    :func:`cache_meta`). Returns the final meta (``complete`` false when ``max_chunks`` stopped it early)."""
    path = Path(path)
    rank, world, barrier = _dist()
    if rank == 0:
        prepare_cache(path, meta, overwrite)
    barrier()
    if rank != 0:
        problems = compare_meta(read_meta(path), meta)
        if problems:  # cannot happen unless the ranks disagree on the config
            raise TeacherCacheError(f"teacher feature cache {path} (rank {rank}): " + "; ".join(problems))
    compute_shard(path, teacher, dataset, rank=rank, world_size=world, batch_size=batch_size,
                  num_workers=num_workers, device=device, chunk_batches=chunk_batches, max_chunks=max_chunks,
                  autocast=autocast, progress=progress)
    barrier()
    final = finalize_cache(path, world) if rank == 0 else {}
    barrier()
    return final if rank == 0 else read_meta(path)


def cache_meta(tcfg: Any, dcfg: Any, teacher: nn.Module, num_samples: int, views: int = 1, *,
               dtype: str = "float16", base_seed: int = 0, seed: Optional[int] = None,
               samples: Optional[str] = None, precision: Optional[str] = None) -> dict:
    """The full meta of a cache about to be built with the (already built) ``teacher``; ``samples``: the train
    split's sample fingerprint (:func:`data_identity`)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {list(DTYPES)}")
    meta = expected_meta(tcfg, dcfg, num_samples, views, base_seed=base_seed if views > 1 else None, seed=seed,
                         samples=samples, precision=precision)
    fp = teacher.fingerprint() if hasattr(teacher, "fingerprint") else None
    meta["teacher"]["fingerprint"] = fp
    dim = int(teacher.embed_dim)
    meta.update(embed_dim=dim, dtype=dtype, shape=list(_feature_shape(num_samples, views, dim)))
    return meta


def cache_dataset(dm: Any, views: int = 1, base_seed: int = 0) -> Dataset:
    """What the teacher sees: the train split with the evaluation transform (K = 1), or K seeded views of the
    training augmentation (:class:`AllViews`)."""
    if views == 1:
        return dm.train_dataset_eval
    if dm.num_train >= 1 << 24:
        raise TeacherCacheError(f"{dm.num_train} training images: K-view seeds (view_seed) are distinct only for "
                                f"fewer than 2**24 images")
    return AllViews(dm.train_dataset, views, base_seed)


# ------------------------------------------------------------------------------------------------------------
# using
# ------------------------------------------------------------------------------------------------------------
class CachedFeatures(nn.Module):
    """Stands in for :class:`~compress_lit.teachers.FrozenTeacher` when the teacher is cached: no network, no
    parameters; ``lookup(index, view)`` returns the stored (L2-normalised) features of a batch as float32 on
    ``index``'s device. The memory map is opened lazily (and not pickled)."""

    is_cached = True

    def __init__(self, path: str | os.PathLike, meta: Mapping):
        super().__init__()
        self.path = Path(path)
        self.meta = dict(meta)
        self.embed_dim = int(meta["embed_dim"])
        self.views = int(meta["views"])
        self.num_samples = int(meta["data"]["num_samples"])
        self.base_seed = int(meta["transform"].get("base_seed", 0))
        self.name = meta["teacher"].get("name")
        self.layer_names: tuple[str, ...] = ()
        self._features = None
        super().train(False)

    @property
    def features(self) -> np.ndarray:
        if self._features is None:
            self._features = np.load(self.path / FEATURES_FILE, mmap_mode="r")
        return self._features

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_features"] = None
        return state

    def train(self, mode: bool = True) -> "CachedFeatures":
        return super().train(False)

    def assert_frozen(self) -> None:
        """Nothing to check: there are no parameters."""

    def fingerprint(self) -> str | None:
        """The cached teacher's weight fingerprint (as :meth:`FrozenTeacher.fingerprint` gave it)."""
        return self.meta["teacher"].get("fingerprint")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise TeacherCacheError(f"the cached teacher ({self.path}) has no network: its features can only be looked "
                                "up by dataset index (lookup); evaluate the teacher from its checkpoint instead")

    def lookup(self, index: torch.Tensor, view: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows ``index`` (``B``) of the cache: ``B x D`` float32 on ``index.device``. K views: view ``view[b]``
        of sample ``index[b]``, or uniformly random views when ``view`` is None."""
        idx = torch.as_tensor(index).detach().to("cpu", torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_samples):
            raise IndexError(f"teacher feature cache {self.path}: index out of range [0, {self.num_samples}): "
                             f"{int(idx.min())}..{int(idx.max())}")
        rows_idx = idx.numpy()
        if self.views == 1:
            rows = self.features[rows_idx]
        else:
            v = torch.randint(self.views, (len(idx),)) if view is None else \
                torch.as_tensor(view).detach().to("cpu", torch.int64).reshape(-1)
            if v.numel() and (int(v.min()) < 0 or int(v.max()) >= self.views):
                raise IndexError(f"teacher feature cache {self.path}: view out of range [0, {self.views})")
            rows = self.features[rows_idx, v.numpy()]
        out = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
        device = index.device if torch.is_tensor(index) else torch.device("cpu")
        if device.type == "cpu":  # training looks rows up on the host, before the batch goes to the GPU
            return out.pin_memory() if torch.cuda.is_available() else out
        return out.to(device, non_blocking=True)

    def extra_repr(self) -> str:
        return (f"path={str(self.path)!r}, teacher={self.name!r}, embed_dim={self.embed_dim}, views={self.views}, "
                f"samples={self.num_samples}")


def open_cache(path: str | os.PathLike, expected: Mapping) -> CachedFeatures:
    """Open a complete cache built for ``expected`` (:func:`expected_meta`; every field given is compared).
    Raises :class:`CacheMissingError` when there is none, :class:`TeacherCacheError` naming the path and every
    mismatched field (cached vs expected value) otherwise."""
    path = Path(path)
    meta = read_meta(path)
    if not (path / FEATURES_FILE).is_file():
        raise TeacherCacheError(f"teacher feature cache {path}: {FEATURES_FILE} is missing")
    problems = compare_meta(meta, expected)
    if not meta.get("complete"):
        problems.insert(0, f"complete: cached False (done {meta.get('done', 0)} of "
                           f"{meta.get('data', {}).get('num_samples', '?')} samples) vs expected True")
    if problems:
        raise TeacherCacheError(f"teacher feature cache {path} cannot be used: " + "; ".join(problems))
    damage = features_problem(path, meta)
    if damage is not None:
        raise TeacherCacheError(f"teacher feature cache {path}: {damage}; python -m compress_lit.cache_features with "
                                f"the run's overrides rebuilds it")
    return CachedFeatures(path, meta)


def cache_features_command(overrides: Sequence[str]) -> str:
    """The ``python -m compress_lit.cache_features`` command line for a run's overrides."""
    return " ".join(["python -m compress_lit.cache_features", *(shlex.quote(o) for o in overrides)])


__all__ = ["AllViews", "CacheMissingError", "CachedFeatures", "SeededViews", "TeacherCacheError", "build_cache",
           "cache_dataset", "cache_features_command", "cache_meta", "compare_meta",
           "compute_shard", "data_identity", "default_cache_path", "expected_meta", "finalize_cache",
           "open_cache", "prepare_cache", "read_meta", "shard_range", "teacher_identity", "transform_identity",
           "view_seed", "write_meta"]
