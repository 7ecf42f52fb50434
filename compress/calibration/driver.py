"""The one calibration driver: forward passes with observer hooks, filling a StatsStore.

* :class:`StatRequest` says which modules (regex on qualified names) get which
  statistic on their input or output.
* :func:`observe` is the thin hook adapter: it attaches observers, and removes every
  hook in ``finally``.
* :func:`calibrate` runs the model once over the data.
* :func:`sequential_calibrate` goes block by block (as GPTQ does): block ``i`` is
  observed on the outputs of the already *modified* blocks ``0..i-1``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from edgecompress.compress.calibration.observers import OBSERVERS, Observer
from edgecompress.compress.calibration.store import StatsStore
from edgecompress.errors import EdgeCompressError, RecipeError
from edgecompress.progress import track

log = logging.getLogger(__name__)

Batch = Any  # a LongTensor [B, T] of token ids, or a dict of model inputs
ForwardFn = Callable[[nn.Module, Batch], Any]
ObserverMap = dict[tuple[str, str], Observer]


@dataclass(frozen=True)
class StatRequest:
    """Observe ``stat`` on the ``where`` side of modules whose name ``re.search``-es ``pattern``.

    Only modules that are instances of ``module_types`` match. Output statistics are
    stored under ``"{stat}@output"`` (see :attr:`key`) so input and output of one
    module never collide. ``tokens`` pools each sequence ``[B, T, C]`` before the
    observer sees it: ``"all"`` (every token), ``"last"`` (the last token of each
    sequence) or ``"mean"`` (the mean over its tokens), so a prompt set gives one row
    per prompt (feed unpadded prompts one per batch); ``"after_first"`` drops each
    sequence's first token (a float prefix that static activation ranges must not see).
    """

    pattern: str
    stat: str
    where: Literal["input", "output"] = "input"
    module_types: tuple[type[nn.Module], ...] = field(default=(nn.Linear,))
    tokens: Literal["all", "last", "mean", "after_first"] = "all"

    def __post_init__(self) -> None:
        if self.stat not in OBSERVERS:
            raise RecipeError(f"unknown statistic {self.stat!r}", hint=f"use one of {', '.join(sorted(OBSERVERS))}")
        if self.where not in ("input", "output"):
            raise RecipeError(f"where must be 'input' or 'output', got {self.where!r}")
        if self.tokens not in ("all", "last", "mean", "after_first"):
            raise RecipeError(f"tokens must be 'all', 'last', 'mean' or 'after_first', got {self.tokens!r}")
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise RecipeError(f"bad module pattern {self.pattern!r}: {exc}", hint="write a Python regex") from exc

    @property
    def key(self) -> str:
        """The stat name in the store."""
        return self.stat if self.where == "input" else f"{self.stat}@output"

    def matches(self, name: str, module: nn.Module) -> bool:
        """Whether this request applies to ``module`` named ``name``."""
        return isinstance(module, self.module_types) and re.search(self.pattern, name) is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description (recorded in the store's meta.json)."""
        types = [f"{t.__module__}.{t.__qualname__}" for t in self.module_types]
        out = {"pattern": self.pattern, "stat": self.stat, "where": self.where, "module_types": types}
        return out if self.tokens == "all" else {**out, "tokens": self.tokens}

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the observer sees it: every token, or one row per sequence (see ``tokens``)."""
        if self.tokens == "all":
            return x
        if x.dim() < 3:
            raise TypeError(f"tokens={self.tokens!r} needs [batch, tokens, channels] activations, got {tuple(x.shape)}")
        if self.tokens == "after_first":
            return x[:, 1:]
        return x[:, -1] if self.tokens == "last" else x.mean(dim=1)


def resolve(
    model: nn.Module, requests: Sequence[StatRequest], *, within: nn.Module | None = None
) -> list[tuple[str, nn.Module, StatRequest]]:
    """(qualified name, module, request) for every match, optionally only inside ``within``."""
    inside = None if within is None else {id(m) for m in within.modules()}
    out, seen = [], set()
    for name, module in model.named_modules():
        if inside is not None and id(module) not in inside:
            continue
        for req in requests:
            if (name, req.key) not in seen and req.matches(name, module):
                seen.add((name, req.key))
                out.append((name, module, req))
    return out


def _check_all_match(model: nn.Module, requests: Sequence[StatRequest]) -> list[tuple[str, nn.Module, StatRequest]]:
    named = list(model.named_modules())
    for req in requests:
        if not any(req.matches(name, module) for name, module in named):
            types = ", ".join(t.__name__ for t in req.module_types)
            raise EdgeCompressError(
                f"statistic request {req.pattern!r} ({req.stat}) matches no {types} module",
                hint="check the pattern against the names in model.named_modules()",
            )
    return resolve(model, requests)


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in ("input", "hidden_states", "x"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    raise TypeError("cannot find the input tensor of a hooked module")


def _main_output(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output (tensor, tuple, or HF ModelOutput)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    elif hasattr(output, "to_tuple"):
        output = output.to_tuple()[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"expected a tensor output, got {type(output).__name__}")
    return output


@contextlib.contextmanager
def observe(
    model: nn.Module, requests: Sequence[StatRequest], *, within: nn.Module | None = None
) -> Iterator[ObserverMap]:
    """Attach observers per ``requests``; yields ``{(module name, stat key): observer}``.

    An input statistic observes what the module's weight multiplies: its ``matmul_input(x)`` when it
    has one (a ``QuantLinear`` with an input rotation), else its input. Every hook is removed when the
    block exits, also when the forward raises.
    """
    observers: ObserverMap = {}
    handles = []
    try:
        for name, module, req in resolve(model, requests, within=within):
            obs = OBSERVERS[req.stat]()
            observers[(name, req.key)] = obs
            if req.where == "input":

                def hook(m: nn.Module, args: tuple, kwargs: dict, _out: Any, obs: Observer = obs,
                         req: StatRequest = req) -> None:
                    x = _first_tensor(args, kwargs)
                    prepare = getattr(m, "matmul_input", None)  # e.g. a QuantLinear's input rotation
                    obs.update(req.pool(x if prepare is None else prepare(x)))

            else:

                def hook(_m: nn.Module, _args: tuple, _kwargs: dict, out: Any, obs: Observer = obs,
                         req: StatRequest = req) -> None:
                    obs.update(req.pool(_main_output(out)))

            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield observers
    finally:
        for h in handles:
            h.remove()


def _accepts(model: nn.Module, arg: str) -> bool:
    params = inspect.signature(model.forward).parameters
    return arg in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def default_forward(model: nn.Module, batch: Batch) -> Any:
    """``model(input_ids=batch)`` (``model(**batch)`` for a dict), with ``use_cache=False`` for HF models."""
    device = next(iter(model.parameters())).device
    if isinstance(batch, dict):
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    else:
        inputs = {"input_ids": batch.to(device)}
    if getattr(getattr(model, "config", None), "use_cache", None) is not None and _accepts(model, "use_cache"):
        inputs.setdefault("use_cache", False)
    return model(**inputs)


def _iter_batches(batches: Iterable[Batch] | torch.Tensor, batch_size: int) -> tuple[Iterable[Batch], int | None]:
    if isinstance(batches, torch.Tensor):
        rows = batches.unsqueeze(0) if batches.dim() == 1 else batches
        return rows.split(batch_size), -(-rows.shape[0] // batch_size)
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    return ((b.unsqueeze(0) if isinstance(b, torch.Tensor) and b.dim() == 1 else b) for b in batches), total


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _record(store: StatsStore, observers: ObserverMap, requests: Sequence[StatRequest]) -> None:
    for (name, key), obs in observers.items():
        store.add_observer(name, key, obs)
    for req in requests:
        if req.to_dict() not in store.requests:
            store.requests.append(req.to_dict())


def calibrate(
    model: nn.Module,
    batches: Iterable[Batch] | torch.Tensor,
    requests: Sequence[StatRequest],
    *,
    store: StatsStore | None = None,
    progress: bool = False,
    forward: ForwardFn | None = None,
    batch_size: int = 1,
) -> StatsStore:
    """Run ``forward(model, batch)`` under ``torch.no_grad()`` and eval mode, observing ``requests``.

    ``batches`` is an iterable of batches or a ``[N, T]`` tensor split into
    ``batch_size`` rows. Results are merged into ``store`` (a new one when None) and
    the store is returned. A request that matches no module is an EdgeCompressError.
    """
    store = store if store is not None else StatsStore()
    forward = forward or default_forward
    log.debug("calibrating %d (module, stat) pairs", len(_check_all_match(model, requests)))
    items, total = _iter_batches(batches, batch_size)
    with torch.no_grad(), _eval_mode(model), observe(model, requests) as observers:
        for batch in track(items, total, "calibrating", progress):
            forward(model, batch)
    _record(store, observers, requests)
    return store


class _StopForward(Exception):
    """Raised by the capture hook to end a forward pass at the first block."""


def _capture_block_inputs(
    model: nn.Module, block: nn.Module, items: Iterable[Batch], total: int | None, forward: ForwardFn, progress: bool
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    cache: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def grab(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        for key in ("past_key_values", "past_key_value"):
            if key in kwargs:
                kwargs[key] = None
        cache.append((tuple(args), kwargs))
        raise _StopForward

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in track(items, total, "capturing block inputs", progress):
            before = len(cache)
            try:
                forward(model, batch)
            except _StopForward:
                pass
            if len(cache) == before:
                raise EdgeCompressError("the forward pass never reached the first block", hint="check `blocks`")
    finally:
        handle.remove()
    return cache


def _with_hidden(args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    raise TypeError("cannot find where to feed the hidden states of the next block")


def sequential_calibrate(
    model: nn.Module,
    batches: Iterable[Batch] | torch.Tensor,
    blocks: nn.ModuleList | Sequence[nn.Module],
    requests: Sequence[StatRequest],
    on_block: Callable[[int, nn.Module, StatsStore], None],
    *,
    store: StatsStore | None = None,
    progress: bool = False,
    forward: ForwardFn | None = None,
    batch_size: int = 1,
    float_stream: bool = False,
) -> StatsStore:
    """Calibrate block by block, letting ``on_block`` modify each block before the next sees it.

    The inputs (positional and keyword) of ``blocks[0]`` are captured for every batch
    (the forward stops there). Then for each block ``i``: run it on the cached inputs
    while observing the requested modules inside it (names relative to ``model``),
    call ``on_block(i, block, store)`` (with the caller's grad mode), and recompute the
    block's outputs with the possibly modified block as the inputs of block ``i + 1``.
    Every request must match modules inside ``blocks`` only.

    ``float_stream``: also carry the hidden states of the blocks as they were before
    ``on_block`` changed them (the float model's), and store for every module with a
    ``hessian`` input request the cross moment ``"cross"``: ``{"cross": (1/n) sum_t f_t x_t^T}``,
    ``f_t`` the module's input in the float model and ``x_t`` its input here, token by token
    (GPTQ's float targets, :func:`~edgecompress.compress.quant.sequential.apply_gptq`).
    """
    store = store if store is not None else StatsStore()
    forward = forward or default_forward
    blocks = list(blocks)
    inside = {id(m) for b in blocks for m in b.modules()}
    outside = sorted({name for name, module, _ in _check_all_match(model, requests) if id(module) not in inside})
    if outside:
        raise EdgeCompressError(
            f"sequential calibration only observes modules inside the blocks; outside: {', '.join(outside)}",
            hint="narrow the pattern, or use calibrate() for those modules",
        )
    items, total = _iter_batches(batches, batch_size)
    with _eval_mode(model):
        with torch.no_grad():
            cache = _capture_block_inputs(model, blocks[0], items, total, forward, progress)
        log.debug("captured block-0 inputs of %d batches; calibrating %d blocks", len(cache), len(blocks))
        float_cache = list(cache) if float_stream else None
        for i, block in enumerate(track(blocks, len(blocks), "calibrating blocks", progress)):
            float_block = copy.deepcopy(block) if float_stream else None  # before any hook or change
            with torch.no_grad(), observe(model, requests, within=block) as observers:
                if float_stream:
                    float_cache = _paired_pass(model, block, float_block, requests, cache, float_cache, store)
                else:
                    for args, kwargs in cache:
                        block(*args, **kwargs)
            _record(store, observers, requests)
            on_block(i, block, store)
            if i + 1 < len(blocks):
                with torch.no_grad():
                    for j, (args, kwargs) in enumerate(cache):
                        cache[j] = _with_hidden(args, kwargs, _main_output(block(*args, **kwargs)))
    return store


def _paired_pass(model: nn.Module, block: nn.Module, float_block: nn.Module, requests: Sequence[StatRequest],
                 cache: list, float_cache: list, store: StatsStore) -> list:
    """Run ``block`` on ``cache`` (its observers attached by the caller) and its unchanged copy
    ``float_block`` on ``float_cache``, batch by batch; store each hessian-observed module's cross
    moment ``(1/n) sum_t f_t x_t^T`` as ``"cross"``. Returns the float stream's next inputs."""
    prefix = next(n for n, m in model.named_modules() if m is block)
    pools = {name: req.pool for name, _, req in resolve(model, requests, within=block)
             if req.stat == "hessian" and req.where == "input"}
    names = sorted(pools)
    own = dict(model.named_modules())
    twin = dict(float_block.named_modules())
    seen: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)

    def grab(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple, kwargs: dict, _out: Any) -> None:
            f = pools[name](_first_tensor(args, kwargs)).detach()
            seen[name] = f.reshape(-1, f.shape[-1]).float()
        return hook

    def cross(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple, kwargs: dict, _out: Any) -> None:
            x = pools[name](_first_tensor(args, kwargs)).detach()
            x = x.reshape(-1, x.shape[-1]).float()
            f = seen.pop(name)
            if f.shape != x.shape:
                raise EdgeCompressError(f"float stream: {name} saw {tuple(f.shape)} and {tuple(x.shape)} inputs",
                                        hint="float targets need the same tokens in both streams")
            xtx = (f.T @ x).double()
            sums[name] = xtx if name not in sums else sums[name] + xtx
            counts[name] += x.shape[0]
        return hook

    rel = {name: name[len(prefix) + 1:] for name in names}
    handles = [twin[rel[n]].register_forward_hook(grab(n), with_kwargs=True) for n in names]
    handles += [own[n].register_forward_hook(cross(n), with_kwargs=True) for n in names]
    out = []
    try:
        for (args, kwargs), (fargs, fkwargs) in zip(cache, float_cache, strict=True):
            out.append(_with_hidden(fargs, fkwargs, _main_output(float_block(*fargs, **fkwargs))))
            block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    for name in names:
        if counts[name]:
            store.put(name, "cross", {"cross": sums[name] / counts[name]}, counts[name])
    return out
