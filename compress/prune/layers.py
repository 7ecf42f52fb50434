"""Removing decoder blocks and attention/MLP sublayers from a Llama-family model, and recording it in its config.

A decoder layer is two residual sublayers, ``h += self_attn(input_layernorm(h))`` then
``h += mlp(post_attention_layernorm(h))``. Sublayer ``s`` of a model with L layers is layer ``s // 2``'s
attention (even ``s``) or MLP (odd ``s``); its name is ``model.layers.{i}.self_attn`` / ``model.layers.{i}.mlp``.

Removing a sublayer replaces it with :class:`RemovedSublayer` (adds nothing) and its norm with ``nn.Identity``,
so the layer is the identity there and holds no weights for it. A layer whose two sublayers are both gone is
deleted from ``model.model.layers`` and ``config.num_hidden_layers`` shrinks. The attention layers left are
renumbered ``0..A-1`` (their ``layer_idx``): the KV cache holds one entry per remaining attention layer, in the
torch model as in the ONNX export (``past_key_values.{j}``).

``config.layer_pruning`` records what was removed (it goes into the artifact's config.json)::

    {"original_layers": 30,                 # num_hidden_layers before any pruning
     "layers": [0, 1, 3, ...],              # original index of each remaining layer
     "no_attention": [4, 9], "no_mlp": [7],  # remaining layers (new indices) without that sublayer
     "intermediate_sizes": [1152, ...]}      # only after prune_mlp_channels (see .channels)

:func:`restore_pruned_layers` applies that record to a model freshly built from the config (torch runtime).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from edgecompress.errors import RecipeError

log = logging.getLogger(__name__)

KINDS = ("self_attn", "mlp")
NORMS = {"self_attn": "input_layernorm", "mlp": "post_attention_layernorm"}


class RemovedSublayer(nn.Module):
    """A pruned attention or MLP sublayer: its residual branch adds zero (attention also returns no weights)."""

    def __init__(self, kind: str):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        zero = torch.zeros_like(hidden_states)
        return (zero, None) if self.kind == "self_attn" else zero

    def extra_repr(self) -> str:
        return self.kind


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """``model.model.layers`` of a Llama-family causal LM; a clear error for any other model."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    ok = isinstance(layers, nn.ModuleList) and len(layers) > 0 and all(
        hasattr(m, k) for m in layers for k in (*KINDS, *NORMS.values()))
    if not ok:
        raise RecipeError(f"prune_layers needs a Llama-family decoder (model.layers.N.self_attn|mlp); "
                          f"{type(model).__name__} is not one")
    if getattr(model.config, "layer_types", None) is not None:
        raise RecipeError(f"prune_layers does not handle per-layer attention types yet "
                          f"({model.config.model_type}: config.layer_types)")
    return layers


def has_sublayer(layer: nn.Module, kind: str) -> bool:
    return not isinstance(getattr(layer, kind), RemovedSublayer)


def sublayer_name(s: int) -> str:
    return f"model.layers.{s // 2}.{KINDS[s % 2]}"


def present_sublayers(model: nn.Module) -> list[int]:
    """Indices ``s`` of the sublayers the model still has."""
    return [2 * i + k for i, layer in enumerate(decoder_layers(model)) for k, kind in enumerate(KINDS)
            if has_sublayer(layer, kind)]


def _record(config) -> dict[str, Any]:
    rec = getattr(config, "layer_pruning", None)
    if rec:
        return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in rec.items()}
    n = config.num_hidden_layers
    return {"original_layers": n, "layers": list(range(n)), "no_attention": [], "no_mlp": []}


