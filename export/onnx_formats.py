"""ONNX emission of the weight formats in ``edgecompress.compress.quant.formats``.

* fp32 ``nn.Linear``            -> ``MatMul`` (+ ``Add`` for a bias)
* int4/int8 in blocks of 16..256 (``QuantLinear``) -> ``com.microsoft::MatMulNBits`` (packed uint8 B,
  scales, zero points); the block layout is the one the embedding's ``GatherBlockQuantized`` reads,
  so a tied embedding and LM head share one stored tensor
* int8 per output channel (``QuantLinear``) -> QDQ: ``DequantizeLinear`` (axis 0) + ``MatMul``;
  with static input quantization (W8A8) the input gets a ``QuantizeLinear``/``DequantizeLinear`` pair
* int3 (``QuantLinear``, symmetric) -> ``edgecompress::MatMulBlockQuantized`` with its ONNX function
  body (``onnx_custom``), so ONNX Runtime runs it without a kernel of its own
* fp4 E2M1 (``QuantLinear`` of an ``FP4Tensor``) -> ``edgecompress::MatMulFP4``, likewise
* embeddings                    -> ``Gather`` / ``com.microsoft::GatherBlockQuantized``

Scales are stored as float16 when that is lossless (the quantizer rounds them so) and cast to float32
in the graph; ONNX Runtime folds the cast once at session creation. A packed tensor used by
both the embedding and the tied LM head is stored once (``WeightCache``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from onnx import TensorProto, helper
from torch import nn

from edgecompress.compress.quant.activation import ActQuant
from edgecompress.compress.quant.formats import BlockQuantizedTensor, SplitRowsTensor
from edgecompress.compress.quant.fp4 import E2M1_VALUES, FP4Tensor
from edgecompress.compress.quant.modules import QuantEmbedding, QuantLinear
from edgecompress.compress.quant.rotation import HadamardRotation

from . import onnx_custom as custom
from .graph import FLOAT, INT64, MS_DOMAIN, GraphBuilder


@dataclass
class EmitOptions:
    accuracy_level: int = 4


@dataclass
class LayerFormat:
    """One row of the manifest's per-layer table."""

    module: str
    format: str
    onnx_op: str
    bits: float
    params: int
    stored_bytes: int
    shared_with: list[str] = field(default_factory=list)
    shape: tuple[int, int] = (0, 0)  # (N outputs, K inputs)
    block_size: int = 0
    initializers: dict[str, str] = field(default_factory=dict)
    parts: list[tuple[str, int]] = field(default_factory=list)  # fused projections: (name, rows)


class WeightCache:
    """Initializer names per packed tensor id, so a tied tensor is stored once.

    The cache holds a reference to every tensor it has seen: fused projections are temporary
    objects, and CPython gives a freed object's id to the next one, so without the reference a
    later layer's fused weights could be mistaken for an earlier layer's (and silently reuse them).
    """

    def __init__(self) -> None:
        self._by_id: dict[int, dict[str, str]] = {}
        self.owner: dict[int, str] = {}
        self._alive: list[object] = []

    def get(self, packed: object) -> dict[str, str] | None:
        return self._by_id.get(id(packed))

    def put(self, packed: object, names: dict[str, str], owner: str) -> None:
        self._alive.append(packed)
        self._by_id[id(packed)] = names
        self.owner[id(packed)] = owner


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _scale_tensor(g: GraphBuilder, base: str, scales: np.ndarray, opts: EmitOptions) -> tuple[str, str, int]:
    """Store scales as float16 when that is lossless (the quantizer rounded them), else float32.

    Returns (stored name, float32 name, stored bytes).
    """
    if np.array_equal(scales.astype(np.float16).astype(np.float32), scales):
        stored = g.initializer(f"{base}.scales_f16", scales.astype(np.float16))
        return stored, g.op("Cast", stored, name=f"{base}/cast_scales", to=TensorProto.FLOAT), scales.size * 2
    stored = g.initializer(f"{base}.scales", scales.astype(np.float32))
    return stored, stored, scales.size * 4


