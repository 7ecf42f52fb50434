"""The activation-sparse int4 GEMV (TVM) and its converter: kernel against NumPy, graphs against ORT.

The kernel is checked on awkward shapes (K not a multiple of the block, N not a multiple of the
32-output vector step, zero points) with all-zero, all-active and random masks; the converter on
one- and two-consumer graphs (``ActSparse`` feeding one ``MatMulNBits``, or two sharing its output)
against ONNX Runtime running the function body, with a graph that must not fuse; and end to end
on a tiny Llama with TEAL thresholds and int4 weights, tvm-cpu against ort-cpu.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

from edgecompress.export import tvm as tvm_export
from edgecompress.export import tvm_kernels as kern


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
])
@pytest.mark.parametrize("mask", ["random", "none-active", "all-active"])
def test_act_sparse_kernel_matches_numpy(k, n, block, m, zero_points, mask):
    rng = np.random.default_rng(k * 7 + n + m)
    b, scales, zp = _weights(rng, k, n, block, zero_points)
    a = rng.standard_normal((m, k)).astype(np.float32)
    thr = {"random": np.abs(rng.standard_normal(k)).astype(np.float32),  # per-channel thresholds, ~50% active
           "none-active": np.full(k, 1e9, np.float32), "all-active": np.zeros(k, np.float32)}[mask]
    if mask == "all-active":
        a[a == 0] = 1.0
    kept = np.where(np.abs(a) > thr, a, 0)
    ref = kept @ _dequant(b, scales, zp, k, n, block).T
    w, s, z = kern.pack_act_sparse_nbits(b, scales, zp, k, n, block)
    assert w.shape == (k, -(-n // 32) * 16) and w.dtype == np.uint8  # still 4 bits per weight
    args = [a, thr, w, s] + ([z] if z is not None else []) + [np.full((m, n), np.nan, np.float32)]
    y = _run(kern.act_sparse_matmul_nbits(k, n, block, zero_points=zero_points), args)
    if mask == "none-active":
        np.testing.assert_array_equal(y, 0)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * max(np.abs(ref).max(), 1))
