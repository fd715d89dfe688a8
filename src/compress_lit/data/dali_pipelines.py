"""NVIDIA DALI graphs of the image-folder pipelines (``data.loader=dali``): what :mod:`.transforms` does with PIL,
on DALI's operators, decoding on the GPU (``device="mixed"``: nvJPEG, the hardware JPEG decoder where the GPU has
one) or on the CPU (libjpeg-turbo through nvImageCodec; no GPU needed).

Every graph reads the files it is given, in the given order (``fn.readers.file(files=..., labels=...)``, no
shuffling of its own: :mod:`.dali_loader` orders and shards them), and carries each file's *sample index* as its
label, so the host maps indices to class labels and every batch keeps the dataset indices the torch loader gives.
EXIF orientation is not applied (as PIL's ``Image.open`` + ``convert``).

* **Training** (:func:`train_graph`), per view: a random resized crop with area fraction ``data.crop_scale`` and
  aspect ratio 3/4-4/3, 10 attempts then the ratio-clamped centre crop (torchvision's rule; one view: decoded
  region of interest only, ``fn.decoders.image_random_crop``; two views: the image decoded once and cropped twice,
  ``fn.random_resized_crop``), resized bilinearly (antialiased) to ``data.image_size``. ``data.augment=mocov2`` then
  applies MoCo v2's colour jitter with p 0.8 (brightness, contrast, saturation factors uniform in 0.6-1.4, hue
  uniform in +-0.1 of the circle), grayscale with p 0.2 and a Gaussian blur with p 0.5 (sigma uniform in
  :func:`~.transforms.blur_sigma`, kernel :func:`~.transforms.blur_kernel_size` of its top), the values of
  :mod:`.transforms`. ``data.color_jitter > 0`` (``crop_flip``) applies brightness and contrast jitter of that
  strength to every image, as the torch transform. Then a horizontal flip with p 0.5 (``data.hflip``) and
  normalisation by ``data.mean`` / ``data.std``. Views are drawn independently.
* **Evaluation** (:func:`eval_graph`): the short side resized to ``data.resize_size`` (the long side
  ``int(resize_size * long / short)``, torchvision's size rule), the centre ``data.image_size`` square cropped at
  torchvision's offsets (``round((size - crop) / 2)``, half to even), normalisation.

Known differences from the torch transforms (tests/test_dali.py measures them): the colour jitter's four operations
run in a fixed order (brightness, contrast, saturation, hue: torchvision draws a random order per image), clamped
to [0, 255] after each one in float arithmetic (PIL rounds to 8 bits after each), and the hue is rotated in YIQ
space (DALI's ``fn.hsv``) rather than shifted in PIL's 8-bit HSV; contrast blends with the mean luma of the image
as torchvision does; grayscale and saturation use ITU-R 601 luma, as PIL's ``convert("L")``. Resampling is
DALI's antialiased bilinear filter: evaluation pixels are within one grey level of PIL's on photographs.

``nvidia.dali`` is imported inside the functions: importing this module needs no DALI.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .transforms import (MOCOV2_BLUR_P, MOCOV2_GRAYSCALE_P, MOCOV2_JITTER, MOCOV2_JITTER_P, blur_kernel_size,
                         blur_sigma)

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect ratio range (torchvision's default, as the torch transform)
CROP_ATTEMPTS = 10  # torchvision's attempts before the centre-crop fallback
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's convert("L")
READER = "reader"
# nvJPEG's preallocated buffers for ImageNet-sized images (the values of NVIDIA's DALI ImageNet examples): no
# reallocation while the first batches grow them
DEVICE_MEMORY_PADDING = 211_025_920
HOST_MEMORY_PADDING = 140_544_512


@dataclass(frozen=True)
class DaliSpec:
    """What the graphs need from the data config (``from_config``), plus the views and the output layout."""
    image_size: int
    resize_size: int
    crop_scale: tuple[float, float]
    hflip: bool
    augment: str  # crop_flip | mocov2
    color_jitter: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    views: int = 1
    channels_last: bool = False  # batches N x C x H x W with channels-last strides (HWC from DALI, permuted)

    @classmethod
    def from_config(cls, cfg, views: int = 1, channels_last: bool = False) -> "DaliSpec":
        return cls(image_size=int(cfg.image_size), resize_size=int(cfg.resize_size),
                   crop_scale=(float(cfg.crop_scale[0]), float(cfg.crop_scale[1])), hflip=bool(cfg.hflip),
                   augment=str(getattr(cfg, "augment", "crop_flip")), color_jitter=float(cfg.color_jitter),
                   mean=tuple(float(m) for m in cfg.mean), std=tuple(float(s) for s in cfg.std), views=int(views),
                   channels_last=bool(channels_last))


# ------------------------------------------------------------------------------------------------- pieces
def _luma(x):
    """``H x W x 1`` ITU-R 601 luma of a float ``H x W x 3`` image."""
    import nvidia.dali.fn as fn

    return fn.coord_transform(x, M=list(LUMA))


def _clamp(x):
    import nvidia.dali.math as dmath

    return dmath.clamp(x, 0.0, 255.0)


def _brightness(x, b):
    return _clamp(x * b)


def _contrast(x, c):
    """Blend with the image's mean luma (torchvision's ``adjust_contrast``)."""
    import nvidia.dali.fn as fn

    m = fn.reductions.mean(_luma(x))
    return _clamp((x - m) * c + m)


def _saturation(x, s):
    """Blend with the image's luma (torchvision's ``adjust_saturation``)."""
    g = _luma(x)
    return _clamp((x - g) * s + g)


def _uniform(lo: float, hi: float):
    import nvidia.dali.fn as fn

    return fn.random.uniform(range=[float(lo), float(hi)])


def _coin(p: float):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    return fn.random.coin_flip(probability=float(p), dtype=types.BOOL)


def _mocov2_colour(x, size: int):
    """MoCo v2's colour jitter (p 0.8), grayscale (p 0.2) and blur (p 0.5) on a float ``H x W x 3`` image."""
    import nvidia.dali.fn as fn

    b, c, s, h = MOCOV2_JITTER
    if _coin(MOCOV2_JITTER_P):
        x = _brightness(x, _uniform(1 - b, 1 + b))
        x = _contrast(x, _uniform(1 - c, 1 + c))
        x = _saturation(x, _uniform(1 - s, 1 + s))
        x = _clamp(fn.hsv(x, hue=_uniform(-h, h) * 360.0))  # torchvision's hue factor is a fraction of the circle
    if _coin(MOCOV2_GRAYSCALE_P):
        x = fn.coord_transform(x, M=list(LUMA) * 3)  # three equal channels
    lo, hi = blur_sigma(size)
    if _coin(MOCOV2_BLUR_P):
        x = fn.gaussian_blur(x, sigma=_uniform(lo, hi), window_size=blur_kernel_size(hi))
    return x