def _pack_zero_points(zp: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits zero points: one byte each for 8 bits, two per byte (low nibble first) for 4."""
    if bits == 8:
        return zp.astype(np.uint8)
    n, nb = zp.shape
    out = np.zeros((n, (nb + 1) // 2), np.uint8)
    out[:, : (nb + 1) // 2] |= zp[:, 0::2]
    out[:, : nb // 2] |= (zp[:, 1::2] << 4).astype(np.uint8)
    return out


def _nbits_initializers(g: GraphBuilder, base: str, p: BlockQuantizedTensor,
                       opts: EmitOptions) -> tuple[dict[str, str], int]:
    names = {"B": g.initializer(f"{base}.qweight", _np(p.qweight))}
    _, names["scales"], nbytes = _scale_tensor(g, base, _np(p.scales), opts)
    nbytes += p.qweight.numel()
    if p.zero_points is not None:
        zp = _pack_zero_points(_np(p.zero_points), p.bits)
        names["zero_points"] = g.initializer(f"{base}.zero_points", zp)
        nbytes += zp.size
    return names, nbytes


def matmulnbits_ok(p: BlockQuantizedTensor) -> bool:
    """ONNX Runtime's MatMulNBits takes 4- or 8-bit codes in power-of-two blocks of 16..256."""
    b = p.block_size
    return p.bits in (4, 8) and 16 <= b <= 256 and b & (b - 1) == 0


def emit_linear(g: GraphBuilder, x: str, mod: nn.Module, base: str, opts: EmitOptions,
                cache: WeightCache) -> tuple[str, LayerFormat]:
    """Emit ``y = mod(x)``; return the output name and the layer's format record."""
    extra = _emit_extra_linear(g, x, mod, base, opts, cache)
    if extra is not None:
        return extra
    if isinstance(mod, QuantLinear) and isinstance(mod.packed, FP4Tensor):
        y, fmt = _emit_fp4_custom(g, x, mod.packed, base, opts)
        bias = mod.bias
    elif isinstance(mod, QuantLinear) and isinstance(mod.packed, SplitRowsTensor):
        y, fmt = _emit_split_linear(g, x, mod.packed, base, opts, cache)
        bias = mod.bias
    elif isinstance(mod, QuantLinear):
        p = mod.packed
        n, k = p.shape
        rot_names = {}
        if mod.rotation is not None:
            x, rot_names = _emit_rotation(g, x, mod.rotation, base)
        if mod.act is not None:
            if not p.bits == 8 or p.n_blocks != 1:
                raise NotImplementedError(f"{base}: static activation quantization exports with int8 "
                                          "per-channel weights (W8A8); use bits: 8, group_size: null")
            x, act_names = _emit_act_qdq(g, x, mod.act, base)
        if matmulnbits_ok(p) and mod.act is None:
            names = cache.get(p)
            owner = cache.owner.get(id(p), base)
            nbytes = 0
            if names is None:
                names, nbytes = _nbits_initializers(g, base, p, opts)
                cache.put(p, names, base)
            elif p.zero_points is not None and "zero_points" not in names:
                # B and scales are shared with the embedding; MatMulNBits packs zero points its own way
                zp = _pack_zero_points(_np(p.zero_points), p.bits)
                names["zero_points"] = g.initializer(f"{base}.zero_points", zp)
                nbytes += zp.size
            shared = [owner] if owner != base else []
            ins = [x, names["B"], names["scales"]] + ([names["zero_points"]] if "zero_points" in names else [])
            y = g.op("MatMulNBits", *ins, name=f"{base}/MatMulNBits", domain=MS_DOMAIN,
                     K=k, N=n, bits=p.bits, block_size=p.block_size, accuracy_level=opts.accuracy_level)
            fmt = LayerFormat(base, f"int{p.bits}-b{p.block_size}-{'sym' if p.symmetric else 'asym'}",
                              "MatMulNBits", 8 * nbytes / (n * k), n * k, nbytes, shared,
                              (n, k), p.block_size, dict(names))
        elif p.bits == 8:
            y, fmt = _emit_int8_qdq(g, x, p, base, opts, unsigned=mod.act is not None)
            if cache.get(p) is not None and cache.owner.get(id(p)) != base:
                fmt.shared_with = [cache.owner[id(p)]]  # same parameters, stored again transposed
            if mod.act is not None:
                fmt.format += f"-a{mod.act.bits}"
                fmt.onnx_op = "QuantizeLinear+DequantizeLinear+" + fmt.onnx_op
                fmt.initializers.update(act_names)
        elif p.bits == 3:
            y, fmt = _emit_block_quantized_custom(g, x, p, base, opts)
        else:
            raise NotImplementedError(
                f"{base}: no ONNX form for {p.bits}-bit weights in blocks of {p.block_size}; "
                "use a group_size of 16..256 (a power of two)")
        if rot_names:
            fmt.format += "-hadamard"
            fmt.onnx_op = "Hadamard+" + fmt.onnx_op
            fmt.initializers.update(rot_names)
        bias = mod.bias
    elif isinstance(mod, nn.Linear):
        w = g.initializer(f"{base}.weight_t", _np(mod.weight).T.copy())
        y = g.op("MatMul", x, w, name=f"{base}/MatMul")
        fmt = LayerFormat(base, "fp32", "MatMul", 32.0, mod.weight.numel(), mod.weight.numel() * 4,
                          shape=tuple(mod.weight.shape), initializers={"weight_t": w})
        bias = mod.bias
    else:
        raise NotImplementedError(f"{base}: no ONNX emitter for {type(mod).__name__}")
    if bias is not None:
        fmt.initializers["bias"] = g.initializer(f"{base}.bias", _np(bias).astype(np.float32))
        y = g.op("Add", y, fmt.initializers["bias"], name=f"{base}/bias")
    return y, fmt


def _emit_rotation(g: GraphBuilder, x: str, rot: HadamardRotation, base: str) -> tuple[str, dict[str, str]]:
    """``x (A ⊗ B)`` as ``Aᵀ X B`` on the ``[a, b]`` view of the last axis: Reshape, MatMul by ``B``,
    MatMul by ``Aᵀ`` (broadcast over the leading axes), Reshape back to ``x``'s shape. The factors are
    graph constants shared by every layer of the same size."""
    A, B = (f.numpy() for f in rot.factors())
    names = {}
    for key, arr in (("hadamard_a", A.T.copy()), ("hadamard_b", B)):
        name = f"hadamard.{arr.shape[0]}" + (".t" if key == "hadamard_a" else "")
        names[key] = name if name in g.initializers else g.initializer(name, arr.astype(np.float32))
    shape = g.op("Shape", x, name=f"{base}/hadamard_Shape")
    view = g.op("Reshape", x, g.const(f"{base}.hadamard_view", np.array([-1, rot.a, rot.b], np.int64)),
                name=f"{base}/hadamard_Reshape")
    y = g.op("MatMul", view, names["hadamard_b"], name=f"{base}/hadamard_MatMulB")
    y = g.op("MatMul", names["hadamard_a"], y, name=f"{base}/hadamard_MatMulA")
    return g.op("Reshape", y, shape, name=f"{base}/hadamard_Reshape_back"), names


def _emit_act_qdq(g: GraphBuilder, x: str, act: ActQuant, base: str) -> tuple[str, dict[str, str]]:
    """Static input quantization: ``QuantizeLinear`` -> ``DequantizeLinear`` (uint8, per tensor), the
    pattern ONNX Runtime fuses with the weight's ``DequantizeLinear`` into ``MatMulIntegerToFloat``."""
    if act.bits != 8 or act.per_channel:
        raise NotImplementedError(f"{base}: only per-tensor uint8 input quantization has an ONNX form here "
                                  "(an integer matmul needs one input scale)")
    s = g.initializer(f"{base}.input_scale", _np(act.scale).astype(np.float32))
    zp = g.initializer(f"{base}.input_zero_point", _np(act.zero_point).astype(np.uint8))
    q = g.op("QuantizeLinear", x, s, zp, name=f"{base}/input_QuantizeLinear")
    return (g.op("DequantizeLinear", q, s, zp, name=f"{base}/input_DequantizeLinear"),
            {"input_scale": s, "input_zero_point": zp})


def fuse_linears(mods: list[nn.Module]) -> nn.Module | None:
    """One projection computing the concatenated outputs of ``mods`` sharing one input (None when
    their formats, or their input quantization or activation sparsity, differ)."""
    from edgecompress.compress.sparse.activation import ActSparseLinear

    if any(isinstance(m, ActSparseLinear) for m in mods):
        if not all(isinstance(m, ActSparseLinear) and m.site == mods[0].site for m in mods):
            return None
        inner = fuse_linears([m.inner for m in mods])
        return None if inner is None else ActSparseLinear(inner, mods[0].threshold, site=mods[0].site,
                                                          method=mods[0].method)
    biases = [m.bias for m in mods]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b.detach() if b is not None else torch.zeros(m.out_features) for b, m in zip(biases, mods)])
    if all(type(m) is nn.Linear for m in mods):
        fused = nn.Linear(mods[0].in_features, sum(m.out_features for m in mods), bias=bias is not None)
        fused.weight.data = torch.cat([m.weight.data for m in mods])
        if bias is not None:
            fused.bias.data = bias
        return fused
    if all(isinstance(m, QuantLinear) for m in mods):
        acts = [m.act for m in mods]
        if any((a is None) != (acts[0] is None) for a in acts) or any(m.rotation != mods[0].rotation for m in mods):
            return None
        if acts[0] is not None and not all(
                torch.equal(a.scale, acts[0].scale) and torch.equal(a.zero_point, acts[0].zero_point)
                and a.bits == acts[0].bits for a in acts):
            return None
        try:
            return QuantLinear(mods[0].packed.cat_rows(*[m.packed for m in mods[1:]]), bias, acts[0], mods[0].rotation)
        except ValueError:
            return None
    return None


