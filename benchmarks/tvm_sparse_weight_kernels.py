"""Kernel microbenchmark: pruned (2:4) fp16 weights on TVM, the 2:4 and CSR kernels against the dense fp32 GEMV.

    .venv/bin/python benchmarks/tvm_sparse_weight_kernels.py [--threads 2] [--repeats 3] [--json OUT]

At SmolLM2's shapes (gate/up 576 -> 1536, down 1536 -> 576, q/o 576 -> 576, k/v 576 -> 192), M = 1, a
2:4-pruned weight with fp16 values, weights from DRAM (128 MB of copies cycled through): the dense
fp32 kernel (:func:`matmul_f32`, what the fp32 export runs), :func:`sparse_matmul_csr` and
:func:`sparse_matmul_2of4` (AVX-512), interleaved, medians of ``--repeats`` rounds of 200 calls.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from _common import interleaved_medians, tvm_kernel_builder  # benchmarks/ is on sys.path when a script runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import tvm

    kern, build = tvm_kernel_builder(args.threads)

    rows = []
    for k, n in ((576, 1536), (1536, 576), (576, 576), (576, 192)):
        rng = np.random.default_rng(k + n)
        w = rng.standard_normal((n, k)).astype(np.float32)
        mask = np.zeros((n, k // 4, 4), bool)
        np.put_along_axis(mask, np.argsort(-np.abs(w.reshape(n, -1, 4)), -1)[..., :2], True, -1)
        mask = mask.reshape(n, k)
        w = np.where(mask, w, 0).astype(np.float16).astype(np.float32)
        copies = range(max(1, int(128e6 / w.nbytes)))
        x = rng.standard_normal((1, k)).astype(np.float32)
        y = tvm.runtime.tensor(np.zeros((1, n), np.float32))

        def t(a):
            return tvm.runtime.tensor(a)

        row_ptr, cols, vals = kern.pack_sparse_csr(w[mask].astype(np.float16), np.packbits(mask, axis=1, bitorder="little"),
                                                   n, k)
        kernels = {"dense_fp32": (build(kern.matmul_f32(k, n)), [[t(x), t(w), y] for _ in copies], w.nbytes),
                   "csr": (build(kern.sparse_matmul_csr(k, n, int(mask.sum()), "float16")),
                           [[t(x), t(row_ptr), t(cols), t(vals), y] for _ in copies],
                           row_ptr.nbytes + cols.nbytes + vals.nbytes)}
        isa = kern.permute_isa(kern.target_llvm())
        if isa:
            idx, v24 = kern.pack_sparse_2of4(w, mask, "float16")
            kernels["2of4"] = (build(kern.sparse_matmul_2of4(k, n, "float16", isa)), [[t(x), t(idx), t(v24), y] for _ in copies],
                               idx.nbytes + v24.nbytes)
        med = interleaved_medians(kernels, 200, args.repeats)
        row = {"k": k, "n": n, **{f"{name}_us": round(v * 1e6, 1) for name, v in med.items()},
               **{f"{name}_bytes": kernels[name][2] for name in med},
               **{f"{name}_over_dense": round(med["dense_fp32"] / v, 2) for name, v in med.items() if name != "dense_fp32"}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
