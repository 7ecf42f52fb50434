"""The activation-sparse int4 GEMV (TVM) and its converter: kernel against NumPy, graphs against ORT.

The kernel is checked on awkward shapes (K not a multiple of the block, N not a multiple of the
32-output vector step, zero points, K below one block) with all-zero, all-active, one-active (one
thread's share of the active inputs is empty) and random masks; the converter on one- and
two-consumer graphs (``ActSparse`` feeding one ``MatMulNBits``, or two sharing its output)
against ONNX Runtime running the function body, with a graph that must not fuse; and end to end
on a tiny Llama with TEAL thresholds and int4 weights, tvm-cpu against ort-cpu.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

from edgecompress.export import tvm as tvm_export
from edgecompress.export import tvm_kernels as kern

from test_tvm import INT8_ISAS  # noqa: E402  (the int8 instruction sets this CPU can test)


def _run(func, args):
    func = func.with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=kern.target_llvm(threads=2))
    tensors = [tvm.runtime.tensor(a, tvm.cpu()) for a in args]
    lib["main"](*tensors)
    return tensors[-1].numpy()


def _dequant(b, scales, zp, k, n, block):
    """MatMulNBits' 4-bit weights as a dense ``[N, K]`` matrix (low nibble = even k)."""
    nb = -(-k // block)
    codes = np.stack([b & 15, b >> 4], -1).reshape(n, nb, block).astype(np.float32)
    z = (np.stack([zp & 15, zp >> 4], -1).reshape(n, -1)[:, :nb] if zp is not None
         else np.full((n, nb), 8)).astype(np.float32)
    return ((codes - z[:, :, None]) * scales.reshape(n, nb, 1)).reshape(n, nb * block)[:, :k]


def _weights(rng, k, n, block, zero_points):
    nb = -(-k // block)
    b = rng.integers(0, 256, (n, nb, block // 2)).astype(np.uint8)
    scales = rng.random(n * nb).astype(np.float32) + 0.1
    zp = rng.integers(0, 256, (n, (nb + 1) // 2)).astype(np.uint8) if zero_points else None
    return b, scales, zp


@pytest.mark.parametrize("k,n,block,m,zero_points", [
    (64, 48, 32, 1, False),      # N not a multiple of 32 (padded outputs)
    (96, 40, 64, 3, True),       # K padded to 2 blocks; odd N; zero points; 3 rows (prefill)
    (576, 1536, 64, 1, False),   # SmolLM2 gate/up shape
    (1536, 576, 128, 1, True),
    (200, 33, 32, 2, False),     # K = 6.25 blocks, N = 33
    (7, 33, 32, 1, False),       # fewer inputs than one block (and than the prefetch distance)
])
@pytest.mark.parametrize("mask", ["random", "none-active", "all-active", "one-active"])
@pytest.mark.parametrize("variant", ["fp32", *INT8_ISAS])
def test_act_sparse_kernel_matches_numpy(k, n, block, m, zero_points, mask, variant):
    """fp32: against the dense product of the kept values; int8 (accuracy level 4): against
    MatMulNBits-at-level-4 math on the sparsified input (each K-block of kept values quantized to
    int8 with scale max|kept| / 127)."""
    from test_tvm import _int8_reference

    rng = np.random.default_rng(k * 7 + n + m)
    b, scales, zp = _weights(rng, k, n, block, zero_points)
    a = rng.standard_normal((m, k)).astype(np.float32)
    thr = {"random": np.abs(rng.standard_normal(k)).astype(np.float32),  # per-channel thresholds, ~50% active
           "none-active": np.full(k, 1e9, np.float32), "all-active": np.zeros(k, np.float32),
           "one-active": np.where(np.arange(k) == k // 2, 0, 1e9).astype(np.float32)}[mask]
    if mask == "all-active":
        a[a == 0] = 1.0
    kept = np.where(np.abs(a) > thr, a, 0).astype(np.float32)
    if variant != "fp32":
        ref, tol, chunk = _int8_reference(kept, b, scales, zp, k, n, 4, block), 1e-5, kern.SPARSE_INT8_CHUNK
        pack = functools.partial(kern.pack_act_sparse_int8, isa=variant)
        make = functools.partial(kern.act_sparse_matmul_nbits_int8, isa=variant)
    else:
        ref, tol, chunk = kept @ _dequant(b, scales, zp, k, n, block).T, 1e-4, 2 * kern.SPARSE_LANES
        pack, make = kern.pack_act_sparse_nbits, kern.act_sparse_matmul_nbits
    w, s, z = pack(b, scales, zp, k, n, block)
    assert w.shape == (k, -(-n // chunk) * chunk // 2) and w.dtype == np.uint8  # still 4 bits per weight
    args = [a, thr, w, s] + ([z] if z is not None else []) + [np.full((m, n), np.nan, np.float32)]
    y = _run(make(k, n, block, zero_points=zero_points), args)
    if mask == "none-active":
        np.testing.assert_array_equal(y, 0)
    np.testing.assert_allclose(y, ref, rtol=tol, atol=tol * max(np.abs(ref).max(), 1))


# ----------------------------------------------------------------------------- converter on small graphs

def _graph(k, consumers, threshold, rows=2, zero_points=False, seed=0, accuracy_level=0):
    """``X [rows, K] -> edgecompress::ActSparse -> MatMulNBits`` for each ``(N, bits, block)`` in
    ``consumers`` (all reading the one ActSparse output), with ActSparse's function body."""
    from edgecompress.export.onnx_act_sparse import act_sparse_function
    from edgecompress.export.onnx_custom import DOMAIN

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.asarray(threshold, np.float32), "thr")]
    nodes = [helper.make_node("ActSparse", ["X", "thr"], ["xs"], name="site/ActSparse", domain=DOMAIN)]
    outputs = []
    for i, (n, bits, block) in enumerate(consumers):
        nb = -(-k // block)
        b = rng.integers(0, 256, (n, nb, block * bits // 8)).astype(np.uint8)
        s = (rng.random(n * nb) + 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(b, f"B{i}"), numpy_helper.from_array(s, f"S{i}")]
        ins = ["xs", f"B{i}", f"S{i}"]
        if zero_points:
            zp = rng.integers(0, 256, n * ((nb + 1) // 2 if bits == 4 else nb)).astype(np.uint8)
            inits.append(numpy_helper.from_array(zp, f"Z{i}"))
            ins.append(f"Z{i}")
        nodes.append(helper.make_node("MatMulNBits", ins, [f"Y{i}"], name=f"linear{i}", domain="com.microsoft",
                                      K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy_level))
        outputs.append(helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, [rows, n]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [rows, k])],
                              outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1),
                                                    helper.make_opsetid(DOMAIN, 1)])
    model.functions.append(act_sparse_function(21))
    return model


def _ort(model, x):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"X": x})


def _tvm(model, x, int8=None):
    """The graph as :func:`.tvm.prepare` treats it (inline, fold, fuse), imported, compiled and run."""
    from tvm import relax

    from edgecompress.export.npu import fold_constants
    from edgecompress.export.tvm_act_sparse import fuse_act_sparse

    m = fold_constants(onnx.inliner.inline_local_functions(model))
    fused = fuse_act_sparse(m, int8=int8)
    m = tvm_export.prune_dead(m)
    mod, params = tvm_export.import_relax(m)
    vm = relax.VirtualMachine(tvm_export.compile_library(mod, kern.target_llvm(threads=2)), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x, tvm.cpu()), *[tvm.runtime.tensor(p, tvm.cpu()) for p in params])
    outs = [o.numpy() for o in out] if isinstance(out, (list, tuple)) or hasattr(out, "__len__") else [out.numpy()]
    return fused, m, outs


@pytest.mark.parametrize("consumers,threshold,zero_points,rows", [
    ([(40, 4, 32)], 0.7, True, 3),                       # one linear, scalar (TEAL) threshold, prefill rows
    ([(48, 4, 32), (20, 4, 32)], "per-channel", False, 1),  # two linears sharing the input (q/k/v, gate/up)
])
def test_act_sparse_converter_matches_ort_function_body(consumers, threshold, zero_points, rows):
    from edgecompress.export.tvm_act_sparse import FUSED

    k = 96
    rng = np.random.default_rng(5)
    thr = np.abs(rng.standard_normal(k)).astype(np.float32) if threshold == "per-channel" else np.float32(threshold)
    model = _graph(k, consumers, thr, rows=rows, zero_points=zero_points)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    ref = _ort(model, x)
    fused, prepared, outs = _tvm(model, x)
    assert fused.linears == len(consumers) and fused.sites == 1 and fused.function_body_sites == 0
    ops = [n.op_type for n in prepared.graph.node]
    assert ops.count(FUSED) == len(consumers) and not {"Where", "Abs", "MatMulNBits"} & set(ops)
    for y, r in zip(outs, ref):
        np.testing.assert_allclose(y, r, rtol=1e-4, atol=1e-4 * np.abs(r).max())


@pytest.mark.parametrize("isa", INT8_ISAS)
def test_act_sparse_converter_at_accuracy_level_4_matches_ort(isa):
    """At accuracy level 4 (int8 activations in ORT's MatMulNBits too) the fused node takes the int8
    kernel; against ORT running the function body at level 4 (its rounding differs in details)."""
    from edgecompress.export.tvm_act_sparse import FUSED

    k, rows = 96, 2
    rng = np.random.default_rng(6)
    thr = np.abs(rng.standard_normal(k)).astype(np.float32)
    model = _graph(k, [(48, 4, 32), (20, 4, 32)], thr, rows=rows, zero_points=True, accuracy_level=4)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    ref = _ort(model, x)
    fused, prepared, outs = _tvm(model, x, int8=isa)
    nodes = [n for n in prepared.graph.node if n.op_type == FUSED]
    assert fused.linears == len(nodes) == 2
    assert all(helper.get_attribute_value(next(a for a in n.attribute if a.name == "int8")) == kern.INT8_ISA_CODES[isa]
               for n in nodes)
    for y, r in zip(outs, ref):
        np.testing.assert_allclose(y, r, rtol=2e-2, atol=2e-2 * np.abs(r).max())


def test_unsupported_consumers_and_thresholds_keep_the_function_body(caplog):
    """Must not fuse: an 8-bit MatMulNBits, and a ``[1, K]`` threshold (the kernel takes a scalar or
    ``[K]``); both still compile (function body + dense kernel) and equal ORT."""
    import logging

    k = 64
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, k)).astype(np.float32)
    for consumers, thr, reason in (([(32, 8, 32)], np.float32(0.5), "8-bit codes"),
                                   ([(32, 4, 32)], np.full((1, k), 0.5, np.float32), "has shape [1, 64]")):
        model = _graph(k, consumers, thr)
        with caplog.at_level(logging.INFO, logger="edgecompress.export.tvm_act_sparse"):
            fused, prepared, outs = _tvm(model, x)
        assert fused.linears == 0 and fused.function_body_sites == 1
        assert reason in fused.skipped[0] and reason in caplog.text
        assert "MatMulNBits" in [n.op_type for n in prepared.graph.node]
        ref = _ort(model, x)
        np.testing.assert_allclose(outs[0], ref[0], rtol=1e-4, atol=1e-4 * np.abs(ref[0]).max())


def test_a_plain_where_does_not_match():
    from edgecompress.export.tvm_act_sparse import match_act_sparse

    nodes = [helper.make_node("Greater", ["X", "t"], ["c"]), helper.make_node("Where", ["c", "X", "z"], ["Y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4])],
                              initializer=[numpy_helper.from_array(np.float32(0), "z"),
                                           numpy_helper.from_array(np.float32(1), "t")])
    model = helper.make_model(graph)
    producers = {o: n for n in graph.node for o in n.output}
    assert match_act_sparse(model, graph.node[1], producers) == "Greater does not compare Abs of the kept value"


# ----------------------------------------------------------------------------- end to end: tiny Llama, TEAL + int4

TINY_RECIPE = """
name: tiny-llama-tvm-sparse
model: {source: tiny-llama}
calibration: {data: 'pydoc:calib', samples: 4, seq_len: 64}
steps:
  - quantize: {method: rtn, bits: 4, group_size: 32, symmetric: true, targets: ['.*'], embeddings: true}
  - sparsify_activations: {method: teal, sparsity: 0.5, allocation: uniform}
export:
  - {format: onnx, name: int4, accuracy_level: 0}
  - {format: tvm, name: int4-tvm, target: llvm, accuracy_level: 0}
"""


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    from edgecompress.pipeline import run_recipe
    from edgecompress.recipe import load_recipe

    out = tmp_path_factory.mktemp("tvm-sparse")
    (out / "recipe.yaml").write_text(TINY_RECIPE)
    run_recipe(load_recipe(out / "recipe.yaml"), out, progress=False, bench=False)
    return out / "tiny-llama-tvm-sparse"


def test_teal_int4_tiny_llama_on_tvm_equals_ort(sparse_run):
    from edgecompress.artifact import Artifact
    from edgecompress.runtimes import open_runtime

    art = Artifact.load(sparse_run / "int4-tvm")
    info = art.manifest["tvm"]
    onnx_ops = art.manifest["onnx_source"]["op_counts"]
    # every ActSparse site feeds int4 MatMulNBits: all of them run the sparse kernel, none the body
    assert info["kernels"]["act_sparse_matmul_nbits"] >= onnx_ops["edgecompress::ActSparse"] > 0
    assert "edgecompress::ActSparse" not in info["function_body_ops"]
    ids = np.random.default_rng(3).integers(0, 256, 24)
    ort = open_runtime("ort-cpu", Artifact.load(sparse_run / "int4")).logits(ids)
    tvm_logits = open_runtime("tvm-cpu", art, threads=2).logits(ids)
    np.testing.assert_allclose(tvm_logits, ort, atol=1e-4 * np.abs(ort).max())
    assert (tvm_logits.argmax(-1) == ort.argmax(-1)).all()
    prompt = [int(t) for t in ids[:8]]
    assert (open_runtime("tvm-cpu", art, threads=2).generate(prompt, 12).tokens
            == open_runtime("ort-cpu", Artifact.load(sparse_run / "int4")).generate(prompt, 12).tokens)