def _emit_extra_linear(g: GraphBuilder, x: str, mod: nn.Module, base: str, opts: EmitOptions,
                       cache: WeightCache) -> tuple[str, LayerFormat] | None:
    """Sparse weights (``edgecompress::SparseMatMul``, :mod:`.onnx_sparse`), low-rank corrections
    (the base layer plus two small ``MatMul``s, :mod:`.onnx_lowrank`) and activation-sparse inputs
    (``edgecompress::ActSparse`` before the inner layer, :mod:`.onnx_act_sparse`); None for the other formats."""
    from edgecompress.compress.lowrank.apply import LowRankLinear
    from edgecompress.compress.sparse.activation import ActSparseLinear
    from edgecompress.compress.sparse.format import SparseLinear

    if isinstance(mod, ActSparseLinear):
        from .onnx_act_sparse import emit_act_sparse_linear

        return emit_act_sparse_linear(g, x, mod, base, opts, cache)
    if isinstance(mod, LowRankLinear):
        from .onnx_lowrank import emit_lowrank_linear

        return emit_lowrank_linear(g, x, mod, base, opts, cache)
    if isinstance(mod, SparseLinear):
        from .onnx_sparse import emit_sparse_linear

        y, fmt = emit_sparse_linear(g, x, mod, base)
    else:
        return None
    if mod.bias is not None:
        fmt.initializers["bias"] = g.initializer(f"{base}.bias", _np(mod.bias).astype(np.float32))
        y = g.op("Add", y, fmt.initializers["bias"], name=f"{base}/bias")
    return y, fmt


