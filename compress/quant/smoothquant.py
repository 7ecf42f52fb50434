"""SmoothQuant: migrate activation outliers into the weights before W8A8 quantization.

Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models". For a linear ``y = x Wᵀ`` whose input channel ``j`` has calibrated
abs-max ``max|X_j|``, ``s_j = max|X_j|^α / max|W_:,j|^(1-α)``; ``x / s`` is easier to quantize
per tensor and ``W diag(s)`` absorbs the difference, so ``(x / s)(W diag(s))ᵀ = x Wᵀ``
exactly. The division by ``s`` is folded into the op that produces ``x`` (an RMSNorm's
weight, or the rows of a linear whose output feeds ``x`` channel by channel), so the model
keeps its structure and the export is unchanged.

Pure core: :func:`smooth_scales`. Thin adapter: :func:`smoothquant_` over the fold sites of
a model family (:func:`fold_sites`), reusing AWQ's exact folds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

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


# family -> (layer list path, [(fold site, linears sharing its output)]) relative to one layer.
# BERT is post-LN: a LayerNorm's output is also the residual stream, so folding into it would
# change the residual; only value -> attention output (linear in V per head) folds exactly.
# Llama's o_proj input is not smoothed: with grouped-query attention one v_proj row feeds
# several query heads (the same reason AWQ leaves it, see awq._GROUPS).
_FAMILIES: dict[str, tuple[str, tuple[tuple[str, tuple[str, ...]], ...]]] = {
    "llama": ("model.layers", (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    )),
    "bert": ("encoder.layer", (
        ("attention.self.value", ("attention.output.dense",)),
    )),
}
_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "bert": "bert"}


def fold_sites(model: nn.Module) -> Iterator[tuple[str, nn.Module, list[str]]]:
    """``(fold site name, fold site module, names of the linears it feeds)`` for every layer."""
    config = getattr(model, "config", None)
    family = _MODEL_TYPES.get(getattr(config, "model_type", None))
    if family is None:
        raise EdgeCompressError(
            f"SmoothQuant has no fold sites for model_type {getattr(config, 'model_type', None)!r}",
            hint=f"supported model types: {', '.join(sorted(_MODEL_TYPES))}")
    path, groups = _FAMILIES[family]
    found = [n for n, _ in model.named_modules() if n == path or n.endswith("." + path)]
    if not found:
        raise EdgeCompressError(f"no {path!r} layer list in this {family} model", hint="a Hugging Face model is expected")
    for i, layer in enumerate(model.get_submodule(found[0])):
        base = f"{found[0]}.{i}"
        for site, linears in groups:
            yield f"{base}.{site}", layer.get_submodule(site), [f"{base}.{n}" for n in linears]


@torch.no_grad()
def smoothquant_(model: nn.Module, act_absmax: Callable[[str], torch.Tensor], alpha: float = 0.5) -> list[dict[str, Any]]:
    """Smooth every fold site of ``model`` in place; ``act_absmax(linear name)`` is the
    per-channel abs-max of that linear's input, calibrated before this call. Returns one
    manifest record per fold site."""
    records = []
    for site_name, site, names in fold_sites(model):
        linears = [model.get_submodule(n) for n in names]
        if not all(type(m) is nn.Linear for m in linears):
            raise EdgeCompressError(f"SmoothQuant needs float nn.Linear layers, but {names[0]} is "
                                    f"{type(linears[0]).__name__}",
                                    hint="put the smoothquant step before the quantize step")
        a = act_absmax(names[0])
        s = smooth_scales(a, [m.weight for m in linears], alpha)
        if isinstance(site, nn.Linear):
            fold_scales_into_linear(site, linears[0], s)
        else:
            fold_scales_into_norm(site, linears, s)
        before = float(a.max() / a.clamp(min=1e-8).median())
        after = float((a / s).max() / (a / s).clamp(min=1e-8).median())
        log.debug("SmoothQuant %s -> %s: act max/median %.1f -> %.1f", site_name, names, before, after)
        records.append({"step": "smoothquant", "scaled_from": site_name, "modules": names, "alpha": alpha,
                        "act_peak_to_median_before": before, "act_peak_to_median_after": after,
                        "s_min": float(s.min()), "s_max": float(s.max())})
    return records
