"""data.augment=mocov2 (data/transforms.py): MoCo v2's augmentation for ImageFolder data, and its exact grey-image
counterpart for the tensor datasets; the default crop_flip pipeline is unchanged."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from scipy.ndimage import gaussian_filter

from compress_lit.runtime.config import DataConfig
from compress_lit.data.transforms import TensorAugment, blur_kernel_size, blur_sigma, train_transform


def data_cfg(**kw):
    return OmegaConf.structured(DataConfig(**kw))


def test_imagefolder_mocov2_is_mocov2s_aug_plus():
    import torchvision.transforms as T

    steps = train_transform(data_cfg(name="imagefolder", root="/d", crop_scale=[0.2, 1.0], augment="mocov2")).transforms
    crop, jitter, gray, blur, flip = steps[:5]
    assert isinstance(crop, T.RandomResizedCrop) and crop.size == (224, 224) and crop.scale == (0.2, 1.0)
    assert jitter.p == 0.8 and isinstance(jitter.transforms[0], T.ColorJitter)
    cj = jitter.transforms[0]
    assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1))
    assert isinstance(gray, T.RandomGrayscale) and gray.p == 0.2
    gb = blur.transforms[0]
    assert blur.p == 0.5 and isinstance(gb, T.GaussianBlur)
    assert gb.sigma == (0.1, 2.0) and gb.kernel_size == (13, 13)  # +-3 sigma at sigma 2
    assert isinstance(flip, T.RandomHorizontalFlip)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    small = train_transform(data_cfg(name="imagefolder", root="/d", image_size=32, augment="mocov2"))
    assert small(img).shape == (3, 32, 32)


def test_blur_sigma_scales_with_the_image():
    assert blur_sigma(224) == (0.1, 2.0)
    assert blur_sigma(112) == pytest.approx((0.05, 1.0))
    assert blur_kernel_size(2.0) == 13 and blur_kernel_size(0.01) == 3


def test_grey_tensor_mocov2_keeps_only_what_acts_on_grey_images():
    aug = train_transform(data_cfg(name="digits", image_size=16, crop_scale=[0.6, 1.0], hflip=False,
                                   augment="mocov2", in_channels=3, mean=[0.3] * 3, std=[0.4] * 3))
    assert isinstance(aug, TensorAugment)
    assert (aug.jitter, aug.jitter_p, aug.blur_p) == (0.4, 0.8, 0.5)
    assert aug.blur_sigma == pytest.approx((0.1 * 16 / 224, 2.0 * 16 / 224))
    assert aug.scale == (0.6, 1.0) and not aug.hflip
    assert aug(torch.rand(1, 16, 16)).shape == (3, 16, 16)


def test_tensor_blur_is_a_gaussian_filter_by_hand():
    """Full-image crop at ratio 1 (the identity), no jitter, blur always at sigma 1: scipy's Gaussian filter with
    mirror borders (torchvision's reflect padding) truncated at 3 sigma."""
    x = torch.rand(1, 16, 16)
    aug = TensorAugment(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False, blur_p=1.0, blur_sigma=(1.0, 1.0),
                        mean=(0.0,), std=(1.0,))
    expected = gaussian_filter(x[0].double().numpy(), 1.0, mode="mirror", truncate=3.0)
    np.testing.assert_allclose(aug(x)[0].numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("jitter_p,blur_p,expected", [(0.8, 0.0, 0.8), (1.0, 0.5, 0.5)])
def test_jitter_and_blur_are_applied_with_their_probabilities(jitter_p, blur_p, expected):
    torch.manual_seed(0)
    x = torch.rand(1, 8, 8) * 0.5 + 0.25
    aug = TensorAugment(8, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False, jitter=0.4 if blur_p == 0 else 0.0,
                        jitter_p=jitter_p, blur_p=blur_p, blur_sigma=(1.0, 2.0), mean=(0.0,), std=(1.0,))
    changed = np.mean([not torch.allclose(aug(x), x) for _ in range(600)])
    assert abs(changed - expected) < 0.05  # binomial sd at n=600: <= 0.02


def test_default_pipeline_draws_the_same_random_numbers_as_before():
    """crop_flip (as used by every calibrated small preset and by the teacher caches' descriptions) is unchanged:
    43 uniforms per image, and the same description."""
    aug = train_transform(data_cfg(name="fashion_mnist", image_size=28, crop_scale=[0.5, 1.0], color_jitter=0.2))
    torch.manual_seed(3)
    aug(torch.rand(1, 28, 28))
    after = torch.rand(1)
    torch.manual_seed(3)
    torch.rand(1, 28, 28)
    torch.rand(43)
    assert torch.equal(after, torch.rand(1))
    assert "blur" not in repr(aug) and "jitter_p" not in repr(aug)