def _emit_int8_qdq(g: GraphBuilder, x: str, p: BlockQuantizedTensor, base: str,
                   opts: EmitOptions, *, unsigned: bool = False) -> tuple[str, LayerFormat]:
    """int8 weights as QDQ: codes stored transposed ``[K, N]``, quantized along axis 0.

    ``unsigned`` stores symmetric codes as uint8 with zero point 128 (the same dequantized
    weights): with a uint8 activation, ONNX Runtime's integer matmul is then U8U8, which is exact
    on every x86 CPU. U8S8 — uint8 activations times int8 weights — runs on AVX2 CPUs without
    VNNI as ``vpmaddubsw``, whose int16 pair sums saturate (255 * 127 * 2 > 32767): wrong results,
    not just rounding, on such a CPU."""
    n, k = p.shape
    codes = _np(p.unpacked()).reshape(n, -1)[:, :k]  # [N, K] unsigned
    scales = _np(p.scales).T.copy()  # [n_blocks, N]
    per_channel = p.n_blocks == 1
    if p.symmetric and unsigned and per_channel:
        q = g.initializer(f"{base}.qweight", codes.T.copy())
        zp_in = [g.initializer(f"{base}.zero_points", np.full(n, 128, np.uint8))]
        zbytes = n
    elif p.symmetric:
        q = g.initializer(f"{base}.qweight", (codes.astype(np.int16) - 128).astype(np.int8).T.copy())
        zp_in: list[str] = []
        zbytes = 0
    else:
        q = g.initializer(f"{base}.qweight", codes.T.copy())
        zp = _np(p.zero_points).T.copy()
        zp_in = [g.initializer(f"{base}.zero_points", zp[0] if per_channel else zp)]
        zbytes = zp.size
    _, s, sbytes = _scale_tensor(g, base, scales[0] if per_channel else scales, opts)
    attrs = {"axis": 1} if per_channel else {"axis": 0, "block_size": p.block_size}
    w = g.op("DequantizeLinear", q, s, *zp_in, name=f"{base}/DequantizeLinear", **attrs)
    y = g.op("MatMul", x, w, name=f"{base}/MatMul")
    label = "int8-channel" if per_channel else f"int8-b{p.block_size}"
    inits = {"qweight": q, "scales": s} | ({"zero_points": zp_in[0]} if zp_in else {})
    fmt = LayerFormat(base, f"{label}-{'sym' if p.symmetric else 'asym'}", "DequantizeLinear+MatMul",
                      8 * (n * k + sbytes + zbytes) / (n * k), n * k, n * k + sbytes + zbytes,
                      shape=(n, k), block_size=p.block_size, initializers=inits)
    return y, fmt


