"""Activation sparsity with calibrated thresholds: TEAL and WINA, per-layer allocation, the transform.

A decoder linear ``y = W x`` skips the columns ``W[:, j]`` whose input ``x_j`` is zero, so zeroing
small inputs saves memory traffic at decode time. Which entries are "small":

* **TEAL** (Liu et al. 2024, *Training-Free Activation Sparsity in Large Language Models*): ``|x_j| <= t``
  with one magnitude threshold ``t`` per tensor, read off a calibration histogram of ``|x|``;
* **WINA** (Chen et al. 2025, *Weight Informed Neuron Activation*): ``|x_j| * ||W[:, j]||_2 <= t``, the
  entry's contribution to ``||y||`` when W's columns are orthogonal; the column norms are folded into
  a per-input-channel threshold vector ``t / ||W[:, j]||_2`` so the model (and its ONNX form) applies
  one comparison ``|x| > threshold`` for both methods.

* **CATS** (Lee et al. 2024, *Contextually-Aware Thresholding for Sparsity in Large Language Models*):
  ``|silu(g_j)| <= t`` on the MLP's gated activation, one threshold per block at a uniform sparsity;
  a zeroed channel ``j`` needs neither row ``j`` of ``up_proj`` nor column ``j`` of ``down_proj``
  (two thirds of the MLP's weights), while gate_proj stays dense. :class:`CatsActivation` replaces
  the MLP's ``act_fn``.

Layers that read the same input (q/k/v; gate/up) share one sparsified input and one threshold, as
TEAL's fused kernels do (WINA's norms are those of the concatenated weight); o_proj and down_proj have
their own: four thresholded inputs per Llama block ("sites").

Allocation (``greedy``, TEAL Sec. 4.2 in spirit, made model-wide): on a few calibration windows the
dense model's block inputs are captured; for every site and every sparsity level on a grid, the cost
is the error of the block's output when only that site is sparsified (mean over tokens of
``||dh||^2 / ||h||^2``, per token so that the few massive-activation tokens do not dominate). Costs are
taken as additive, and the site whose next level costs the least error per skipped weight is raised,
repeatedly, until the parameter-weighted sparsity over the selected linears (the fraction of their
weight columns skipped, i.e. of the decoder's matmul reads) reaches the target; the last step is
interpolated so the target is met exactly. ``uniform`` puts every site at the target.

Thresholds are then calibrated sequentially (the one calibration driver, block by block): block ``i``'s
histograms are observed on the outputs of the already sparsified blocks ``0..i-1``. Inside a block the
four sites are observed in one pass, so o_proj's and down_proj's thresholds see the block's own q/k/v
and gate/up inputs dense (the achieved sparsity is measured afterwards and recorded).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from edgecompress.compress.calibration.driver import _main_output, _with_hidden, default_forward, sequential_calibrate
from edgecompress.compress.calibration.observers import LogHistogramObserver
from edgecompress.compress.prune.layers import RemovedSublayer
from edgecompress.compress.quant.rtn import _set_module, check_targets, select
from edgecompress.compress.quant.sequential import LINEAR_TYPES, _block_prefix, decoder_blocks
from edgecompress.errors import RecipeError

log = logging.getLogger(__name__)

METHODS = ("teal", "wina", "cats")
ALLOCATIONS = ("uniform", "greedy")
# the thresholded inputs of a Llama block: the site (the module whose input it is) and the linears reading it
SITES = (("self_attn.q_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
         ("self_attn.o_proj", ("self_attn.o_proj",)),
         ("mlp.gate_proj", ("mlp.gate_proj", "mlp.up_proj")),
         ("mlp.down_proj", ("mlp.down_proj",)))


@dataclass(frozen=True)
class ActSparsifyConfig:
    method: str = "teal"  # teal (|x|) | wina (|x| * column norm)
    sparsity: float = 0.4  # model-wide target: parameter-weighted over the selected linears
    allocation: str = "greedy"  # greedy (per-site levels from block-output costs) | uniform
    targets: tuple[str, ...] = (".*",)
    ignore: tuple[str, ...] = ()
    grid: float = 0.05  # greedy: spacing of the sparsity levels whose costs are measured
    max_level: float = 0.95  # greedy: highest sparsity a site may get
    cost_windows: int = 4  # greedy: calibration windows the costs are measured on
    cost_at: str = "block"  # greedy: error unit, block output | final hidden states (block curves rescaled)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.method == "cats" and self.allocation != "uniform":
            raise ValueError("cats thresholds every MLP at the same sparsity: allocation must be uniform")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if not 0.0 < self.grid <= self.max_level < 1.0:
            raise ValueError(f"need 0 < grid <= max_level < 1, got grid {self.grid}, max_level {self.max_level}")
        if self.cost_at not in ("final", "block"):
            raise ValueError(f"cost_at must be final or block, got {self.cost_at!r}")
        if self.allocation == "greedy" and self.sparsity > self.max_level:
            raise ValueError(f"sparsity {self.sparsity} is above max_level {self.max_level}")

    def levels(self) -> np.ndarray:
        n = int(round(self.max_level / self.grid))
        return np.minimum(np.arange(n + 1) * self.grid, self.max_level)


class ActSparseLinear(nn.Module):
    """A linear layer whose input entries with ``|x_j| <= threshold_j`` are zeroed first.

    ``threshold`` is a 0-d tensor (TEAL) or one value per input channel (WINA); ``inner`` is any linear
    format (``nn.Linear``, ``QuantLinear``, ``SparseLinear``). ``site`` names the shared input, so the
    layers reading it (q/k/v) are known to share one mask (and one ``threshold`` tensor).
    """

    def __init__(self, inner: nn.Module, threshold: torch.Tensor, *, site: str, method: str):
        super().__init__()
        self.inner = inner
        self.register_buffer("threshold", threshold.detach().to(torch.float32))
        self.site, self.method = site, method
        self.in_features, self.out_features = inner.in_features, inner.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.inner.bias

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        """The entries that survive: ``|x| > threshold`` (the ONNX function body computes the same)."""
        return x.abs() > self.threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.where(self.keep(x), x, torch.zeros((), dtype=x.dtype)))

    def extra_repr(self) -> str:
        return f"site={self.site}, method={self.method}, threshold={tuple(self.threshold.shape) or 'scalar'}"


class CatsActivation(nn.Module):
    """The MLP's activation with the outputs ``|act(g)| <= threshold`` zeroed (CATS); replaces ``mlp.act_fn``.

    ``site`` names the block's MLP (``model.layers.3.mlp``); ``threshold`` is a 0-d tensor."""

    def __init__(self, act: nn.Module, threshold: torch.Tensor, *, site: str):
        super().__init__()
        self.act = act
        self.register_buffer("threshold", threshold.detach().to(torch.float32))
        self.site = site

    def keep(self, y: torch.Tensor) -> torch.Tensor:
        return y.abs() > self.threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(x)
        return torch.where(self.keep(y), y, torch.zeros((), dtype=y.dtype))

    def extra_repr(self) -> str:
        return f"site={self.site}, threshold={float(self.threshold):.4g}"


