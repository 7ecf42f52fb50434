"""Kernel microbenchmark: the activation-sparse int4 GEMV against the dense MatMulNBits kernel (TVM, M = 1).

    .venv/bin/python benchmarks/tvm_act_sparse_kernels.py [--threads 2] [--repeats 5] [--json OUT]

For each shape ``K -> N`` (SmolLM2's 576 -> 1536 and 1536 -> 576, and 4096 x 4096; 4-bit,
symmetric, blocks of 64) and each activation sparsity (0, 40, 50%: a threshold at that quantile
of ``|x|`` for a Gaussian ``x``), times the sparse kernel and the dense kernel on the same weights,
interleaved (dense, sparse, dense, ...; the median of ``--repeats`` rounds of
``--number`` calls each). Reports microseconds per call, the speedup over dense and the effective
bandwidth: the bytes each kernel must read (dense: all packed codes and fp32 scales; sparse: the
active rows' codes and the scales of blocks with an active row) per second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _timer(fn, arg_sets, number: int = 200):
    """Seconds per call of ``fn``, averaged over ``number`` calls cycling through ``arg_sets`` (after
    one warm-up)."""
    def run() -> float:
        t0 = time.perf_counter()
        for i in range(number):
            fn(*arg_sets[i % len(arg_sets)])
        return (time.perf_counter() - t0) / number
    fn(*arg_sets[0])
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--copies", type=int, default=1,
                    help="distinct weight copies cycled through (enough copies, e.g. 48 at 576->1536, make every "
                    "call read its weights from DRAM instead of the caches)")
    ap.add_argument("--shapes", default="576x1536,1536x576,4096x4096")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import tvm

    from edgecompress.export import tvm_kernels as kern

    tvm.get_global_func("runtime.config_threadpool")(0, args.threads)
    target = kern.target_llvm(threads=args.threads)
    dev = tvm.cpu()
    rows = []
    for k, n in (tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")):
        rng = np.random.default_rng(k + n)
        block = args.block
        nb = -(-k // block)
        b = rng.integers(0, 256, (n, nb, block // 2)).astype(np.uint8)
        scales = (rng.random(n * nb) * 0.01).astype(np.float32)
        w, s, _ = kern.pack_act_sparse_nbits(b, scales, None, k, n, block)
        copies = range(args.copies)
        dense = tvm.compile(tvm.IRModule({"main": kern.matmul_nbits(k, n, 4, block, zero_points=False)
                                          .with_attr("global_symbol", "main")}), target=target)
        sparse = tvm.compile(tvm.IRModule({"main": kern.act_sparse_matmul_nbits(k, n, block, zero_points=False,
                                                                                  parts=args.threads)
                                           .with_attr("global_symbol", "main")}), target=target)
        x = rng.standard_normal((1, k)).astype(np.float32)
        t = lambda a: tvm.runtime.tensor(a, dev)  # noqa: E731
        y = t(np.zeros((1, n), np.float32))
        dense_args = [[t(x), t(b), t(scales), y] for _ in copies]
        dense_bytes = b.nbytes + scales.nbytes
        for sparsity in (0.0, 0.4, 0.5):
            thr = np.full(k, np.quantile(np.abs(x), sparsity) if sparsity else 0.0, np.float32)
            active = np.abs(x[0]) > thr
            sparse_args = [[t(x), t(thr), t(w), t(s), y] for _ in copies]
            touched = np.add.reduceat(active, np.arange(0, k, block)) > 0
            sparse_bytes = int(active.sum()) * w.shape[1] + int(touched.sum()) * s.shape[1] * 4
            fd, fs = _timer(dense["main"], dense_args), _timer(sparse["main"], sparse_args)
            td, ts = [], []
            for _ in range(args.repeats):  # interleaved: the machine's load hits both alike
                td.append(fd())
                ts.append(fs())
            td, ts = statistics.median(td), statistics.median(ts)
            rows.append({"k": k, "n": n, "sparsity": round(float(1 - active.mean()), 3),
                         "dense_us": round(td * 1e6, 1), "sparse_us": round(ts * 1e6, 1),
                         "speedup": round(td / ts, 2), "dense_gb_s": round(dense_bytes / td / 1e9, 2),
                         "sparse_gb_s": round(sparse_bytes / ts / 1e9, 2)})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "block": args.block, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