def _emit_custom(g: GraphBuilder, x: str, p: BlockQuantizedTensor | FP4Tensor, base: str, opts: EmitOptions,
                 op: str, function, label: str) -> tuple[str, LayerFormat]:
    """``edgecompress::<op>(x, packed codes, scales)`` with its function body added to the model once."""
    n, k = p.shape
    if not any(f.domain == custom.DOMAIN and f.name == op for f in g.functions):
        g.functions.append(function())
    b = g.initializer(f"{base}.qweight", _np(p.qweight))
    _, s, sbytes = _scale_tensor(g, base, _np(p.scales), opts)
    y = g.op(op, x, b, s, name=f"{base}/{op}", domain=custom.DOMAIN)
    g.value_info.append(helper.make_tensor_value_info(y, FLOAT, None))
    nbytes = p.qweight.numel() + sbytes
    return y, LayerFormat(base, label, f"{custom.DOMAIN}::{op}", 8 * nbytes / (n * k), n * k, nbytes,
                          shape=(n, k), block_size=p.block_size, initializers={"B": b, "scales": s})


def _emit_block_quantized_custom(g: GraphBuilder, x: str, p: BlockQuantizedTensor, base: str,
                                 opts: EmitOptions) -> tuple[str, LayerFormat]:
    """3-bit weights as ``edgecompress::MatMulBlockQuantized`` with its function body in the model."""
    if not p.symmetric:
        raise NotImplementedError(f"{base}: 3-bit export is symmetric only; set symmetric: true")
    return _emit_custom(g, x, p, base, opts, custom.MATMUL_BQ,
                        lambda: custom.matmul_block_quantized_function(g.opset), f"int3-b{p.block_size}-sym")


