"""The orthonormal DCT-II, shared by JPEG (8-point blocks), SimBA-DCT and GeoDA (low frequencies).

One cached float64 matrix per size, made outside inference mode so autograd may use it whichever
mode the first call came from; callers move it with ``.to(x)`` and must not modify it.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor


@functools.lru_cache(maxsize=32)
def dct_matrix(n: int) -> Tensor:
    """The (n, n) orthonormal DCT-II matrix: ``D @ v`` is the DCT of ``v``, ``D.T @ c`` its
    inverse, and row ``k`` is the k-th cosine basis vector (float64, CPU)."""
    with torch.inference_mode(False):
        k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
        i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
        d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
        d[0] /= math.sqrt(2.0)
        return d


def dct2(img: Tensor) -> Tensor:
    """Orthonormal 2-D DCT-II over the last two dimensions (``D_h @ img @ D_w.T``)."""
    h, w = img.shape[-2:]
    return dct_matrix(h).to(img) @ img @ dct_matrix(w).to(img).t()


def idct2(coef: Tensor) -> Tensor:
    """Orthonormal 2-D inverse DCT over the last two dimensions (``D_h.T @ coef @ D_w``)."""
    h, w = coef.shape[-2:]
    return dct_matrix(h).to(coef).t() @ coef @ dct_matrix(w).to(coef)