def wina_scale(weights: list[torch.Tensor]) -> torch.Tensor:
    """WINA's per-input-channel factor: the column norms ``||W[:, j]||_2`` of the stacked weights reading
    one input (``[N_total, K]``), float32 ``[K]``."""
    return torch.cat([w.detach().float() for w in weights]).norm(dim=0)


def site_threshold(t: float, scale: torch.Tensor | None) -> torch.Tensor:
    """The tensor a site's layers compare ``|x|`` with: ``t`` (TEAL) or ``t / ||W[:, j]||`` (WINA)."""
    t32 = torch.tensor(t, dtype=torch.float32)
    return t32 if scale is None else (t32 / scale).to(torch.float32)


def allocate_greedy(costs: dict[str, np.ndarray], params: dict[str, int], levels: np.ndarray,
                    target: float) -> dict[str, float]:
    """Per-site sparsities with ``sum(p * s) / sum(p) == target``, by least marginal cost per weight.

    ``costs[site][k]`` is the error with the site at ``levels[k]`` (``costs[site][0]`` dense). Pure.
    """
    total = float(sum(params.values()))
    need, done = target * total, 0.0
    at = {site: 0 for site in costs}
    if need <= 0:
        return {site: 0.0 for site in costs}
    while True:
        open_ = [s for s in costs if at[s] + 1 < len(levels)]
        if not open_:
            raise ValueError(f"target {target} is above what the level grid (max {levels[-1]}) allows")

        def price(s: str) -> float:
            k = at[s]
            return (costs[s][k + 1] - costs[s][k]) / (params[s] * (levels[k + 1] - levels[k]))

        best = min(open_, key=price)
        k = at[best]
        gain = params[best] * (levels[k + 1] - levels[k])
        if done + gain >= need:
            out = {s: float(levels[at[s]]) for s in costs}
            out[best] = float(levels[k] + (need - done) / params[best])
            return out
        done += gain
        at[best] = k + 1