def _emit_fp4_custom(g: GraphBuilder, x: str, p: FP4Tensor, base: str,
                     opts: EmitOptions) -> tuple[str, LayerFormat]:
    """fp4 (E2M1) weights as ``edgecompress::MatMulFP4`` with its function body in the model."""
    return _emit_custom(g, x, p, base, opts, custom.MATMUL_FP4,
                        lambda: custom.matmul_fp4_function(g.opset, E2M1_VALUES.numpy()), f"fp4-e2m1-b{p.block_size}")


def emit_embedding(g: GraphBuilder, ids: str, mod: nn.Module, base: str, opts: EmitOptions,
                   cache: WeightCache) -> tuple[str, LayerFormat]:
    """Emit the token embedding lookup ``[B, S] -> [B, S, H]``."""
    if isinstance(mod, QuantEmbedding) and isinstance(mod.packed, SplitRowsTensor):
        return _emit_split_embedding(g, ids, mod.packed, base, opts, cache)
    if isinstance(mod, QuantEmbedding):
        p = mod.packed
        v, h = p.shape
        if isinstance(p, FP4Tensor):
            raise NotImplementedError(f"{base}: fp4 embeddings have no ONNX form; quantize the embedding as int4/int8")
        if p.bits not in (4, 8):
            raise NotImplementedError(f"{base}: no ONNX form for {p.bits}-bit embeddings (GatherBlockQuantized "
                                      "takes 4 or 8 bits); quantize the embedding separately at 4 or 8 bits")
        if p.bits == 8 and p.n_blocks == 1 and not matmulnbits_ok(p):
            return _emit_int8_row_embedding(g, ids, p, base, opts, cache)
        qname = g.initializer(f"{base}.qweight", _np(p.qweight))
        _, s2d, sbytes = _scale_tensor(g, base, _np(p.scales), opts)  # [V, n_blocks], shared with a tied head
        s = g.op("Unsqueeze", s2d, g.const("axes2", np.array([2], np.int64)), name=f"{base}/scales_3d")
        ins = [qname, ids, s]
        zbytes = 0
        if p.zero_points is not None:
            zp = _np(p.zero_points)[..., None]
            ins.append(g.initializer(f"{base}.gather.zero_points", zp))
            zbytes = zp.size
        out = g.op("GatherBlockQuantized", *ins, name=f"{base}/GatherBlockQuantized", domain=MS_DOMAIN,
                   gather_axis=0, quantize_axis=2, block_size=p.block_size, bits=p.bits)
        padded = p.n_blocks * p.block_size
        out = g.op("Reshape", out, g.const("emb_shape", np.array([0, 0, padded], np.int64)),
                   name=f"{base}/reshape")
        if padded != h:
            out = g.op("Slice", out, g.const("zero", np.array([0], np.int64)),
                       g.const("hidden", np.array([h], np.int64)), g.const("axis2", np.array([2], np.int64)),
                       name=f"{base}/unpad")
        cache.put(p, {"B": qname, "scales": s2d}, base)
        nbytes = p.qweight.numel() + sbytes + zbytes
        inits = {"B": qname, "scales": s} | ({"zero_points": ins[3]} if len(ins) > 3 else {})
        fmt = LayerFormat(base, f"int{p.bits}-b{p.block_size}-{'sym' if p.symmetric else 'asym'}",
                          "GatherBlockQuantized", 8 * nbytes / (v * h), v * h, nbytes,
                          shape=(v, h), block_size=p.block_size, initializers=inits)
        return out, fmt
    if isinstance(mod, nn.Embedding):
        w = g.initializer(f"{base}.weight", _np(mod.weight))
        cache.put(mod.weight, {"dense": w}, base)
        out = g.op("Gather", w, ids, name=f"{base}/Gather", axis=0)
        return out, LayerFormat(base, "fp32", "Gather", 32.0, mod.weight.numel(), mod.weight.numel() * 4,
                                shape=tuple(mod.weight.shape), initializers={"weight": w})
    raise NotImplementedError(f"{base}: no ONNX emitter for {type(mod).__name__}")


