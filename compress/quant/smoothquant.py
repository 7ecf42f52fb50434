"""SmoothQuant: migrate activation outliers into the weights before W8A8 quantization.

Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models". For a linear ``y = x Wᵀ`` whose input channel ``j`` has calibrated
abs-max ``max|X_j|``, ``s_j = max|X_j|^α / max|W_:,j|^(1-α)``; ``x / s`` is easier to quantize
per tensor and ``W diag(s)`` absorbs the difference, so ``(x / s)(W diag(s))ᵀ = x Wᵀ``
exactly. The division by ``s`` is folded into the op that produces ``x`` (a norm's weight and
bias, or the rows of a linear whose output feeds ``x`` channel by channel). In a post-LN model
(BERT) the norm's output is also the residual stream, which gets ``* s`` back (a ``Mul``).

Pure core: :func:`smooth_scales`. Thin adapter: :func:`smoothquant_` over the fold sites of
a model family (:func:`fold_sites`), reusing AWQ's exact folds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from edgecompress.compress.prune.layers import RemovedSublayer
from edgecompress.errors import EdgeCompressError

from .awq import fold_scales_into_linear, fold_scales_into_norm

log = logging.getLogger(__name__)


def smooth_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s [K] = max|X_j|^α / max_i max|W_i[:, j]|^(1-α)`` over the linears sharing input ``X``.

    Channels never active (or with all-zero weights) keep ``s = 1``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = act_absmax.detach().float().cpu()
    w = torch.stack([W.detach().float().cpu().abs().amax(0) for W in weights]).amax(0)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s)).clamp(min=1e-5)


def search_alpha(X: torch.Tensor, ch_min: torch.Tensor, ch_max: torch.Tensor, weights: list[torch.Tensor],
                 grid: int = 11, bits: int = 8) -> tuple[float, dict[float, float]]:
    """The migration strength for one fold site: the ``alpha`` in ``linspace(0, 1, grid)`` whose W8A8
    layer output ``Q_a(X / s) Q_w(W s)ᵀ`` is closest (squared error, summed over the linears) to
    ``X Wᵀ`` on the sampled input rows ``X``. The activation range is the per-tensor min/max over the
    whole calibration set (``ch_min / s``, ``ch_max / s``), the weights int8 per output channel."""
    from .activation import ActQuant, affine_params
    from .awq import fake_quant
    from .formats import QuantScheme

    X = X.detach().float().cpu()
    Ws = [W.detach().float().cpu() for W in weights]
    refs = [X @ W.T for W in Ws]
    absmax = torch.maximum(ch_min.abs(), ch_max.abs()).float()
    wscheme = QuantScheme(bits=8, block_size=0, symmetric=True)
    errors = {}
    for alpha in torch.linspace(0.0, 1.0, grid).tolist():
        s = smooth_scales(absmax, Ws, alpha)
        scale, zp = affine_params((ch_min / s).min(), (ch_max / s).max(), bits)
        xq = ActQuant(scale, zp, bits).fake_quant(X / s)
        errors[round(alpha, 4)] = sum(float((xq @ fake_quant(W * s, wscheme).T - r).square().sum())
                                      for W, r in zip(Ws, refs))
    best = min(errors, key=errors.get)
    return best, errors


# Llama (pre-LN): per layer, (fold site, linears sharing its output). o_proj's input is not
# smoothed: with grouped-query attention one v_proj row feeds several query heads (the reason AWQ
# leaves it too, see awq._GROUPS).
_LLAMA = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)
_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "bert": "bert"}


class _ResidualScaled:
    """Mixin for a BERT ``*Output`` block: ``LayerNorm(dense(h) + input_tensor * residual_scale)``.

    BERT is post-LN: a LayerNorm's output feeds the next linears *and* the next residual add.
    Folding ``1 / s`` into that LayerNorm is made exact by multiplying the residual back by ``s``
    here (one elementwise multiply, exported as ``Mul``)."""

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states, input_tensor * self.residual_scale.to(input_tensor.dtype))


def _scale_residual(block: nn.Module, s: torch.Tensor) -> None:
    if not isinstance(block, _ResidualScaled):
        block.__class__ = type(f"ResidualScaled{type(block).__name__}", (_ResidualScaled, type(block)), {})
        block.register_buffer("residual_scale", torch.ones_like(s), persistent=False)
    block.residual_scale.mul_(s.to(block.residual_scale.device))


FoldSite = tuple[str, list[str], "str | None"]  # (site, linears fed by it, residual block to compensate)


def _sites(model: nn.Module, family: str) -> Iterator[FoldSite]:
    path = "model.layers" if family == "llama" else "encoder.layer"
    found = [n for n, _ in model.named_modules() if n == path or n.endswith("." + path)]
    if not found:
        raise EdgeCompressError(f"no {path!r} layer list in this {family} model", hint="a Hugging Face model is expected")
    root = found[0]
    n_layers = len(model.get_submodule(root))
    for i in range(n_layers):
        b = f"{root}.{i}"
        if family == "llama":
            for site, linears in _LLAMA:
                if not isinstance(model.get_submodule(f"{b}.{linears[0].split('.')[0]}"), RemovedSublayer):
                    yield f"{b}.{site}", [f"{b}.{n}" for n in linears], None  # (unless prune_layers removed it)
            continue
        qkv = [f"{b}.attention.self.{n}" for n in ("query", "key", "value")]
        prev_norm = f"{root[: -len(path)]}embeddings.LayerNorm" if i == 0 else f"{root}.{i - 1}.output.LayerNorm"
        yield prev_norm, qkv, f"{b}.attention.output"
        yield f"{b}.attention.self.value", [f"{b}.attention.output.dense"], None
        yield f"{b}.attention.output.LayerNorm", [f"{b}.intermediate.dense"], f"{b}.output"


def fold_sites(model: nn.Module) -> Iterator[tuple[str, nn.Module, list[str]]]:
    """``(fold site name, fold site module, names of the linears it feeds)`` for every site."""
    config = getattr(model, "config", None)
    family = _MODEL_TYPES.get(getattr(config, "model_type", None))
    if family is None:
        raise EdgeCompressError(
            f"SmoothQuant has no fold sites for model_type {getattr(config, 'model_type', None)!r}",
            hint=f"supported model types: {', '.join(sorted(_MODEL_TYPES))}")
    for site, linears, _ in _sites(model, family):
        yield site, model.get_submodule(site), linears


def _residual_of(model: nn.Module, site: str) -> str | None:
    family = _MODEL_TYPES[model.config.model_type]
    return next((r for s, _, r in _sites(model, family) if s == site), None)


@torch.no_grad()
def smoothquant_(model: nn.Module, act_stats: Callable[[str], dict[str, torch.Tensor]],
                 alpha: float | str = 0.5, grid: int = 11) -> list[dict[str, Any]]:
    """Smooth every fold site of ``model`` in place. ``act_stats(linear name)`` holds that linear's
    input statistics gathered before this call: ``absmax`` (per channel), and for ``alpha="auto"``
    also ``min``, ``max`` and sampled ``rows``, from which :func:`search_alpha` picks each site's
    alpha. Returns one manifest record per fold site."""
    records = []
    for site_name, site, names in fold_sites(model):
        linears = [model.get_submodule(n) for n in names]
        if not all(type(m) is nn.Linear for m in linears):
            raise EdgeCompressError(f"SmoothQuant needs float nn.Linear layers, but {names[0]} is "
                                    f"{type(linears[0]).__name__}",
                                    hint="put the smoothquant step before the quantize step")
        stats = act_stats(names[0])
        a = stats["absmax"]
        site_alpha = alpha
        if alpha == "auto":
            site_alpha, _ = search_alpha(stats["rows"], stats["min"], stats["max"], [m.weight for m in linears], grid)
        s = smooth_scales(a, [m.weight for m in linears], site_alpha)
        if isinstance(site, nn.Linear):
            fold_scales_into_linear(site, linears[0], s)
        else:
            fold_scales_into_norm(site, linears, s)
            residual = _residual_of(model, site_name)
            if residual is not None:
                _scale_residual(model.get_submodule(residual), s)
        before = float(a.max() / a.clamp(min=1e-8).median())
        after = float((a / s).max() / (a / s).clamp(min=1e-8).median())
        log.debug("SmoothQuant %s -> %s: act max/median %.1f -> %.1f", site_name, names, before, after)
        records.append({"step": "smoothquant", "scaled_from": site_name, "modules": names, "alpha": site_alpha,
                        "act_peak_to_median_before": before, "act_peak_to_median_after": after,
                        "s_min": float(s.min()), "s_max": float(s.max())})
    return records
