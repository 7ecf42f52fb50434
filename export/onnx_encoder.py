"""ONNX export of BERT-family sentence encoders (e.g. all-MiniLM-L6-v2) with their pooling.

Written directly from the (possibly compressed) torch model, like the decoder: embeddings
(word + position + token type 0, the position and type rows pre-added), ``LayerNormalization``,
per layer one fused QKV projection, multi-head attention from standard ops with an additive
padding mask, output projection + residual + LayerNorm, ``Gelu`` (exact erf) MLP + residual +
LayerNorm; then masked mean pooling (or the first token) and L2 normalisation as
:class:`~edgecompress.models.SentenceEncoder`. Projections are emitted in their weight format
by :mod:`edgecompress.export.onnx_formats` (fp32 ``MatMul``, QDQ with static activation
quantization for W8A8, ``MatMulNBits``).

I/O: inputs ``input_ids`` int64 [B, S], ``attention_mask`` int64 [B, S];
outputs ``sentence_embedding`` float32 [B, H], ``last_hidden_state`` float32 [B, S, H].
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from torch import nn

from .graph import FLOAT, INT64, GraphBuilder
from .onnx_formats import EmitOptions, LayerFormat, WeightCache, emit_embedding, emit_linear, fuse_linears


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _layer_norm(g: GraphBuilder, x: str, ln: nn.LayerNorm, base: str) -> str:
    return g.op("LayerNormalization", x, g.initializer(f"{base}.weight", _np(ln.weight)),
                g.initializer(f"{base}.bias", _np(ln.bias)), name=f"{base}/LayerNorm", axis=-1,
                epsilon=float(ln.eps))


def _residual_add(g: GraphBuilder, y: str, residual: str, block: nn.Module, base: str) -> str:
    """``y + residual`` (times the block's ``residual_scale`` when SmoothQuant folded into a post-LN norm)."""
    scale = getattr(block, "residual_scale", None)
    if scale is not None:
        residual = g.op("Mul", residual, g.initializer(f"{base}.residual_scale", _np(scale)), name=f"{base}/residual_scale")
    return g.op("Add", y, residual, name=f"{base}/residual")


def build_bert_encoder(encoder: nn.Module, *, opts: EmitOptions | None = None,
                       fuse: bool = True, progress=None) -> tuple[onnx.ModelProto, list[LayerFormat]]:
    """The ONNX graph of a :class:`~edgecompress.models.SentenceEncoder` wrapping a HF ``BertModel``."""
    opts = opts or EmitOptions()
    bert = encoder.bert
    cfg = bert.config
    if getattr(cfg, "model_type", None) != "bert" or getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        raise NotImplementedError("the encoder export supports BERT with absolute position embeddings")
    if cfg.hidden_act not in ("gelu", "gelu_python"):
        raise NotImplementedError(f"the encoder export supports the exact GELU, not {cfg.hidden_act!r}")
    heads, hidden = cfg.num_attention_heads, cfg.hidden_size
    head_dim = hidden // heads
    g = GraphBuilder("edgecompress_bert_encoder")
    cache = WeightCache()
    formats: list[LayerFormat] = []
    ids = g.input("input_ids", INT64, ["batch_size", "sequence_length"])
    mask = g.input("attention_mask", INT64, ["batch_size", "sequence_length"])
    g.output("sentence_embedding", FLOAT, ["batch_size", hidden])
    g.output("last_hidden_state", FLOAT, ["batch_size", "sequence_length", hidden])

    emb = bert.embeddings
    pos_table = _np(emb.position_embeddings.weight) + _np(emb.token_type_embeddings.weight)[0]
    pos = g.initializer("embeddings.position_plus_type0", pos_table)
    seq = g.op("Gather", g.op("Shape", ids, name="ids/shape"), g.const("idx1", np.array(1, np.int64)),
               name="ids/seq_len", axis=0)
    positions = g.op("Range", g.const("zero", np.array(0, np.int64)), seq, g.const("one", np.array(1, np.int64)),
                     name="positions")
    words, fmt = emit_embedding(g, ids, emb.word_embeddings, "embeddings.word_embeddings", opts, cache)
    formats.append(fmt)
    x = g.op("Add", words,
             g.op("Gather", pos, positions, name="embeddings/position", axis=0), name="embeddings/add")
    x = _layer_norm(g, x, emb.LayerNorm, "embeddings.LayerNorm")

    # additive mask [B, 1, 1, S]: 0 where attended, float32 min where padded (as Hugging Face)
    maskf = g.op("Cast", mask, name="mask/float", to=FLOAT)
    neg = g.op("Mul", g.op("Sub", g.const("onef", np.array(1.0, np.float32)), maskf, name="mask/invert"),
               g.const("fmin", np.array(np.finfo(np.float32).min, np.float32)), name="mask/scale")
    bias = g.op("Unsqueeze", neg, g.const("axes12", np.array([1, 2], np.int64)), name="mask/bias")
    split_heads = g.const("split_heads", np.array([0, 0, heads, head_dim], np.int64))
    merge_heads = g.const("merge_heads", np.array([0, 0, hidden], np.int64))
    scale = g.const("attn_scale", np.array(1.0 / math.sqrt(head_dim), np.float32))

    for i, layer in enumerate(bert.encoder.layer):
        pre = f"encoder.layer.{i}"
        sa = layer.attention.self
        q_in = [sa.query, sa.key, sa.value]
        fused = fuse_linears(q_in) if fuse else None
        if fused is not None:
            qkv, fmt = emit_linear(g, x, fused, f"{pre}.attention.self.qkv", opts, cache)
            fmt.parts = [(f"{pre}.attention.self.{n}", hidden) for n in ("query", "key", "value")]
            formats.append(fmt)
            q, k, v = g.node("Split", [qkv, g.const("split_qkv", np.array([hidden] * 3, np.int64))], 3,
                             name=f"{pre}/split_qkv", axis=-1)
        else:
            outs = []
            for n, m in zip(("query", "key", "value"), q_in):
                y, fmt = emit_linear(g, x, m, f"{pre}.attention.self.{n}", opts, cache)
                formats.append(fmt)
                outs.append(y)
            q, k, v = outs

        def heads_of(t: str, perm: list[int], what: str) -> str:
            t = g.op("Reshape", t, split_heads, name=f"{pre}/{what}_split")
            return g.op("Transpose", t, name=f"{pre}/{what}_heads", perm=perm)

        qh = heads_of(q, [0, 2, 1, 3], "q")
        kh = heads_of(k, [0, 2, 3, 1], "k")
        vh = heads_of(v, [0, 2, 1, 3], "v")
        scores = g.op("Add", g.op("Mul", g.op("MatMul", qh, kh, name=f"{pre}/scores"), scale, name=f"{pre}/scaled"),
                      bias, name=f"{pre}/masked")
        probs = g.op("Softmax", scores, name=f"{pre}/softmax", axis=-1)
        ctx = g.op("Transpose", g.op("MatMul", probs, vh, name=f"{pre}/context"), name=f"{pre}/context_t",
                   perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", ctx, merge_heads, name=f"{pre}/context_merge")
        o, fmt = emit_linear(g, ctx, layer.attention.output.dense, f"{pre}.attention.output.dense", opts, cache)
        formats.append(fmt)
        x = _layer_norm(g, _residual_add(g, o, x, layer.attention.output, f"{pre}.attention.output"),
                        layer.attention.output.LayerNorm, f"{pre}.attention.output.LayerNorm")
        h, fmt = emit_linear(g, x, layer.intermediate.dense, f"{pre}.intermediate.dense", opts, cache)
        formats.append(fmt)
        h = g.op("Gelu", h, name=f"{pre}/gelu")
        o, fmt = emit_linear(g, h, layer.output.dense, f"{pre}.output.dense", opts, cache)
        formats.append(fmt)
        x = _layer_norm(g, _residual_add(g, o, x, layer.output, f"{pre}.output"), layer.output.LayerNorm,
                        f"{pre}.output.LayerNorm")
        if progress is not None:
            progress()

    g.node("Identity", [x], outputs=["last_hidden_state"], name="last_hidden_state")
    if encoder.pooling == "cls":
        pooled = g.op("Gather", x, g.const("first", np.array(0, np.int64)), name="pool/cls", axis=1)
    else:
        m3 = g.op("Unsqueeze", maskf, g.const("axes2", np.array([2], np.int64)), name="pool/mask")
        total = g.op("ReduceSum", g.op("Mul", x, m3, name="pool/masked"), g.const("axes1", np.array([1], np.int64)),
                     name="pool/sum", keepdims=0)
        count = g.op("ReduceSum", m3, g.const("axes1b", np.array([1], np.int64)), name="pool/count", keepdims=0)
        count = g.op("Max", count, g.const("eps_count", np.array(1e-9, np.float32)), name="pool/count_clamp")
        pooled = g.op("Div", total, count, name="pool/mean")
    if encoder.normalize:
        norm = g.op("ReduceL2", pooled, g.const("axes_last", np.array([-1], np.int64)), name="l2/norm", keepdims=1)
        norm = g.op("Max", norm, g.const("eps_norm", np.array(1e-12, np.float32)), name="l2/clamp")
        pooled = g.op("Div", pooled, norm, name="l2/normalize")
    g.node("Identity", [pooled], outputs=["sentence_embedding"], name="sentence_embedding")
    return g.model(), formats
