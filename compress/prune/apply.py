"""The prune_layers transform: choose decoder blocks or attention/MLP sublayers by calibration evidence and
remove them (thin adapter over :mod:`.scores` and :mod:`.layers`).

Methods: ``greedy`` (FinerCut: output KL/JS re-scored after each removal), ``block_influence`` (ShortGPT:
``1 - cos(x_in, x_out)``, scored once) and ``given`` (the ``remove`` list, no data). The scores run on the
model as it is when the step runs (put prune_layers before quantize: the divergence is then the pruning's own).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgecompress.errors import RecipeError

from .layers import KINDS, decoder_layers, present_sublayers, remove_sublayers, sublayer_name
from .scores import DIVERGENCES, SublayerChain, Unit, block_influence, greedy_removal

log = logging.getLogger(__name__)

METHODS = ("greedy", "block_influence", "given")
GRANULARITIES = ("sublayer", "block")
NAME_RE = re.compile(r"model\.layers\.(\d+)(?:\.(self_attn|mlp))?")


@dataclass(frozen=True)
class PruneLayersConfig:
    method: str = "greedy"
    granularity: str = "sublayer"  # sublayer (attention and MLP separately) | block (whole decoder layers)
    fraction: float | None = None  # of the model's units (blocks or sublayers), rounded; or `count`
    count: int | None = None
    divergence: str = "kl"  # greedy: kl | js
    keep: tuple[str, ...] = ()  # regexes (re.search) over unit and sublayer names never removed
    remove: tuple[str, ...] = ()  # given: model.layers.N or model.layers.N.self_attn|mlp
    windows: int | None = None  # calibration windows the scores use (None: all)
    rescore: int | None = None  # greedy: re-score only this many best units after the first round (None: all)
    stride: int = 1  # greedy: the divergence is measured at every stride-th token (the decoder runs on all)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {self.divergence!r}")
        if self.method == "given":
            if not self.remove or self.fraction is not None or self.count is not None:
                raise ValueError("method 'given' takes a `remove` list and no fraction/count")
        elif self.remove or (self.fraction is None) == (self.count is None):
            raise ValueError(f"method {self.method!r} takes exactly one of fraction, count (and no `remove` list)")
        if self.fraction is not None and not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"fraction must be in [0, 1), got {self.fraction}")
        if self.count is not None and self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")
        if self.stride < 1 or (self.rescore is not None and self.rescore < 1) or (self.windows or 1) < 1:
            raise ValueError("stride, rescore and windows must be >= 1")


def units_of(model: nn.Module, granularity: str) -> dict[str, Unit]:
    """The removable units of the current model by name: ``model.layers.N`` -> its present sublayers, or
    ``model.layers.N.self_attn|mlp`` -> ``(s,)``."""
    present = present_sublayers(model)
    if granularity == "sublayer":
        return {sublayer_name(s): (s,) for s in present}
    blocks: dict[str, list[int]] = {}
    for s in present:
        blocks.setdefault(f"model.layers.{s // 2}", []).append(s)
    return {n: tuple(u) for n, u in blocks.items()}


def _kept(name: str, unit: Unit, keep: tuple[str, ...]) -> bool:
    names = [name, *(sublayer_name(s) for s in unit)]
    return any(re.search(k, n) for k in keep for n in names)


def _leaves_attention(present: set[int]) -> Callable[[set[int]], bool]:
    """A veto for removal sets that would leave no attention sublayer."""
    return lambda removed: any(s % 2 == 0 for s in present - removed)


def resolve_given(model: nn.Module, names: tuple[str, ...]) -> list[Unit]:
    """Units named by ``remove`` (indices of the model as the step sees it); every bad name reported at once."""
    n_layers = len(decoder_layers(model))
    present = set(present_sublayers(model))
    units, bad = [], []
    for name in names:
        m = NAME_RE.fullmatch(name)
        if m is None:
            what = ("the embedding" if "embed" in name else "the LM head" if "lm_head" in name
                    else "the final norm" if name.endswith("norm") else name)
            bad.append(f"{name!r}: {what} cannot be removed; name decoder blocks 'model.layers.N' or "
                       f"sublayers 'model.layers.N.self_attn' / 'model.layers.N.mlp'")
            continue
        i = int(m.group(1))
        if i >= n_layers:
            bad.append(f"{name!r}: the model has {n_layers} decoder layers (0..{n_layers - 1})")
            continue
        unit = tuple(s for s in (2 * i, 2 * i + 1) if s in present) if m.group(2) is None else \
            (2 * i + KINDS.index(m.group(2)),)
        if not set(unit) <= present or not unit:
            bad.append(f"{name!r}: already removed")
            continue
        units.append(unit)
    if bad:
        raise RecipeError("prune_layers.remove: " + "; ".join(bad))
    return units


def plan(model: nn.Module, windows: torch.Tensor, cfg: PruneLayersConfig, *,
         progress: bool = False) -> tuple[list[tuple[str, Unit, float | None]], dict[str, float]]:
    """What to remove: ``[(unit name, unit, score)]`` in removal order, and every unit's block influence
    (empty for ``given``). Raises RecipeError when the request cannot be met."""
    if cfg.method == "given":
        by_unit = {u: n for n, u in units_of(model, "block").items()} | \
                  {u: n for n, u in units_of(model, "sublayer").items()}
        return [(by_unit[u], u, None) for u in resolve_given(model, cfg.remove)], {}
    units = units_of(model, cfg.granularity)
    total = len(units)
    count = cfg.count if cfg.count is not None else round(cfg.fraction * total)
    what = "decoder blocks" if cfg.granularity == "block" else "sublayers"
    if count >= total:
        raise RecipeError(f"prune_layers would remove every decoder layer ({count} of the model's {total} {what})",
                          hint=f"remove fewer than {total} {what}")
    candidates = {n: u for n, u in units.items() if not _kept(n, u, cfg.keep)}
    if count > len(candidates):
        raise RecipeError(f"prune_layers: {count} {what} to remove, but only {len(candidates)} of {total} are not "
                          f"protected by keep {list(cfg.keep)}", hint="remove fewer, or keep less")
    if count == 0:
        log.warning("prune_layers removes nothing (count 0)")
        return [], {}
    batch = windows[: cfg.windows] if cfg.windows is not None else windows
    chain = SublayerChain(model, batch, stride=cfg.stride)
    allowed = _leaves_attention(set(present_sublayers(model)))
    name_of = {u: n for n, u in candidates.items()}
    influence = block_influence(chain, list(units.values()))
    scores = {n: round(influence[u], 6) for n, u in units.items()}
    if cfg.method == "block_influence":
        chosen: list[tuple[str, Unit, float | None]] = []
        removed: set[int] = set()
        for u in sorted(candidates.values(), key=lambda u: influence[u]):
            if len(chosen) == count:
                break
            if allowed(removed | set(u)):
                chosen.append((name_of[u], u, influence[u]))
                removed |= set(u)
    else:
        order = greedy_removal(chain, list(candidates.values()), count, divergence=cfg.divergence,
                               rescore=cfg.rescore, allowed=allowed, progress=progress)
        chosen = [(name_of[u], u, d) for u, d in order]
    if len(chosen) < count:
        raise RecipeError(f"prune_layers could remove only {len(chosen)} of {count} {what}: the rest would leave "
                          "no attention sublayer", hint="remove fewer, or use granularity: block")
    return chosen, scores


def _params(model: nn.Module, unit: Unit) -> int:
    layers = decoder_layers(model)
    return sum(p.numel() for s in unit for p in getattr(layers[s // 2], KINDS[s % 2]).parameters())


def apply_prune_layers(model: nn.Module, windows: torch.Tensor, cfg: PruneLayersConfig, *,
                       progress: bool = False) -> list[dict[str, Any]]:
    """Remove the chosen units in place; returns the manifest records (one summary, then one per unit)."""
    layers_before = len(decoder_layers(model))
    total = sum(p.numel() for p in model.parameters())
    chosen, influence = plan(model, windows, cfg, progress=progress)
    params = [_params(model, u) for _, u, _ in chosen]
    done = remove_sublayers(model, [s for _, u, _ in chosen for s in u]) if chosen else {"removed_original": []}
    original = iter(done["removed_original"])
    by_sublayer = {sublayer_name(s): next(original) for s in sorted(s for _, u, _ in chosen for s in u)}
    records = [{"module": name, "original": [by_sublayer[sublayer_name(s)] for s in u], "order": k,
                "score": None if score is None else round(score, 6),
                "score_kind": {"greedy": f"{cfg.divergence} after removal", "block_influence": "block influence",
                               "given": None}[cfg.method], "params": p}
               for k, ((name, u, score), p) in enumerate(zip(chosen, params))]
    summary = {"method": cfg.method, "granularity": cfg.granularity, "removed": len(chosen),
               "layers_before": layers_before, "layers_after": len(decoder_layers(model)),
               "params_removed": sum(params), "params_before": total,
               "layer_pruning": dict(getattr(model.config, "layer_pruning", None) or {}),
               "block_influence": influence}
    log.info("prune_layers %s: removed %s (%d parameters, %.1f%%)", cfg.method,
             ", ".join(r["module"] for r in records) or "nothing", sum(params), 100 * sum(params) / total)
    return [{"prune_layers": summary}, *records]