def _split_positions(g: GraphBuilder, p: SplitRowsTensor, base: str,
                     cache: WeightCache) -> tuple[dict[str, str], int]:
    """``{"row_position": stored, "position": int64 [V]}``: each row's place in ``[int8 rows; other
    rows]``, stored as uint16 or int32 (``p.position_bits``) and cast at load; shared by a tied
    embedding and head. Also returns the bytes stored by this call."""
    names = cache.get(p)
    if names is not None:
        return names, 0
    pos = _np(p.position())
    stored = pos.astype(np.uint16 if p.position_bits == 16 else np.int32)
    q = g.initializer(f"{base}.row_position", stored)
    names = {"row_position": q, "position": g.op("Cast", q, name=f"{base}/row_position_int64", to=INT64)}
    cache.put(p, names, base)
    return names, stored.nbytes


def _split_format(base: str, p: SplitRowsTensor, op: str, hi: LayerFormat, lo: LayerFormat, pos_bytes: int,
                  shared: list[str], position: dict[str, str]) -> LayerFormat:
    v, h = p.shape
    nbytes = hi.stored_bytes + lo.stored_bytes + pos_bytes
    inits = {f"hi.{k}": n for k, n in hi.initializers.items()} | {f"lo.{k}": n for k, n in lo.initializers.items()}
    return LayerFormat(base, f"{hi.format}-rows{p.rows.numel()}+{lo.format}", f"SplitRows:{op}", 8 * nbytes / (v * h),
                       v * h, nbytes, shared, (v, h), p.lo.block_size,
                       inits | {"row_position": position["row_position"]})


def _emit_split_embedding(g: GraphBuilder, ids: str, p: SplitRowsTensor, base: str, opts: EmitOptions,
                          cache: WeightCache) -> tuple[str, LayerFormat]:
    """Rows from two ``GatherBlockQuantized`` tables: ``position[id]`` < n picks the int8 table at that
    row, else the other table at ``position[id] - n``; ``Where`` selects per token."""
    position, pos_bytes = _split_positions(g, p, base, cache)
    n = p.rows.numel()
    where = g.op("Gather", position["position"], ids, name=f"{base}/row_position", axis=0)
    n_hi = g.const("n_int8_rows", np.array([n], np.int64))
    is_hi = g.op("Less", where, n_hi, name=f"{base}/is_int8_row")
    i_hi = g.op("Min", where, g.const("last_int8_row", np.array([n - 1], np.int64)), name=f"{base}/int8_row")
    i_lo = g.op("Max", g.op("Sub", where, n_hi, name=f"{base}/sub_rows"),
                g.const("zero_row", np.array([0], np.int64)), name=f"{base}/other_row")
    e_hi, f_hi = emit_embedding(g, i_hi, QuantEmbedding(p.hi), f"{base}.int8_rows", opts, cache)
    e_lo, f_lo = emit_embedding(g, i_lo, QuantEmbedding(p.lo), f"{base}.other_rows", opts, cache)
    cond = g.op("Unsqueeze", is_hi, g.const("axes_last", np.array([-1], np.int64)), name=f"{base}/is_int8_row_3d")
    out = g.op("Where", cond, e_hi, e_lo, name=f"{base}/select_rows")
    return out, _split_format(base, p, "GatherBlockQuantized", f_hi, f_lo, pos_bytes, [], position)