@dataclass
class Site:
    """One thresholded input: the module whose input it is, the selected linears reading it."""

    key: str
    block: int
    members: list[str]
    params: int
    scale: torch.Tensor | None = None
    level: float = 0.0
    threshold: float = 0.0
    hist: LogHistogramObserver = field(default_factory=LogHistogramObserver)


def _sites(model: nn.Module, blocks: nn.ModuleList, cfg: ActSparsifyConfig) -> list[Site]:
    check_targets(model, cfg.targets)
    sites, taken = [], []
    for i, block in enumerate(blocks):
        prefix = _block_prefix(model, block)
        for site, members in SITES:
            if isinstance(block.get_submodule(site.split(".")[0]), RemovedSublayer):  # removed by prune_layers
                continue
            chosen = [f"{prefix}.{m}" for m in members if select(f"{prefix}.{m}", cfg.targets, cfg.ignore)]
            mods = [model.get_submodule(n) for n in chosen]
            taken += [n for n, m in zip(chosen, mods) if isinstance(m, ActSparseLinear)]
            chosen = [n for n, m in zip(chosen, mods) if isinstance(m, LINEAR_TYPES)]
            if chosen:
                weights = [model.get_submodule(n).weight for n in chosen]
                scale = wina_scale(weights) if cfg.method == "wina" else None
                sites.append(Site(f"{prefix}.{site}", i, chosen, sum(w.numel() for w in weights), scale))
    if taken:
        raise RecipeError(f"sparsify_activations twice: {taken[0]} is already activation-sparse",
                          hint="use one sparsify_activations step")
    if not sites:
        raise RecipeError("sparsify_activations selects no linear layer inside the decoder blocks",
                          hint="check targets/ignore (q/k/v/o/gate/up/down projections are thresholded)")
    return sites


def _set_threshold(model: nn.Module, site: Site, t: float | None) -> None:
    """Threshold every layer of ``site`` at ``t`` (None: dense); the layers share one tensor."""
    thr = site_threshold(-1.0 if t is None else t, None if t is None else site.scale)
    for name in site.members:
        model.get_submodule(name).threshold = thr


def _wrap(model: nn.Module, sites: list[Site], method: str) -> None:
    for site in sites:
        for name in site.members:
            _set_module(model, name, ActSparseLinear(model.get_submodule(name), torch.tensor(-1.0), site=site.key,
                                                     method=method))


