"""AWQ: activation-aware weight quantization, from second-order statistics only.

Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration" (cf. mit-han-lab/llm-awq ``auto_scale`` / ``auto_clip``). AWQ changes no
format: it rescales input channels (folded exactly into the previous op) and clips weight
blocks, so that a later plain quantizer (RTN or GPTQ) loses less. The layer stays fp32.

Search objective. For a linear layer with input covariance ``H = E[x xᵀ]`` (the
``HessianObserver`` statistic) the expected squared output error of replacing ``W`` by
``W'`` is ``trace((W' - W) H (W' - W)ᵀ)``; layers sharing one input (q/k/v, gate/up) sum
it. llm-awq evaluates the same loss on cached activations; here no activation is kept.

Pure core (paper symbols): :func:`awq_search_scales`, :func:`awq_search_clip`,
:func:`apply_clip`, :func:`rescale_stats`. Thin Llama adapter: :func:`fold_scales_into_norm`,
:func:`fold_scales_into_linear`, :func:`awq_block_`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgecompress.compress.prune.layers import RemovedSublayer

from .formats import QuantScheme, block_scales, decode, encode, to_blocks

log = logging.getLogger(__name__)

Stats = Callable[[str, str], dict[str, torch.Tensor]]


# --------------------------------------------------------------------------- pure core
def fake_quant(W: torch.Tensor, scheme: QuantScheme, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """RTN then dequantize: float32 ``[N, K]``, equal to ``quantize_blockwise(W, scheme, clip).to_float()``."""
    n, k = W.shape
    blocks = to_blocks(W, scheme.block_size)
    scales, zp = block_scales(blocks, scheme, clip)
    return decode(encode(blocks, scales, zp, scheme.bits), scales, zp, scheme.bits).reshape(n, -1)[:, :k]


def output_error(E: torch.Tensor, H: torch.Tensor) -> float:
    """``trace(E H Eᵀ)``: the mean squared output error of a weight error ``E [N, K]`` on inputs with ``H``."""
    return float(((E @ H).double() * E.double()).sum())


def awq_search_scales(weights: list[torch.Tensor], H: torch.Tensor, act_mag: torch.Tensor, scheme: QuantScheme,
                      grid: int = 20) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-input-channel scales ``s [K]`` minimising ``Σ_i trace(E_i H E_iᵀ)``, ``E_i = Q(W_i s) / s - W_i``.

    ``s = act_mag^alpha`` (``act_mag`` = mean |x| per channel), normalised by
    ``sqrt(max(s) min(s))`` as llm-awq, for ``alpha`` in ``linspace(0, 1, grid)``; ``alpha = 0``
    is ``s = 1`` (plain RTN), and a scale is kept only if strictly better, so the result is
    never worse than RTN. Returns ``(s, {"alpha", "loss_rtn", "loss"})``.
    """
    Ws = [W.detach().float().cpu() for W in weights]
    H = H.detach().float().cpu()
    x_mag = act_mag.detach().float().cpu().clamp(min=1e-5)
    best_s, best_alpha, best_loss, loss_rtn = torch.ones_like(x_mag), 0.0, float("inf"), float("nan")
    for alpha in torch.linspace(0.0, 1.0, max(grid, 2)).tolist():
        s = x_mag.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        E = torch.cat([fake_quant(W * s, scheme) / s - W for W in Ws])
        loss = output_error(E, H)
        if alpha == 0.0:
            loss_rtn = loss
        if loss < best_loss:
            best_s, best_alpha, best_loss = s, alpha, loss
    return best_s.contiguous(), {"alpha": best_alpha, "loss_rtn": loss_rtn, "loss": best_loss}


