"""MLP channel pruning: each decoder layer's intermediate size shrinks to the channels that matter most.

A SiLU-gated MLP is ``down(silu(gate(x)) * up(x))``; channel ``j`` of the intermediate activation ``a`` reaches
the output only through column ``j`` of ``W_down``. Its importance is the expected energy it adds there,
``I_j = E[a_j^2] * ||W_down[:, j]||^2`` (a Wanda-style score: calibrated input mean square times the weight
norm), with ``E[a_j^2]`` observed on the calibration windows at ``down_proj``'s input. Each layer keeps its
``round((1 - fraction) * intermediate / multiple_of) * multiple_of`` most important channels (rows of
gate/up, columns of down), in their original order. The per-layer sizes go into
``config.layer_pruning["intermediate_sizes"]`` (:func:`.layers.restore_pruned_layers` rebuilds them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgecompress.compress.calibration.driver import StatRequest, calibrate
from edgecompress.errors import RecipeError

from .layers import _record, decoder_layers, has_sublayer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChannelPruneConfig:
    fraction: float = 0.25  # of each layer's intermediate channels removed
    multiple_of: int = 64  # kept channels per layer: a multiple of this (block-quantization friendly)

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"fraction must be in [0, 1), got {self.fraction}")
        if self.multiple_of < 1:
            raise ValueError(f"multiple_of must be >= 1, got {self.multiple_of}")


def channel_importance(W_down: torch.Tensor, meansq: torch.Tensor) -> torch.Tensor:
    """``I_j = E[a_j^2] * ||W_down[:, j]||^2`` for ``W_down [hidden, intermediate]``."""
    return meansq.float() * W_down.detach().float().square().sum(0)


def kept_count(intermediate: int, cfg: ChannelPruneConfig) -> int:
    k = round((1.0 - cfg.fraction) * intermediate / cfg.multiple_of) * cfg.multiple_of
    return min(max(k, cfg.multiple_of), intermediate)


def _sliced(lin: nn.Linear, idx: torch.Tensor, dim: int) -> nn.Linear:
    w = lin.weight.detach().index_select(dim, idx).clone()
    out = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, dtype=w.dtype)
    out.weight.data.copy_(w)
    if lin.bias is not None:
        out.bias.data.copy_(lin.bias.detach() if dim == 1 else lin.bias.detach()[idx])
    return out


def prune_mlp_channels_(mlp: nn.Module, keep: torch.Tensor) -> None:
    """Keep intermediate channels ``keep`` (sorted indices) of a Llama MLP, in place."""
    mlp.gate_proj = _sliced(mlp.gate_proj, keep, 0)
    mlp.up_proj = _sliced(mlp.up_proj, keep, 0)
    mlp.down_proj = _sliced(mlp.down_proj, keep, 1)


def apply_prune_channels(model: nn.Module, windows: torch.Tensor, cfg: ChannelPruneConfig, *,
                         progress: bool = False, batch_size: int = 1) -> list[dict[str, Any]]:
    """Prune every remaining MLP's intermediate channels by calibrated importance; one record per layer."""
    layers = decoder_layers(model)
    mlps = {i: layer.mlp for i, layer in enumerate(layers) if has_sublayer(layer, "mlp")}
    if not mlps:
        raise RecipeError("prune_mlp_channels: the model has no MLP sublayer left")
    bad = [f"model.layers.{i}.mlp.{n}" for i, m in mlps.items() for n in ("gate_proj", "up_proj", "down_proj")
           if type(getattr(m, n)) is not nn.Linear]
    if bad:
        raise RecipeError(f"prune_mlp_channels needs plain fp32 linears; {bad[0]} is already compressed",
                          hint="put prune_mlp_channels before quantize / sparsify / lowrank")
    pattern = "^model\\.layers\\.(" + "|".join(str(i) for i in mlps) + ")\\.mlp\\.down_proj$"
    store = calibrate(model, windows, [StatRequest(pattern, "meansq")], progress=progress, batch_size=batch_size)
    rec = _record(model.config)
    sizes = rec.get("intermediate_sizes") or [layer.mlp.gate_proj.out_features if has_sublayer(layer, "mlp") else 0
                                              for layer in layers]
    records = []
    for i, mlp in mlps.items():
        name = f"model.layers.{i}.mlp"
        n = mlp.down_proj.in_features
        score = channel_importance(mlp.down_proj.weight, store.get(f"{name}.down_proj", "meansq")["meansq"])
        k = kept_count(n, cfg)
        keep = torch.sort(torch.topk(score, k).indices).values
        prune_mlp_channels_(mlp, keep)
        sizes[i] = k
        records.append({"module": name, "intermediate_before": n, "intermediate_after": k,
                        "importance_kept": round(float(score[keep].sum() / score.sum().clamp_min(1e-30)), 6)})
    rec["intermediate_sizes"] = sizes
    model.config.layer_pruning = rec
    log.info("prune_mlp_channels: %d MLPs, intermediate %s", len(records),
             sorted({(r["intermediate_before"], r["intermediate_after"]) for r in records}))
    return records
