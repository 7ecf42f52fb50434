"""Sparse weights on TVM: the CSR and 2:4 kernels against NumPy, the SparseMatMul rewrite against ORT's
function body, and a pruned tiny Llama end to end (tvm-cpu against ort-cpu)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

from edgecompress.export import tvm as tvm_export
from edgecompress.export import tvm_kernels as kern

from test_tvm import _run  # compile one kernel, run it, return its last argument


def _sparse_weight(rng, n, k, pattern, dtype):
    """``(W [N, K] float32 with zeros, mask)``: 2:4 (two largest of every four), ~50% unstructured,
    or every other row empty; the kept values exactly representable in ``dtype``."""
    w = rng.standard_normal((n, k)).astype(np.float32)
    if pattern == "2:4":
        mask = np.zeros((n, k // 4, 4), bool)
        np.put_along_axis(mask, np.argsort(-np.abs(w.reshape(n, -1, 4)), -1)[..., :2], True, -1)
        mask = mask.reshape(n, k)
    else:
        mask = rng.random((n, k)) < 0.5
        if pattern == "empty-rows":
            mask[::2] = False
    return np.where(mask, w, 0).astype(dtype).astype(np.float32), mask


@pytest.mark.parametrize("k,n,m,pattern,dtype", [
    (64, 48, 1, "2:4", "float16"),
    (576, 1536, 1, "unstructured", "float16"),   # SmolLM2's gate/up shape
    (1536, 576, 3, "2:4", "float32"),            # down_proj, prefill rows, fp32 values
    (37, 5, 2, "unstructured", "float32"),       # rows shorter than one 16-lane vector
    (40, 8, 1, "empty-rows", "float16"),
])
def test_csr_kernel_matches_numpy(k, n, m, pattern, dtype):
    rng = np.random.default_rng(k + n)
    w, mask = _sparse_weight(rng, n, k, pattern, dtype)
    row_ptr, cols, vals = kern.pack_sparse_csr(w[mask].astype(dtype), np.packbits(mask, axis=1, bitorder="little"), n, k)
    assert vals.dtype == np.dtype(dtype) and vals.size == mask.sum() + 16  # only the kept weights (+ padding)
    a = rng.standard_normal((m, k)).astype(np.float32)
    y = _run(kern.sparse_matmul_csr(k, n, int(mask.sum()), dtype), [a, row_ptr, cols, vals, np.full((m, n), np.nan, np.float32)])
    ref = a @ w.T
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


needs_avx512 = pytest.mark.skipif(not kern.has_avx512(kern.target_llvm()), reason="this CPU has no AVX-512")
needs_permute = pytest.mark.skipif(kern.permute_isa(kern.target_llvm()) is None, reason="this CPU has no AVX2")
PERMUTE_ISAS = [pytest.param("avx512", marks=needs_avx512), pytest.param("avx2", marks=needs_permute)]


@pytest.mark.parametrize("isa", PERMUTE_ISAS)
@pytest.mark.parametrize("k,n,m,dtype,pattern", [
    (64, 48, 1, "float16", "2:4"),
    (576, 1536, 1, "float16", "2:4"),
    (1536, 576, 3, "float32", "2:4"),   # fp32 values, prefill rows
    (8, 5, 2, "float32", "1:4"),        # one kept per group (an empty slot), N below one tile
])
def test_2of4_kernel_matches_numpy(k, n, m, dtype, pattern, isa):
    rng = np.random.default_rng(k + n)
    w, mask = _sparse_weight(rng, n, k, "2:4", dtype)
    if pattern == "1:4":
        mask[:, ::4] = False
        w = np.where(mask, w, 0)
    assert kern.is_2of4(mask) and not kern.is_2of4(np.ones((2, 8), bool))
    idx, vals = kern.pack_sparse_2of4(w, mask, dtype)
    assert idx.nbytes + vals.nbytes == -(-n // 16) * 16 * (k // 4) * (1 + 2 * np.dtype(dtype).itemsize)
    a = rng.standard_normal((m, k)).astype(np.float32)
    y = _run(kern.sparse_matmul_2of4(k, n, dtype, isa), [a, idx, vals, np.full((m, n), np.nan, np.float32)])
    np.testing.assert_allclose(y, a @ w.T, rtol=1e-5, atol=1e-5 * np.abs(a @ w.T).max())


def test_pack_rejects_a_bitmask_that_disagrees_with_the_values():
    mask = np.ones((2, 8), bool)
    with pytest.raises(ValueError, match="keeps 16 weights, values has 15"):
        kern.pack_sparse_csr(np.zeros(15, np.float16), np.packbits(mask, axis=1, bitorder="little"), 2, 8)


def _graph(n, k, rows, seed=0):
    """``X [rows, K] -> edgecompress::SparseMatMul(Cast(values fp16), bitmask, shape)``, as the
    export writes a pruned linear, with its function body."""
    from edgecompress.export.onnx_custom import DOMAIN
    from edgecompress.export.onnx_sparse import SPARSE_MATMUL, sparse_matmul_function

    w, mask = _sparse_weight(np.random.default_rng(seed), n, k, "2:4", "float16")
    inits = [numpy_helper.from_array(w[mask].astype(np.float16), "values_f16"),
             numpy_helper.from_array(np.packbits(mask, axis=1, bitorder="little"), "bitmask"),
             numpy_helper.from_array(np.array([n, k], np.int64), "shape")]
    nodes = [helper.make_node("Cast", ["values_f16"], ["values"], to=TensorProto.FLOAT),
             helper.make_node(SPARSE_MATMUL, ["X", "values", "bitmask", "shape"], ["Y"], name="linear", domain=DOMAIN)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [rows, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [rows, n])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)])
    model.functions.append(sparse_matmul_function(21))
    return model


@pytest.mark.parametrize("two_of_four", [None, *PERMUTE_ISAS])
def test_sparse_matmul_rewrite_matches_ort_function_body(two_of_four):
    import onnxruntime as ort
    from tvm import relax

    from edgecompress.export.npu import fold_constants
    from edgecompress.export.tvm_sparse import CSR, NM, sparse_outputs, use_sparse_kernels

    n, k, rows = 40, 64, 2
    model = _graph(n, k, rows)
    x = np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    marked = sparse_outputs(model)
    assert marked == {"Y": "float16"}
    m = fold_constants(onnx.inliner.inline_local_functions(model))
    done = use_sparse_kernels(m, marked, two_of_four=two_of_four)
    assert done.linears == 1 and not done.kept
    m = tvm_export.prune_dead(m)
    assert [node.op_type for node in m.graph.node] == [NM if two_of_four else CSR]  # no dense matrix, no MatMul
    assert {t.name.split("/")[-1] for t in m.graph.initializer} == (
        {"2of4.idx", "2of4.vals"} if two_of_four else {"csr.row_ptr", "csr.cols", "csr.vals"})
    assert next(t for t in m.graph.initializer if t.name.endswith("vals")).data_type == TensorProto.FLOAT16
    mod, params = tvm_export.import_relax(m)
    vm = relax.VirtualMachine(tvm_export.compile_library(mod, kern.target_llvm(threads=2)), tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x, tvm.cpu()), *[tvm.runtime.tensor(p, tvm.cpu()) for p in params]).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


TINY_RECIPE = """
name: tiny-llama-tvm-2of4
model: {source: tiny-llama}
calibration: {data: 'pydoc:calib', samples: 4, seq_len: 64}
steps:
  - sparsify: {method: wanda, pattern: '2:4', value_dtype: float16}
