"""Model factory, normalization inside the model, layer names and the penultimate alias."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import rfd
from rfd.models import ImageClassifier, family, load_weights, resolve_layer


def tiny_vgg() -> ImageClassifier:
    from timm.models.vgg import VGG

    cfg = [8, "M", 16, "M", 16, "M", 16, "M", 16, "M"]
    return ImageClassifier(VGG(cfg, num_classes=10, mlp_ratio=0.01)).eval()


def plain_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 16),
        nn.ReLU(),
        nn.Linear(16, 10),
    ).eval()


FAMILIES = {
    "resnet": (lambda: rfd.create_model("test_resnet", 10), 32, "global_pool"),
    "vgg": (tiny_vgg, 32, "pre_logits"),
    "vit": (lambda: rfd.create_model("test_vit", 10), 160, "head_drop"),
    "deit": (
        lambda: rfd.create_model(
            "deit_tiny_patch16_224",
            10,
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
        ),
        32,
        "head_drop",
    ),
    "plain": (plain_cnn, 32, "5"),
}


@pytest.mark.parametrize("fam", FAMILIES)
def test_penultimate_feeds_the_classifier(fam: str) -> None:
    """The alias resolves per family, and the head applied to its output gives the logits."""
    build, size, expected = FAMILIES[fam]
    model = build()
    names = rfd.feature_layers(model)
    assert names[0] == "penultimate" and expected in names
    path = resolve_layer(model, "penultimate")
    assert path.endswith(expected)
    captured = {}
    module = model.get_submodule(path)
    h = module.register_forward_hook(lambda m, i, o: captured.__setitem__("feat", o))
    x = torch.rand(3, 3, size, size)
    with torch.no_grad():
        logits = model(x)
    h.remove()
    feat = captured["feat"]
    net = model.net if isinstance(model, ImageClassifier) else model
    with torch.no_grad():
        if fam == "vgg":
            head_out = net.head(feat)
        elif fam == "plain":
            head_out = net[6](feat)
        else:
            head_out = net.get_classifier()(feat)
    torch.testing.assert_close(head_out, logits)


def test_family_detection() -> None:
    assert family(rfd.create_model("test_resnet", 10)) == "resnet"
    assert family(tiny_vgg()) == "vgg"
    assert family(rfd.create_model("test_vit", 10)) == "vit"
    assert family(plain_cnn()) == "generic"


def test_feature_layers_come_from_timm_feature_info() -> None:
    model = rfd.create_model("test_resnet", 10)
    stages = [d["module"] for d in model.net.feature_info]
    assert rfd.feature_layers(model)[1 : 1 + len(stages)] == stages
    for name in rfd.feature_layers(model):
        resolve_layer(model, name)  # every listed name is hookable


def test_unknown_layer_lists_valid_names() -> None:
    model = rfd.create_model("test_resnet", 10)
    with pytest.raises(ValueError, match=r"unknown layer 'layer9'.*valid layers: penultimate"):
        resolve_layer(model, "layer9")


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match="unknown timm model"):
        rfd.create_model("resnet_does_not_exist", 10)


def test_normalization_lives_inside_the_model() -> None:
    model = rfd.create_model("test_resnet", 10)
    mean = torch.tensor(model.net.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.net.pretrained_cfg["std"]).view(1, 3, 1, 1)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net((x - mean) / std))
    one = rfd.create_model("test_resnet", 10, in_chans=1)
    assert one.normalize.mean.numel() == 1
    assert one.normalize.mean.item() == pytest.approx(float(mean.mean()), rel=1e-6)


def test_local_weights_go_through_timm_pretrained_path(tmp_path) -> None:
    """pretrained=True + pretrained_cfg_overlay(file=...) is timm's own loading code, offline."""
    from safetensors.torch import save_file

    src = timm.create_model("test_resnet", num_classes=1000)
    torch.nn.init.normal_(src.layer1[0].conv1.weight)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = rfd.create_model(
        "test_resnet", 10, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))
    )
    torch.testing.assert_close(model.net.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    assert model.net.fc.out_features == 10  # new head: the 1000-class head was dropped by timm


def test_checkpoint_round_trip_and_errors(tmp_path) -> None:
    model = rfd.create_model("test_resnet", 10)
    torch.nn.init.normal_(model.net.fc.weight)
    path = tmp_path / "state.pt"
    torch.save(model.state_dict(), path)
    again = rfd.create_model("test_resnet", 10, checkpoint=path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt or unreadable checkpoint"):
        rfd.create_model("test_resnet", 10, checkpoint=bad)
    with pytest.raises(ValueError, match="does not match the model"):
        load_weights(rfd.create_model("test_resnet", 5), path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        rfd.create_model("test_resnet", 10, checkpoint=tmp_path / "missing.ckpt")


def test_model_hash_sees_every_byte_of_every_tensor():
    """The calibration cache key of a model without a file: a change at the end of a tensor
    larger than 64 KiB (what the hash once read of each) gives another key."""
    from rfd.models import model_hash

    a, b = nn.Linear(200, 200), nn.Linear(200, 200)
    b.load_state_dict(a.state_dict())
    assert model_hash(a) == model_hash(b)
    with torch.no_grad():
        b.weight[-1, -1] += 1.0
    assert model_hash(a) != model_hash(b)
