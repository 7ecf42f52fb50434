"""The NPU form of a Llama-family causal LM: a static prefill graph and a static decode graph over a
fixed-size KV cache, in standard ONNX ops the QNN HTP runs (no contrib ops, no control flow).

* **prefill** (``P`` tokens): ``input_ids``, ``position_ids``, ``attention_mask`` int64 ``[1, P]`` (a
  shorter prompt is right-padded, mask 0) -> ``logits [1, P, V]`` and ``key.{i}`` / ``value.{i}``
  ``[1, kv_heads, P, head_dim]``: the rows the runtime writes into slots ``0..P-1`` of its cache.
* **decode** (one token): ``input_ids``, ``position_ids`` ``[1, 1]``, ``attention_mask`` ``[1, C]`` (1 for
  the cache slots to attend), ``past_key.{i}`` / ``past_value.{i}`` ``[1, kv_heads, C, head_dim]`` (the
  fixed cache, ``C`` = max context) -> ``logits [1, 1, V]`` and the new ``key.{i}`` / ``value.{i}``
  ``[1, kv_heads, 1, head_dim]``, which the runtime writes into slot ``position``. The token always attends
  to itself.

Both come from one torch module (:class:`StaticLlama`) traced by ``torch.onnx.export``: plain MatMul /
Softmax attention, grouped-query heads folded into the query rows (``[1, kv, groups*S, d]``: no repeated
K/V), RoPE as ``x*cos + swap_halves(x)*sin_signed`` with cos/sin gathered from constant tables by
position, RMSNorm as ``LpNormalization(x) * sqrt(hidden) * gamma`` (one op the HTP computes internally:
a QDQ ``x*x`` over Llama's residual stream would need a range of 1e4+ and lose the ordinary tokens), the
attention mask as ``(1 - allowed) * float32.min`` (clamped to -100 by the NPU passes).

The RMSNorm form drops ``eps`` (``x / sqrt(mean(x^2) + eps)`` vs ``x / sqrt(mean(x^2))``): a relative change
of about ``eps / (2 mean(x^2))`` to the output (the tests compare with the model's eps set to 0, exactly).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import onnx
import torch
from torch import nn

from .npu import NpuExportError

PREFILL, DECODE = "prefill", "decode"
LLM_STATIC_DIMS = ("prefill_len", "max_context")
ROUNDINGS = ("gptq", "nearest")
#: weight MatMuls whose calibrated input range is wider than this run in float16 (export.npu.fp16_matmuls):
#: SmolLM2-135M has three (ranges 762-3107; the median of its 211 is 9.7)
FP16_WIDE_RANGE = 256.0


def llm_static_dims(static_shapes: Mapping[str, int] | None) -> tuple[int, int]:
    """``(prefill_len, max_context)`` from a recipe's ``static_shapes``; a missing one is an error naming it."""
    shapes = dict(static_shapes or {})
    missing = [d for d in LLM_STATIC_DIMS if d not in shapes]
    if missing:
        raise NpuExportError(
            f"the NPU form of a causal LM needs static shapes, and {', '.join(missing)} has no value",
            hint="add it to the export's static_shapes, e.g. static_shapes: {batch_size: 1, prefill_len: 128, "
            "max_context: 256}")
    p, c = int(shapes["prefill_len"]), int(shapes["max_context"])
    if int(shapes.get("batch_size", 1)) != 1:
        raise NpuExportError(f"the causal-LM NPU graphs run batch size 1, got batch_size {shapes['batch_size']}",
                             hint="set static_shapes.batch_size: 1")
    if p < 1 or c < p:
        raise NpuExportError(f"static shapes need 1 <= prefill_len <= max_context, got prefill_len {p}, "
                             f"max_context {c}")
    return p, c