def block_error(W: torch.Tensor, d: torch.Tensor, scheme: QuantScheme,
                clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Activation-weighted RTN error per block, ``Σ_j d_j (Q(w)_j - w_j)²``: float32 ``[N, n_blocks]``."""
    w = to_blocks(W, scheme.block_size)
    d = to_blocks(d.detach().float().cpu().reshape(1, -1), scheme.block_size)  # padding weighs 0
    scales, zp = block_scales(w, scheme, clip)
    q = decode(encode(w, scales, zp, scheme.bits), scales, zp, scheme.bits)
    return ((q - w).square() * d).sum(-1)


def awq_search_clip(W: torch.Tensor, H_diag: torch.Tensor, scheme: QuantScheme, grid: int = 20,
                    max_shrink: float = 0.5) -> torch.Tensor:
    """Clip ratio ``r [N, n_blocks]`` per block in ``linspace(1, 1 - max_shrink, grid)`` minimising :func:`block_error`.

    ``H_diag`` is ``diag(H)`` = the per-channel mean square of the input (the diagonal
    approximation of llm-awq's ``auto_clip`` output loss). All rows and blocks are searched
    at once; ``r = 1`` comes first and is replaced only by a strictly smaller error.
    """
    best_err = best_r = None
    for r in torch.linspace(1.0, 1.0 - max_shrink, max(grid, 1)).tolist():
        err = block_error(W, H_diag, scheme, r)
        if best_err is None:
            best_err, best_r = err, torch.full_like(err, r)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_r = torch.where(better, torch.full_like(err, r), best_r)
    return best_r


@torch.no_grad()
def apply_clip(W: torch.Tensor, ratios: torch.Tensor, scheme: QuantScheme) -> None:
    """Clamp ``W`` in place to each block's clipped range, so a later plain RTN sees the clipped grid.

    Symmetric: the bound on the peak's side is exactly ``r * peak`` (the value
    ``block_scales(clip=r)`` maps onto code 0); the opposite bound is one ulp inside
    ``-r * peak``, so ``argmax |w|`` still finds a peak of the same sign. Then
    ``quantize_blockwise(W_clamped, scheme)`` equals ``quantize_blockwise(W, scheme, clip=r)``
    bit for bit (codes and scales). Asymmetric: clamp to ``[r lo, r hi]``; scales and zero
    points are identical and so are the codes of unclamped entries; an entry clamped to the
    upper bound may get one code less than clip-quantized (that grid can reach up to half a
    step past the bound; seen on ~0.06% of clamped entries). This is llm-awq's
    clamp-then-quantize.
    """
    n, k = W.shape
    w = to_blocks(W, scheme.block_size)
    r = ratios.detach().float().cpu()
    if scheme.symmetric:
        peak = w.gather(-1, w.abs().argmax(-1, keepdim=True)).squeeze(-1)  # as block_scales
        top = r * peak
        far = torch.nextafter(-top, torch.zeros_like(top))
        lo, hi = torch.minimum(top, far), torch.maximum(top, far)
    else:
        lo = w.amin(-1).clamp(max=0.0) * r
        hi = w.amax(-1).clamp(min=0.0) * r
    w = torch.maximum(torch.minimum(w, hi.unsqueeze(-1)), lo.unsqueeze(-1))
    W.copy_(w.reshape(n, -1)[:, :k].to(device=W.device, dtype=W.dtype))


def rescale_stats(entry: dict[str, torch.Tensor], s: torch.Tensor) -> dict[str, torch.Tensor]:
    """Statistics of ``x / s`` from those of ``x``: ``H_ij / (s_i s_j)``, ``meansq / s²``, ``meanabs / s``."""
    s = s.detach().float().cpu()
    out = dict(entry)
    if "hessian" in entry:
        out["hessian"] = entry["hessian"] / torch.outer(s, s)
    if "meansq" in entry:
        out["meansq"] = entry["meansq"] / s.square()
    if "meanabs" in entry:
        out["meanabs"] = entry["meanabs"] / s
    return out


# --------------------------------------------------------------------------- model adapter
@torch.no_grad()
def fold_scales_into_norm(norm: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """``norm.weight /= s``; each ``linear.weight[:, j] *= s_j`` (RMSNorm output is ``weight * x̂``)."""
    s = s.to(torch.float32)
    norm.weight.copy_((norm.weight.float() / s.to(norm.weight.device)).to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:  # LayerNorm: the bias scales with the output too
        norm.bias.copy_((norm.bias.float() / s.to(norm.bias.device)).to(norm.bias.dtype))
    for lin in linears:
        lin.weight.copy_((lin.weight.float() * s.to(lin.weight.device)).to(lin.weight.dtype))


@torch.no_grad()
def fold_scales_into_linear(prev: nn.Linear, next_: nn.Linear, s: torch.Tensor) -> None:
    """``prev`` rows (and bias) ``/= s``; ``next_`` columns ``*= s``.

    Exact when ``next_``'s input is linear in ``prev``'s output channel by channel, e.g.
    up_proj -> down_proj (``down(silu(gate) * up)``).
    """
    s = s.to(torch.float32)
    prev.weight.copy_((prev.weight.float() / s.to(prev.weight.device).unsqueeze(1)).to(prev.weight.dtype))
    if prev.bias is not None:
        prev.bias.copy_((prev.bias.float() / s.to(prev.bias.device)).to(prev.bias.dtype))
    next_.weight.copy_((next_.weight.float() * s.to(next_.weight.device)).to(next_.weight.dtype))


@dataclass(frozen=True)
class AWQConfig:
    scheme: QuantScheme
    grid: int = 20  # alpha grid of the scale search
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5  # smallest clip ratio is 1 - max_shrink


# (previous op, linears sharing its output as input). o_proj's input is not scaled: its
# channels are v_proj's output per *query* head, and with grouped-query attention one v_proj
# row feeds several query heads, so v_proj could absorb a scale only if every head of a
# group shared it (llm-awq folds v -> o only when the shapes match). Searching each group
# with the statistics collected before any change is valid: a fold leaves the inputs of the
# other groups unchanged, and scaling up_proj's rows (group 3) commutes with block-wise RTN
# of its columns (group 2) up to the fp16 rounding of the block scales.
_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)
_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _present(layer: nn.Module, name: str) -> bool:
    """Whether ``name``'s sublayer (``self_attn`` / ``mlp``) is still in the layer (not removed by prune_layers)."""
    return not isinstance(layer.get_submodule(name.split(".")[0]), RemovedSublayer)


def awq_block_(layer: nn.Module, stats: Stats, prefix: str, cfg: AWQConfig) -> list[dict[str, Any]]:
    """Search and fold AWQ scales, then search and apply clip ratios, in one Llama decoder layer.

    ``stats(module_name, stat)`` returns the ``"hessian"`` / ``"meansq"`` entries of each
    linear's input, collected before any change (names ``f"{prefix}.self_attn.q_proj"``...).
    The weights stay fp32; quantize them afterwards (RTN, or GPTQ with statistics
    recollected on the changed layer). Returns one record per scale group and per clipped
    linear, for the manifest.
    """
    records: list[dict[str, Any]] = []
    hessian: dict[str, torch.Tensor] = {}  # of each linear's input, after folding
    for prev_name, names in _GROUPS:
        if not _present(layer, names[0]):  # a sublayer removed by prune_layers
            continue
        prev = layer.get_submodule(prev_name)
        linears = [layer.get_submodule(n) for n in names]
        first = f"{prefix}.{names[0]}"
        entry = {**stats(first, "hessian"), **stats(first, "meansq")}
        s, info = awq_search_scales([lin.weight for lin in linears], entry["hessian"], entry["meanabs"],
                                    cfg.scheme, cfg.grid)
        if isinstance(prev, nn.Linear):
            fold_scales_into_linear(prev, linears[0], s)
        else:
            fold_scales_into_norm(prev, linears, s)
        folded = rescale_stats(entry, s)
        hessian.update({n: folded["hessian"] for n in names})
        ratio = info["loss"] / info["loss_rtn"] if info["loss_rtn"] > 0 else 1.0
        log.info("AWQ %s.%s -> %s: alpha %.2f, output loss %.4g -> %.4g (x%.3f)", prefix, prev_name,
                 ",".join(n.rsplit(".", 1)[-1] for n in names), info["alpha"], info["loss_rtn"], info["loss"], ratio)
        records.append({"step": "awq_scale", "modules": [f"{prefix}.{n}" for n in names],
                        "scaled_from": f"{prefix}.{prev_name}", "alpha": info["alpha"],
                        "loss_before": info["loss_rtn"], "loss_after": info["loss"],
                        "s_min": float(s.min()), "s_max": float(s.max())})
    if _present(layer, "self_attn.o_proj"):
        hessian["self_attn.o_proj"] = stats(f"{prefix}.self_attn.o_proj", "hessian")["hessian"]
    if not cfg.clip:
        return records
    for name in filter(lambda n: _present(layer, n), _LINEARS):
        lin = layer.get_submodule(name)
        d = hessian[name].diagonal().float().cpu()
        r = awq_search_clip(lin.weight, d, cfg.scheme, cfg.clip_grid, cfg.max_shrink)
        before = float(block_error(lin.weight, d, cfg.scheme).double().sum())
        after = float(block_error(lin.weight, d, cfg.scheme, r).double().sum())
        apply_clip(lin.weight, r, cfg.scheme)
        log.debug("AWQ clip %s.%s: mean ratio %.3f, weighted error %.4g -> %.4g", prefix, name, float(r.mean()),
                  before, after)
        records.append({"step": "awq_clip", "modules": [f"{prefix}.{name}"], "mean_clip": float(r.mean()),
                        "loss_before": before, "loss_after": after})
    return records
