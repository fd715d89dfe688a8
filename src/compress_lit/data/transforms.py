"""Training and evaluation transforms.

* ``imagefolder`` (PIL images, ImageNet-sized): the paper's augmentation, ``RandomResizedCrop(image_size,
  scale=crop_scale)`` + ``RandomHorizontalFlip`` (if ``hflip``) [+ brightness/contrast ``ColorJitter`` if
  ``color_jitter > 0``] + ``ToTensor`` + ``Normalize``; evaluation ``Resize(resize_size)`` +
  ``CenterCrop(image_size)`` + ``ToTensor`` + ``Normalize``. With ``data.decoder=torchvision`` the images are
  uint8 tensors and the same steps run as ``torchvision.transforms.v2`` on them (:func:`image_ops`).
* ``digits`` / ``fashion_mnist`` (grey ``1 x S x S`` float tensors in [0, 1], already ``image_size``): a fused
  tensor pipeline, :class:`TensorAugment` (random resized crop with ratio (3/4, 4/3), optional flip, optional
  brightness/contrast jitter, normalisation), about 25 us per 32 px image on one CPU thread (45 us with
  jitter); evaluation is :class:`TensorNormalize` alone (no crop: the images are already at ``image_size``).
  The normalisation broadcasts the grey channel to ``len(mean)`` channels.

``data.augment=mocov2``: MoCo v2's augmentation (its ``aug_plus``), in its order: ``RandomResizedCrop(image_size,
scale=crop_scale)`` (MoCo: 0.2-1, set by its preset), colour jitter (brightness, contrast, saturation 0.4, hue 0.1)
with p 0.8, grayscale with p 0.2, Gaussian blur with sigma uniform in 0.1-2 px with p 0.5, horizontal flip
(if ``hflip``). The blur's sigma range is given at 224 px and scales with ``image_size`` (``sigma * S / 224``),
so a smaller image gets the same blur relative to its content; the kernel spans +-3 sigma (MoCo blurs with PIL's
``GaussianBlur(radius=sigma)``, torchvision's kernel is used here). On the grey tensor datasets, saturation, hue
and grayscale are identities (a grey image has no colour), so they are skipped exactly: brightness and contrast
0.4 with p 0.8, then the blur with p 0.5.

:class:`MultiView` wraps a transform to return ``n`` independently augmented views (MoCo pretraining).
All randomness comes from torch's global generator, which DataLoader seeds per worker.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

TENSOR_DATASETS = ("digits", "fashion_mnist")
AUGMENTATIONS = ("crop_flip", "mocov2")

# MoCo v2's augmentation (He et al. / Chen et al., "Improved Baselines with Momentum Contrastive Learning")
MOCOV2_JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
MOCOV2_JITTER_P = 0.8
MOCOV2_GRAYSCALE_P = 0.2
MOCOV2_BLUR_SIGMA = (0.1, 2.0)  # pixels at 224 px
MOCOV2_BLUR_P = 0.5


def blur_sigma(image_size: int, sigma: Sequence[float] = MOCOV2_BLUR_SIGMA) -> tuple[float, float]:
    """MoCo v2's blur sigma range (pixels at 224 px) for images of ``image_size`` pixels."""
    return float(sigma[0]) * image_size / 224, float(sigma[1]) * image_size / 224


def blur_kernel_size(sigma: float) -> int:
    """Odd Gaussian kernel spanning +-3 sigma (at least 3 taps)."""
    return 2 * max(1, math.ceil(3 * sigma)) + 1


