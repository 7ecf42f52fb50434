"""Compile an ONNX artifact to a TVM library (Relax VM executable) with native low-bit kernels.

Relax's ONNX importer knows the standard operators but none of the ONNX Runtime contrib ops the
decoder export writes. This module supplies a converter for each one the toolkit emits:

* ``MatMulNBits`` and ``GatherBlockQuantized`` -> the packed-weight kernels of
  :mod:`.tvm_kernels` (weights stay 4/8-bit in memory; dequantized in the inner loop);
* ``GroupQueryAttention`` -> rotary embedding, an in-place append to the KV cache and two
  scheduled attention kernels (grouped heads read their shared KV head; no ``repeat``);
* ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` -> ``rms_norm``.

``edgecompress::ActSparse`` in front of 4-bit ``MatMulNBits`` (activation-sparse int4 linears) ->
the activation-sparse kernel (:mod:`.tvm_act_sparse`), which reads only the weight rows of active
inputs. ``edgecompress::SparseMatMul`` (pruned weights) -> the 2:4 or CSR kernel (:mod:`.tvm_sparse`),
which reads only the kept weights; ``edgecompress::MatMulBlockQuantized`` / ``MatMulFP4`` (int3, fp4) -> kernels
on their packed codes (:mod:`.tvm_lowbit`); an fp32 ``MatMul`` by a constant weight -> a GEMV
(:mod:`.tvm_dense`). Other ``edgecompress::`` custom ops are inlined to their ONNX function bodies before
import (their weights are then decompressed once, at compile time: they have no native TVM kernel;
the manifest lists them under ``tvm.function_body_ops``, the native kernels under ``tvm.kernels``). Any
other operator the importer lacks is an error naming the node, before any compilation.

The library's calling convention (:data:`INTERFACE`) differs from the ONNX graph's: ``main(input_ids,
*kv_cache_views, *params)`` returns the logits of every position (``logits_to_keep`` is fixed to
0); each cache view is the first ``T = past + new`` rows of a runtime-owned position-major buffer
``[positions, kv_heads, head_dim]``, and the new rows are written into it in place (no present
outputs, no per-token copies of the cache, no attention mask: one unpadded sequence). The
parameters (initializers) are trailing inputs of ``main``, stored in ``params.safetensors``
beside the library and bound once at load time.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.inliner  # not imported by `import onnx`; prepare() inlines custom ops with it
from onnx import numpy_helper

from edgecompress.errors import EdgeCompressError

from .npu import fold_constants

log = logging.getLogger(__name__)

LIBRARY, PARAMS = "model.so", "params.safetensors"
# The library's calling convention; the runtime refuses a library with another one.
INTERFACE = ("relax-vm/main and decode (one token)(input_ids [1, S], *kv_cache_views [T, kv_heads, head_dim], "
             "*params) -> logits; v3")

def _relax():
    import tvm
    from tvm import relax

    return tvm, relax


def _shape(expr) -> list:
    return list(expr.ty.shape.values)


def _as_rows(bb, x, k: int):
    """``x [..., k]`` reshaped to ``[rows, k]``: (the 2-D tensor, rows, the original shape)."""
    from tvm import relax

    shape = _shape(x)
    rows = 1
    for d in shape[:-1]:
        rows = rows * d
    return bb.emit(relax.op.reshape(x, [rows, k])), rows, shape


def _linear(bb, x, k: int, n: int, func, name: str, weights: list):
    """``func(x as [rows, K], *weights) -> [rows, N]`` as a ``call_tir`` of the PrimFunc ``func``
    (added to the module as ``name``), reshaped back to ``x``'s leading dimensions: how every
    native linear kernel is called."""
    from tvm import relax

    x2, rows, shape = _as_rows(bb, x, k)
    y = bb.emit(relax.call_tir(bb.add_func(func, name), [x2, *weights], relax.TensorType([rows, n], "float32")))
    return relax.op.reshape(y, shape[:-1] + [n])


def _str(value) -> str:
    """A string attribute as the importer hands it (bytes or str)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _lowbit_sizes(a, attr) -> tuple[int, int, int]:
    """``(K, N, block)`` of an int3/fp4 linear: K is the input's last dimension (the custom op has no K
    attribute; its function body reads K from the input's shape), which must be static."""
    k = _shape(a)[-1]
    if not isinstance(k, int) and not hasattr(k, "value"):
        raise NotImplementedError(f"int3/fp4 linear with a symbolic input width {k}")
    return int(k), int(attr["N"]), int(attr["block_size"])


