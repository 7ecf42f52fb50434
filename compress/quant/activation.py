"""Static activation quantization: calibrated ranges and the affine uint8 grid (W8A8).

A linear's input ``x`` is quantized once per tensor (or per channel) with a scale and a
zero point fixed at calibration time, as ONNX ``QuantizeLinear``/``DequantizeLinear`` do::

    q = clamp(round(x / scale) + zero_point, 0, 2**bits - 1);   x' = (q - zero_point) * scale

(round half to even, as ONNX). The range ``[lo, hi]`` (always containing 0, so 0 is exact)
comes from calibration statistics by one of the methods below; all but ``minmax`` read the
signed histogram of :class:`~edgecompress.compress.calibration.observers.SignedHistogramObserver`.

* ``minmax``     the observed min and max (per tensor or per channel);
* ``percentile`` the ``p``-th and ``(100 - p)``-th percentiles (outliers clipped);
* ``mse``        the range ``[a lo, a hi]`` (``a`` on a grid) minimising the expected squared
                 quantization error over the histogram, clipping included;
* ``entropy``    the range ``[a lo, a hi]`` minimising KL(P || Q) between the clipped histogram
                 and its quantized version (TensorRT's calibrator, Migacz 2017), on both signs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

METHODS = ("minmax", "percentile", "mse", "entropy")


@dataclass(frozen=True)
class ActQuant:
    """Static affine quantization of an activation: ``scale``/``zero_point`` are scalars
    (per tensor) or 1-D over the last (channel) dimension."""

    scale: torch.Tensor  # float32, () or [C]
    zero_point: torch.Tensor  # int32, same shape
    bits: int = 8
    method: str = "minmax"

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def per_channel(self) -> bool:
        return self.scale.dim() == 1

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize and dequantize ``x`` (the ``QuantizeLinear``/``DequantizeLinear`` pair)."""
        s = self.scale.to(x.device, torch.float32)
        zp = self.zero_point.to(x.device, torch.float32)
        q = torch.clamp(torch.round(x.float() / s) + zp, 0, self.qmax)
        return ((q - zp) * s).to(x.dtype)

    def to_dict(self) -> dict:
        def show(t: torch.Tensor) -> float | list:
            return t.tolist() if t.dim() == 0 else {"min": float(t.min()), "max": float(t.max())}
        return {"bits": self.bits, "method": self.method, "per_channel": self.per_channel,
                "scale": show(self.scale), "zero_point": show(self.zero_point)}