class TensorNormalize:
    """``(x - mean) / std`` per channel for a ``C x H x W`` float tensor (a 1-channel input broadcasts to
    ``len(mean)`` channels)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        std_t = torch.as_tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        if len(mean_t) != len(std_t):
            raise ValueError(f"mean has {len(mean_t)} values but std has {len(std_t)}")
        self.scale = 1.0 / std_t
        self.shift = -mean_t / std_t
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x, self.scale)

    def __repr__(self) -> str:
        return f"TensorNormalize(mean={self.mean}, std={self.std})"


def random_resized_crop_box(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                            rand: Sequence[float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box ``(top, left, h, w)``, drawn from ``rand`` (40 uniforms in [0, 1):
    10 attempts x (area, log-ratio, top, left)); falls back to the ratio-clamped centre crop."""
    area = height * width
    lo_r, hi_r = math.log(ratio[0]), math.log(ratio[1])
    for k in range(10):
        ua, ur, ut, ul = rand[4 * k: 4 * k + 4]
        target = area * (scale[0] + ua * (scale[1] - scale[0]))
        aspect = math.exp(lo_r + ur * (hi_r - lo_r))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(ut * (height - h + 1)), int(ul * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TensorAugment:
    """Fused augmentation of a float ``C x H x W`` tensor in [0, 1]:

    1. random resized crop to ``size`` x ``size`` (area fraction ``scale``, aspect ratio ``ratio``; bilinear,
       antialiased when the crop is larger than the output),
    2. horizontal flip with probability 0.5 (if ``hflip``),
    3. if ``jitter > 0``, with probability ``jitter_p``: brightness ``x * b`` then contrast
       ``(x - mean(x)) * c + mean(x)`` with ``b, c`` uniform in ``[1 - jitter, 1 + jitter]``, each clamped to
       [0, 1] (fixed order, unlike torchvision's random order),
    4. with probability ``blur_p``: Gaussian blur with sigma uniform in ``blur_sigma`` (pixels; reflect padding,
       kernel +-3 sigma, at most the image),
    5. normalisation by ``mean`` / ``std``.

    Steps 3 and 4 draw their own uniforms only when ``jitter_p < 1`` or ``blur_p > 0``, so the default pipeline's
    random stream is unchanged.
    """

    def __init__(self, size: int, scale: Sequence[float] = (0.2, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 hflip: bool = True, jitter: float = 0.0, mean: Sequence[float] = (0.5,),
                 std: Sequence[float] = (0.5,), jitter_p: float = 1.0, blur_p: float = 0.0,
                 blur_sigma: Sequence[float] = MOCOV2_BLUR_SIGMA):
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = bool(hflip)
        self.jitter = float(jitter)
        self.jitter_p = float(jitter_p)
        self.blur_p = float(blur_p)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.normalize = TensorNormalize(mean, std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.rand(43).tolist()
        extra = torch.rand(3).tolist() if self.jitter_p < 1 or self.blur_p > 0 else (0.0, 1.0, 0.0)
        height, width = x.shape[-2:]
        top, left, h, w = random_resized_crop_box(height, width, self.scale, self.ratio, r)
        x = F.interpolate(x[None, :, top:top + h, left:left + w], size=(self.size, self.size), mode="bilinear",
                          align_corners=False, antialias=h > self.size or w > self.size)[0]
        if self.hflip and r[40] < 0.5:
            x = x.flip(-1)
        if self.jitter > 0 and extra[0] < self.jitter_p:
            b = 1.0 + self.jitter * (2.0 * r[41] - 1.0)
            c = 1.0 + self.jitter * (2.0 * r[42] - 1.0)
            # a factor <= 1 cannot leave [0, 1] (contrast with c <= 1 is a convex mix of x and its mean)
            x = x.mul(b).clamp_(0.0, 1.0) if b > 1.0 else x.mul(b)
            x = torch.lerp(x.mean(), x, c)
            if c > 1.0:
                x = x.clamp_(0.0, 1.0)
        if extra[1] < self.blur_p:
            lo, hi = self.blur_sigma
            sigma = lo + extra[2] * (hi - lo)
            kernel = min(blur_kernel_size(sigma), 2 * ((min(x.shape[-2:]) - 1) // 2) + 1)
            if kernel > 1:
                from torchvision.transforms.functional import gaussian_blur

                x = gaussian_blur(x, [kernel, kernel], [sigma, sigma])
        return self.normalize(x)

    def __repr__(self) -> str:
        extra = ""
        if self.jitter_p < 1:
            extra += f", jitter_p={self.jitter_p}"
        if self.blur_p > 0:
            extra += f", blur_p={self.blur_p}, blur_sigma={self.blur_sigma}"
        return (f"TensorAugment(size={self.size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}, "
                f"jitter={self.jitter}{extra}, {self.normalize!r})")


class MultiView:
    """Apply ``transform`` ``n`` times independently; returns a list of ``n`` views (collated to a list of
    batches by the default DataLoader collate)."""

    def __init__(self, transform: Callable, n: int = 2):
        if n < 1:
            raise ValueError(f"MultiView needs n >= 1, got {n}")
        self.transform = transform
        self.n = int(n)

    def __call__(self, x):
        return [self.transform(x) for _ in range(self.n)]

    def __repr__(self) -> str:
        return f"MultiView({self.transform!r}, n={self.n})"


def image_ops(cfg) -> tuple[Any, Callable]:
    """The transforms module and the to-float step for image-folder inputs of ``data.decoder``.

    ``pil``: PIL images through ``torchvision.transforms``, ``ToTensor``. ``torchvision``: the decoder's uint8
    ``C x H x W`` tensors through ``torchvision.transforms.v2`` (the same operations with the same parameters, on
    uint8 kernels; an antialiased resize differs from PIL's by at most 1 grey level) and ``ToDtype(float32,
    scale=True)``, the tensor equivalent of ``ToTensor``.
    """
    if getattr(cfg, "decoder", "pil") == "torchvision":
        import torchvision.transforms.v2 as T

        return T, T.ToDtype(torch.float32, scale=True)
    import torchvision.transforms as T

    return T, T.ToTensor()


def train_transform(cfg) -> Callable:
    """Training augmentation for the data config ``cfg`` (see the module docstring)."""
    scale = (float(cfg.crop_scale[0]), float(cfg.crop_scale[1]))
    augment = getattr(cfg, "augment", "crop_flip")
    if augment not in AUGMENTATIONS:
        raise ValueError(f"data.augment={augment!r} is invalid: choose one of {list(AUGMENTATIONS)}")
    size = int(cfg.image_size)
    if cfg.name in TENSOR_DATASETS:
        if augment == "mocov2":  # saturation, hue and grayscale are identities on grey images (module docstring)
            return TensorAugment(size, scale=scale, hflip=bool(cfg.hflip), jitter=MOCOV2_JITTER[0],
                                 jitter_p=MOCOV2_JITTER_P, blur_p=MOCOV2_BLUR_P, blur_sigma=blur_sigma(size),
                                 mean=list(cfg.mean), std=list(cfg.std))
        return TensorAugment(size, scale=scale, hflip=bool(cfg.hflip),
                             jitter=float(cfg.color_jitter), mean=list(cfg.mean), std=list(cfg.std))
    T, to_float = image_ops(cfg)
    steps = [T.RandomResizedCrop(size, scale=scale)]
    if augment == "mocov2":
        sigma = blur_sigma(size)
        steps += [T.RandomApply([T.ColorJitter(*MOCOV2_JITTER)], p=MOCOV2_JITTER_P),
                  T.RandomGrayscale(p=MOCOV2_GRAYSCALE_P),
                  T.RandomApply([T.GaussianBlur(blur_kernel_size(sigma[1]), sigma=sigma)], p=MOCOV2_BLUR_P)]
    if cfg.hflip:
        steps.append(T.RandomHorizontalFlip())
    if augment == "crop_flip" and cfg.color_jitter > 0:
        steps.append(T.ColorJitter(brightness=float(cfg.color_jitter), contrast=float(cfg.color_jitter)))
    steps += [to_float, T.Normalize(list(cfg.mean), list(cfg.std))]
    return T.Compose(steps)


def eval_transform(cfg) -> Callable:
    """Deterministic evaluation transform for the data config ``cfg`` (see the module docstring)."""
    if cfg.name in TENSOR_DATASETS:
        return TensorNormalize(list(cfg.mean), list(cfg.std))
    T, to_float = image_ops(cfg)
    return T.Compose([T.Resize(int(cfg.resize_size)), T.CenterCrop(int(cfg.image_size)), to_float,
                      T.Normalize(list(cfg.mean), list(cfg.std))])
