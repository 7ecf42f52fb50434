"""Where one TVM decode step's time goes: wall time per token, then per VM call (kernels and VM builtins).

    .venv/bin/python benchmarks/tvm_profile.py ARTIFACT [--past 128] [--threads 2] [--steps 20]

Runs ``main`` of the artifact's TVM library (a TVM artifact, or an ONNX one compiled on first use)
for one new token after ``--past`` cached positions. The per-call table comes from the VM's
instrument hook, timed in Python: each call carries a few microseconds of hook overhead (the
hooked total is printed beside the plain one), so builtins (``vm.builtin.*``) read high.
"""

from __future__ import annotations

import argparse
import collections
import re
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    from edgecompress.artifact import Artifact
    from edgecompress.runtimes.tvm_cpu import TvmCpuRuntime

    rt = TvmCpuRuntime(Artifact.load(args.artifact), threads=args.threads)
    cache = rt._cache(args.past + 1)
    ids = np.array([[5]], np.int64)
    for _ in range(3):
        rt._step(ids, cache, args.past + 1)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        rt._step(ids, cache, args.past + 1)
    plain = (time.perf_counter() - t0) / args.steps
    total: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    start: dict[str, float] = {}

    def hook(func, name, before, ret, *xs):
        if before:
            start[name] = time.perf_counter()
        else:
            total[re.sub(r"\d+$", "", name)] += time.perf_counter() - start[name]
            calls[re.sub(r"\d+$", "", name)] += 1
        return 0

    rt.vm.set_instrument(hook)
    for _ in range(args.steps):
        rt._step(ids, cache, args.past + 1)
    n = args.steps
    print(f"{plain * 1e3:.2f} ms/token ({args.threads} threads, {args.past} cached positions); hooked: "
          f"{sum(total.values()) / n * 1e3:.2f} ms in {sum(calls.values()) / n:.0f} calls/token")
    for name, sec in total.most_common():
        print(f"{sec / n * 1e3:9.3f} ms {calls[name] / n:6.0f} calls  {name}")


if __name__ == "__main__":
    main()
