"""Int8 per-output-channel rounding of convolution (and classifier) weights for an integer NPU.

The NPU graph stores ``W ≈ s·q`` with one symmetric scale per output channel, ``s = max|W_c| / 127``
and ``q ∈ [-127, 127]`` (ONNX Runtime's symmetric int8 rule, which the QNN HTP runs). Rounding each
weight to its nearest level (``nearest``) costs EfficientNet-Lite0 most of its top-1 agreement with
fp32 (BENCHMARKS.md), mostly in the first depthwise convolutions. Two data-driven repairs, on the same
grid (the scales stay ``max|W_c| / 127``, so the exporter writes exactly these codes):

* ``gptq`` -- GPTQ (Frantar et al. 2022) on convolution patches: the layer's input, unfolded into
  ``[positions, C_in·k·k]`` patches, gives ``H = (1/n) Σ x xᵀ``; a dense convolution shares one ``H``
  across its output channels, a depthwise one has one ``[k·k, k·k]`` ``H`` per channel. Each column's
  rounding error is fed back into the columns not yet rounded (:func:`gptq_fixed_scale`).
* bias correction (Nagel et al. 2019, "Data-Free Quantization", §4.2, empirical form) -- the mean
  output shift per channel that the rounded weights cause on calibration images,
  ``E[W_q x] − E[W x]``, is subtracted from the bias (:func:`bias_shift`).

Layers are processed in forward order on inputs computed by the already-rounded earlier layers, in one
forward pass (:func:`round_conv_weights`, the adapter; its hooks are removed in ``finally``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

QMAX = 127  # symmetric int8: q in [-127, 127]
METHODS = ("nearest", "gptq")


@dataclass(frozen=True)
class ConvRoundingConfig:
    method: str = "gptq"  # nearest | gptq
    bias_correction: bool = True
    damp: float = 0.01  # GPTQ: fraction of mean(diag H) added to the diagonal
    batch_size: int = 8  # images per chunk of unfolded patches (GPTQ's Hessian)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not self.damp > 0:
            raise ValueError(f"damp must be > 0, got {self.damp}")


# ----------------------------------------------------------------------------- pure cores

def channel_scales(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 scale per output channel (dim 0): ``max|W_c| / 127`` (float32, ``[C_out]``). An all-zero
    channel (e.g. a tied LM head's padding row) gets the median of the others (1 if none): its codes are 0
    either way, and a 1e-38 scale made the QNN HTP's MatMul wrong for the whole layer."""
    s = weight.detach().float().flatten(1).abs().amax(1) / QMAX
    dead = s == 0
    if dead.any():
        s[dead] = s[~dead].median() if not dead.all() else 1.0
    return s