def _normalise(x, spec: DaliSpec, mirror=0):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    return fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="HWC" if spec.channels_last else "CHW",
                                    mean=[255.0 * m for m in spec.mean], std=[255.0 * s for s in spec.std],
                                    mirror=mirror)


def _decoder_kwargs(device: str) -> dict:
    import nvidia.dali.types as types

    kw = dict(device=device, output_type=types.RGB, adjust_orientation=False)
    if device == "mixed":
        kw.update(device_memory_padding=DEVICE_MEMORY_PADDING, host_memory_padding=HOST_MEMORY_PADDING)
    return kw


def _augment_view(img, spec: DaliSpec):
    """One training view of a cropped ``S x S`` uint8 image: colour, flip, normalisation."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    if spec.augment == "mocov2":
        img = _mocov2_colour(fn.cast(img, dtype=types.FLOAT), spec.image_size)
    elif spec.color_jitter > 0:  # crop_flip's brightness/contrast jitter, on every image
        j = spec.color_jitter
        img = _contrast(_brightness(fn.cast(img, dtype=types.FLOAT), _uniform(max(0.0, 1 - j), 1 + j)),
                        _uniform(max(0.0, 1 - j), 1 + j))
    mirror = fn.random.coin_flip(probability=0.5) if spec.hflip else 0
    return _normalise(img, spec, mirror)


# -------------------------------------------------------------------------------------------------- graphs
def train_graph(files: Sequence[str], indices: Sequence[int], spec: DaliSpec, decode_device: str):
    """``(view_1, ..., view_V, index)`` of the training pipeline (built with ``enable_conditionals=True``)."""
    import nvidia.dali.fn as fn

    jpegs, index = fn.readers.file(files=list(files), labels=list(indices), random_shuffle=False, name=READER)
    size = [spec.image_size, spec.image_size]
    crop = dict(random_area=list(spec.crop_scale), random_aspect_ratio=list(RATIO), num_attempts=CROP_ATTEMPTS)
    if spec.views == 1:  # decode the crop's region only
        img = fn.decoders.image_random_crop(jpegs, **_decoder_kwargs(decode_device), **crop)
        crops = [fn.resize(img, size=size, antialias=True)]
    else:  # decode once, crop each view
        img = fn.decoders.image(jpegs, **_decoder_kwargs(decode_device))
        crops = [fn.random_resized_crop(img, size=size, antialias=True, **crop) for _ in range(spec.views)]
    views = [_augment_view(c, spec) for c in crops]
    return (*views, index)


def eval_graph(files: Sequence[str], indices: Sequence[int], spec: DaliSpec, decode_device: str):
    """``(image, index)`` of the evaluation pipeline: Resize(resize_size) + CenterCrop(image_size), torchvision's
    sizes and offsets exactly (computed from each file's header), + normalisation. The last batch is padded by
    repeating its last file (the loader drops the padding)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    jpegs, index = fn.readers.file(files=list(files), labels=list(indices), random_shuffle=False, pad_last_batch=True,
                                   name=READER)
    shape = fn.peek_image_shape(jpegs, adjust_orientation=False)  # H, W, C
    h, w = shape[0], shape[1]
    r, s = spec.resize_size, spec.image_size
    portrait = w <= h  # torchvision: the short side becomes r, the long one int(r * long / short)
    new_w = portrait * r + (1 - portrait) * ((r * w) // h)
    new_h = portrait * ((r * h) // w) + (1 - portrait) * r
    img = fn.decoders.image(jpegs, **_decoder_kwargs(decode_device))
    img = fn.resize(img, resize_x=fn.cast(new_w, dtype=types.FLOAT), resize_y=fn.cast(new_h, dtype=types.FLOAT),
                    antialias=True)
    top, left = _centre_offset(new_h - s), _centre_offset(new_w - s)
    img = fn.slice(img, start=fn.cast(fn.stack(top, left), dtype=types.INT32), shape=[s, s], axis_names="HW")
    return _normalise(img, spec), index


def _centre_offset(d):
    """``round(d / 2)`` with Python's half-to-even rounding (torchvision's CenterCrop), ``d`` an integer node."""
    f = d // 2
    odd = d - 2 * f
    return f + odd * (f - 2 * (f // 2))


def build_pipeline(files: Sequence[str], indices: Sequence[int], spec: DaliSpec, *, train: bool, batch_size: int,
                   num_threads: int, device_id: int | None, seed: int, prefetch: int = 2):
    """A built DALI pipeline over ``files`` (labels: ``indices``), on GPU ``device_id`` (mixed decoding) or on the
    CPU (``None``)."""
    import nvidia.dali as dali

    graph = train_graph if train else eval_graph
    decode_device = "cpu" if device_id is None else "mixed"
    pipe = dali.pipeline_def(graph, enable_conditionals=train)(
        files=files, indices=indices, spec=spec, decode_device=decode_device, batch_size=int(batch_size),
        num_threads=max(1, int(num_threads)), device_id=device_id, seed=int(seed), prefetch_queue_depth=prefetch)
    pipe.build()
    return pipe


def _decode_one(files: Sequence[str]):
    import nvidia.dali.fn as fn

    jpegs, _ = fn.readers.file(files=list(files), random_shuffle=False)
    return fn.decoders.image(jpegs, **_decoder_kwargs("cpu"))


def cpu_decode_error(path: str) -> str | None:
    """DALI's error decoding ``path`` alone on the CPU, or ``None`` when it decodes (finds the file of a failed
    batch: DALI's own message does not always name it)."""
    import nvidia.dali as dali

    try:
        pipe = dali.pipeline_def(_decode_one)(files=[path], batch_size=1, num_threads=1, device_id=None,
                                              prefetch_queue_depth=1)
        pipe.build()
        pipe.run()
    except RuntimeError as e:
        return " ".join(str(e).split())
    return None
