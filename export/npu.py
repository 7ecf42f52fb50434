"""NPU artifacts for the Qualcomm HTP (through ``onnxruntime-qnn``): static shapes, graph rewrites, QDQ.

An NPU runs integer graphs with static shapes and no fallback, so an fp32 ONNX graph goes through:

1. :func:`make_static` -- every symbolic input/output dimension gets the value the recipe declares
   (a missing one is an error naming it); ONNX Runtime then folds the shape arithmetic away
   (:func:`fold_constants`, basic-level optimisation: constant folding only).
2. :func:`clamp_mask_sentinels` -- additive attention masks built from ``float32.min`` (Hugging Face's
   convention) put ~-3.4e38 into the masked scores, and a calibrated activation range that covers it
   has a step of ~1e34: every real score rounds to the same level. The sentinel becomes ``-100``
   (``exp(-100)`` is 4e-44: the softmax is unchanged in fp32), so the masked scores need a range of
   ~100 + the real scores', which 16-bit activations resolve to ~0.002.
3. :func:`fuse_l2_normalize` -- ``x / max(ReduceL2(x), eps)`` becomes one ``LpNormalization``: QNN HTP
   cannot finalize the quantized ``Max`` with a 1e-12 constant (``QNN_COMMON_ERROR_MEM_ALLOC``).
   :func:`fold_batchnorm` folds inference ``BatchNormalization`` into the ``Conv`` before it (vision
   models), and :func:`fixed_ranges` gives bounded functions (Softmax, Clip/ReLU6) their exact output
   range instead of a calibrated one.
4. :func:`unsupported_nodes` -- every remaining op must be one QNN HTP runs (:data:`QNN_HTP_OPS`); the
   check runs before any calibration, and names node and op.
5. :func:`quantize_for_qnn` -- QDQ with ONNX Runtime's QNN quantization rules (``get_qnn_qdq_config``:
   which tensors must share scales, which ops need 16-bit or symmetric inputs), uint16 (or uint8)
   activations with ranges calibrated on the recipe's data, **int8 symmetric per-output-channel**
   MatMul/Gemm/Conv weights (per-tensor uint8 weights cost MiniLM ~0.03 of embedding cosine), and uint8 for the
   other constants (embedding tables, LayerNorm weights).

Measured on all-MiniLM-L6-v2 (BENCHMARKS.md): ORT's own QNN recipe on the plain graph gives cosine
~0.5 to fp32; after these rewrites with per-channel weights it is 0.998 on the HTP simulator.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgecompress.errors import EdgeCompressError

log = logging.getLogger(__name__)

MASK_SENTINEL_THRESHOLD = -1e4  # a float constant at or below this is a mask sentinel, not a weight
MASK_FILL = -100.0

# ONNX ops the QNN HTP backend runs (onnxruntime-qnn 2.7 op builders), restricted to what the
# toolkit's graphs need; QuantizeLinear/DequantizeLinear are added by the quantizer.
QNN_HTP_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "MatMul", "Gemm", "Conv", "Relu", "Clip", "Sigmoid", "Tanh", "Softmax",
    "LayerNormalization", "Gelu", "Erf", "Sqrt", "Pow", "Gather", "Reshape", "Transpose", "Unsqueeze",
    "Squeeze", "Split", "Concat", "Slice", "ReduceSum", "ReduceMean", "ReduceMax", "LpNormalization",
    "Max", "Min", "Cast", "Identity", "GlobalAveragePool", "AveragePool", "MaxPool", "Pad", "Flatten",
    "Where", "Expand", "QuantizeLinear", "DequantizeLinear", "BatchNormalization",
})

ACTIVATION_TYPES = ("uint16", "uint8")


class NpuExportError(EdgeCompressError):
    """The graph cannot become an NPU artifact as it is."""


# ----------------------------------------------------------------------------- static shapes

def make_static(model: onnx.ModelProto, dims: Mapping[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` whose symbolic input/output dimensions are replaced by ``dims[name]``.

    Raises :class:`NpuExportError` naming the first symbolic input dimension ``dims`` does not give (an
    output dimension ``dims`` does not name is left to shape inference)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    outputs = {o.name for o in model.graph.output}
    for vi in list(model.graph.input) + list(model.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                continue
            if d.dim_param not in dims and vi.name in outputs:
                d.Clear()  # an output dimension follows from the inputs' (exporters name them freely)
                continue
            if d.dim_param not in dims:
                raise NpuExportError(
                    f"the NPU needs static shapes, and dimension {d.dim_param!r} of {vi.name!r} has no value",
                    hint=f"add it to the export's static_shapes, e.g. static_shapes: {{{d.dim_param}: ...}}")
            value = int(dims[d.dim_param])
            if value < 1:
                raise NpuExportError(f"static dimension {d.dim_param!r} must be at least 1, got {value}")
            d.Clear()
            d.dim_value = value
    del model.graph.value_info[:]  # re-inferred with the static shapes
    return onnx.shape_inference.infer_shapes(model)


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant-fold ``model`` with ONNX Runtime's basic optimisation level (static shapes make the
    ``Shape``/``Range`` arithmetic constant); no fusions that would introduce contrib ops."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, str(src))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(dst)
        so.log_severity_level = 3
        ort.set_default_logger_severity(3)  # "removing unused initializer" from the folding is expected
        # MatMulAddFusion would turn MatMul+bias into Gemm, hiding the weights from the per-channel rule
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"], disabled_optimizers=["MatMulAddFusion"])
        return onnx.load(str(dst))


# ----------------------------------------------------------------------------- rewrites

def _float_constants(model: onnx.ModelProto) -> Iterable[tuple[str, np.ndarray, object]]:
    for init in model.graph.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            yield init.name, numpy_helper.to_array(init), init
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                    yield node.output[0], numpy_helper.to_array(a.t), a.t


def clamp_mask_sentinels(model: onnx.ModelProto, *, fill: float = MASK_FILL,
                         threshold: float = MASK_SENTINEL_THRESHOLD) -> list[str]:
    """Replace scalar float constants ``<= threshold`` (``float32.min``, ``-inf``, ``-1e9``, ``-10000``)
    by ``fill``, in place; returns the names rewritten.

    Only scalars (size-1 tensors) count: a mask sentinel is one number broadcast over the mask; a weight
    tensor that happens to hold a large negative entry is left alone."""
    done = []
    for name, arr, proto in _float_constants(model):
        if arr.size == 1 and float(arr.reshape(-1)[0]) <= threshold:
            proto.CopyFrom(numpy_helper.from_array(np.full(arr.shape, fill, arr.dtype), proto.name))
            done.append(name)
    return done


def _constant_value(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for n, arr, _ in _float_constants(model):
        if n == name:
            return arr
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return None


def _graph_index(model: onnx.ModelProto) -> tuple[dict[str, onnx.NodeProto], dict[str, int], set[str]]:
    """(producer node of each tensor, number of node inputs reading each tensor, graph output names)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    return producers, uses, {o.name for o in model.graph.output}