def _plain_linear(m: nn.Module, name: str, rounded: Mapping[str, "Rounded"] | None = None) -> torch.Tensor:
    if type(m) is not nn.Linear or m.bias is not None:
        raise NpuExportError(f"{name} is a {type(m).__name__}{' with bias' if type(m) is nn.Linear else ''}: the "
                             "npu-qnn export quantizes the float model itself",
                             hint="drop the quantize/sparsify steps (or export them for the cpu target)")
    if rounded is not None and name in rounded:
        return rounded[name].weight
    return m.weight.detach().float()


def _require_whole(model: nn.Module) -> None:
    from .onnx_llm import llama_dims

    layers = model.model.layers
    if len(layers) != llama_dims(model.config).layers or any(not hasattr(l, "self_attn") or not hasattr(l, "mlp")
                                                             for l in layers):
        raise NpuExportError("the npu-qnn export of causal LMs needs every decoder layer whole (attention and MLP)",
                             hint="drop prune_layers, or export the pruned model for the cpu target")


def _linears(model: nn.Module) -> list[tuple[str, nn.Module, float]]:
    """``(name, module, factor)`` of every weight MatMul of the static graphs, in graph order: ``factor`` is what
    :class:`StaticLlama` multiplies the weight by (the query projection carries ``1/sqrt(head_dim)``)."""
    from .onnx_llm import llama_dims

    _require_whole(model)
    d = llama_dims(model.config)
    out = []
    for i, layer in enumerate(model.model.layers):
        a, m, pre = layer.self_attn, layer.mlp, f"model.layers.{i}"
        out += [(f"{pre}.self_attn.q_proj", a.q_proj, 1.0 / math.sqrt(d.head_dim)),
                *[(f"{pre}.self_attn.{k}", getattr(a, k), 1.0) for k in ("k_proj", "v_proj", "o_proj")],
                *[(f"{pre}.mlp.{k}", getattr(m, k), 1.0) for k in ("gate_proj", "up_proj", "down_proj")]]
    return out + [("lm_head", model.lm_head, 1.0)]


# ----------------------------------------------------------------------------- int8 weight rounding

class Rounded(NamedTuple):
    """A weight on its int8 symmetric per-output-channel grid: ``weight = scale[:, None] * q``, ``|q| <= 127``."""

    weight: torch.Tensor
    scale: torch.Tensor


@torch.no_grad()
def round_linears(model: nn.Module, windows: np.ndarray, *, damp: float = 0.01) -> tuple[dict[str, Rounded], dict]:
    """GPTQ-round every weight MatMul of the static graphs (decoder linears and the LM head) to its int8
    symmetric per-output-channel grid (scale ``max|W_c| / 127``, as the QDQ export would take it): each
    column's rounding error is fed into the later columns along the inverse Hessian of the layer's input
    (:func:`~edgecompress.compress.quant.conv_rounding.gptq_fixed_scale`). The Hessians are the float model's
    on the calibration ``windows`` (at 8 bits the layers' inputs barely move, so no sequential pass).

    Returns ``{module name: Rounded}`` and a manifest record with the Hessian-weighted relative output error
    ``tr(dW H dWᵀ) / tr(W H Wᵀ)`` of nearest rounding and of GPTQ, averaged over the layers. The weights of
    ``model`` are not changed (its LM head may be tied to the embedding, which stays a uint16 table)."""
    from edgecompress.compress.calibration.driver import StatRequest, calibrate
    from edgecompress.compress.quant.conv_rounding import channel_scales, gptq_fixed_scale, round_nearest
    from edgecompress.compress.quant.sequential import stat_source

    linears = _linears(model)
    # a plain float Linear each, or the error that says why not: before the calibration pass
    weights = {name: _plain_linear(module, name) for name, module, _ in linears}
    store = calibrate(model, torch.from_numpy(np.asarray(windows, np.int64)),
                      [StatRequest(r"(\.(q_proj|o_proj|gate_proj|down_proj)|^lm_head)$", "hessian")])
    rounded, errors = {}, []
    for name, W in weights.items():
        H = store.get(stat_source(name) if name != "lm_head" else name, "hessian")["hessian"].double()
        s = channel_scales(W)
        Wq = gptq_fixed_scale(W, H[None].float(), s, damp)
        rounded[name] = Rounded(Wq, s)

        def rel(dW: torch.Tensor) -> float:
            return float(((dW.double() @ H) * dW.double()).sum() / ((W.double() @ H) * W.double()).sum())

        errors.append((rel(round_nearest(W, s) - W), rel(Wq - W)))
    near, gptq = (float(np.mean([e[k] for e in errors])) for k in (0, 1))
    return rounded, {"method": "gptq", "damp": damp, "calibration_windows": int(len(windows)),
                     "layers": len(linears), "mean_rel_output_error_nearest": round(near, 8),
                     "mean_rel_output_error": round(gptq, 8)}


