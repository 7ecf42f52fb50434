"""ONNX export of Llama-family causal LMs as a KV-cache decoder built from fused ORT ops.

The graph is written directly (not traced), in the form ONNX Runtime runs fastest on CPU:
``GatherBlockQuantized``/``Gather`` embedding, per layer ``SkipSimplifiedLayerNormalization``,
one fused QKV projection, ``GroupQueryAttention`` (rotary inside, KV cache in and out),
output projection, fused gate/up projection, SiLU-gated MLP, down projection; final norm and
the (possibly tied) LM head. Each projection is emitted in its weight format by
:mod:`edgecompress.export.onnx_formats` (``MatMulNBits``, QDQ or ``MatMul``).

I/O (names follow optimum, so ``ORTModelForCausalLM`` loads the artifact):
  inputs  ``input_ids`` int64 [B, S], ``attention_mask`` int64 [B, P+S],
          ``past_key_values.{i}.key|value`` float32 [B, kv_heads, P, head_dim]
  outputs ``logits`` float32 [B, S, vocab], ``present.{i}.key|value`` float32 [B, kv_heads, P+S, head_dim]
Binding the same buffer as ``past`` and ``present`` (size max_length) makes
``GroupQueryAttention`` update the cache in place (the runtime's lean decode loop).
Batch size 1 or right-aligned unpadded batches: positions come from the attention mask.

A structurally pruned model (``prune_layers``) writes only what is left: a layer without attention has no
norm/QKV/attention/output projection and no KV cache entry (``{i}`` counts the remaining attention layers; the
manifest's ``layer_pruning.kv_cache_layers`` maps each to its decoder layer), a layer without MLP no gate/up/down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn


from edgecompress.compress.prune.layers import has_sublayer
from edgecompress.compress.sparse.activation import CatsActivation

from .graph import FLOAT, INT32, INT64, MS_DOMAIN, GraphBuilder
from .onnx_act_sparse import CATS_SUFFIX, emit_cats
from .onnx_formats import (EmitOptions, LayerFormat, WeightCache, emit_embedding, emit_linear, emit_tied_head,
                           fuse_linears)


@dataclass(frozen=True)
class LlamaDims:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rope_theta: float
    rms_eps: float
    max_positions: int


def llama_dims(config) -> LlamaDims:
    if getattr(config, "model_type", None) not in ("llama", "mistral", "qwen2"):
        raise NotImplementedError(f"ONNX decoder export supports llama-family models, got {config.model_type!r}")
    rope_scaling = getattr(config, "rope_scaling", None)
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
        raise NotImplementedError(f"rope scaling {rope_scaling} is not supported by the ONNX export yet")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return LlamaDims(
        layers=config.num_hidden_layers, hidden=config.hidden_size, heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads, head_dim=head_dim, intermediate=config.intermediate_size,
        vocab=config.vocab_size, rope_theta=float(config.rope_theta), rms_eps=float(config.rms_norm_eps),
        max_positions=int(config.max_position_embeddings),
    )


def rope_cache(g: GraphBuilder, d: LlamaDims, max_positions: int) -> tuple[str, str]:
    """cos/sin caches ``[max_positions, head_dim/2]`` computed in the graph, in float32 as
    Hugging Face does; ONNX Runtime folds them into constants once, at session creation, so
    they cost nothing on disk."""
    inv_freq = (1.0 / (d.rope_theta ** (np.arange(0, d.head_dim, 2, dtype=np.int64).astype(np.float32)
                                        / d.head_dim))).astype(np.float32)
    pos = g.op("Range", g.const("rope_start", np.array(0.0, np.float32)),
               g.const("rope_limit", np.array(float(max_positions), np.float32)),
               g.const("rope_delta", np.array(1.0, np.float32)), name="rope/positions")
    pos = g.op("Unsqueeze", pos, g.const("rope_axes", np.array([1], np.int64)), name="rope/column")
    freqs = g.op("Mul", pos, g.initializer("rope.inv_freq", inv_freq[None, :]), name="rope/freqs")
    return g.op("Cos", freqs, name="rope/cos_cache"), g.op("Sin", freqs, name="rope/sin_cache")


def build_llama_decoder(model: nn.Module, *, opts: EmitOptions | None = None, fuse: bool = True,
                        max_positions: int | None = None, progress=None) -> tuple[onnx.ModelProto, list[LayerFormat]]:
    """Write the ONNX decoder for a (possibly compressed) HF Llama model.

    Returns the model proto (initializers inline; the caller saves them as external data)
    and one :class:`LayerFormat` per weight.
    """
    opts = opts or EmitOptions()
    d = llama_dims(model.config)
    inner = model.model
    g = GraphBuilder("edgecompress_llama_decoder")
    cache = WeightCache()
    formats: list[LayerFormat] = []
    dyn_b, dyn_s, dyn_t, dyn_p = "batch_size", "sequence_length", "total_sequence_length", "past_sequence_length"

    ids = g.input("input_ids", INT64, [dyn_b, dyn_s])
    mask = g.input("attention_mask", INT64, [dyn_b, dyn_t])
    kv_slot = {i: j for j, i in enumerate(attention_layers(model))}  # decoder layer -> KV cache entry
    past = []
    for i in range(len(kv_slot)):
        k = g.input(f"past_key_values.{i}.key", FLOAT, [dyn_b, d.kv_heads, dyn_p, d.head_dim])
        v = g.input(f"past_key_values.{i}.value", FLOAT, [dyn_b, d.kv_heads, dyn_p, d.head_dim])
        past.append((k, v))
    g.output("logits", FLOAT, [dyn_b, dyn_s, d.vocab])
    for i in range(len(kv_slot)):
        for kind in ("key", "value"):
            g.output(f"present.{i}.{kind}", FLOAT, [dyn_b, d.kv_heads, dyn_t, d.head_dim])

    # sequence lengths for GroupQueryAttention: seqlens_k = sum(mask) - 1, total = mask width
    msum = g.op("ReduceSum", mask, g.const("axes1", np.array([1], np.int64)), name="mask/sum", keepdims=0)
    seqlens = g.op("Cast", g.op("Sub", msum, g.const("one", np.array(1, np.int64)), name="mask/sub"),
                   name="mask/seqlens_k", to=INT32)
    total = g.op("Cast", g.op("Gather", g.op("Shape", mask, name="mask/shape"),
                              g.const("idx1", np.array(1, np.int64)), name="mask/width", axis=0),
                 name="mask/total_len", to=INT32)
    cos_name, sin_name = rope_cache(g, d, max_positions or d.max_positions)

    h, fmt = emit_embedding(g, ids, inner.embed_tokens, "model.embed_tokens", opts, cache)
    formats.append(fmt)
    eps = d.rms_eps
    residual = None
    pending = h  # value to add into the residual stream before the next norm
    for i, layer in enumerate(inner.layers):
        if i in kv_slot:
            pending, residual = _attention(g, layer, i, kv_slot[i], pending, residual, past,
                                           (seqlens, total, cos_name, sin_name), d, fuse, opts, cache, formats)
        if has_sublayer(layer, "mlp"):
            pending, residual = _mlp(g, layer, i, pending, residual, d, fuse, opts, cache, formats)
        if progress is not None:
            progress()
    x, _ = _add_norm(g, pending, residual, inner.norm.weight, "model.norm", eps)
    x = _keep_last(g, x)
    head = model.lm_head
    if isinstance(head, nn.Linear) and type(head) is nn.Linear and cache.get(head.weight) is not None:
        logits, fmt = emit_tied_head(g, x, head.weight, "lm_head", cache, "model.embed_tokens")
    else:
        logits, fmt = emit_linear(g, x, head, "lm_head", opts, cache)
    formats.append(fmt)
    g.node("Identity", [logits], outputs=["logits"], name="logits")
    return g.model(), formats


def attention_layers(model: nn.Module) -> list[int]:
    """Decoder layers that have attention (all, unless ``prune_layers`` removed some): one KV cache entry each."""
    return [i for i, layer in enumerate(model.model.layers) if has_sublayer(layer, "self_attn")]


def _attention(g: GraphBuilder, layer: nn.Module, i: int, slot: int, pending: str, residual: str | None,
               past: list, gqa_extra: tuple, d: LlamaDims, fuse: bool, opts: EmitOptions, cache: WeightCache,
               formats: list[LayerFormat]) -> tuple[str, str]:
    """Norm, QKV, GroupQueryAttention (KV cache entry ``slot``), output projection of layer ``i``."""
    pre, attn, eps = f"model.layers.{i}", layer.self_attn, d.rms_eps
    x, residual = _add_norm(g, pending, residual, layer.input_layernorm.weight, f"{pre}.input_layernorm", eps)
    q_in = [attn.q_proj, attn.k_proj, attn.v_proj]
    fused = fuse_linears(q_in) if fuse else None
    if fused is not None:
        qkv, fmt = emit_linear(g, x, fused, f"{pre}.self_attn.qkv_proj", opts, cache)
        fmt.parts = [(f"{pre}.self_attn.{n}", m.out_features) for n, m in zip(("q_proj", "k_proj", "v_proj"), q_in)]
        formats.append(fmt)
        gqa_in = [qkv, "", ""]
    else:
        gqa_in = []
        for name, m in zip(("q_proj", "k_proj", "v_proj"), q_in):
            y, fmt = emit_linear(g, x, m, f"{pre}.self_attn.{name}", opts, cache)
            formats.append(fmt)
            gqa_in.append(y)
    a, = g.node(
        "GroupQueryAttention", gqa_in + [past[slot][0], past[slot][1], *gqa_extra], 3,
        name=f"{pre}.self_attn/GroupQueryAttention", domain=MS_DOMAIN,
        outputs=[f"{pre}.self_attn/attn", f"present.{slot}.key", f"present.{slot}.value"],
        num_heads=d.heads, kv_num_heads=d.kv_heads, do_rotary=1, rotary_interleaved=0,
        scale=1.0 / math.sqrt(d.head_dim),
    )[:1]
    o, fmt = emit_linear(g, a, attn.o_proj, f"{pre}.self_attn.o_proj", opts, cache)
    formats.append(fmt)
    return o, residual


def _mlp(g: GraphBuilder, layer: nn.Module, i: int, pending: str, residual: str | None, d: LlamaDims, fuse: bool,
         opts: EmitOptions, cache: WeightCache, formats: list[LayerFormat]) -> tuple[str, str]:
    """Norm, gate/up, SiLU gate, down projection of layer ``i``."""
    pre, mlp, eps = f"model.layers.{i}", layer.mlp, d.rms_eps
    x, residual = _add_norm(g, pending, residual, layer.post_attention_layernorm.weight,
                            f"{pre}.post_attention_layernorm", eps)
    inter = mlp.gate_proj.out_features
    fused = fuse_linears([mlp.gate_proj, mlp.up_proj]) if fuse else None
    if fused is not None:
        gu, fmt = emit_linear(g, x, fused, f"{pre}.mlp.gate_up_proj", opts, cache)
        fmt.parts = [(f"{pre}.mlp.gate_proj", inter), (f"{pre}.mlp.up_proj", inter)]
        formats.append(fmt)
        gate, up = g.node("Split", [gu, g.const("split", np.array([inter] * 2, np.int64))], 2,
                          name=f"{pre}.mlp/split", axis=-1)
    else:
        gate, fmt = emit_linear(g, x, mlp.gate_proj, f"{pre}.mlp.gate_proj", opts, cache)
        formats.append(fmt)
        up, fmt = emit_linear(g, x, mlp.up_proj, f"{pre}.mlp.up_proj", opts, cache)
        formats.append(fmt)
    act = g.op("Mul", gate, g.op("Sigmoid", gate, name=f"{pre}.mlp/sigmoid"), name=f"{pre}.mlp/silu")
    cats = mlp.act_fn if isinstance(mlp.act_fn, CatsActivation) else None
    if cats is not None:  # CATS: the gated activation thresholded before the product with up
        act, cats_thr = emit_cats(g, act, cats)
    act = g.op("Mul", act, up, name=f"{pre}.mlp/gate_mul")
    pending, fmt = emit_linear(g, act, mlp.down_proj, f"{pre}.mlp.down_proj", opts, cache)
    if cats is not None:
        fmt.format = f"{fmt.format}+cats"
        fmt.initializers[CATS_SUFFIX] = cats_thr
        fmt.stored_bytes += 4
        fmt.bits = 8 * fmt.stored_bytes / fmt.params
    formats.append(fmt)
    return pending, residual


def _keep_last(g: GraphBuilder, x: str) -> str:
    """Optional input ``logits_to_keep`` (default 0 = all): the LM head runs on the last k positions.

    Generation feeds 1, so prefill skips the vocabulary projection of every prompt position but
    the last; callers that do not feed it (evaluation, optimum) get logits for every position.
    """
    g.input("logits_to_keep", INT64, [1])
    g.initializer("logits_to_keep", np.array([0], np.int64))
    zero = g.const("zero_i64", np.array([0], np.int64))
    keep = g.op("Where", g.op("Equal", "logits_to_keep", zero, name="keep/is_all"),
                g.const("int_max", np.array([2**62], np.int64)), "logits_to_keep", name="keep/k")
    start = g.op("Neg", keep, name="keep/start")
    return g.op("Slice", x, start, g.const("end_max", np.array([2**62], np.int64)),
                g.const("axes_seq", np.array([1], np.int64)), name="keep/slice")


def _add_norm(g: GraphBuilder, x: str, residual: str | None, weight: torch.Tensor, base: str,
              eps: float) -> tuple[str, str]:
    """RMSNorm of ``x + residual``; returns (normed, new residual)."""
    gamma = g.initializer(f"{base}.weight", weight.detach().float().numpy())
    if residual is None:
        y = g.op("SimplifiedLayerNormalization", x, gamma, name=f"{base}/norm", axis=-1, epsilon=eps)
        return y, x
    y, s = f"{base}/normed", f"{base}/residual"
    g.node("SkipSimplifiedLayerNormalization", [x, residual, gamma], name=f"{base}/skipnorm",
           domain=MS_DOMAIN, outputs=[y, "", "", s], epsilon=eps)
    return y, s
