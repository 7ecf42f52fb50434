"""The steer transform: prompt sets -> direction per layer -> strength (given or searched) -> baked.

Thin adapter around :mod:`.directions` (pure) and :mod:`.bake` (weight rewrites). Activations
are read with the one calibration driver: the output of each chosen decoder block (the
residual stream after it), pooled per prompt (last token or mean over tokens) and kept in a
:class:`StatsStore` per prompt set, keyed by module name (``mean`` for difference of means,
``rows`` for PCA of paired differences).

The strength ``a`` scales the direction ``v`` as found (its natural size, see
:mod:`.directions`): ``add`` puts ``a v`` on the stream after each chosen layer; ``clamp`` fixes
the stream's component along ``u = v/|v|`` to ``a`` times the positive prompts' mean
component; ``ablate`` has no strength. With ``kl_bound`` and no strength, the largest ``a`` in
``(0, max_strength]`` whose KL(unsteered || steered) on neutral text stays under the bound is
found by bisection (KL grows with ``a``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from edgecompress.compress.calibration.driver import StatRequest, calibrate
from edgecompress.compress.calibration.store import StatsStore
from torch import nn

from edgecompress.errors import EdgeCompressError

from . import bake
from .directions import mean_difference, pca_of_differences, unit

log = logging.getLogger(__name__)

METHODS = ("mean_diff", "pca")
POSITIONS = ("last", "mean")
MODES = ("add", "ablate", "clamp")


@dataclass(frozen=True)
class SteerConfig:
    layers: tuple[int, ...]
    method: str = "mean_diff"  # mean_diff | pca
    position: str = "last"  # last | mean (token read per prompt)
    mode: str = "add"  # add | ablate | clamp
    strength: float | None = None  # None: searched under kl_bound (add, clamp)
    kl_bound: float | None = None
    max_strength: float = 16.0
    search_steps: int = 8

    def __post_init__(self) -> None:
        for key, value, choices in (("method", self.method, METHODS), ("position", self.position, POSITIONS),
                                    ("mode", self.mode, MODES)):
            if value not in choices:
                raise EdgeCompressError(f"steer.{key}: {value!r} is not one of {', '.join(choices)}")
        if not self.layers:
            raise EdgeCompressError("steer.layers: empty", hint="name at least one decoder layer index")
        if self.mode in ("ablate", "clamp") and len(self.layers) != 1:
            raise EdgeCompressError(f"steer.layers: {self.mode} reads one direction, got layers {list(self.layers)}",
                                    hint="give one layer; the direction is removed from every layer")
        if self.mode == "ablate" and self.strength is not None:
            raise EdgeCompressError("steer.strength: ablate has no strength",
                                    hint="drop strength, or use mode: clamp to set the component to a value")
        if self.mode != "ablate" and self.strength is None and self.kl_bound is None:
            raise EdgeCompressError(f"steer: mode {self.mode} needs strength or kl_bound",
                                    hint="set strength: (e.g. 4.0), or kl_bound: (e.g. 0.1) to search the "
                                    "largest strength whose KL on neutral text stays under it")


def layer_name(i: int) -> str:
    return f"model.layers.{i}"


def prompt_activations(model: nn.Module, prompts: Sequence[torch.Tensor], layers: tuple[int, ...],
                       position: str, stat: str) -> StatsStore:
    """``stat`` (``mean`` or ``rows``) of the residual stream after each of ``layers``, one row per
    prompt (its last token or its mean over tokens). Prompts are fed one at a time, unpadded."""
    block_type = type(model.model.layers[0])
    pattern = "^model\\.layers\\.(" + "|".join(str(i) for i in layers) + ")$"
    req = StatRequest(pattern, stat, where="output", module_types=(block_type,), tokens=position)
    return calibrate(model, [p.reshape(1, -1) for p in prompts], [req])


def directions(model: nn.Module, pos: Sequence[torch.Tensor], neg: Sequence[torch.Tensor],
               cfg: SteerConfig) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer: ``v`` (the direction at its natural size) and ``pos_mean``, ``neg_mean``."""
    if not pos or not neg:
        raise EdgeCompressError(f"steer: empty prompt set ({len(pos)} positive, {len(neg)} negative prompts)",
                                hint="give at least one prompt in each set (a few dozen steer well)")
    if cfg.method == "pca" and len(pos) != len(neg):
        raise EdgeCompressError(f"steer: method pca pairs the prompts, but there are {len(pos)} positive and "
                                f"{len(neg)} negative prompts", hint="give sets of equal size, or method: mean_diff")
    stat = "rows" if cfg.method == "pca" else "mean"
    sp = prompt_activations(model, pos, cfg.layers, cfg.position, stat)
    sn = prompt_activations(model, neg, cfg.layers, cfg.position, stat)
    out = {}
    for i in cfg.layers:
        key = f"{stat}@output"
        a, b = sp.get(layer_name(i), key)[stat], sn.get(layer_name(i), key)[stat]
        if cfg.method == "pca":
            v, pm, nm = pca_of_differences(a, b), a.mean(0), b.mean(0)
        else:
            v, pm, nm = mean_difference(a, b), a, b
        out[i] = {"v": v, "pos_mean": pm, "neg_mean": nm}
    return out