def grid_scales(proto: onnx.ModelProto, model: nn.Module, rounded: Mapping[str, Rounded]) -> dict[str, np.ndarray]:
    """``{initializer name: per-output-channel scale}`` for the MatMul weights of ``proto`` (a static graph of
    ``model`` with ``rounded`` weights) that hold a rounded weight, matched by content (the exporter names the
    transposed constants itself). Every rounded weight must be found: an :class:`NpuExportError` otherwise."""
    import hashlib

    from onnx import numpy_helper

    def key(a: np.ndarray) -> str:
        return hashlib.sha1(np.ascontiguousarray(a, np.float32).tobytes()).hexdigest()

    wanted = {}
    for name, _, factor in _linears(model):
        if name in rounded:
            w, s = rounded[name]
            wanted[key((w * factor).T.numpy())] = (name, (s * factor).numpy())
    inits = {i.name: i for i in proto.graph.initializer}
    scales, found = {}, set()
    for n in proto.graph.node:
        if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits:
            hit = wanted.get(key(numpy_helper.to_array(inits[n.input[1]])))
            if hit is not None:
                scales[n.input[1]] = hit[1]
                found.add(hit[0])
    missing = sorted(set(rounded) - found)
    if missing:
        raise NpuExportError(f"{len(missing)} rounded weight(s) not found in the traced graph: {', '.join(missing[:4])}",
                             hint="report this model: the exporter changed a weight while tracing")
    return scales