class _Converters:
    """Converters for ONNX Runtime contrib ops, in the Relax importer's converter protocol."""

    @staticmethod
    def matmul_nbits(bb, inputs, attr, params):
        from tvm import relax

        from . import tvm_kernels as kern

        a, b, scales = inputs[0], inputs[1], inputs[2]
        zp = inputs[3] if len(inputs) > 3 and inputs[3] is not None else None
        if len(inputs) > 4 and any(x is not None for x in inputs[4:]):
            raise NotImplementedError("MatMulNBits with g_idx or bias inputs")
        k, n, bits, block = (int(attr[x]) for x in ("K", "N", "bits", "block_size"))
        return _linear(bb, a, k, n, kern.matmul_nbits(k, n, bits, block, zero_points=zp is not None),
                       f"matmul_nbits_k{k}_n{n}_b{bits}_g{block}{'_zp' if zp is not None else ''}",
                       [b, relax.op.reshape(scales, [-1])] + ([zp] if zp is not None else []))

    @staticmethod
    def matmul_nbits_int8(bb, inputs, attr, params):
        """``edgecompress::MatMulNBitsInt8`` (made by :func:`.tvm_int8.use_int8_kernels`)."""
        from . import tvm_kernels as kern

        a, w, scales = inputs[:3]
        zeros = inputs[3] if len(inputs) > 3 and inputs[3] is not None else None
        k, n, bits, block = (int(attr[x]) for x in ("K", "N", "bits", "block_size"))
        isa = kern.isa_of_code(int(attr.get("int8", 1)))
        return _linear(bb, a, k, n, kern.matmul_nbits_int8(k, n, bits, block, zero_points=zeros is not None, isa=isa),
                       f"matmul_nbits_int8_k{k}_n{n}_b{bits}_g{block}{'_zp' if zeros is not None else ''}",
                       [w, scales] + ([zeros] if zeros is not None else []))

    @staticmethod
    def matmul_f32(bb, inputs, attr, params):
        """``edgecompress::MatMulF32`` (made by :func:`.tvm_dense.use_dense_kernels`)."""
        from . import tvm_kernels as kern

        k, n = int(attr["K"]), int(attr["N"])
        return _linear(bb, inputs[0], k, n, kern.matmul_f32(k, n), f"matmul_f32_k{k}_n{n}", [inputs[1]])

    @staticmethod
    def matmul_int3(bb, inputs, attr, params):
        """``edgecompress::MatMulInt3`` (made by :func:`.tvm_lowbit.use_lowbit_kernels`)."""
        from . import tvm_kernels as kern

        k, n, block = _lowbit_sizes(inputs[0], attr)
        return _linear(bb, inputs[0], k, n, kern.matmul_int3(k, n, block), f"matmul_int3_k{k}_n{n}_g{block}",
                       list(inputs[1:3]))

    @staticmethod
    def matmul_e2m1(bb, inputs, attr, params):
        """``edgecompress::MatMulE2M1`` (made by :func:`.tvm_lowbit.use_lowbit_kernels`)."""
        from . import tvm_kernels as kern

        k, n, block = _lowbit_sizes(inputs[0], attr)
        return _linear(bb, inputs[0], k, n, kern.matmul_nbits(k, n, 4, block, zero_points=False, e2m1=True),
                       f"matmul_e2m1_k{k}_n{n}_g{block}", list(inputs[1:3]))

    @staticmethod
    def sparse_matmul_2of4(bb, inputs, attr, params):
        """``edgecompress::SparseMatMul2of4`` (made by :func:`.tvm_sparse.use_sparse_kernels`)."""
        from . import tvm_kernels as kern

        k, n = int(attr["K"]), int(attr["N"])
        isa = kern.isa_of_code(int(attr.get("isa", 1)), kern.PERMUTE_ISA_CODES)
        return _linear(bb, inputs[0], k, n, kern.sparse_matmul_2of4(k, n, _str(attr["value_dtype"]), isa),
                       f"sparse_matmul_2of4_k{k}_n{n}", list(inputs[1:3]))

    @staticmethod
    def sparse_matmul_csr(bb, inputs, attr, params):
        """``edgecompress::SparseMatMulCSR`` (made by :func:`.tvm_sparse.use_sparse_kernels`)."""
        from . import tvm_kernels as kern

        k, n, nnz = (int(attr[x]) for x in ("K", "N", "nnz"))
        return _linear(bb, inputs[0], k, n, kern.sparse_matmul_csr(k, n, nnz, _str(attr["value_dtype"])),
                       f"sparse_matmul_csr_k{k}_n{n}_nnz{nnz}", list(inputs[1:4]))

    @staticmethod
    def act_sparse_matmul_nbits(bb, inputs, attr, params):
        """``edgecompress::ActSparseMatMulNBits`` (made by :func:`.tvm_act_sparse.fuse_act_sparse`):
        the activation-sparse 4-bit kernel, rows flattened (prefill runs it once per row)."""
        from . import tvm_kernels as kern

        x, thr, w, scales = inputs[:4]
        zeros = inputs[4] if len(inputs) > 4 and inputs[4] is not None else None
        k, n, block, parts = (int(attr[a]) for a in ("K", "N", "block_size", "parts"))
        code = int(attr.get("int8", 0))
        int8 = code > 0
        make = (functools.partial(kern.act_sparse_matmul_nbits_int8, isa=kern.isa_of_code(code)) if int8
                else kern.act_sparse_matmul_nbits)
        return _linear(bb, x, k, n, make(k, n, block, zero_points=zeros is not None, parts=parts),
                       f"act_sparse_matmul_nbits{'_int8' if int8 else ''}_k{k}_n{n}_g{block}"
                       f"{'_zp' if zeros is not None else ''}", [thr, w, scales] + ([zeros] if zeros is not None else []))

    @staticmethod
    def gather_block_quantized(bb, inputs, attr, params):
        from tvm import relax

        from . import tvm_kernels as kern

        data, ids, scales = inputs[0], inputs[1], inputs[2]
        zp = inputs[3] if len(inputs) > 3 and inputs[3] is not None else None
        if int(attr.get("gather_axis", 0)) != 0 or int(attr.get("quantize_axis", 1)) != 2:
            raise NotImplementedError("GatherBlockQuantized other than gather_axis=0, quantize_axis=2")
        bits, block = int(attr.get("bits", 4)), int(attr["block_size"])
        v, nb, blob = (int(x) for x in _shape(data))
        ishape = _shape(ids)
        count = 1
        for d in ishape:
            count = count * d
        flat = bb.emit(relax.op.reshape(ids, [count]))
        func = kern.gather_block_quantized(v, nb, blob, bits, block, zero_points=zp is not None)
        gv = bb.add_func(func, f"gather_block_quantized_v{v}_b{bits}")
        args = [data, flat, scales] + ([zp] if zp is not None else [])
        width = blob * 8 // bits
        rows = bb.emit(relax.call_tir(gv, args, relax.TensorType([count, nb, width], "float32")))
        return relax.op.reshape(rows, ishape + [nb, width])

    @staticmethod
    def simplified_layer_norm(bb, inputs, attr, params):
        if int(attr.get("axis", -1)) != -1:
            raise NotImplementedError("SimplifiedLayerNormalization over an axis other than the last")
        return _rms_norm(bb, inputs[0], inputs[1], float(attr.get("epsilon", 1e-5)))

    @staticmethod
    def skip_simplified_layer_norm(bb, inputs, attr, params):
        from tvm import relax

        total = bb.emit(relax.op.add(inputs[0], inputs[1]))
        if len(inputs) > 3 and inputs[3] is not None:
            total = bb.emit(relax.op.add(total, inputs[3]))
        y = _rms_norm(bb, total, inputs[2], float(attr.get("epsilon", 1e-5)))
        empty = relax.const(0.0, "float32")
        return relax.Tuple([bb.emit(y), empty, empty, total])

    @staticmethod
    def group_query_attention(bb, inputs, attr, params):
        """GroupQueryAttention for one unpadded sequence (batch 1) over an in-place KV cache.

        ``past_key``/``past_value`` are views ``[T, kv_heads, head_dim]`` (position-major) of
        the runtime's cache buffers, ``T = P + S``: the ``S`` new keys and values are written at
        rows ``P .. T-1`` in place (:func:`.tvm_kernels.kv_append`) and attention reads all
        ``T`` rows; ``seqlens_k`` and ``total_sequence_length`` are implied by the shapes."""
        from tvm import relax

        from . import tvm_kernels as kern

        op = relax.op
        heads, kv = int(attr["num_heads"]), int(attr["kv_num_heads"])
        if int(attr.get("rotary_interleaved", 0)) or int(attr.get("local_window_size", -1)) != -1 \
                or float(attr.get("softcap", 0.0)) != 0.0:
            raise NotImplementedError("GroupQueryAttention with interleaved rotary, local window or softcap")
        q_in, k_in, v_in, past_k, past_v = inputs[:5]
        cos, sin = (inputs[7], inputs[8]) if int(attr.get("do_rotary", 0)) else (None, None)
        batch, seq = _shape(q_in)[:2]
        total = _shape(past_k)[0]
        d = int(_shape(past_k)[2])
        past = total - seq
        if k_in is None:  # packed QKV
            q = bb.emit(op.strided_slice(q_in, axes=[2], begin=[0], end=[heads * d]))
            k = bb.emit(op.strided_slice(q_in, axes=[2], begin=[heads * d], end=[(heads + kv) * d]))
            v = bb.emit(op.strided_slice(q_in, axes=[2], begin=[(heads + kv) * d], end=[(heads + 2 * kv) * d]))
        else:
            q, k, v = q_in, k_in, v_in
        q = bb.emit(op.reshape(q, [batch, seq, heads, d]))
        k = bb.emit(op.reshape(k, [seq, kv, d]))
        v = bb.emit(op.reshape(v, [seq, kv, d]))
        if cos is not None:
            pos = bb.emit(op.arange(past, total, 1, "int64"))
            # positions past the cache are refused by the runtime (max_positions in the manifest)
            c = bb.emit(op.take(cos, pos, axis=0, mode="clip"))
            s = bb.emit(op.take(sin, pos, axis=0, mode="clip"))

            def rotate(x, shape):
                x1 = bb.emit(op.strided_slice(x, axes=[3], begin=[0], end=[d // 2]))
                x2 = bb.emit(op.strided_slice(x, axes=[3], begin=[d // 2], end=[d]))
                return bb.emit(op.reshape(op.concat([op.subtract(op.multiply(x1, c4), op.multiply(x2, s4)),
                                                     op.add(op.multiply(x2, c4), op.multiply(x1, s4))], axis=3),
                                          shape))
            c4 = bb.emit(op.reshape(c, [1, seq, 1, d // 2]))
            s4 = bb.emit(op.reshape(s, [1, seq, 1, d // 2]))
            q = rotate(q, [batch, seq, heads, d])
            k = rotate(bb.emit(op.reshape(k, [1, seq, kv, d])), [seq, kv, d])
        append = bb.add_func(kern.kv_append(kv, d), f"kv_append_kv{kv}_d{d}")
        cache = relax.TensorType([total, kv, d], "float32")
        kc = bb.emit(relax.call_tir_inplace(append, [past_k, k], [0], cache))
        vc = bb.emit(relax.call_tir_inplace(append, [past_v, v], [0], cache))
        group = heads // kv
        scale = float(attr.get("scale", 0.0)) or 1.0 / math.sqrt(d)
        # one batch row: q [S, H, D] -> [KV, group * S, D] (grouped heads share their KV head)
        qg = bb.emit(op.reshape(op.permute_dims(op.reshape(q, [seq, kv, group, d]), [1, 2, 0, 3]),
                                [kv, group * seq, d]))
        scores_fn = bb.add_func(kern.attention_scores(kv, group, d, scale), f"attention_scores_kv{kv}_g{group}_d{d}")
        values_fn = bb.add_func(kern.attention_values(kv, d), f"attention_values_kv{kv}_d{d}")
        scores = bb.emit(relax.call_tir(scores_fn, [qg, kc], relax.TensorType([kv, group * seq, total], "float32")))
        probs = bb.emit(op.nn.softmax(scores, axis=-1))
        out = bb.emit(relax.call_tir(values_fn, [probs, vc], relax.TensorType([kv, group * seq, d], "float32")))
        out = bb.emit(op.reshape(op.permute_dims(op.reshape(out, [kv, group, seq, d]), [2, 0, 1, 3]),
                                 [batch, seq, heads * d]))
        return relax.Tuple([out, kc, vc])


def _rms_norm(bb, x, weight, epsilon: float):
    """RMS norm over the last axis through :func:`.tvm_kernels.rms_norm` (rows flattened)."""
    from tvm import relax

    from . import tvm_kernels as kern

    shape = _shape(x)
    hidden = int(shape[-1])
    rows = 1
    for d in shape[:-1]:
        rows = rows * d
    x2 = bb.emit(relax.op.reshape(x, [rows, hidden]))
    gv = bb.add_func(kern.rms_norm(hidden, epsilon), f"rms_norm_h{hidden}")
    y = bb.emit(relax.call_tir(gv, [x2, weight], relax.TensorType([rows, hidden], "float32")))
    return relax.op.reshape(y, shape)


def _converter(fn):
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    return type(fn.__name__, (OnnxOpConverter,), {"_impl_v1": classmethod(lambda cls, *a: fn(*a))})


CONTRIB_CONVERTERS = {
    "MatMulNBits": _Converters.matmul_nbits,
    "GatherBlockQuantized": _Converters.gather_block_quantized,
    "SimplifiedLayerNormalization": _Converters.simplified_layer_norm,
    "SkipSimplifiedLayerNormalization": _Converters.skip_simplified_layer_norm,
    "GroupQueryAttention": _Converters.group_query_attention,
    "ActSparseMatMulNBits": _Converters.act_sparse_matmul_nbits,
    "MatMulNBitsInt8": _Converters.matmul_nbits_int8,
    "SparseMatMulCSR": _Converters.sparse_matmul_csr,
    "MatMulF32": _Converters.matmul_f32,
    "SparseMatMul2of4": _Converters.sparse_matmul_2of4,
    "MatMulInt3": _Converters.matmul_int3,
    "MatMulE2M1": _Converters.matmul_e2m1,
}


@contextlib.contextmanager
def _converters() -> Iterator[dict]:
    """The importer's converter table with the toolkit's converters added (restored after)."""
    from tvm.relax.frontend.onnx import onnx_frontend as fe

    original = fe._get_convert_map
    table = dict(original())
    table.update({op: _converter(fn) for op, fn in CONTRIB_CONVERTERS.items()})
    fe._get_convert_map = lambda: table
    try:
        yield table
    finally:
        fe._get_convert_map = original


def unsupported_ops(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(node name, op type) of every node neither the importer nor the toolkit can convert."""
    with _converters() as table:
        return [(n.name, f"{n.domain + '::' if n.domain else ''}{n.op_type}") for n in model.graph.node
                if n.op_type not in table and n.op_type not in ("Constant", "If")]


def prepare(model: onnx.ModelProto, *, logits_to_keep: int, act_sparse: bool = True,
            parts: int = 2, int8: str | bool | None = None, sparse: bool = True, lowbit: bool = True,
            two_of_four: str | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """The graph Relax imports: custom ops inlined, ``logits_to_keep`` fixed, constants folded
    (rotary caches, casts of float16 scales, the keep-slice start): with parameters kept as
    inputs, Relax could not fold them and would recompute them every token. With ``act_sparse``,
    ``ActSparse`` -> 4-bit ``MatMulNBits`` pairs become the native activation-sparse kernel
    (:mod:`.tvm_act_sparse`, ``parts`` threads). With ``int8`` (the target's byte dot product,
    ``"vnni"`` or ``"avx2"``: :func:`.tvm_kernels.int8_isa`; True means ``"vnni"``), ``MatMulNBits``
    at ``accuracy_level`` 4 run int8-activation kernels: the activation-sparse one after an
    ActSparse, :mod:`.tvm_int8`'s dense one elsewhere. With ``sparse``, each ``SparseMatMul`` (pruned
    weights, stored compressed) runs a sparse kernel of :mod:`.tvm_sparse` (the 2:4 one needs
    ``two_of_four``, the CPU's lane permute: :func:`.tvm_kernels.permute_isa`) instead of a dense MatMul. With ``lowbit``, int3 and fp4 linears (``MatMulBlockQuantized``,
    ``MatMulFP4``) run :mod:`.tvm_lowbit`'s kernels on their packed codes instead of a folded fp32 weight.

    Returns the model and the custom ops that run as their function bodies.
    """
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node
                     if n.domain not in ("", "ai.onnx", "com.microsoft")})
    int8 = "vnni" if int8 is True else (int8 or None)
    from .tvm_sparse import SOURCE, sparse_outputs, use_sparse_kernels

    from .tvm_lowbit import lowbit_outputs, use_lowbit_kernels

    marked = sparse_outputs(model) if sparse else {}  # before inlining, which erases the op
    packed = lowbit_outputs(model) if lowbit else {}
    source_model = model
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    model = onnx.ModelProto.FromString(model.SerializeToString())  # a copy we may edit
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    if "logits_to_keep" in inits:
        inits["logits_to_keep"].CopyFrom(numpy_helper.from_array(np.array([logits_to_keep], np.int64),
                                                                "logits_to_keep"))
        keep = [i for i in g.input if i.name != "logits_to_keep"]
        del g.input[:]
        g.input.extend(keep)
    model = fold_constants(model)
    if marked:
        done = use_sparse_kernels(model, marked, two_of_four=two_of_four)
        if done.linears and not done.kept:
            custom = [c for c in custom if c != f"edgecompress::{SOURCE}"]
        log.info("sparse-weight kernels for %d of %d SparseMatMul", done.linears, len(marked))
    if packed:
        done = use_lowbit_kernels(model, packed)
        custom = [c for c in custom if c not in done.all_native(source_model)]
        log.info("int3/fp4 kernels for %d of %d low-bit custom linears", done.linears, len(packed))
    from .tvm_dense import use_dense_kernels

    dense = use_dense_kernels(model)
    if dense:
        log.info("fp32 GEMV kernel for %d MatMul by constant weights", dense)
    if act_sparse:
        from .tvm_act_sparse import fuse_act_sparse

        fused = fuse_act_sparse(model, parts=parts, int8=int8)
        if fused.sites and not fused.function_body_sites:
            custom = [c for c in custom if c != "edgecompress::ActSparse"]
        if fused.sites:
            log.info("activation-sparse kernel for %d linears; %d of %d ActSparse sites keep the function body",
                     fused.linears, fused.function_body_sites, fused.sites)
    if int8:
        from .tvm_int8 import use_int8_kernels

        done = use_int8_kernels(model, isa=int8)
        if done.linears:
            log.info("int8-activation (%s) kernel for %d MatMulNBits at accuracy level 4", int8, done.linears)
    return _inplace_kv_interface(model), custom


def _inplace_kv_interface(model: onnx.ModelProto) -> onnx.ModelProto:
    """The library's calling convention (:data:`INTERFACE`): each ``past_key_values.*`` input is
    a position-major cache view ``[total_sequence_length, kv_heads, head_dim]`` that attention
    appends to in place; ``logits`` is the only output; the attention mask (whose only use was
    the sequence lengths GroupQueryAttention takes from the shapes here) is pruned."""
    from onnx import TensorProto, helper

    g = model.graph
    for n in g.node:
        if n.op_type == "GroupQueryAttention":
            for i in (5, 6):  # seqlens_k, total_sequence_length
                n.input[i] = ""
    layout = kv_layout(model)
    for i in g.input:
        if i.name.startswith("past_key_values."):
            i.CopyFrom(helper.make_tensor_value_info(i.name, TensorProto.FLOAT, ["total_sequence_length",
                                                                                 layout["kv_heads"],
                                                                                 layout["head_dim"]]))
    outputs = [o for o in g.output if o.name == "logits"]
    del g.output[:]
    g.output.extend(outputs)
    return prune_dead(model)


def prune_dead(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without the nodes, inputs and initializers no output depends on (in place)."""
    g = model.graph
    needed = {o.name for o in g.output}
    kept = []
    for n in reversed(g.node):  # dead-node elimination
        if any(o in needed for o in n.output):
            kept.append(n)
            needed.update(x for x in n.input if x)
    del g.node[:]
    g.node.extend(reversed(kept))
    for field in (g.input, g.initializer):
        alive = [x for x in field if x.name in needed]
        del field[:]
        field.extend(alive)
    return model


def import_relax(model: onnx.ModelProto):
    """Relax module of ``model`` (parameters as trailing inputs) and the parameters in order."""
    _, relax = _relax()
    from tvm.relax.frontend.onnx import from_onnx

    missing = unsupported_ops(model)
    if missing:
        name, op = missing[0]
        raise EdgeCompressError(
            f"no TVM converter for {op} (node {name!r}"
            f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''})",
            hint="run this artifact with --runtime ort-cpu, or export it without that operator")
    with _converters(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the checker's complaints about contrib ops; unknown dims
        mod = from_onnx(model, keep_params_in_input=True)
    mod, params = relax.frontend.detach_params(mod)
    return _specialize(mod), [p.numpy() if hasattr(p, "numpy") else np.asarray(p) for p in params["main"]]


def _specialize(mod):
    """``main`` for batch 1 (the only batch the converters support) and ``decode``, the same
    function for one new token: static shapes save the VM most of its per-call shape work."""
    from tvm.relax.utils import copy_with_new_vars

    main = mod["main"]
    mod["main"] = _bind(main, {"batch_size": 1})
    decode = _bind(copy_with_new_vars(main), {"batch_size": 1, "sequence_length": 1})
    mod["decode"] = decode.with_attr("global_symbol", "decode")
    return mod


def _bind(func, values: dict[str, int]):
    """``func`` with its symbolic shape variables named in ``values`` fixed."""
    by_name = {v.name: v for p in func.params for v in _sym_vars(p)}
    bound = {by_name[k]: v for k, v in values.items() if k in by_name}
    return func.bind_symbolic_vars(bound) if bound else func


def _sym_vars(param) -> list:
    from tvm import tirx

    shape = getattr(param.ty, "shape", None)
    values = getattr(shape, "values", None) or []
    return [d for d in values if isinstance(d, tirx.Var)]


def compile_library(mod, target):
    """``tvm.compile`` with the CPU pipeline plus the generic CPU schedules for what the toolkit's
    kernels do not cover (elementwise, norms, softmax)."""
    tvm, _ = _relax()
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.s_tir import dlight as dl

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(m, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                cpu.library_dispatch_passes(target) + cpu.legalize_passes(target)
                + [dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction())]
                + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))
            return seq(m)

    return tvm.compile(mod, target=target, relax_pipeline=pipeline)


def _native_kernels(model: onnx.ModelProto) -> dict[str, int]:
    """Nodes per native kernel in the prepared graph (the manifest's ``tvm.kernels``)."""
    from .tvm_act_sparse import FUSED

    names = {"MatMulNBits": "matmul_nbits", "GatherBlockQuantized": "gather_block_quantized",
             FUSED: "act_sparse_matmul_nbits", "MatMulNBitsInt8": "matmul_nbits_int8",
             "SparseMatMulCSR": "sparse_matmul_csr", "SparseMatMul2of4": "sparse_matmul_2of4",
             "MatMulF32": "matmul_f32", "MatMulInt3": "matmul_int3", "MatMulE2M1": "matmul_e2m1",
             "GroupQueryAttention": "attention"}
    counts: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type in names:
            name = names[n.op_type]
            if n.op_type == FUSED and any(a.name == "int8" and a.i > 0 for a in n.attribute):
                name += "_int8"
            counts[name] = counts.get(name, 0) + 1
    return counts


def kv_layout(model: onnx.ModelProto) -> dict[str, int]:
    """Layers, KV heads and head size of a decoder, from its ``past_key_values.*`` inputs."""
    past = [i for i in model.graph.input if i.name.startswith("past_key_values.")]
    if not past:
        raise EdgeCompressError("the TVM target compiles KV-cache decoders; this graph has no past_key_values inputs",
                                hint="export a causal LM (the sentence encoders run on --runtime ort-cpu)")
    dims = past[0].type.tensor_type.shape.dim
    return {"layers": len(past) // 2, "kv_heads": int(dims[1].dim_value), "head_dim": int(dims[3].dim_value)}


def _max_positions(model: onnx.ModelProto) -> int | None:
    """Rows of the (folded) rotary cache: the longest sequence the decoder can run."""
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "GroupQueryAttention" and len(n.input) > 7 and n.input[7] in inits:
            return int(inits[n.input[7]].dims[0])
    return None


def build_decoder(onnx_path: Path, dest: Path, *, target=None, mcpu: str | None = None,
                  threads: int | None = None, act_sparse: bool = True, int8: str | bool | None = None,
                  lowbit: bool = True) -> dict[str, Any]:
    """Compile the KV-cache decoder at ``onnx_path`` into ``dest`` (``model.so`` +
    ``params.safetensors``) for ``target`` (default: LLVM for ``mcpu``, default this machine's
    CPU); returns the manifest's ``tvm`` section: what the library needs to load (TVM version,
    triple, CPU, calling convention) and what compiling it cost. ``int8``: MatMulNBits at
    accuracy level 4 on the int8-activation kernels with this byte dot product (``"vnni"``,
    ``"avx2"``; False: the fp32 kernels; default: what the target CPU has, :func:`.tvm_kernels.int8_isa`). ``lowbit``:
    int3/fp4 linears on their native kernels (else folded to fp32 weights, as before those kernels)."""
    from safetensors.numpy import save_file

    from . import tvm_kernels as kern

    target = target or kern.target_llvm(mcpu, threads=threads)
    model = onnx.load(str(onnx_path))
    layout = kv_layout(model)
    t0 = time.perf_counter()
    if int8 is None:
        int8 = kern.int8_isa(target)
    prepared, custom = prepare(model, logits_to_keep=0, act_sparse=act_sparse, parts=threads or 2, int8=int8,
                               lowbit=lowbit, two_of_four=kern.permute_isa(target))
    kernels = _native_kernels(prepared)
    layout["max_positions"] = _max_positions(prepared)
    mod, params = import_relax(prepared)
    import_s = time.perf_counter() - t0
    lib = compile_library(mod, target)
    dest.mkdir(parents=True, exist_ok=True)
    lib.export_library(str(dest / LIBRARY))
    compile_s = time.perf_counter() - t0 - import_s  # LLVM code generation and linking
    save_file({f"p{i:04d}": np.ascontiguousarray(a) for i, a in enumerate(params)}, str(dest / PARAMS))
    host = kern.host()
    return {"interface": INTERFACE, "library": LIBRARY, "params_file": PARAMS, "tvm_version": host["tvm_version"],
            "target": {k: (list(v) if k == "keys" else str(v)) for k, v in target.export().items() if k != "tag"},
            "triple": str(target.attrs.get("mtriple") or host["triple"]),
            "mcpu": str(target.attrs.get("mcpu") or host["mcpu"]), "kv_cache": layout, "params": len(params),
            "kernels": kernels, "function_body_ops": custom, "import_seconds": round(import_s, 1), "compile_seconds": round(compile_s, 1)}