@contextlib.contextmanager
def added_to_stream(model: nn.Module, vectors: dict[int, torch.Tensor]) -> Iterator[None]:
    """Hooks that add ``vectors[i]`` to the output of block ``i`` (the unbaked reference of ``add``)."""
    handles = []

    def make(v: torch.Tensor) -> Callable:
        def hook(_m: nn.Module, _args: tuple, out):
            if isinstance(out, tuple):
                return (out[0] + v.to(out[0].dtype),) + tuple(out[1:])
            return out + v.to(out.dtype)
        return hook

    try:
        for i, v in vectors.items():
            handles.append(model.model.layers[i].register_forward_hook(make(v)))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def log_probs(model: nn.Module, windows: torch.Tensor) -> list[torch.Tensor]:
    return [F.log_softmax(model(input_ids=w[None], use_cache=False).logits[0].float(), dim=-1) for w in windows]


@torch.no_grad()
def neutral_kl(model: nn.Module, ref: list[torch.Tensor], windows: torch.Tensor) -> float:
    """Mean per-token KL(reference || model) over ``windows`` (``ref`` = the reference log-probs)."""
    total, n = 0.0, 0
    for r, lp in zip(ref, log_probs(model, windows)):
        total += float((r.exp() * (r - lp)).sum())
        n += r.shape[0]
    return total / max(n, 1)


def search_strength(kl_at: Callable[[float], float], kl_bound: float, max_strength: float,
                    steps: int) -> tuple[float, list[dict]]:
    """Largest ``a`` in ``(0, max_strength]`` with ``kl_at(a) <= kl_bound`` (KL grows with ``a``).

    Halves from ``max_strength`` until the bound holds (at most ``steps`` times), then bisects
    between that strength and its double ``steps`` times. Returns (strength, trace of every
    evaluation); 0 means even ``max_strength / 2**steps`` crossed the bound.
    """
    trace: list[dict] = []

    def feasible(a: float) -> bool:
        kl = kl_at(a)
        trace.append({"strength": a, "kl": kl})
        return kl <= kl_bound

    a = max_strength
    for _ in range(steps + 1):
        if feasible(a):
            break
        a /= 2
    else:
        return 0.0, trace
    if a == max_strength:
        return a, trace
    lo, hi = a, 2 * a
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
    return lo, trace