def _emit_split_linear(g: GraphBuilder, x: str, p: SplitRowsTensor, base: str, opts: EmitOptions,
                       cache: WeightCache) -> tuple[str, LayerFormat]:
    """Two ``MatMulNBits`` (int8 rows, other rows), concatenated and put back in row order by one
    ``Gather`` over the last axis (the rows and positions a tied embedding stored, reused)."""
    owner = cache.owner.get(id(p))
    position, pos_bytes = _split_positions(g, p, base, cache)
    y_hi, f_hi = emit_linear(g, x, QuantLinear(p.hi), f"{base}.int8_rows", opts, cache)
    y_lo, f_lo = emit_linear(g, x, QuantLinear(p.lo), f"{base}.other_rows", opts, cache)
    y = g.op("Concat", y_hi, y_lo, name=f"{base}/concat_rows", axis=-1)
    y = g.op("Gather", y, position["position"], name=f"{base}/row_order", axis=-1)
    shared = [owner] if owner is not None and owner != base else []
    return y, _split_format(base, p, f_hi.onnx_op, f_hi, f_lo, pos_bytes, shared, position)


def _emit_int8_row_embedding(g: GraphBuilder, ids: str, p: BlockQuantizedTensor, base: str,
                             opts: EmitOptions, cache: WeightCache) -> tuple[str, LayerFormat]:
    """int8 rows with one scale each (a row length ``GatherBlockQuantized`` cannot block): gather the
    codes and the row scales, ``(q - zp) * scale`` in standard ops."""
    v, h = p.shape
    codes = _np(p.unpacked()).reshape(v, -1)[:, :h]
    if p.symmetric:
        q = g.initializer(f"{base}.qweight", (codes.astype(np.int16) - 128).astype(np.int8))
        zbytes = 0
    else:
        q = g.initializer(f"{base}.qweight", codes.copy())
        zp = g.initializer(f"{base}.zero_points", _np(p.zero_points).reshape(v, 1).astype(np.float32))
        zbytes = v
    _, s, sbytes = _scale_tensor(g, base, _np(p.scales).reshape(v, 1), opts)
    rows = g.op("Cast", g.op("Gather", q, ids, name=f"{base}/Gather", axis=0), name=f"{base}/cast", to=FLOAT)
    if not p.symmetric:
        rows = g.op("Sub", rows, g.op("Gather", zp, ids, name=f"{base}/gather_zp", axis=0), name=f"{base}/sub_zp")
    out = g.op("Mul", rows, g.op("Gather", s, ids, name=f"{base}/gather_scales", axis=0), name=f"{base}/dequantize")
    nbytes = v * h + sbytes + zbytes
    cache.put(p, {"row_codes": q}, base)  # a tied head stores its own transposed copy (QDQ); counted once
    return out, LayerFormat(base, f"int8-row-{'sym' if p.symmetric else 'asym'}", "Gather+Mul", 8 * nbytes / (v * h),
                            v * h, nbytes, shape=(v, h), block_size=p.block_size,
                            initializers={"qweight": q, "scales": s} | ({"zero_points": zp} if zbytes else {}))


def emit_tied_head(g: GraphBuilder, x: str, weight: torch.Tensor, base: str, cache: WeightCache,
                   owner: str) -> tuple[str, LayerFormat]:
    """fp32 LM head tied to an fp32 embedding: ``MatMul(x, Transpose(E))`` sharing E on disk."""
    names = cache.get(weight)
    wt = g.op("Transpose", names["dense"], name=f"{base}/transpose_tied", perm=[1, 0])
    y = g.op("MatMul", x, wt, name=f"{base}/MatMul")
    return y, LayerFormat(base, "fp32", "MatMul", 32.0, weight.numel(), 0, [owner], tuple(weight.shape),
                          initializers={"weight": names["dense"]})