export:
  - {format: onnx, name: sparse}
"""


def test_pruned_tiny_llama_on_tvm_equals_ort(tmp_path):
    from edgecompress.artifact import Artifact
    from edgecompress.pipeline import run_recipe
    from edgecompress.recipe import load_recipe
    from edgecompress.runtimes import open_runtime

    (tmp_path / "recipe.yaml").write_text(TINY_RECIPE)
    run_recipe(load_recipe(tmp_path / "recipe.yaml"), tmp_path, progress=False, bench=False)
    art = Artifact.load(tmp_path / "tiny-llama-tvm-2of4" / "sparse")
    info = tvm_export.build_decoder(art.onnx_path, tmp_path / "lib", threads=2)
    sparse_ops = art.manifest["onnx"]["op_counts"]["edgecompress::SparseMatMul"]
    # every pruned linear runs a sparse kernel (2:4 ones the 2:4 kernel on AVX-512 or AVX2); none is rebuilt dense
    kernel = "sparse_matmul_2of4" if kern.permute_isa(kern.target_llvm()) else "sparse_matmul_csr"
    assert info["kernels"][kernel] == sparse_ops > 0
    assert "edgecompress::SparseMatMul" not in info["function_body_ops"]
    ids = np.random.default_rng(3).integers(0, 256, 24)
    ort_logits = open_runtime("ort-cpu", art).logits(ids)
    tvm_logits = open_runtime("tvm-cpu", art, threads=2).logits(ids)
    np.testing.assert_allclose(tvm_logits, ort_logits, atol=1e-4 * np.abs(ort_logits).max())
    assert (tvm_logits.argmax(-1) == ort_logits.argmax(-1)).all()