def round_nearest(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``s·clamp(round(W / s), ±127)`` per output channel."""
    s = scales.view(-1, *([1] * (weight.dim() - 1)))
    return (weight / s).round().clamp(-QMAX, QMAX) * s


def conv_patches(module: nn.Conv2d | nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as the rows its weight multiplies: ``[positions, K]`` for a dense layer
    (``K = C_in·kh·kw``), ``[C, positions, kh·kw]`` for a depthwise convolution."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    p = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
    if module.groups == 1:
        return p.transpose(1, 2).reshape(-1, p.shape[1])
    if module.groups != module.in_channels or module.out_channels != module.in_channels:
        raise NotImplementedError("grouped convolutions other than depthwise (groups = channels) are not supported")
    c, k = module.in_channels, module.kernel_size[0] * module.kernel_size[1]
    return p.view(x.shape[0], c, k, -1).permute(1, 0, 3, 2).reshape(c, -1, k)


def patch_hessian(patches: torch.Tensor) -> torch.Tensor:
    """``Σ x xᵀ`` over the patch rows (float64): ``[1, K, K]`` (dense) or ``[C, k, k]`` (depthwise)."""
    p = patches.double()
    return (p.T @ p)[None] if p.dim() == 2 else p.transpose(1, 2) @ p


def gptq_fixed_scale(W: torch.Tensor, H: torch.Tensor, scales: torch.Tensor, damp: float = 0.01,
                     block: int = 128) -> torch.Tensor:
    """GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
    Transformers") of ``W [N, K]`` on a FIXED symmetric grid (``scales [N]``, q in ±127).

    ``H``: ``[1, K, K]`` shared by every row, or ``[N, K, K]`` one per row (depthwise convolutions).
    With ``U`` the upper Cholesky factor of ``Hinv = (H + λI)^-1`` (λ = ``damp``·mean diag), column j is
    rounded and its scaled error ``(w_j − q_j) / U_jj`` is subtracted from the later columns along
    ``U[j, j+1:]``: inside a ``block`` of columns at once, to the columns after it in one product per block
    (GPTQ's lazy batch update: the same result, without an ``[N, K]`` update per column). Returns the rounded
    weights ``[N, K]`` (on the grid). Dead inputs (``H_jj = 0``) get ``H_jj = 1`` (their weights are rounded
    to nearest)."""
    W = W.detach().double().clone()
    H = H.detach().double().clone()
    K = W.shape[1]
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    diag += (diag == 0).double()
    diag += damp * diag.mean(-1, keepdim=True)
    L, info = torch.linalg.cholesky_ex(H)
    if bool(info.any()):
        raise ValueError("GPTQ: the damped Hessian is not positive definite (too few calibration images?)")
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    s = scales.double()
    Wt, Qt = W.T.contiguous(), torch.empty(K, W.shape[0], dtype=W.dtype)  # columns as contiguous rows
    Ut = U.transpose(0, 2)  # Ut[j, :, i] = U[i, :, j]: [K, K, 1 | N]
    for b0 in range(0, K, block):
        b1 = min(b0 + block, K)
        errs = torch.empty(b1 - b0, W.shape[0], dtype=W.dtype)
        for j in range(b0, b1):
            w = Wt[j]
            q = (w / s).round().clamp(-QMAX, QMAX) * s
            Qt[j] = q
            err = (w - q) / Ut[j, j]
            Wt[j + 1:b1] -= Ut[j + 1:b1, j] * err
            errs[j - b0] = err
        if b1 < K and len(U) == 1:  # one Hessian: [K - b1, B] x [B, N]
            Wt[b1:] -= U[0, b0:b1, b1:].T @ errs
        elif b1 < K:  # one per row
            Wt[b1:] -= torch.einsum("bn,nbk->kn", errs, U[:, b0:b1, b1:])
    return Qt.T.float()


def bias_shift(y_ref: torch.Tensor, y_q: torch.Tensor) -> torch.Tensor:
    """Mean per-channel output shift ``E[y_q − y_ref]`` (channels on dim 1, or last for 2-D outputs)."""
    d = (y_q - y_ref).double()
    return (d.mean(0) if d.dim() == 2 else d.transpose(0, 1).flatten(1).mean(1)).float()


# ----------------------------------------------------------------------------- adapter

def weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv2d and Linear layers in registration (= forward, for EfficientNet-Lite) order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``module``'s function with another weight (called directly: no hooks)."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, module.bias)
    return module._conv_forward(x, weight, module.bias)


def round_layer(module: nn.Conv2d | nn.Linear, x: torch.Tensor, cfg: ConvRoundingConfig) -> tuple[torch.Tensor, dict]:
    """Round ``module``'s weight in place given its input ``x`` (and correct its bias); returns the scales
    and a record with the relative output error before and after the bias correction."""
    W = module.weight.data.clone()
    s = channel_scales(W)
    if cfg.method == "gptq":
        H, n = 0, 0
        for xb in x.split(cfg.batch_size):  # patches of a few images at a time (they are k·k times the input)
            P = conv_patches(module, xb)
            H, n = H + patch_hessian(P), n + P.shape[-2]
        Wq = gptq_fixed_scale(W.flatten(1), H / n, s, cfg.damp).view_as(W)
    else:
        Wq = round_nearest(W, s)
    y, yq = _forward(module, x, W), _forward(module, x, Wq)
    norm = y.norm().clamp_min(1e-12)
    rec = {"shape": list(W.shape), "rel_error": round(float((yq - y).norm() / norm), 6)}
    module.weight.data.copy_(Wq)
    if cfg.bias_correction:
        module.bias.data -= bias_shift(y, yq)
        rec["rel_error_corrected"] = round(float((_forward(module, x, Wq) - y).norm() / norm), 6)
    return s, rec


@torch.no_grad()
def round_conv_weights(model: nn.Module, images: torch.Tensor, cfg: ConvRoundingConfig = ConvRoundingConfig(),
                       *, progress=None) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Round every Conv2d/Linear weight of ``model`` (eval mode, BatchNorm already folded: every layer
    needs a bias) to its int8 grid, in place, on calibration ``images [N, 3, H, W]``.

    One forward pass over all images: a pre-hook on each layer rounds it on the input it receives, which
    the already-rounded earlier layers computed, then the pass continues through the rounded layer.
    Returns ``({weight name: scales [C_out]}, records)``: the scales the exporter must use (the weights
    are exactly ``scales·q``), and per layer the relative output error before and after correction."""
    layers = weighted_layers(model)
    for name, mod in layers:
        if mod.bias is None:
            raise ValueError(f"{name} has no bias: fold BatchNorm before rounding (bias correction needs one)")
    scales: dict[str, torch.Tensor] = {}
    records: list[dict] = []

    def hook_for(name: str):
        def hook(mod, args):
            if name + ".weight" in scales:
                raise RuntimeError(f"{name} runs twice in one forward; shared layers are not supported")
            s, rec = round_layer(mod, args[0], cfg)
            scales[name + ".weight"] = s
            records.append({"layer": name, **rec})
            if progress is not None:
                progress()
        return hook

    handles = [mod.register_forward_pre_hook(hook_for(name)) for name, mod in layers]
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n, _ in layers if n + ".weight" not in scales]
    if missing:
        raise RuntimeError(f"layers not reached by the forward pass: {', '.join(missing[:4])}")
    log.info("rounded %d layers to int8 (%s%s)", len(layers), cfg.method, " + bias correction" if cfg.bias_correction else "")
    return scales, records
