import pytest
import torch
import torchvision

from compress_lit.models import build_backbone, embedding_layer


@pytest.mark.parametrize("arch,tv", [("resnet18", torchvision.models.resnet18), ("resnet50", torchvision.models.resnet50)])
def test_resnet_has_torchvision_layout_and_outputs(arch, tv):
    ours = build_backbone(arch, num_classes=1000)
    ref = tv(weights=None)
    ref_sd = ref.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}
    ours.load_state_dict(ref_sd)
    ref.fc = torch.nn.Identity()
    ours.eval(), ref.eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), ref(x))


def test_resnet50x4_is_simclr_width():
    m = build_backbone("resnet50x4")
    assert m.conv1.out_channels == 256 and m.embed_dim == 8192
    assert m.layer1[0].conv1.out_channels == 256 and m.layer4[0].conv3.out_channels == 8192
    n_params = sum(p.numel() for p in m.parameters())
    assert 370e6 < n_params < 380e6  # SimCLR v1 R50x4: ~375M parameters without the classifier
    n_conv = sum(isinstance(mod, torch.nn.Conv2d) for mod in m.modules())
    assert n_conv == 53


@pytest.mark.parametrize("arch,dim", [("alexnet", 4096), ("resnet18", 512), ("mobilenetv2", 1280), ("resnet50", 2048)])
def test_embedding_dims_match_paper(arch, dim):
    m = build_backbone(arch).eval()
    assert m.embed_dim == dim
    with torch.no_grad():
        out = m(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, dim)


def test_alexnet_embedding_is_relu_fc7_and_has_no_batchnorm():
    m = build_backbone("alexnet").eval()
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        feats = m.forward_features(x, ("conv5", "fc6", "fc7"))
        assert set(feats) == {"conv5", "fc6", "fc7"}
        assert (feats["fc7"] >= 0).all()  # after ReLU
        torch.testing.assert_close(feats["fc7"], m(x))
        # fc7 = ReLU(W7 fc6 + b7) by hand
        lin = m.fc7[1]
        torch.testing.assert_close(feats["fc7"], torch.relu(feats["fc6"] @ lin.weight.t() + lin.bias))
    assert embedding_layer("alexnet") == "fc7" and embedding_layer("resnet18") == "pool"


@pytest.mark.parametrize("arch", ["alexnet", "resnet18", "mobilenetv2"])
@pytest.mark.parametrize("size", [16, 28, 32])
def test_small_input_stem_runs_on_tiny_images(arch, size):
    m = build_backbone(arch, small_input=True, width_multiplier=0.25).eval()
    with torch.no_grad():
        out = m(torch.randn(2, 3, size, size))
    assert out.shape == (2, m.embed_dim) and torch.isfinite(out).all()


def test_resnet_intermediate_layers():
    m = build_backbone("resnet18", small_input=True, width_multiplier=0.25).eval()
    f = m.forward_features(torch.randn(1, 3, 32, 32), ("layer1", "layer3", "pool"))
    assert f["layer1"].shape == (1, 16, 32, 32) and f["layer3"].shape == (1, 64, 8, 8) and f["pool"].shape == (1, 128)


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="vgg"):
        build_backbone("vgg")