def fuse_l2_normalize(model: onnx.ModelProto, *, max_eps: float = 1e-6) -> list[str]:
    """Rewrite ``Div(x, Max(ReduceL2(x, axes=[last], keepdims=1), eps))`` (eps <= ``max_eps``) into
    ``LpNormalization(x, axis=-1, p=2)``, in place; returns the names of the ``Div`` nodes replaced.

    ``LpNormalization`` divides by the norm without the clamp: it differs only for a vector with norm
    below ``eps``, which a pooled embedding is not."""
    producers, consumers, graph_outputs = _graph_index(model)
    replace: dict[str, onnx.NodeProto] = {}
    drop: set[str] = set()
    for div in model.graph.node:
        if div.op_type != "Div":
            continue
        x, den = div.input
        mx = producers.get(den)
        if mx is None or mx.op_type != "Max" or len(mx.input) != 2:
            continue
        red = eps = None
        for a, b in ((mx.input[0], mx.input[1]), (mx.input[1], mx.input[0])):
            p = producers.get(a)
            if p is not None and p.op_type == "ReduceL2":
                red, eps = p, _constant_value(model, b)
        if red is None or eps is None or eps.size != 1 or float(eps.reshape(-1)[0]) > max_eps:
            continue
        if red.input[0] != x or not _reduces_last_axis_keepdims(model, red):
            continue
        if any(consumers.get(t, 0) > 1 or t in graph_outputs for t in (mx.output[0], red.output[0])):
            continue  # the norm is used elsewhere: keep it
        replace[div.name] = helper.make_node("LpNormalization", [x], list(div.output), name=div.name + "/lpnorm",
                                             axis=-1, p=2)
        drop.update({mx.name, red.name})
    if not replace:
        return []
    nodes = []
    for n in model.graph.node:
        if n.name in drop:
            continue
        nodes.append(replace.get(n.name, n))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return sorted(replace)