class _LpNormalize(torch.autograd.Function):
    """``x / ||x||_2`` over the last axis, exported as one ONNX ``LpNormalization`` (which the HTP runs)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)

    @staticmethod
    def symbolic(g, x):
        return g.op("LpNormalization", x, axis_i=-1, p_i=2)


class StaticLlama(nn.Module):
    """A Hugging Face Llama-family model as a static prefill or decode step with an explicit mask, explicit
    positions and a fixed-size cache (module docstring). Holds copies of the model's float weights, or of their
    ``rounded`` int8-grid values (:func:`round_linears`) where given."""

    def __init__(self, model: nn.Module, *, max_context: int, mode: str,
                 rounded: Mapping[str, Rounded] | None = None):
        super().__init__()
        from .onnx_llm import llama_dims

        if mode not in (PREFILL, DECODE):
            raise ValueError(f"mode must be {PREFILL} or {DECODE}, got {mode!r}")
        d = llama_dims(model.config)
        self.mode, self.max_context = mode, max_context
        self.layers, self.heads, self.kv_heads, self.head_dim = d.layers, d.heads, d.kv_heads, d.head_dim
        self.groups = d.heads // d.kv_heads
        inner = model.model
        _require_whole(model)
        self.embed = nn.Parameter(inner.embed_tokens.weight.detach().float().clone(), requires_grad=False)
        scale = 1.0 / math.sqrt(d.head_dim)  # folded into the query projection (RoPE is linear)
        self.w = nn.ParameterList()
        for i, layer in enumerate(inner.layers):
            a, m, pre = layer.self_attn, layer.mlp, f"model.layers.{i}"
            for t in (_plain_linear(a.q_proj, f"{pre}.self_attn.q_proj", rounded) * scale,
                      _plain_linear(a.k_proj, f"{pre}.self_attn.k_proj", rounded),
                      _plain_linear(a.v_proj, f"{pre}.self_attn.v_proj", rounded),
                      _plain_linear(a.o_proj, f"{pre}.self_attn.o_proj", rounded),
                      _plain_linear(m.gate_proj, f"{pre}.mlp.gate_proj", rounded),
                      _plain_linear(m.up_proj, f"{pre}.mlp.up_proj", rounded),
                      _plain_linear(m.down_proj, f"{pre}.mlp.down_proj", rounded),
                      layer.input_layernorm.weight.detach().float() * math.sqrt(d.hidden),
                      layer.post_attention_layernorm.weight.detach().float() * math.sqrt(d.hidden)):
                self.w.append(nn.Parameter(t.clone(), requires_grad=False))
        self.norm = nn.Parameter(inner.norm.weight.detach().float() * math.sqrt(d.hidden), requires_grad=False)
        self.head = nn.Parameter(_plain_linear(model.lm_head, "lm_head", rounded).clone(), requires_grad=False)
        inv_freq = 1.0 / (d.rope_theta ** (torch.arange(0, d.head_dim, 2, dtype=torch.int64).float() / d.head_dim))
        freqs = torch.outer(torch.arange(max_context, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", torch.cat([freqs.cos(), freqs.cos()], -1), persistent=False)
        self.register_buffer("sin", torch.cat([-freqs.sin(), freqs.sin()], -1), persistent=False)

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def _rms(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        # on [rows, hidden], the 2-D form MiniLM's LpNormalization runs in on the HTP
        return _LpNormalize.apply(x.reshape(-1, x.shape[-1])).reshape(x.shape) * gamma

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = self.head_dim // 2
        return x * cos + torch.cat([x[..., h:], x[..., :h]], -1) * sin

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:  # [1, S, n*d] -> [1, n, S, d]
        return x.reshape(1, x.shape[1], n, self.head_dim).transpose(1, 2)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """q [1, heads, S, d], k/v [1, kv, T, d], bias [S, T] -> [1, S, heads*d]."""
        s = q.shape[2]
        q = q.reshape(1, self.kv_heads, self.groups * s, self.head_dim)  # head h = kv head h // groups
        scores = torch.matmul(q, k.transpose(2, 3)) + torch.cat([bias] * self.groups, 0)
        out = torch.matmul(torch.softmax(scores, -1), v)  # [1, kv, groups*S, d]
        return out.reshape(1, self.heads, s, self.head_dim).transpose(1, 2).reshape(1, s, self.heads * self.head_dim)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                *past: torch.Tensor):
        s = input_ids.shape[1]
        mask = attention_mask.to(torch.float32)
        if self.mode == PREFILL:
            allowed = torch.tril(torch.ones(s, s)) * mask  # [S, S]: causal and not padding
        else:
            allowed = torch.cat([mask, torch.ones(1, 1)], 1)  # [1, C + 1]: the cache slots, then itself
        bias = (1.0 - allowed) * torch.finfo(torch.float32).min
        cos = self.cos[position_ids].unsqueeze(1)  # [1, 1, S, d]
        sin = self.sin[position_ids].unsqueeze(1)
        x = self.embed[input_ids]
        new_kv = []
        for i in range(self.layers):
            wq, wk, wv, wo, wg, wu, wd, g1, g2 = self.w[9 * i: 9 * i + 9]
            h = self._rms(x, g1)
            q = self._rope(self._heads(h @ wq.T, self.heads), cos, sin)
            k = self._rope(self._heads(h @ wk.T, self.kv_heads), cos, sin)
            v = self._heads(h @ wv.T, self.kv_heads)
            new_kv += [k, v]
            if self.mode == DECODE:
                k, v = torch.cat([past[2 * i], k], 2), torch.cat([past[2 * i + 1], v], 2)
            x = x + self._attend(q, k, v, bias) @ wo.T
            h = self._rms(x, g2)
            gate = h @ wg.T
            x = x + ((gate * torch.sigmoid(gate)) * (h @ wu.T)) @ wd.T
        logits = self._rms(x, self.norm) @ self.head.T
        return (logits, *new_kv)

    # ------------------------------------------------------------------ I/O
    def io_names(self) -> tuple[list[str], list[str]]:
        inputs = ["input_ids", "position_ids", "attention_mask"]
        if self.mode == DECODE:
            inputs += [f"past_{kind}.{i}" for i in range(self.layers) for kind in ("key", "value")]
        outputs = ["logits"] + [f"{kind}.{i}" for i in range(self.layers) for kind in ("key", "value")]
        return inputs, outputs

    def example_inputs(self, prefill_len: int) -> tuple[torch.Tensor, ...]:
        c = self.max_context
        if self.mode == PREFILL:
            return (torch.zeros(1, prefill_len, dtype=torch.int64), torch.arange(prefill_len)[None],
                    torch.ones(1, prefill_len, dtype=torch.int64))
        past = [torch.zeros(1, self.kv_heads, c, self.head_dim) for _ in range(2 * self.layers)]
        return (torch.zeros(1, 1, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int64),
                torch.zeros(1, c, dtype=torch.int64), *past)


def static_llm_onnx(model: nn.Module, mode: str, *, prefill_len: int, max_context: int,
                    rounded: Mapping[str, Rounded] | None = None) -> onnx.ModelProto:
    """The fp32 static ``mode`` graph (prefill | decode) of ``model``, traced with static shapes (with the
    ``rounded`` weights where given)."""
    wrapper = StaticLlama(model, max_context=max_context, mode=mode, rounded=rounded).eval()
    inputs, outputs = wrapper.io_names()
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(wrapper, wrapper.example_inputs(prefill_len), buf, input_names=inputs,
                          output_names=outputs, opset_version=21, dynamo=False, do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


# ----------------------------------------------------------------------------- calibration feeds

def prefill_feeds(windows: np.ndarray, prefill_len: int) -> list[dict[str, np.ndarray]]:
    """Prefill feeds from token windows ``[N, L]``: the first ``prefill_len`` tokens (shorter windows
    right-padded with mask 0)."""
    feeds = []
    for row in np.asarray(windows, np.int64):
        ids = row[:prefill_len]
        n = len(ids)
        feeds.append({"input_ids": np.pad(ids, (0, prefill_len - n))[None],
                      "position_ids": np.arange(prefill_len, dtype=np.int64)[None],
                      "attention_mask": (np.arange(prefill_len) < n).astype(np.int64)[None]})
    return feeds


def decode_feeds(model: nn.Module, windows: np.ndarray, max_context: int, per_window: int = 4,
                 seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Decode feeds from real caches: for each window, the float model's KV cache of its first ``t`` tokens
    (``per_window`` positions ``t`` drawn in ``[1, min(L, max_context) - 1]``) in the fixed cache, and token
    ``t`` at position ``t``."""
    rng = np.random.default_rng(seed)
    feeds = []
    for row in np.asarray(windows, np.int64):
        n = min(len(row), max_context)
        ids = torch.from_numpy(row[:n])[None]
        with torch.no_grad():
            cache = model(input_ids=ids, use_cache=True).past_key_values
        kv = [(layer_k, layer_v) for layer_k, layer_v in _cache_layers(cache)]
        for t in sorted(rng.choice(np.arange(1, n), size=min(per_window, n - 1), replace=False)):
            feed = {"input_ids": row[t:t + 1][None], "position_ids": np.array([[t]], np.int64),
                    "attention_mask": (np.arange(max_context) < t).astype(np.int64)[None]}
            for i, (k, v) in enumerate(kv):
                for kind, x in (("key", k), ("value", v)):
                    buf = np.zeros((1, x.shape[1], max_context, x.shape[3]), np.float32)
                    buf[:, :, :t] = x[:, :, :t].float().numpy()
                    feed[f"past_{kind}.{i}"] = buf
            feeds.append(feed)
    return feeds


