"""The ceiling for activation-sparse GEMV on this machine: reading a random subset of weight rows from DRAM.

    .venv/bin/python benchmarks/dram_row_reads.py [--threads 2] [--repeats 3] [--json OUT]

An activation-sparse GEMV reads only the weight rows of its active inputs. With the weights in DRAM
(a decode step's case: a model's weights do not fit in the caches) its best possible time is the
time to read those rows. This measures that with a kernel that does nothing else (XOR of every
64-byte line of the rows, the rows split between the threads in order): all rows in order (what a
dense kernel reads) against a random 60% and 50% of them (sorted, as the sparse kernels visit them),
without and with software prefetch of the row ``--prefetch`` entries ahead. Row lengths are those of
SmolLM2's 4-bit input-major rows (gate/up: 576 rows of 1536 bytes; down: 1536 rows of 320) and of a
4096 x 4096 layer (2048 bytes). ``--dram-mb`` of copies are cycled through so that no call finds its
rows in the caches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def read_rows(k: int, row_bytes: int, parts: int, prefetch: int):
    from tvm.script import tirx as T

    from edgecompress.export.tvm_kernels import prefetch_line

    lines = row_bytes // 64

    @T.prim_func
    def func(w: T.Buffer((k, row_bytes), "uint8"), idx: T.Buffer((k + prefetch,), "int32"),
             cnt: T.Buffer((1,), "int32"), out: T.Buffer((parts, 64), "uint8")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for p in T.parallel(parts):
            acc = T.alloc_buffer((64,), "uint8", scope="local")
            acc[T.ramp(0, 1, 64)] = T.broadcast(T.uint8(0), 64)
            for j in T.serial(p * cnt[0] // parts, (p + 1) * cnt[0] // parts):
                for c in T.serial(lines):
                    if prefetch > 0:
                        T.evaluate(prefetch_line(T.address_of(w[idx[j + prefetch], c * 64])))
                    acc[T.ramp(0, 1, 64)] = acc[T.ramp(0, 1, 64)] ^ w[idx[j], T.ramp(c * 64, 1, 64)]
            out[p, T.ramp(0, 1, 64)] = acc[T.ramp(0, 1, 64)]
    return func


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--number", type=int, default=200)
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--dram-mb", type=float, default=128.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import tvm

    from edgecompress.export import tvm_kernels as kern

    threads = kern.set_threads(args.threads)
    target = kern.target_llvm(threads=threads)
    rows = []
    for k, row_bytes in ((576, 1536), (1536, 320), (4096, 2048)):
        copies = max(1, int(args.dram_mb * 1e6 / (k * row_bytes)))
        rng = np.random.default_rng(k)
        weights = [tvm.runtime.tensor(rng.integers(0, 256, (k, row_bytes), dtype=np.uint8)) for _ in range(copies)]
        out = tvm.runtime.tensor(np.zeros((threads, 64), np.uint8))
        for prefetch in (0, args.prefetch):
            f = tvm.compile(tvm.IRModule({"main": read_rows(k, row_bytes, threads, prefetch)}), target=target)["main"]
            for fraction in (1.0, 0.6, 0.5):
                active = np.sort(rng.permutation(k)[: int(k * fraction)]).astype(np.int32)
                idx = tvm.runtime.tensor(np.concatenate([active, np.full(k - len(active) + prefetch, active[-1],
                                                                         np.int32)]))
                cnt = tvm.runtime.tensor(np.array([len(active)], np.int32))
                f(weights[0], idx, cnt, out)
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    for i in range(args.number):
                        f(weights[i % copies], idx, cnt, out)
                    times.append((time.perf_counter() - t0) / args.number)
                t = statistics.median(times)
                rows.append({"rows": k, "row_bytes": row_bytes, "prefetch": prefetch, "fraction_read": fraction,
                             "us": round(t * 1e6, 1), "gb_s": round(len(active) * row_bytes / t / 1e9, 2)})
                full = next(r["us"] for r in rows if r["rows"] == k and r["prefetch"] == prefetch
                            and r["fraction_read"] == 1.0)
                rows[-1]["time_vs_all_rows"] = round(rows[-1]["us"] / full, 2)
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"threads": threads, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