def _reduces_last_axis_keepdims(model: onnx.ModelProto, red: onnx.NodeProto) -> bool:
    attrs = {a.name: helper.get_attribute_value(a) for a in red.attribute}
    if attrs.get("keepdims", 1) != 1:
        return False
    if len(red.input) > 1 and red.input[1]:
        axes = _constant_value(model, red.input[1])
        axes = None if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]
    else:
        axes = attrs.get("axes")
    if axes is None or len(axes) != 1:
        return False
    if axes[0] == -1:
        return True
    rank = _rank_of(model, red.input[0])
    return rank is not None and axes[0] == rank - 1


def _rank_of(model: onnx.ModelProto, name: str) -> int | None:
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return len(vi.type.tensor_type.shape.dim)
    return None


def fold_batchnorm(model: onnx.ModelProto) -> list[str]:
    """Fold ``BatchNormalization`` (inference form, constant statistics) into the ``Conv`` before it, in
    place: ``W' = W·γ/√(σ²+ε)`` per output channel, ``b' = (b − μ)·γ/√(σ²+ε) + β``. Returns the folded BN
    names. A BN whose input is not a constant-weight ``Conv`` used only by it is left alone."""
    inits = {i.name: i for i in model.graph.initializer}
    producers, uses, graph_outputs = _graph_index(model)
    folded, drop, new_inits = [], set(), {}
    for bn in model.graph.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        conv = producers.get(bn.input[0])
        if (conv is None or conv.op_type != "Conv" or conv.input[1] not in inits
                or uses.get(conv.output[0], 0) != 1 or conv.output[0] in graph_outputs
                or (len(conv.input) > 2 and conv.input[2] and conv.input[2] not in inits)
                or not all(t in inits for t in bn.input[1:5])):
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(inits[t]).astype(np.float64) for t in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        b = (numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
             if len(conv.input) > 2 and conv.input[2] else np.zeros(w.shape[0]))
        factor = gamma / np.sqrt(var + eps)
        w_name, b_name = conv.input[1] + "/bn_folded", bn.name + "/folded_bias"
        new_inits[w_name] = numpy_helper.from_array((w * factor.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32),
                                                    w_name)
        new_inits[b_name] = numpy_helper.from_array(((b - mean) * factor + beta).astype(np.float32), b_name)
        inputs = [conv.input[0], w_name, b_name]
        conv.ClearField("input")
        conv.input.extend(inputs)
        conv.output[0] = bn.output[0]
        drop.add(id(bn))
        folded.append(bn.name)
    if folded:
        nodes = [n for n in model.graph.node if id(n) not in drop]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(new_inits.values())
        used = {i for n in model.graph.node for i in n.input}
        keep = [i for i in model.graph.initializer if i.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return folded


def _scalar(model: onnx.ModelProto, name: str) -> float | None:
    v = _constant_value(model, name) if name else None
    return None if v is None or v.size != 1 else float(v.reshape(-1)[0])


def fixed_ranges(model: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """Output ranges known from the function, not from calibration: ``Softmax`` [0, 1], ``Sigmoid``
    [0, 1], ``Tanh`` [-1, 1], ``Clip`` with constant bounds (ReLU6: [0, 6]). A calibrated range can only
    be narrower by chance of the calibration data, and then clips real inputs."""
    out: dict[str, tuple[float, float]] = {}
    for n in model.graph.node:
        if n.op_type in ("Softmax", "Sigmoid"):
            out[n.output[0]] = (0.0, 1.0)
        elif n.op_type == "Tanh":
            out[n.output[0]] = (-1.0, 1.0)
        elif n.op_type == "Clip" and len(n.input) == 3:
            lo, hi = _scalar(model, n.input[1]), _scalar(model, n.input[2])
            if lo is not None and hi is not None:
                out[n.output[0]] = (lo, hi)
    return out


def _op_outputs(model: onnx.ModelProto, ops: tuple[str, ...]) -> set[str]:
    return {n.output[0] for n in model.graph.node if n.op_type in ops}


def unsupported_nodes(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """``(node name, op)`` of every node QNN HTP does not run (see :data:`QNN_HTP_OPS`)."""
    return [(n.name or n.output[0], (n.domain + "::" if n.domain else "") + n.op_type) for n in model.graph.node
            if n.domain not in ("", "ai.onnx") or n.op_type not in QNN_HTP_OPS]


def require_supported(model: onnx.ModelProto) -> None:
    bad = unsupported_nodes(model)
    if bad:
        listed = ", ".join(f"{node} ({op})" for node, op in bad[:8]) + (" ..." if len(bad) > 8 else "")
        raise NpuExportError(f"{len(bad)} node(s) use ops QNN HTP does not run: {listed}",
                             hint="export for the cpu target and run it on ort-cpu, or remove the step that "
                             "emits these ops (int4/sparse/custom ops are CPU formats)")


def fp16_matmuls(qdq: onnx.ModelProto, *, wide_range: float | None = None) -> list[str]:
    """Run some MatMuls of a QDQ graph in float16, in place; returns the MatMuls rewritten:

    * every MatMul of two activations (attention's ``Q·Kᵀ`` and ``P·V``). QNN HTP multiplies two 16-bit
      activations at about 8-bit precision (measured on the simulator: relative RMS error 0.009 where the
      CPU EP's QDQ emulation has 7e-5), and in a causal LM's attention that error grows through the softmax
      in every layer;
    * with ``wide_range``, every weight MatMul whose activation input was calibrated to a range (max - min)
      wider than that: a few of SmolLM2's ``down_proj`` inputs span thousands (the massive activations of
      the first token), and on them the HTP's integer MatMul lost three times the CPU EP's accuracy.
      Their weights become float16 constants holding the int8 grid's values (the HTP does not take a
      per-channel ``DequantizeLinear`` feeding a float op).

    Each such MatMul reads its dequantized inputs through a ``Cast`` to float16 and its output is cast back
    to float before the ``QuantizeLinear`` that follows, so the HTP runs it in its float path (float16 math
    on a device; the x86 simulator computed it exactly), and the CPU EP, which has no float16 MatMul, in
    float32."""
    inits = {i.name: i for i in qdq.graph.initializer}
    prod = {o: n for n in qdq.graph.node for o in n.output}

    def dq_of(name: str) -> onnx.NodeProto | None:
        src = prod.get(name)
        return src if src is not None and src.op_type == "DequantizeLinear" else None

    def rewrite(n: onnx.NodeProto) -> bool:
        if n.op_type != "MatMul" or any(i in inits for i in n.input):
            return False
        srcs = [dq_of(i) for i in n.input]
        if any(s is None for s in srcs):
            return False
        consts = [s.input[0] in inits for s in srcs]
        if not any(consts):
            return True  # activation x activation
        if wide_range is None or consts != [False, True]:
            return False
        a = srcs[0]
        if a.input[1] not in inits or len(a.input) < 3 or a.input[2] not in inits:
            return False
        scale = float(numpy_helper.to_array(inits[a.input[1]]).reshape(-1)[0])
        return scale * (2 ** _BITS[inits[a.input[2]].data_type] - 1) > wide_range

    out, done, dropped = [], [], set()
    for n in qdq.graph.node:
        if not rewrite(n):
            out.append(n)
            continue
        halves = []
        for j, i in enumerate(n.input):
            w = dq_of(i)
            if w.input[0] in inits:  # a weight: its dequantized values as a float16 constant
                deq = _dequantize(*(numpy_helper.to_array(inits[t]) if t in inits else None for t in w.input),
                                  axis=next((a.i for a in w.attribute if a.name == "axis"), 1))
                halves.append(f"{n.name}_weight_fp16")
                qdq.graph.initializer.append(numpy_helper.from_array(deq.astype(np.float16), halves[-1]))
                dropped.add(w.name)
                continue
            halves.append(f"{n.name}_fp16_in{j}")
            out.append(helper.make_node("Cast", [i], [halves[-1]], to=onnx.TensorProto.FLOAT16,
                                        name=f"{n.name}_to_fp16_{j}"))
        out.append(helper.make_node("MatMul", halves, [f"{n.output[0]}_fp16"], name=n.name))
        out.append(helper.make_node("Cast", [f"{n.output[0]}_fp16"], [n.output[0]], to=onnx.TensorProto.FLOAT,
                                    name=f"{n.name}_to_fp32"))
        done.append(n.name)
    used = {i for n in out for i in n.input}
    out = [n for n in out if n.name not in dropped or any(o in used for o in n.output)]
    used = {i for n in out for i in n.input} | {o.name for o in qdq.graph.output}
    del qdq.graph.node[:]
    qdq.graph.node.extend(out)
    keep = [t for t in qdq.graph.initializer if t.name in used]
    del qdq.graph.initializer[:]
    qdq.graph.initializer.extend(keep)
    return done


def _dequantize(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, *, axis: int) -> np.ndarray:
    """``DequantizeLinear`` of a constant: per tensor, or per channel along ``axis``."""
    codes = codes.astype(np.float32)
    zero = np.zeros_like(scale) if zero is None else zero.astype(np.float32)
    if scale.size > 1:
        shape = [1] * codes.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (codes - zero) * scale


def prepare_for_npu(model: onnx.ModelProto, dims: Mapping[str, int]) -> tuple[onnx.ModelProto, dict]:
    """Static shapes + folding + rewrites + op check (all before calibration). Returns the graph and a
    record of what was rewritten, for the manifest."""
    model = fold_constants(make_static(model, dims))
    record = {"batchnorms_folded": fold_batchnorm(model),
              "mask_sentinels_clamped": clamp_mask_sentinels(model),
              "l2_normalize_fused": fuse_l2_normalize(model)}
    require_supported(model)
    return model, record


# ----------------------------------------------------------------------------- QDQ

def quantize_for_qnn(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], *,
                     activations: str = "uint16",
                     weight_scales: Mapping[str, np.ndarray] | None = None,
                     table_type: str = "uint8") -> onnx.ModelProto:
    """QDQ ``model`` for QNN HTP: calibrated ``activations`` (uint16 | uint8), int8 per-channel
    MatMul/Gemm/Conv weights, uint8 other constants. ``feeds``: calibration inputs with the static shapes.
    ``weight_scales``: per-output-channel scales of weights already rounded to their int8 grid
    (:mod:`~edgecompress.compress.quant.conv_rounding`), used as given instead of ``max|W_c| / 127``.
    ``table_type``: the type of ``Gather`` tables (embeddings, RoPE cos/sin), uint8 or uint16: a Gather's output
    keeps its table's type, and QNN HTP failed to finalize an ``LpNormalization`` (a causal LM's RMSNorm) reading
    a uint8 Gather output (``QNN_COMMON_ERROR_MEM_ALLOC``); with a uint16 table it runs."""
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    if activations not in ACTIVATION_TYPES:
        raise NpuExportError(f"unknown NPU activation type {activations!r}", hint=f"use one of {ACTIVATION_TYPES}")
    if not feeds:
        raise NpuExportError("no calibration inputs for the NPU activation ranges", hint="set calibration.samples")

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    inits = {i.name for i in model.graph.initializer}
    overrides = {}
    for n in model.graph.node:  # weights: int8 symmetric per output channel
        if n.op_type in ("MatMul", "Gemm", "Conv") and len(n.input) > 1 and n.input[1] in inits:
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
            axis = 1 if n.op_type == "MatMul" or (n.op_type == "Gemm" and not trans_b) else 0
            overrides[n.input[1]] = [{"axis": axis, "quant_type": QuantType.QInt8, "symmetric": True}]
            if weight_scales is not None and n.input[1] in weight_scales:
                overrides[n.input[1]] = [{"axis": axis, "quant_type": QuantType.QInt8,
                                          "scale": np.float32(sc), "zero_point": np.int8(0)}
                                         for sc in np.asarray(weight_scales[n.input[1]], np.float32)]
    for n in model.graph.node:  # lookup tables (embeddings): 8-bit like the other weights, not activation-typed
        if n.op_type == "Gather" and n.input[0] in inits:
            overrides[n.input[0]] = [{"quant_type": QuantType.QUInt16 if table_type == "uint16" else QuantType.QUInt8}]
    # Softmax and Clip get their function's range; Sigmoid/Tanh are left to ORT's QNN rules, which pin
    # the exact scale and zero point the HTP requires for them at 16 bits
    for t, (lo, hi) in fixed_ranges(model).items():
        if t not in overrides and t in _op_outputs(model, ("Softmax", "Clip")):
            overrides[t] = [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
    act = QuantType.QUInt16 if activations == "uint16" else QuantType.QUInt8
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "qdq.onnx"
        onnx.save(model, str(src))
        cfg = get_qnn_qdq_config(str(src), _Reader(), activation_type=act, weight_type=QuantType.QUInt8,
                                 init_overrides=overrides)
        root = logging.getLogger()
        level = root.level
        root.setLevel(max(level, logging.ERROR))  # ORT's quantizer warns "consider pre-processing" via root
        try:
            quantize(str(src), str(dst), cfg)
        finally:
            root.setLevel(level)
        return onnx.load(str(dst))


# ----------------------------------------------------------------------------- artifact

_BITS = {onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT8: 8, onnx.TensorProto.INT16: 16,
         onnx.TensorProto.UINT16: 16, onnx.TensorProto.INT32: 32, onnx.TensorProto.INT4: 4,
         onnx.TensorProto.UINT4: 4}


def qdq_weight_summary(model: onnx.ModelProto) -> dict:
    """Parameters and stored bytes of the integer constants behind ``DequantizeLinear`` nodes (weights,
    biases, tables), scales and zero points included, and of the float16 weights of
    :func:`fp16_matmuls`."""
    inits = {i.name: i for i in model.graph.initializer}
    params = stored = 0
    by_type: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        t = inits[n.input[0]]
        size = int(np.prod(t.dims)) if t.dims else 1
        if size < 2:
            continue  # a quantized scalar constant, not a weight
        params += size
        stored += size * _BITS.get(t.data_type, 32) // 8
        key = onnx.TensorProto.DataType.Name(t.data_type).lower()
        by_type[key] = by_type.get(key, 0) + size
        for extra in n.input[1:]:
            if extra in inits:
                e = inits[extra]
                stored += (int(np.prod(e.dims)) if e.dims else 1) * _BITS.get(e.data_type, 32) // 8
    for n in model.graph.node:
        for name in n.input if n.op_type == "MatMul" else ():
            t = inits.get(name)
            if t is not None and t.data_type == onnx.TensorProto.FLOAT16:
                size = int(np.prod(t.dims))
                params, stored = params + size, stored + 2 * size
                by_type["float16"] = by_type.get("float16", 0) + size
    return {"weight_params": params, "weight_bytes": stored,
            "bits_per_weight": round(8 * stored / params, 4) if params else None, "params_by_format": by_type}


def pad_feeds(batches: Iterable[Mapping[str, np.ndarray]], batch: int, seq: int) -> list[dict[str, np.ndarray]]:
    """Calibration batches ``{input_ids, attention_mask}`` ``[1, L]`` as static ``[batch, seq]`` feeds
    (truncated to ``seq`` tokens, right-padded with mask 0)."""
    rows_ids, rows_mask = [], []
    for b in batches:
        ids = np.asarray(b["input_ids"], np.int64)[:, :seq]
        mask = np.asarray(b["attention_mask"], np.int64)[:, :seq]
        pad = seq - ids.shape[1]
        rows_ids.extend(np.pad(ids, ((0, 0), (0, pad))))
        rows_mask.extend(np.pad(mask, ((0, 0), (0, pad))))
    return [{"input_ids": np.stack(rows_ids[i:i + batch]), "attention_mask": np.stack(rows_mask[i:i + batch])}
            for i in range(0, len(rows_ids) - batch + 1, batch)]


def export_npu_encoder(model, dest: Path, calibration: list[Mapping[str, np.ndarray]], *,
                       static_shapes: Mapping[str, int], activations: str = "uint16",
                       progress=None) -> dict:
    """Write a static QDQ sentence-encoder NPU artifact body into ``dest``: ``model.onnx`` and, when
    onnxruntime-qnn is installed, the compiled HTP context ``model_ctx.onnx``. Returns manifest fields."""
    from .onnx_encoder import build_bert_encoder

    proto, formats = build_bert_encoder(model, progress=progress)
    compressed = sorted({f.format for f in formats} - {"fp32"})
    if compressed:
        raise NpuExportError(f"the npu-qnn export quantizes the model itself, but it is already {compressed}",
                             hint="drop the quantize step (keep smoothquant, steering, pruning) or export it for "
                             "the cpu target")
    batch, seq = int(static_shapes["batch_size"]), int(static_shapes["sequence_length"])
    return write_npu_artifact(proto, dest, pad_feeds(calibration, batch, seq), static_shapes=static_shapes,
                              activations=activations)


def image_classifier_onnx(model, *, batch: int = 1, size: int = 224) -> onnx.ModelProto:
    """An image classifier (``[B, 3, H, W]`` -> logits) as a static fp32 ONNX graph (``pixel_values`` ->
    ``logits``), through torch's TorchScript exporter (which also folds eval-mode BatchNorm)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.onnx.export(model.eval(), torch.zeros(batch, 3, size, size), buf, input_names=["pixel_values"],
                      output_names=["logits"], opset_version=21, dynamo=False)
    return onnx.load_from_string(buf.getvalue())


def export_npu_image_classifier(model, dest: Path, images: np.ndarray, *, static_shapes: Mapping[str, int],
                                activations: str = "uint16", rounding: str = "gptq", bias_correction: bool = True,
                                progress=None) -> dict:
    """Write a static QDQ image-classifier NPU artifact body into ``dest`` (``pixel_values [batch, 3, size,
    size]`` -> ``logits``). BatchNorm is folded in torch, every Conv/Linear weight is rounded to its int8
    per-channel grid on the calibration ``images`` (``rounding`` nearest | gptq, optional bias correction:
    :mod:`~edgecompress.compress.quant.conv_rounding`), then the graph is exported with exactly those codes
    and uint16/uint8 activations calibrated on the same images (``images``: normalised ``[N, 3, size, size]``).
    Returns manifest fields."""
    import torch

    from edgecompress.compress.quant.conv_rounding import ConvRoundingConfig, round_conv_weights
    from edgecompress.efficientnet import EfficientNetLite, fold_batchnorm

    missing = [d for d in ("batch_size", "image_size") if d not in static_shapes]
    if missing:
        raise NpuExportError(f"the NPU needs static shapes, and the image classifier's {', '.join(missing)} has no value",
                             hint="add it to the export's static_shapes, e.g. static_shapes: {batch_size: 1, "
                             "image_size: 224}")
    if not isinstance(model, EfficientNetLite):
        raise NpuExportError(f"the npu-qnn export of image classifiers supports EfficientNet-Lite, not "
                             f"{type(model).__name__}")
    batch, size = int(static_shapes["batch_size"]), int(static_shapes["image_size"])
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[1:] != (3, size, size) or len(images) < batch:
        raise NpuExportError(f"the NPU export needs at least {batch} calibration images [3, {size}, {size}], got "
                             f"{list(images.shape)}", hint="set calibration.samples")
    folded = fold_batchnorm(model)
    x = torch.from_numpy(images)
    scales, records = round_conv_weights(folded, x, ConvRoundingConfig(method=rounding, bias_correction=bias_correction),
                                         progress=progress)
    proto = image_classifier_onnx(folded, batch=batch, size=size)
    feeds = [{"pixel_values": x[i:i + batch].numpy()} for i in range(0, len(x) - batch + 1, batch)]
    body = write_npu_artifact(proto, dest, feeds, static_shapes=static_shapes, activations=activations,
                              weight_scales={k: v.numpy() for k, v in scales.items()},
                              rounded_weights={k: folded.state_dict()[k].numpy() for k in scales})
    errs = [r["rel_error_corrected" if bias_correction else "rel_error"] for r in records if "rel_error" in r]
    body["npu"]["weight_rounding"] = {"method": rounding, "bias_correction": bias_correction,
                                      "calibration_images": len(x), "layers": len(records),
                                      "mean_rel_output_error": round(float(np.mean(errs)), 6) if errs else None,
                                      "per_layer": records}
    return body


def _off_grid(qdq: onnx.ModelProto, rounded: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """Weights of ``rounded`` (output channels first: a MatMul's ``[K, N]`` weight as ``[N, K]``) whose
    dequantized QDQ form differs from the array given: ``{name: {"channels":
    how many output channels moved, "max_change": largest |change| / max|W|}}`` (a missing weight: all)."""
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    dqs = {n.input[0]: n for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    off = {}
    for name, w in rounded.items():
        dq = dqs.get(name + "_quantized")
        if dq is None:
            off[name] = {"channels": int(w.shape[0]), "max_change": None}
            continue
        q, sc = inits[dq.input[0]].astype(np.float64), inits[dq.input[1]].astype(np.float64)
        if sc.ndim == 1:  # per channel: the channel axis first, like ``rounded``
            q = np.moveaxis(q, next((a.i for a in dq.attribute if a.name == "axis"), 1), 0)
            sc = sc.reshape(-1, *([1] * (q.ndim - 1)))
        diff = np.abs(q * sc - w).reshape(len(w), -1).max(1)
        top = float(np.abs(w).max() or 1.0)
        moved = diff > 1e-6 * top
        if moved.any():
            off[name] = {"channels": int(moved.sum()), "max_change": float(diff.max() / top)}
    return off


def write_npu_artifact(proto: onnx.ModelProto, dest: Path, feeds: list[dict[str, np.ndarray]], *,
                       static_shapes: Mapping[str, int], activations: str = "uint16",
                       weight_scales: Mapping[str, np.ndarray] | None = None,
                       rounded_weights: Mapping[str, np.ndarray] | None = None,
                       model_file: str | None = None, context_file: str | None = None,
                       table_type: str = "uint8", fp16: bool = False,
                       fp16_wide_range: float | None = None) -> dict:
    """Prepare (static shapes, rewrites, op check), QDQ-quantize on ``feeds`` and write ``dest/model.onnx``
    (+ the compiled HTP context when onnxruntime-qnn is installed). Returns manifest fields.

    ``weight_scales`` / ``rounded_weights``: weights already on their int8 grid and its scales; the QDQ
    model must reproduce them exactly (checked: an :class:`NpuExportError` names any that moved).
    ``model_file`` / ``context_file``: file names in ``dest`` (default ``model.onnx`` / ``model_ctx.onnx``);
    ``table_type``: see :func:`quantize_for_qnn`; ``fp16``: run activation x activation MatMuls (and, with
    ``fp16_wide_range``, weight MatMuls over wider inputs) in float16 (:func:`fp16_matmuls`)."""
    from edgecompress.runtimes.qnn_htp import (
        CONTEXT_FILE,
        htp_session,
        placement,
        qnn_version,
    )

    from .onnx_export import MODEL_FILE

    model_file, context_file = model_file or MODEL_FILE, context_file or CONTEXT_FILE
    proto, rewrites = prepare_for_npu(proto, static_shapes)
    qdq = quantize_for_qnn(proto, feeds, activations=activations, weight_scales=weight_scales, table_type=table_type)
    off: dict[str, dict] = {}
    if rounded_weights:
        # ONNX Runtime widens a channel's weight scale when its bias would overflow int32 at input scale x
        # weight scale (a near-dead channel: tiny weights, large folded bias); those channels are re-rounded
        # on the wider grid, a change far below the layer's own step. Anything larger is a bug.
        off = _off_grid(qdq, rounded_weights)
        big = {k: v for k, v in off.items() if v["max_change"] is None or v["max_change"] > 1e-2}
        if big:
            raise NpuExportError(f"{len(big)} rounded weight(s) changed in the QDQ model: {', '.join(list(big)[:4])}",
                                 hint="report this model: the exporter did not keep the codes it was given")
        if off:
            log.info("ONNX Runtime widened the int8 scale of %d near-dead channel(s) in %d layer(s) for their int32 "
                     "bias", sum(v["channels"] for v in off.values()), len(off))
    if fp16:  # after the grid check: the float16 weights are the same codes' values, without their DQ
        rewrites["fp16_matmuls"] = fp16_matmuls(qdq, wide_range=fp16_wide_range)
    onnx.save(qdq, str(dest / model_file))
    ops: dict[str, int] = {}
    for node in qdq.graph.node:
        key = f"{node.domain + '::' if node.domain else ''}{node.op_type}"
        ops[key] = ops.get(key, 0) + 1
    npu = {"target": "qnn-htp", "static_shapes": dict(static_shapes), "activations": activations,
           "inputs": {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in qdq.graph.input},
           "weights": f"int8 symmetric per output channel (MatMul/Gemm/Conv); {table_type} per tensor (Gather "
                      "tables: embeddings, RoPE); uint8 per tensor (other constants)",
           "calibration_feeds": len(feeds), "rewrites": rewrites, "onnxruntime_qnn": qnn_version(),
           **({"bias_widened_channels": off} if rounded_weights else {}),
           "context": None, "placement": None}
    if npu["onnxruntime_qnn"] is not None:
        session = htp_session(dest / model_file, profile=True, context_out=dest / context_file)
        npu["placement"] = placement(session, feeds[0])
        npu["context"] = context_file
        cpu = {ep: n for ep, n in npu["placement"].items() if ep != "QNNExecutionProvider"}
        if cpu:  # cannot happen with fallback disabled; kept as a guard on the measurement itself
            raise NpuExportError(f"nodes ran outside the HTP: {cpu}")
    else:
        log.warning("onnxruntime-qnn is not installed: the NPU artifact has no compiled context (it is compiled "
                    "at load time on the device)")
    return {
        "onnx": {"model": model_file, "external_data": None,
                 "opset": {imp.domain or "ai.onnx": imp.version for imp in qdq.opset_import},
                 "op_counts": dict(sorted(ops.items())), "inputs": [i.name for i in qdq.graph.input]},
        "npu": npu,
        "weights": qdq_weight_summary(qdq),
    }