@contextlib.contextmanager
def _score_hooks(model: nn.Module, sites: list[Site]) -> Iterator[None]:
    """Feed each site's histogram with its score ``|x|`` (TEAL) or ``|x| * ||W[:, j]||`` (WINA).

    Own hooks rather than a ``StatRequest``: the driver's observers see the module input ``x``, and
    WINA thresholds the scaled score. Removed in ``finally``.
    """
    handles = []

    def hook(site: Site):
        def fn(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            site.hist.update(x if site.scale is None else x * site.scale)
        return fn

    try:
        for site in sites:
            handles.append(model.get_submodule(site.members[0]).register_forward_pre_hook(hook(site)))
        yield
    finally:
        for h in handles:
            h.remove()


class _BlockInputs:
    """Records each block's (args, kwargs) when the driver first runs it (its observe pass); ``take(i)``
    hands them over and unhooks block ``i``, so the driver's second run (computing the next block's
    inputs) is not recorded. A forward (not pre-) hook, so the driver's capture of block 0's inputs,
    which aborts the forward there, records nothing. Every hook is removed by ``close`` (in ``finally``)."""

    def __init__(self, blocks: nn.ModuleList):
        self.seen: dict[int, list] = {i: [] for i in range(len(blocks))}
        self.recording = True
        self.handles = {i: b.register_forward_hook(self._hook(i), with_kwargs=True) for i, b in enumerate(blocks)}

    def _hook(self, i: int):
        def fn(_m: nn.Module, args: tuple, kwargs: dict, _out: Any) -> None:
            if self.recording:
                self.seen[i].append((args, kwargs))
        return fn

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Run later blocks (the cost propagation) without recording them as their inputs."""
        self.recording = False
        try:
            yield
        finally:
            self.recording = True

    def take(self, i: int) -> list:
        self.handles.pop(i).remove()
        return self.seen.pop(i)

    def close(self) -> None:
        for h in self.handles.values():
            h.remove()


@contextlib.contextmanager
def _capture_inputs(blocks: nn.ModuleList) -> Iterator[_BlockInputs]:
    captured = _BlockInputs(blocks)
    try:
        yield captured
    finally:
        captured.close()


def _rel_error(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    """Mean over tokens of ``||h - h_ref||^2 / ||h_ref||^2``."""
    errs = [((o - r).pow(2).sum(-1) / r.pow(2).sum(-1).clamp_min(1e-12)).flatten() for o, r in zip(outs, refs)]
    return float(torch.cat(errs).mean())


def _outputs(block: nn.Module, inputs: list) -> list[torch.Tensor]:
    return [_main_output(block(*args, **kwargs)) for args, kwargs in inputs]


def _final_states(model: nn.Module, blocks: nn.ModuleList, start: int, inputs: list,
                  hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    """``hidden`` (the outputs of block ``start - 1``) run through the remaining blocks and the final norm."""
    norm = getattr(getattr(model, "model", model), "norm", None)
    out = []
    for (args, kwargs), h in zip(inputs, hidden):
        for block in list(blocks)[start:]:
            a, k = _with_hidden(args, kwargs, h)
            h = _main_output(block(*a, **k))
        out.append(norm(h) if norm is not None else h)
    return out


def site_costs(model: nn.Module, batches: torch.Tensor, blocks: nn.ModuleList, sites: list[Site],
               levels: np.ndarray, *, cost_at: str = "block", progress: bool = False) -> dict[str, np.ndarray]:
    """Error of every site at every level, only that site sparsified (dense inputs).

    The curve is the block-output error; with ``cost_at="final"`` it is rescaled to the error of the
    final (normed) hidden states, by the ratio of the two measured once per site at the level nearest
    50% (the rest of the network run on the perturbed block output). That puts the costs of early and
    late blocks in one unit: what a perturbation does to the model's output, not to its own block's.
    The wrapped layers must be dense (threshold -1) on entry and are left so.
    """
    costs: dict[str, np.ndarray] = {}
    by_block = {i: [s for s in sites if s.block == i] for i in range(len(blocks))}
    mid = int(np.argmin(np.abs(levels - 0.5)))
    final_ref: list[torch.Tensor] = []

    def on_block(i: int, block: nn.Module, _store: Any) -> None:
        inputs = captured.take(i)
        local = [Site(s.key, s.block, s.members, s.params, s.scale) for s in by_block[i]]
        with torch.no_grad():
            with _score_hooks(model, local):
                reference = _outputs(block, inputs)
            if cost_at == "final" and not final_ref:
                with captured.paused():
                    final_ref.extend(_final_states(model, blocks, i + 1, inputs, reference))
            for site in local:
                row = np.zeros(len(levels))
                for k, level in enumerate(levels[1:], start=1):
                    _set_threshold(model, site, site.hist.threshold_for_sparsity(float(level)))
                    outs = _outputs(block, inputs)
                    row[k] = _rel_error(outs, reference)
                    if cost_at == "final" and k == mid and row[k] > 0:
                        with captured.paused():
                            final = _final_states(model, blocks, i + 1, inputs, outs)
                        gain = _rel_error(final, final_ref) / row[k]
                _set_threshold(model, site, None)
                costs[site.key] = row * gain if cost_at == "final" and row[mid] > 0 else row

    with _capture_inputs(blocks) as captured:
        sequential_calibrate(model, batches, blocks, [], on_block, progress=progress)
    return costs


def greedy_costs(model: nn.Module, batches: torch.Tensor, cfg: ActSparsifyConfig, *,
                 progress: bool = False) -> dict[str, np.ndarray]:
    """:func:`site_costs` of ``model``'s selected sites (on a wrapped copy; ``model`` is left alone), so
    several targets can be allocated from one measurement."""
    import copy

    work = copy.deepcopy(model)
    blocks = decoder_blocks(work)
    sites = _sites(work, blocks, cfg)
    _wrap(work, sites, cfg.method)
    return site_costs(work, batches[: cfg.cost_windows], blocks, sites, cfg.levels(), cost_at=cfg.cost_at,
                      progress=progress)


def calibrate_thresholds(model: nn.Module, batches: torch.Tensor, blocks: nn.ModuleList, sites: list[Site], *,
                         progress: bool = False, batch_size: int = 1) -> None:
    """Set each site's threshold at its ``level``, block by block on the already sparsified earlier blocks."""
    by_block = {i: [s for s in sites if s.block == i] for i in range(len(blocks))}

    def on_block(i: int, block: nn.Module, _store: Any) -> None:
        live = [s for s in by_block[i] if s.level > 0]
        with torch.no_grad(), _score_hooks(model, live):
            for args, kwargs in captured.take(i):
                block(*args, **kwargs)
        for site in live:
            site.threshold = site.hist.threshold_for_sparsity(site.level)
            _set_threshold(model, site, site.threshold)

    with _capture_inputs(blocks) as captured:
        sequential_calibrate(model, batches, blocks, [], on_block, progress=progress, batch_size=batch_size)


def measure_sparsity(model: nn.Module, batches: torch.Tensor, *, batch_size: int = 1) -> dict[str, Any]:
    """Fraction of zeroed inputs per site on ``batches`` (decoder only) and their parameter-weighted mean."""
    first = {}
    params: dict[str, int] = {}
    for _, mod in model.named_modules():
        if isinstance(mod, ActSparseLinear):
            first.setdefault(mod.site, mod)
            params[mod.site] = params.get(mod.site, 0) + mod.weight.numel()
    zeros = dict.fromkeys(first, 0)
    total = dict.fromkeys(first, 0)
    handles = []

    def hook(site: str):
        def fn(m: ActSparseLinear, args: tuple) -> None:
            keep = m.keep(args[0])
            zeros[site] += int((~keep).sum())
            total[site] += keep.numel()
        return fn

    decoder = getattr(model, "model", model)
    try:
        handles = [m.register_forward_pre_hook(hook(s)) for s, m in first.items()]
        with torch.no_grad():
            for batch in batches.split(batch_size):
                default_forward(decoder, batch)
    finally:
        for h in handles:
            h.remove()
    per_site = {s: zeros[s] / max(total[s], 1) for s in first}
    all_params = sum(params.values())
    overall = sum(per_site[s] * params[s] for s in first) / all_params if all_params else 0.0
    return {"sparsity": overall, "per_site": per_site, "params": params}


def apply_act_sparsify(model: nn.Module, batches: torch.Tensor, cfg: ActSparsifyConfig, *, progress: bool = False,
                       batch_size: int = 1, costs: dict[str, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """Wrap the selected decoder linears in :class:`ActSparseLinear` with calibrated thresholds, in place.

    ``costs``: per-site costs from :func:`site_costs` on this model (reused across targets by the
    benchmark); measured here when the allocation is greedy and none are given. Returns one manifest
    record per site.
    """
    blocks = decoder_blocks(model)
    if cfg.method == "cats":
        return apply_cats(model, batches, blocks, cfg, progress=progress, batch_size=batch_size)
    sites = _sites(model, blocks, cfg)
    _wrap(model, sites, cfg.method)
    levels = cfg.levels()
    if cfg.allocation == "greedy":
        if costs is None:
            costs = site_costs(model, batches[: cfg.cost_windows], blocks, sites, levels, cost_at=cfg.cost_at,
                               progress=progress)
        alloc = allocate_greedy({s.key: costs[s.key] for s in sites}, {s.key: s.params for s in sites}, levels,
                                cfg.sparsity)
    else:
        alloc = {s.key: cfg.sparsity for s in sites}
    for site in sites:
        site.level = alloc[site.key]
    calibrate_thresholds(model, batches, blocks, sites, progress=progress, batch_size=batch_size)
    for site in sites:
        if site.level == 0:  # a dense site keeps its plain layers
            for name in site.members:
                _set_module(model, name, model.get_submodule(name).inner)
    measured = measure_sparsity(model, batches, batch_size=batch_size)["per_site"]
    records = [{"module": s.key, "members": s.members, "format": "act-sparse", "method": cfg.method,
                "allocation": cfg.allocation, "target_sparsity": round(s.level, 6),
                "threshold": s.threshold, "calibration_sparsity": round(measured.get(s.key, 0.0), 6),
                "params": s.params} for s in sites]
    total = sum(s.params for s in sites)
    achieved = sum(r["calibration_sparsity"] * r["params"] for r in records) / total
    log.info("sparsify_activations %s %s: %d sites, %.1f%% of their inputs zeroed on the calibration data "
             "(parameter-weighted; target %.1f%%)", cfg.method, cfg.allocation, len(sites), 100 * achieved,
             100 * cfg.sparsity)
    return records


def _cats_sites(model: nn.Module, blocks: nn.ModuleList, cfg: ActSparsifyConfig) -> list[tuple[int, str]]:
    """``(block, mlp name)`` of every selected MLP: ``targets``/``ignore`` match ``model.layers.i.mlp.act_fn``."""
    check_targets(model, cfg.targets)
    out = []
    for i, block in enumerate(blocks):
        mlp = getattr(block, "mlp", None)
        if mlp is None or isinstance(mlp, RemovedSublayer) or not hasattr(mlp, "act_fn"):
            continue
        name = f"{_block_prefix(model, block)}.mlp"
        if isinstance(mlp.act_fn, CatsActivation) or any(isinstance(m, ActSparseLinear) for m in mlp.modules()):
            raise RecipeError(f"sparsify_activations twice: {name} is already activation-sparse",
                              hint="use one sparsify_activations step")
        if select(f"{name}.act_fn", cfg.targets, cfg.ignore):
            out.append((i, name))
    if not out:
        raise RecipeError("sparsify_activations method cats selects no MLP (targets/ignore match "
                          "model.layers.N.mlp.act_fn)", hint="check targets/ignore")
    return out


def apply_cats(model: nn.Module, batches: torch.Tensor, blocks: nn.ModuleList, cfg: ActSparsifyConfig, *,
               progress: bool = False, batch_size: int = 1) -> list[dict[str, Any]]:
    """CATS: each selected MLP's activation gets the threshold at which a fraction ``cfg.sparsity`` of its
    outputs ``|silu(g)|`` are at or below it, calibrated block by block on the already sparsified earlier
    blocks (the same sequential pass as TEAL's thresholds)."""
    sites = dict(_cats_sites(model, blocks, cfg))
    hists: dict[int, LogHistogramObserver] = {}
    thresholds: dict[int, float] = {}

    def on_block(i: int, block: nn.Module, _store: Any) -> None:
        if i not in sites:
            return
        hist = hists[i] = LogHistogramObserver()
        h = block.mlp.act_fn.register_forward_hook(lambda _m, _a, out: hist.update(out.detach().float()))
        try:
            with torch.no_grad():
                for args, kwargs in captured.take(i):
                    block(*args, **kwargs)
        finally:
            h.remove()
        thresholds[i] = hist.threshold_for_sparsity(cfg.sparsity) if cfg.sparsity > 0 else -1.0
        block.mlp.act_fn = CatsActivation(block.mlp.act_fn, torch.tensor(thresholds[i]), site=sites[i])

    with _capture_inputs(blocks) as captured:
        sequential_calibrate(model, batches, blocks, [], on_block, progress=progress, batch_size=batch_size)
    measured = measure_cats_sparsity(model, batches, batch_size=batch_size)
    records = []
    for i, name in sites.items():
        mlp = blocks[i].mlp
        params = mlp.up_proj.weight.numel() + mlp.down_proj.weight.numel()  # the weights a zero lets a kernel skip
        records.append({"module": name, "members": [f"{name}.up_proj", f"{name}.down_proj"], "format": "act-sparse",
                        "method": "cats", "allocation": "uniform", "target_sparsity": round(cfg.sparsity, 6),
                        "threshold": thresholds[i], "calibration_sparsity": round(measured["per_site"][name], 6),
                        "params": params})
    log.info("sparsify_activations cats: %d MLPs, %.1f%% of their gated activations zeroed on the calibration data "
             "(target %.1f%%)", len(records), 100 * measured["sparsity"], 100 * cfg.sparsity)
    return records


def measure_cats_sparsity(model: nn.Module, batches: torch.Tensor, *, batch_size: int = 1) -> dict[str, Any]:
    """Fraction of zeroed gated activations per CATS MLP on ``batches``, and their mean."""
    mods = {m.site: m for m in model.modules() if isinstance(m, CatsActivation)}
    zeros, total = dict.fromkeys(mods, 0), dict.fromkeys(mods, 0)

    def hook(site: str):
        def fn(m: CatsActivation, _args: tuple, out: torch.Tensor) -> None:
            zeros[site] += int((out == 0).sum())
            total[site] += out.numel()
        return fn

    handles = [m.register_forward_hook(hook(s)) for s, m in mods.items()]
    try:
        with torch.no_grad():
            for batch in batches.split(batch_size):
                default_forward(getattr(model, "model", model), batch)
    finally:
        for h in handles:
            h.remove()
    per_site = {s: zeros[s] / max(total[s], 1) for s in mods}
    return {"sparsity": sum(per_site.values()) / max(len(per_site), 1), "per_site": per_site}
