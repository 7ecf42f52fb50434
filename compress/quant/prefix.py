"""A float prefix for static activation quantization (PrefixQuant).

Chen et al. 2024, "PrefixQuant: Static Quantization Beats Dynamic through Prefixed Outliers in
LLMs". A decoder's first token (the BOS token every sequence starts with) carries massive
activations — thousands of times the typical magnitude in a few channels (Sun et al. 2024,
"Massive Activations in Large Language Models"). A per-tensor static range must either cover
them (coarse steps for every other token) or clip them (the attention sink breaks). In a causal
model the first position attends only to itself, so everything it computes, its key/value cache
included, is a constant of the model: it is computed once, in float, and shipped with the
artifact; the runtimes start every sequence from that cache, and the quantized graph (and its
calibrated ranges) never sees the outlier token.

Pure core: :func:`prefix_state` (the prefix's KV cache and logits from a model with its
activation quantization switched off). :func:`set_float_prefix` records the prefix on the model
for the exporter; :func:`logits_with_prefix` is the torch reference of what a runtime computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from edgecompress.errors import EdgeCompressError

from .modules import QuantLinear

CONFIG_KEY = "float_prefix"  # model.config attribute: the prefix token ids


@contextlib.contextmanager
def float_activations(model: nn.Module) -> Iterator[None]:
    """Switch off every ``QuantLinear``'s static input quantization inside the block."""
    saved = {m: m.act for m in model.modules() if isinstance(m, QuantLinear)}
    try:
        for m in saved:
            m.act = None
        yield
    finally:
        for m, act in saved.items():
            m.act = act


def set_float_prefix(model: nn.Module, windows: Any, tokenizer: Any) -> dict[str, Any]:
    """Record the BOS token as ``model``'s float prefix; every calibration sequence must start with it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise EdgeCompressError("float_prefix needs a tokenizer with a BOS token; this one has none",
                                hint="set quantize.activations.float_prefix: false")
    if not isinstance(windows, torch.Tensor) or not bool((windows[:, 0] == bos).all()):
        raise EdgeCompressError(f"float_prefix: every calibration sequence must start with the BOS token ({bos})",
                                hint="calibrate a causal LM on a text source (windows start with BOS)")
    setattr(model.config, CONFIG_KEY, [int(bos)])
    return {"tokens": [int(bos)], "why": "first token computed once in float and shipped as a KV-cache prefix"}


@torch.no_grad()
def prefix_state(model: nn.Module, tokens: list[int]) -> dict[str, torch.Tensor]:
    """The float prefix of ``model``: ``{i}.key``/``{i}.value`` caches ``[1, kv_heads, P, head_dim]``
    per layer and ``logits [P, vocab]``, computed with activation quantization off."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with float_activations(model):
        out = model(input_ids=torch.tensor([tokens]), past_key_values=cache, use_cache=True)
    state = {"logits": out.logits[0].float().contiguous()}
    for i, layer in enumerate(_cache_layers(cache)):
        state[f"{i}.key"], state[f"{i}.value"] = (t.float().contiguous() for t in layer)
    return state


def _cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


@torch.no_grad()
def logits_with_prefix(model: nn.Module, input_ids: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Logits ``[S, vocab]`` of one sequence that starts with the prefix ``tokens``: the prefix in
    float (as shipped), the rest through the (activation-quantized) model on top of its cache."""
    from transformers import DynamicCache

    p = len(tokens)
    if input_ids[:p].tolist() != list(tokens):
        raise ValueError(f"the sequence does not start with the prefix {tokens}")
    cache = DynamicCache()
    with float_activations(model):
        first = model(input_ids=input_ids[None, :p], past_key_values=cache, use_cache=True).logits[0]
    if len(input_ids) == p:
        return first.float()
    rest = model(input_ids=input_ids[None, p:], past_key_values=cache, use_cache=True).logits[0]
    return torch.cat([first, rest]).float()