def affine_params(lo: torch.Tensor | float, hi: torch.Tensor | float, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the unsigned ``bits`` grid covering ``[min(lo, 0), max(hi, 0)]``.

    The scale is rounded to float32 and the zero point to an integer in range, so 0 is
    represented exactly. A zero-width range gets scale 1 (everything quantizes to 0).
    """
    lo = torch.as_tensor(lo, dtype=torch.float64).clamp(max=0.0)
    hi = torch.as_tensor(hi, dtype=torch.float64).clamp(min=0.0)
    qmax = (1 << bits) - 1
    scale = ((hi - lo) / qmax).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = torch.round(-lo / scale.double()).clamp(0, qmax).to(torch.int32)
    return scale, zp


def _centers(edges: np.ndarray) -> np.ndarray:
    return (edges[:-1] + edges[1:]) / 2


def _observed_range(counts: np.ndarray, edges: np.ndarray) -> tuple[float, float]:
    nz = np.nonzero(counts)[0]
    if not len(nz):
        raise ValueError("the histogram is empty: no activations were observed")
    return float(min(edges[nz[0]], 0.0)), float(max(edges[nz[-1] + 1], 0.0))


def percentile_range(counts: np.ndarray, edges: np.ndarray, p: float) -> tuple[float, float]:
    """``(lo, hi)``: the ``100 - p`` and ``p`` percentiles (``p`` in (50, 100]), interpolated in bins."""
    if not 50.0 < p <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {p}")
    cdf = np.concatenate([[0.0], np.cumsum(counts, dtype=np.float64)])
    if cdf[-1] <= 0:
        raise ValueError("the histogram is empty: no activations were observed")
    cdf /= cdf[-1]
    lo = float(np.interp(1.0 - p / 100.0, cdf, edges))
    hi = float(np.interp(p / 100.0, cdf, edges))
    return min(lo, 0.0), max(hi, 0.0)


def mse_range(counts: np.ndarray, edges: np.ndarray, bits: int = 8, grid: int = 200,
              min_ratio: float = 0.05) -> tuple[float, float]:
    """``[a lo, a hi]`` minimising ``Σ counts · (c - Q(c))²`` over bin centres ``c``
    (clipping and rounding error together); ``a`` in ``linspace(1, min_ratio, grid)``."""
    lo, hi = _observed_range(counts, edges)
    c, w = _centers(edges), counts.astype(np.float64)
    best, best_err = 1.0, np.inf
    for a in np.linspace(1.0, min_ratio, grid):
        s, zp = affine_params(lo * a, hi * a, bits)
        s, zp = float(s), float(zp)
        q = np.clip(np.round(c / s) + zp, 0, (1 << bits) - 1)
        err = float((w * (c - (q - zp) * s) ** 2).sum())
        if err < best_err:
            best, best_err = a, err
    return lo * best, hi * best


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum()
    q = q / q.sum()
    m = p > 0
    return float((p[m] * np.log(p[m] / np.maximum(q[m], 1e-12))).sum())


def entropy_range(counts: np.ndarray, edges: np.ndarray, bits: int = 8, grid: int = 100,
                  min_ratio: float = 0.05) -> tuple[float, float]:
    """``[a lo, a hi]`` minimising KL(P || Q): ``P`` is the histogram restricted to the range
    with the clipped mass folded into its end bins, ``Q`` is ``P`` merged into ``2**bits``
    levels and spread back evenly over each level's non-empty bins (TensorRT's entropy
    calibration, extended to an asymmetric range by scaling both ends together)."""
    lo, hi = _observed_range(counts, edges)
    levels = 1 << bits
    w = counts.astype(np.float64)
    best, best_kl = 1.0, np.inf
    for a in np.linspace(1.0, min_ratio, grid):
        i0 = int(np.searchsorted(edges, lo * a, side="right")) - 1
        i1 = int(np.searchsorted(edges, hi * a, side="left"))
        i0, i1 = max(i0, 0), min(max(i1, i0 + 1), len(w))
        if i1 - i0 < levels:  # the range is narrower than the quantizer's levels: no information lost
            continue
        p = w[i0:i1].copy()
        p[0] += w[:i0].sum()
        p[-1] += w[i1:].sum()
        q = np.zeros_like(p)
        for chunk in np.array_split(np.arange(len(p)), levels):
            nz = chunk[w[i0:i1][chunk] > 0]  # bins that hold data inside the range
            if len(nz):
                q[nz] = p[chunk].sum() / len(nz)
        kl = _kl(p, q)
        if kl < best_kl:
            best, best_kl = a, kl
    return lo * best, hi * best


def calibrated_act_quant(stats: dict[str, torch.Tensor], method: str = "minmax", *, bits: int = 8,
                         per_channel: bool = False, percentile: float = 99.99) -> ActQuant:
    """:class:`ActQuant` from a module's input statistics (``minmax`` and/or ``histogram_signed``
    entries merged in one dict: ``min``, ``max``, ``hist``, ``neg``, ``upper``)."""
    if method not in METHODS:
        raise ValueError(f"unknown activation range method {method!r}; use one of {', '.join(METHODS)}")
    if per_channel and method != "minmax":
        raise ValueError(f"per-channel activation ranges use minmax; {method!r} works per tensor")
    if method == "minmax":
        lo, hi = stats["min"], stats["max"]
        if not per_channel:
            lo, hi = lo.min(), hi.max()
        scale, zp = affine_params(lo, hi, bits)
        return ActQuant(scale, zp, bits, method)
    upper = float(stats["upper"].reshape(-1)[0])
    pos, neg = stats["hist"].double().numpy(), stats["neg"].double().numpy()
    counts = np.concatenate([neg[::-1], pos])
    edges = np.linspace(-upper, upper, len(counts) + 1)
    if method == "percentile":
        lo, hi = percentile_range(counts, edges, percentile)
    elif method == "mse":
        lo, hi = mse_range(counts, edges, bits)
    else:
        lo, hi = entropy_range(counts, edges, bits)
    scale, zp = affine_params(lo, hi, bits)
    return ActQuant(scale, zp, bits, method)
