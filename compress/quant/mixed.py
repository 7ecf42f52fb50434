"""Mixed precision by measured sensitivity, under a bits-per-weight budget.

A *unit* is what one exported kernel holds: the fused q/k/v projection, o_proj, the fused
gate/up projection, down_proj of each decoder layer, and the LM head with the embedding it is
tied to. Each unit's sensitivity is the KL divergence of the model's next-token distribution
on calibration text when only that unit is quantized to its cheapest candidate format (fewest
stored bits for that unit's shape: with padding, blocks of 128 cost more than blocks of 64 when
there are 576 inputs). Units are then upgraded to richer formats, most sensitive per extra stored
bit first, while the whole model stays within the budget (bits counted exactly as the artifact
stores them: codes with block padding, fp16 scales, zero points; a tied tensor once).
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.errors import EdgeCompressError
from edgecompress.progress import track

from .formats import QuantScheme, quantize_blockwise
from .rtn import RTNConfig, apply_rtn

log = logging.getLogger(__name__)

GROUPS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


@dataclass
class Unit:
    name: str  # e.g. "model.layers.3.qkv" or "lm_head"
    modules: list[str] = field(default_factory=list)
    params: int = 0


def find_units(model: nn.Module) -> list[Unit]:
    """Units in model order: fused groups of decoder linears, other linears, and the (tied) head."""
    units: dict[str, Unit] = {}
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = isinstance(head, nn.Linear) and isinstance(emb, nn.Embedding) and head.weight is emb.weight
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear:
            continue
        prefix, _, leaf = name.rpartition(".")
        key = f"{prefix}.{GROUPS[leaf]}" if leaf in GROUPS else name
        unit = units.setdefault(key, Unit(key))
        unit.modules.append(name)
        unit.params += mod.weight.numel()
    if tied:
        emb_name = next(n for n, m in model.named_modules() if m is emb)
        head_name = next(n for n, m in model.named_modules() if m is head)
        units[head_name].modules.insert(0, emb_name)  # quantizing the embedding quantizes the tied head
    return list(units.values())


def unit_bits(model: nn.Module, unit: Unit, scheme: QuantScheme) -> int:
    """Stored bits of ``unit`` in ``scheme`` (fp16 scales; a tied embedding/head counted once)."""
    seen: set[int] = set()
    total = 0
    for name in unit.modules:
        w = model.get_submodule(name).weight
        if id(w) not in seen:
            seen.add(id(w))
            total += quantize_blockwise(w, scheme).storage_bits(16 if scheme.scale_dtype == "float16" else 32)
    return total


def _quantize_unit(model: nn.Module, unit: Unit, scheme: QuantScheme) -> None:
    targets = tuple(f"^{re.escape(n)}$" for n in unit.modules)
    apply_rtn(model, RTNConfig.from_scheme(scheme, targets=targets, embeddings=True))


@torch.no_grad()
def measure_sensitivity(model: nn.Module, windows: torch.Tensor, units: list[Unit],
                        scheme: QuantScheme | dict[str, QuantScheme], *, progress: bool = False) -> dict[str, float]:
    """KL(full || unit-quantized) per unit, mean over the tokens of ``windows``.

    ``scheme`` is one format for every unit, or ``{unit name: format}``.
    """
    model.eval()
    ref = [F.log_softmax(model(input_ids=w[None], use_cache=False).logits[0].float(), -1) for w in windows]
    out: dict[str, float] = {}
    for unit in track(units, len(units), "measuring sensitivity", progress):
        saved = {n: model.get_submodule(n) for n in unit.modules}
        _quantize_unit(model, unit, scheme[unit.name] if isinstance(scheme, dict) else scheme)
        kl = 0.0
        for w, r in zip(windows, ref):
            lp = F.log_softmax(model(input_ids=w[None], use_cache=False).logits[0].float(), -1)
            kl += float((r.exp() * (r - lp)).sum(-1).mean())
        out[unit.name] = kl / len(windows)
        for n, m in saved.items():  # restore the float modules (a tied pair still shares its weight)
            parent, _, child = n.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, m)
    return out


def _cheapest(costs: list[int]) -> int:
    return min(range(len(costs)), key=costs.__getitem__)


def assign(units: list[Unit], sensitivity: dict[str, float], cost: dict[str, list[int]],
           budget_bits: float) -> tuple[dict[str, int], float]:
    """Candidate index per unit within ``budget_bits`` per weight; greedy by sensitivity per extra bit.

    ``cost[unit][c]`` is the unit's stored bits in candidate ``c``; candidates are listed in rising
    precision. Each unit starts at its own cheapest candidate (block padding can make a coarser block
    dearer for some shapes) and loses ``sensitivity`` there; a later, dearer candidate is taken to
    remove it, the most sensitive units per extra bit first, the most precise affordable one each.
    """
    params = sum(u.params for u in units)
    choice = {u.name: _cheapest(cost[u.name]) for u in units}
    spent = sum(cost[u.name][choice[u.name]] for u in units)
    if spent / params > budget_bits + 1e-9:
        raise EdgeCompressError(
            f"a budget of {budget_bits} bits per weight cannot be met: the cheapest format alone needs "
            f"{spent / params:.4f}", hint=f"raise budget_bits to at least {spent / params:.4f} or add a cheaper candidate")

    def span(u: Unit) -> int:
        return max(cost[u.name][-1] - cost[u.name][choice[u.name]], 1)

    for u in sorted(units, key=lambda u: sensitivity[u.name] / span(u), reverse=True):
        base = cost[u.name][choice[u.name]]
        for c in range(len(cost[u.name]) - 1, choice[u.name], -1):  # most precise affordable upgrade
            extra = cost[u.name][c] - base
            if (spent + extra) / params <= budget_bits + 1e-9:
                spent += extra
                choice[u.name] = c
                break
    return choice, spent / params


def plan_mixed_precision(model: nn.Module, windows: torch.Tensor, candidates: list[QuantScheme], budget_bits: float,
                         *, embeddings: bool = True, progress: bool = False) -> tuple[dict[str, QuantScheme], dict]:
    """Measure, assign and return ``{module name: scheme}`` plus a report for the manifest."""
    if len(candidates) < 1:
        raise EdgeCompressError("mixed precision needs at least one candidate format")
    units = [u for u in find_units(model)
             if embeddings or not any(isinstance(model.get_submodule(m), nn.Embedding) for m in u.modules)]
    cost = {u.name: [unit_bits(model, u, s) for s in candidates] for u in units}
    cheapest = {u.name: candidates[_cheapest(cost[u.name])] for u in units}
    probe = copy.deepcopy(model)
    sens = measure_sensitivity(probe, windows, units, cheapest, progress=progress)
    del probe
    choice, bpw = assign(units, sens, cost, budget_bits)
    plan = {m: candidates[choice[u.name]] for u in units for m in u.modules}
    report = {"budget_bits": budget_bits, "bits_per_weight": round(bpw, 4),
              "units": [{"unit": u.name, "modules": u.modules, "sensitivity_kl": round(sens[u.name], 6),
                         "format": f"int{candidates[choice[u.name]].bits}-b{candidates[choice[u.name]].block_size}"}
                        for u in units]}
    log.info("mixed precision: %.4f bits/weight (budget %s)", bpw, budget_bits)
    return plan, report