def remove_sublayers(model: nn.Module, removed: Iterable[int]) -> dict[str, Any]:
    """Remove sublayers ``removed`` (indices into the current model) in place; returns what was done.

    Refuses (RecipeError) a sublayer that is not there, removing every sublayer, or every attention
    sublayer (the decoder would have no KV cache and no token mixing)."""
    layers = decoder_layers(model)
    removed = sorted(set(removed))
    present = set(present_sublayers(model))
    missing = [s for s in removed if s not in present]
    if missing:
        raise RecipeError(f"prune_layers: {', '.join(sublayer_name(s) for s in missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not in the model "
                          f"({len(layers)} decoder layers, {len(present)} sublayers left)")
    left = present - set(removed)
    if not left:
        raise RecipeError("prune_layers would remove every decoder layer",
                          hint="remove fewer layers (a smaller count or fraction), or keep some with `keep`")
    if not any(s % 2 == 0 for s in left):
        raise RecipeError("prune_layers would remove every attention sublayer (no token would see another)",
                          hint="keep at least one attention sublayer (`keep: ['self_attn']` keeps them all)")
    rec = _record(model.config)
    original = [sublayer_name(2 * rec["layers"][s // 2] + s % 2) for s in removed]
    for s in removed:
        layer, kind = layers[s // 2], KINDS[s % 2]
        setattr(layer, kind, RemovedSublayer(kind))
        setattr(layer, NORMS[kind], nn.Identity())
    keep = [i for i, layer in enumerate(layers) if any(has_sublayer(layer, k) for k in KINDS)]
    model.model.layers = nn.ModuleList(layers[i] for i in keep)
    rec["layers"] = [rec["layers"][i] for i in keep]
    if "intermediate_sizes" in rec:  # prune_mlp_channels ran before
        rec["intermediate_sizes"] = [rec["intermediate_sizes"][i] for i in keep]
    _finish(model, rec)
    log.info("removed %d sublayers: %s", len(removed), ", ".join(original))
    return {"removed": [sublayer_name(s) for s in removed], "removed_original": original,
            "layers": len(keep), "attention_layers": len(rec["layers"]) - len(rec["no_attention"]),
            "mlp_layers": len(rec["layers"]) - len(rec["no_mlp"])}


def _finish(model: nn.Module, rec: dict[str, Any]) -> None:
    """Renumber the remaining attention layers' cache slots and write the record into the config."""
    layers = model.model.layers
    rec["no_attention"] = [i for i, m in enumerate(layers) if not has_sublayer(m, "self_attn")]
    rec["no_mlp"] = [i for i, m in enumerate(layers) if not has_sublayer(m, "mlp")]
    slot = 0
    for m in layers:
        if has_sublayer(m, "self_attn"):
            m.self_attn.layer_idx = slot
            slot += 1
    model.config.num_hidden_layers = len(layers)
    model.config.layer_pruning = rec


def restore_pruned_layers(model: nn.Module) -> nn.Module:
    """Apply ``model.config.layer_pruning`` to a model built from that config (its layers already counted):
    the recorded sublayers become :class:`RemovedSublayer`, the attention layers are renumbered."""
    rec = getattr(model.config, "layer_pruning", None)
    if not rec:
        return model
    layers = decoder_layers(model)
    if len(layers) != len(rec["layers"]):
        raise ValueError(f"config.layer_pruning lists {len(rec['layers'])} layers, the model has {len(layers)}")
    for key, kind in (("no_attention", "self_attn"), ("no_mlp", "mlp")):
        for i in rec[key]:
            setattr(layers[i], kind, RemovedSublayer(kind))
            setattr(layers[i], NORMS[kind], nn.Identity())
    for i, size in enumerate(rec.get("intermediate_sizes") or []):  # prune_mlp_channels: smaller MLPs
        mlp = layers[i].mlp
        if has_sublayer(layers[i], "mlp") and size != mlp.gate_proj.out_features:
            h, bias = mlp.gate_proj.in_features, mlp.down_proj.bias is not None
            mlp.gate_proj = nn.Linear(h, size, bias=mlp.gate_proj.bias is not None)
            mlp.up_proj = nn.Linear(h, size, bias=mlp.up_proj.bias is not None)
            mlp.down_proj = nn.Linear(size, h, bias=bias)
    _finish(model, dict(rec))
    return model
