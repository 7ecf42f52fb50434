"""Kernel microbenchmark: the activation-sparse int4 GEMV against the dense MatMulNBits kernels (TVM, M = 1).

    .venv/bin/python benchmarks/tvm_act_sparse_kernels.py [--threads 2] [--repeats 5] [--dram] [--json OUT]

For each shape ``K -> N`` (default: SmolLM2's q/k/v 576 -> 960, o 576 -> 576, gate/up 576 -> 3072,
down 1536 -> 576, and 4096 x 4096; 4-bit, symmetric, blocks of 64, or 128 where K = 1536) and each
activation sparsity (0, 40, 50%: a threshold at that quantile of ``|x|`` for a Gaussian ``x``), times
the kernels on the same weights, interleaved (each kernel in turn, ``--repeats`` rounds of ``--number``
calls; medians):

* ``dense_fp32``: :func:`matmul_nbits` (MatMulNBits at accuracy level 0: fp32 math);
* ``sparse_fp32``: :func:`act_sparse_matmul_nbits` (reads only the weight rows of active inputs);
* ``dense_int8``: :func:`matmul_nbits_int8` (level 4: int8 activations, VNNI; on CPUs that have it);
* ``sparse_int8``: :func:`act_sparse_matmul_nbits_int8` (the same, reading only active rows).

Reports microseconds per call, each sparse kernel's speedup over the dense kernel of the same math
and the effective bandwidth: the bytes each kernel must read (dense: all packed codes and fp32
scales; sparse: the active rows' codes and the scales of blocks with an active row) per second.
``--dram`` cycles through enough weight copies (``--dram-mb`` in all) that every call reads its
weights from DRAM, as a decode step does (a model's weights do not fit in the caches); without it
the weights of one shape stay in the caches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _timed(fn, arg_sets, number: int):
    """A callable returning seconds per call of ``fn``, averaged over ``number`` calls cycling through
    ``arg_sets`` (after one warm-up)."""
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
    ap.add_argument("--number", type=int, default=200)
    ap.add_argument("--shapes", default="576x960,576x576,576x3072,1536x576,4096x4096")
    ap.add_argument("--sparsities", default="0,0.4,0.5")
    ap.add_argument("--dram", action="store_true", help="weights from DRAM: cycle through --dram-mb of copies")
    ap.add_argument("--dram-mb", type=float, default=128.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import tvm

    from edgecompress.export import tvm_kernels as kern

    kern.set_threads(args.threads)
    target = kern.target_llvm(threads=args.threads)
    isa = kern.int8_isa(target)
    int8 = isa is not None
    dev = tvm.cpu()

    def build(func):
        return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)["main"]

    def t(a):
        return tvm.runtime.tensor(a, dev)

    rows = []
    for k, n in (tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")):
        rng = np.random.default_rng(k + n)
        block = 128 if k == 1536 else 64  # as the shipped recipes: down_proj in blocks of 128
        nb = -(-k // block)
        b = rng.integers(0, 256, (n, nb, block // 2)).astype(np.uint8)
        scales = (rng.random(n * nb) * 0.01).astype(np.float32)
        dense_bytes = b.nbytes + scales.nbytes
        copies = range(max(1, int(args.dram_mb * 1e6 / dense_bytes)) if args.dram else 1)
        x = rng.standard_normal((1, k)).astype(np.float32)
        y = t(np.zeros((1, n), np.float32))
        kernels = {"dense_fp32": (build(kern.matmul_nbits(k, n, 4, block, zero_points=False)),
                                  [[t(x), t(b), t(scales), y] for _ in copies])}
        ws, ss, _ = kern.pack_act_sparse_nbits(b, scales, None, k, n, block)
        sparse = {"sparse_fp32": (build(kern.act_sparse_matmul_nbits(k, n, block, zero_points=False,
                                                                     parts=args.threads)),
                                  [(t(ws), t(ss)) for _ in copies], ws.shape[1], ss.shape[1])}
        if int8:
            w8, s8, _ = kern.pack_nbits_int8(b, scales, None, k, n, 4, block)
            kernels["dense_int8"] = (build(kern.matmul_nbits_int8(k, n, 4, block, zero_points=False, isa=isa)),
                                     [[t(x), t(w8), t(s8), y] for _ in copies])
            wi, si, _ = kern.pack_act_sparse_int8(b, scales, None, k, n, block, isa=isa)
            sparse["sparse_int8"] = (build(kern.act_sparse_matmul_nbits_int8(k, n, block, zero_points=False,
                                                                              parts=args.threads, isa=isa)),
                                     [(t(wi), t(si)) for _ in copies], wi.shape[1], si.shape[1])
        for sparsity in (float(v) for v in args.sparsities.split(",")):
            thr = np.full(k, np.quantile(np.abs(x), sparsity) if sparsity else 0.0, np.float32)
            active = np.abs(x[0]) > thr
            touched = np.add.reduceat(active, np.arange(0, k, block)) > 0
            nbytes = {name: dense_bytes for name in kernels}
            runs = {name: _timed(f, a, args.number) for name, (f, a) in kernels.items()}
            for name, (f, weights, row_bytes, scale_cols) in sparse.items():
                nbytes[name] = int(active.sum()) * row_bytes + int(touched.sum()) * scale_cols * 4
                runs[name] = _timed(f, [[t(x), t(thr), w, s, y] for w, s in weights], args.number)
            times = {name: [] for name in runs}
            for _ in range(args.repeats):  # interleaved: the machine's load hits all alike
                for name, run in runs.items():
                    times[name].append(run())
            med = {name: statistics.median(v) for name, v in times.items()}
            row = {"k": k, "n": n, "block": block, "sparsity": round(float(1 - active.mean()), 3),
                   "weights": "dram" if args.dram else "cached",
                   **{f"{name}_us": round(v * 1e6, 1) for name, v in med.items()},
                   **{f"{name}_gb_s": round(nbytes[name] / v / 1e9, 2) for name, v in med.items()},
                   "sparse_fp32_speedup": round(med["dense_fp32"] / med["sparse_fp32"], 2),
                   "sparse_int8_speedup": round(med["dense_int8"] / med["sparse_int8"], 2) if int8 else None,
                   "int8_over_fp32": round(med["dense_fp32"] / med["dense_int8"], 2) if int8 else None}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "int8_isa": isa, "dram": args.dram, "rows": rows},
                                        indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