def apply_steering(model: nn.Module, pos: Sequence[torch.Tensor], neg: Sequence[torch.Tensor], cfg: SteerConfig,
                   neutral: torch.Tensor | None = None) -> list[dict]:
    """Bake the steering of ``cfg`` into ``model`` in place; one manifest record per steered layer.

    ``pos``/``neg`` are token-id tensors (one prompt each); ``neutral`` are windows of neutral text
    on which KL(unsteered || steered) is measured, searched against and reported.
    """
    bake.check_layers(model, cfg.layers, cfg.mode)
    if (cfg.kl_bound is not None) and neutral is None:
        raise EdgeCompressError("steer: kl_bound needs neutral text windows")
    found = directions(model, pos, neg, cfg)
    ref = log_probs(model, neutral) if neutral is not None else None
    kl_at: Callable[[float], float] = lambda _a: float("nan")

    extra: dict = {}
    if cfg.mode == "add":
        originals = {i: (None if (b := model.model.layers[i].mlp.down_proj.bias) is None else b.detach().clone())
                     for i in cfg.layers}

        def set_strength(a: float) -> None:
            for i in cfg.layers:
                down = model.model.layers[i].mlp.down_proj
                if down.bias is not None:
                    with torch.no_grad():
                        down.bias.copy_(originals[i] if originals[i] is not None else torch.zeros_like(down.bias))
                bake.add_bias(model, i, a * found[i]["v"])
        modules = {i: f"model.layers.{i}.mlp.down_proj" for i in cfg.layers}
    else:
        (i0,) = cfg.layers
        u = unit(found[i0]["v"])
        extra = bake.ablate(model, u, cfg.mode)
        base = model.get_input_embeddings().weight.detach().clone()
        c0 = float(found[i0]["pos_mean"].double() @ u.double())
        extra["positive_component"] = c0

        def set_strength(a: float) -> None:
            if cfg.mode == "clamp":
                bake.set_embedding_component(model, u, a * c0, base)
        modules = {i0: "model.embed_tokens" if cfg.mode == "clamp" else "residual writers"}

    if ref is not None:
        def kl_at(a: float) -> float:
            set_strength(a)
            return neutral_kl(model, ref, neutral)

    trace: list[dict] = []
    strength = cfg.strength
    if cfg.mode == "ablate":
        strength = None
    elif strength is None:
        strength, trace = search_strength(kl_at, cfg.kl_bound, cfg.max_strength, cfg.search_steps)
        if strength == 0.0:
            raise EdgeCompressError(
                f"steer: no strength keeps KL on neutral text under kl_bound {cfg.kl_bound}: even "
                f"{trace[-1]['strength']:.4g} gives KL {trace[-1]['kl']:.4g} (degenerate direction or layer)",
                hint="raise kl_bound, try another layer or position, or set strength: explicitly")
        log.info("steer: searched strength %.4g under KL %.4g", strength, cfg.kl_bound)
    set_strength(0.0 if strength is None else strength)
    kl = neutral_kl(model, ref, neutral) if ref is not None else None
    if cfg.kl_bound is not None and kl is not None and kl > cfg.kl_bound:
        raise EdgeCompressError(
            f"steer: strength {strength} gives KL {kl:.4g} on neutral text, over kl_bound {cfg.kl_bound} "
            "(the steering would damage ordinary text)",
            hint="lower strength, or drop strength to search the largest one under kl_bound")
    records = []
    for i in cfg.layers:
        v = found[i]["v"]
        u = unit(v)
        records.append({
            "module": modules[i], "layer": i, "read_at": f"output of {layer_name(i)}", "mode": cfg.mode,
            "method": cfg.method, "position": cfg.position, "strength": strength,
            "norm": float(v.double().norm()),
            "added_norm": None if cfg.mode != "add" else float(v.double().norm()) * abs(strength),
            "clamp_value": None if cfg.mode != "clamp" else strength * extra["positive_component"],
            "cos_pos_neg_means": float(F.cosine_similarity(found[i]["pos_mean"], found[i]["neg_mean"], dim=0)),
            "neutral_kl": kl, "kl_bound": cfg.kl_bound, "search": trace,
            "prompts": {"positive": len(pos), "negative": len(neg)},
            "direction": [float(x) for x in u],
            **{("writers" if k == "modules" else k): val for k, val in extra.items()},
        })
    return records
