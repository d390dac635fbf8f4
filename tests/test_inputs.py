"""The library refuses inputs it cannot judge, with a message naming the mistake, instead of a conv
error or a robust accuracy of 0 (rfd.models.check_inputs / check_logits, rfd.attacks.check_eps)."""

from __future__ import annotations

import pytest
import torch
from test_attacks import tiny_cnn
from torch import nn

import rfd


@pytest.fixture(scope="module")
def data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    net = tiny_cnn()
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = net(x).argmax(1)
    return net, x, y


def _attack(net, x, y, **kw):
    args = {"attack": "square", "eps": 0.1, "max_queries": 5, **kw}
    return rfd.attack(net, x, y, **args)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda x, y: (x.double(), y), "images are torch.float64 but the model's weights are"),
        (lambda x, y: ((x * 255).round().to(torch.uint8), y), "images must be float in"),
        (lambda x, y: (x * 255, y), "look like 0-255 pixels: divide by 255"),
        (lambda x, y: (torch.where(x > 0.5, float("nan"), x), y), "NaN or inf"),
        (lambda x, y: (x.repeat(1, 3, 1, 1), y), "images have 3 channels but the model takes 1"),
        (lambda x, y: (x[0], y), r"images must be an \(N, C, H, W\) tensor"),
        (lambda x, y: (x, y.float()), "labels must be integer class indices"),
        (lambda x, y: (x, y == 1), "labels must be integer class indices"),
        (lambda x, y: (x, y - 20), "labels must be >= 0"),
        (lambda x, y: (x, y[:2]), r"labels must be \(N,\) = \(4,\)"),
        (lambda x, y: (x, y * 0 + 10), "labels go up to 10 but the model outputs 10 classes"),
    ],
)
def test_bad_images_and_labels_get_their_own_message(data, change, match):
    net, x, y = data
    xb, yb = change(x, y)
    with pytest.raises(ValueError, match=match):
        _attack(net, xb, yb)


class NaNAfter(nn.Module):
    """A model whose answers turn to NaN after ``n`` forwards."""

    def __init__(self, net: nn.Module, n: int) -> None:
        super().__init__()
        self.net, self.n = net, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n -= 1
        z = self.net(x)
        return z if self.n >= 0 else z * float("nan")


@pytest.mark.parametrize("n", [0, 1])
def test_nan_logits_raise_instead_of_counting_as_fooled(data, n):
    net, x, y = data
    with pytest.raises(ValueError, match="NaN or inf logits"):
        _attack(NaNAfter(net, n), x, y, max_queries=20)


@pytest.mark.parametrize(
    ("norm", "eps", "match"),
    [("linf", 1.0, "eps must be < 1 for norm linf"), ("linf", 5.0, "< 1"),
     ("l2", 28.0, "eps must be < 28 for norm l2 on 1x28x28"), ("l2", 1000.0, "diagonal")],
)  # fmt: skip
def test_a_ball_that_holds_every_image_is_refused(data, norm, eps, match):
    net, x, y = data
    with pytest.raises(ValueError, match=match):
        _attack(net, x, y, norm=norm, eps=eps)
    _attack(net, x, y, norm=norm, eps=27.0 if norm == "l2" else 0.5)  # inside: accepted


def test_calibration_on_0_255_images_says_so(data):
    net, x, y = data
    loader = [(x * 255, y)]
    with pytest.raises(ValueError, match="divide by 255"):
        rfd.calibrate(net, defense="feature", layers="penultimate", data=loader, use_cache=False)
