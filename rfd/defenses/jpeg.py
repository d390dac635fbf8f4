"""JPEG compression of the query, the classic input-transformation defense, and why BPDA beats it.

Guo, Rana, Cisse, van der Maaten. "Countering Adversarial Images using Input Transformations."
ICLR 2018; broken by Athalye, Carlini, Wagner. "Obfuscated Gradients Give a False Sense of
Security." ICML 2018.

Every query is JPEG-compressed before the classifier sees it: 8x8 blocks of the (YCbCr) image
are DCT-transformed, divided by the quality-scaled standard quantization tables, rounded and
transformed back. The rounding makes the gradient zero almost everywhere, so a gradient attack
that differentiates through the defense learns nothing ("gradient masking") and the defense looks
robust. It is not: it declares itself non-differentiable, and under BPDA gradient attacks pass
the identity in its place (JPEG keeps images close to themselves), which finds adversarial
examples as easily as without the defense. Implemented in torch (chroma is not subsampled).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rfd.dct import dct_matrix
from rfd.defenses.base import Defense
from rfd.rng import KeyedRNG

# The standard tables (ITU-T T.81, Annex K), scaled by quality as libjpeg does.
_LUMA = [
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113,
    92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
]  # fmt: skip
_CHROMA = [17, 18, 24, 47] + [99] * 4 + [18, 21, 26, 66] + [99] * 4 + [24, 26, 56] + [99] * 5 + [
    47, 66] + [99] * 6 + [99] * 32  # fmt: skip


def quant_table(quality: int, chroma: bool = False) -> Tensor:
    """The 8x8 quantization table at ``quality`` (1..100), libjpeg's scaling: integer
    arithmetic, entries kept in 1..255 as baseline JPEG (and PIL) forces below quality ~25."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    base = torch.tensor(_CHROMA if chroma else _LUMA, dtype=torch.float32).view(8, 8)
    return ((base * scale + 50) // 100).clamp(1, 255)


_TO_YCBCR = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5],
                          [0.5, -0.418688, -0.081312]])  # fmt: skip


def jpeg(x: Tensor, quality: int = 75) -> Tensor:
    """JPEG-compress and decompress a batch of [0, 1] images (1 or 3 channels)."""
    b, c, h, w = x.shape
    y = x * 255
    if c == 3:
        y = torch.einsum("ij,bjhw->bihw", _TO_YCBCR.to(x), y)
        y = y + torch.tensor([0.0, 128.0, 128.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    ph, pw = (-h) % 8, (-w) % 8
    if ph or pw:
        y = F.pad(y, (0, pw, 0, ph), mode="replicate")
    hh, ww = y.shape[-2:]
    blocks = y.unfold(2, 8, 8).unfold(3, 8, 8) - 128  # (B, C, H/8, W/8, 8, 8)
    d = dct_matrix(8).to(x)
    coef = d @ blocks @ d.T
    q = torch.stack([quant_table(quality, chroma=i > 0) for i in range(c)]).to(x)
    q = q.view(1, c, 1, 1, 8, 8)
    coef = torch.round(coef / q) * q
    blocks = d.T @ coef @ d + 128
    y = blocks.permute(0, 1, 2, 4, 3, 5).reshape(b, c, hh, ww)[..., :h, :w]
    if c == 3:
        y = y - torch.tensor([0.0, 128.0, 128.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        y = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(_TO_YCBCR).to(x), y)
    return (y / 255).clamp(0.0, 1.0)


class JPEG(Defense):
    """JPEG compression of every query (Guo et al., ICLR 2018); deterministic.

    Args:
        model: the classifier.
        seed: accepted for a uniform interface; unused.
        quality: JPEG quality, 1..100 (75, the common default).
    """

    name = "jpeg"
    title = "JPEG"
    order = 40
    differentiable = False  # rounding: zero gradient almost everywhere (BPDA passes the identity)

    def __init__(self, model: nn.Module, seed: int | None = None, quality: int = 75) -> None:
        super().__init__(model, seed=0)
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"jpeg quality must be an integer in 1..100, got {quality!r}")
        self.quality = quality
        self.layers = ["input"]

    def row_input(self, x: Tensor, rng: KeyedRNG) -> Tensor:
        return jpeg(x, self.quality)