def _cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) ``[1, kv_heads, T, d]`` per layer from a transformers cache object or legacy tuple."""
    if hasattr(cache, "layers"):  # transformers >= 4.56 DynamicCache
        return [(lay.keys, lay.values) for lay in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v in cache]


# ----------------------------------------------------------------------------- artifact

def export_npu_causal_lm(model: nn.Module, dest, windows: np.ndarray, *, static_shapes: Mapping[str, int],
                         activations: str = "uint16", rounding: str = "gptq", decode_per_window: int = 4,
                         progress=None) -> dict:
    """Write the static prefill and decode graphs of ``model`` into ``dest`` as QDQ NPU graphs
    (``prefill.onnx``, ``decode.onnx`` and, with onnxruntime-qnn installed, their compiled HTP contexts),
    calibrated on ``windows`` (token windows ``[N, L]``): prefill on their first ``prefill_len`` tokens, decode
    on the float model's real caches at ``decode_per_window`` positions per window. ``rounding``: how the weights
    reach their int8 per-channel grid, ``gptq`` (:func:`round_linears`, on the same windows; both graphs hold
    the same codes) or ``nearest``. Returns manifest fields."""
    from .npu import write_npu_artifact

    p, c = llm_static_dims(static_shapes)
    windows = np.asarray(windows, np.int64)
    if windows.ndim != 2 or len(windows) == 0 or windows.shape[1] < 2:
        raise NpuExportError(f"the NPU export needs calibration token windows [N, L >= 2], got {list(windows.shape)}",
                             hint="set calibration.samples and calibration.seq_len")
    if rounding not in ROUNDINGS:
        raise NpuExportError(f"unknown NPU weight rounding {rounding!r}", hint=f"use one of {ROUNDINGS}")
    feeds = {PREFILL: prefill_feeds(windows, p), DECODE: decode_feeds(model, windows, c, decode_per_window)}
    shapes = {"batch_size": 1, "prefill_len": p, "max_context": c}
    rounded, rounding_record = ({}, {"method": "nearest"}) if rounding == "nearest" else round_linears(model, windows)
    if progress is not None:
        progress()
    bodies = {}
    for mode in (PREFILL, DECODE):
        proto = static_llm_onnx(model, mode, prefill_len=p, max_context=c, rounded=rounded)
        scales = grid_scales(proto, model, rounded) if rounded else None
        inits = {i.name: i for i in proto.graph.initializer}
        bodies[mode] = write_npu_artifact(proto, dest, feeds[mode], static_shapes=shapes, activations=activations,
                                          weight_scales=scales,
                                          rounded_weights={k: onnx.numpy_helper.to_array(inits[k]).T
                                                           for k in scales} if scales else None,
                                          model_file=f"{mode}.onnx", context_file=f"{mode}_ctx.onnx",
                                          table_type="uint16", fp16=True,
                                          fp16_wide_range=FP16_WIDE_RANGE)
        if progress is not None:
            progress()
    pre, dec = bodies[PREFILL], bodies[DECODE]
    graphs = {mode: {"model": b["onnx"]["model"], "context": b["npu"]["context"], "placement": b["npu"]["placement"],
                     "inputs": b["npu"]["inputs"], "calibration_feeds": b["npu"]["calibration_feeds"],
                     "op_counts": b["onnx"]["op_counts"]} for mode, b in bodies.items()}
    npu = {k: v for k, v in pre["npu"].items() if k not in ("context", "placement", "inputs", "calibration_feeds")}
    npu["graphs"] = graphs
    npu["weight_rounding"] = rounding_record
    npu["kv_cache"] = {"layout": "[layers, (key, value), kv_heads, max_context, head_dim] float32, held by the runtime",
                       "prefill": "writes key.{i}/value.{i} [1, kv_heads, prefill_len, head_dim] into slots 0..P-1",
                       "decode": "reads past_key.{i}/past_value.{i} [1, kv_heads, max_context, head_dim] with "
                                 "attention_mask over the slots; its key.{i}/value.{i} go into slot position_ids"}
    return {"onnx": {**pre["onnx"], "decode_model": dec["onnx"]["model"]}, "npu": npu, "weights": pre["weights"]}
