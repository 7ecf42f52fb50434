"""Decode speed of several artifact/runtime pairs side by side in one process (activation-sparse TVM vs dense).

    .venv/bin/python benchmarks/tvm_sparse_decode.py --run LABEL=RUNTIME:ARTIFACT [--run ...]
        [--baseline LABEL ...] [--prompt 64] [--new 64] [--threads 2] [--repeats 5] [--json OUT]

e.g. dense int4 on ORT and on TVM against the activation-sparse int4 TVM library::

    --run int4-ort=ort-cpu:OUT/smollm2-135m-int4/int4 --run int4-tvm=tvm-cpu:OUT/smollm2-135m-int4/int4 \\
    --run teal40-tvm=tvm-cpu:OUT/smollm2-135m-tvm-sparse/teal-int4-tvm --baseline int4-tvm --baseline int4-ort

Every pair is opened once (an ONNX artifact on ``tvm-cpu`` is compiled on first use, cached), warmed
up, then greedy-decodes the same held-out prompt ``--repeats`` times, interleaved (A, B, C, A, B,
C, ...: a change in the machine's load hits all alike). Reports the median decode and prefill tok/s
of each, each one's decode ratio over every ``--baseline``, the greedy tokens' agreement with the
first run, and the 1-minute load average before and after (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, help="LABEL=RUNTIME:ARTIFACT")
    ap.add_argument("--baseline", action="append", default=[])
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from edgecompress.artifact import Artifact
    from edgecompress.data import load_text, token_windows
    from edgecompress.runtimes import open_runtime

    specs = {}
    for item in args.run:
        label, _, rest = item.partition("=")
        runtime, _, path = rest.partition(":")
        if not (label and runtime and path):
            ap.error(f"--run {item!r}: expected LABEL=RUNTIME:ARTIFACT")
        specs[label] = (runtime, Path(path))
    for b in args.baseline:
        if b not in specs:
            ap.error(f"--baseline {b!r} is not one of the --run labels ({', '.join(specs)})")
    load_before = os.getloadavg()[0]
    runtimes = {label: open_runtime(rt, Artifact.load(path), threads=args.threads) for label, (rt, path) in specs.items()}
    first = Artifact.load(next(iter(specs.values()))[1])
    prompt = [int(t) for t in np.asarray(token_windows(first.tokenizer(), load_text("pydoc:eval"), args.prompt, 1))[0]]
    for rt in runtimes.values():
        rt.generate(prompt, 4)  # warm-up
    runs = {label: [] for label in runtimes}
    for _ in range(args.repeats):
        for label, rt in runtimes.items():
            runs[label].append(rt.generate(prompt, args.new))
    decode = {k: statistics.median(g.decode_tok_s for g in r) for k, r in runs.items()}
    prefill = {k: statistics.median(g.prefill_tok_s for g in r) for k, r in runs.items()}
    ref_tokens = next(iter(runs.values()))[0].tokens
    rows = []
    for label, (rt, path) in specs.items():
        info = getattr(runtimes[label], "info", None) or {}
        tokens = runs[label][0].tokens
        rows.append({"label": label, "runtime": rt, "artifact": str(path),
                     "decode_tok_s": round(decode[label], 1), "prefill_tok_s": round(prefill[label], 1),
                     **{f"decode_over_{b}": round(decode[label] / decode[b], 3) for b in args.baseline},
                     "greedy_agreement_with_first": float(np.mean([a == b for a, b in zip(tokens, ref_tokens)])),
                     **({"tvm_kernels": info.get("kernels")} if info.get("kernels") else {})})
    report = {"threads": args.threads, "prompt_tokens": len(prompt), "new_tokens": args.new, "repeats": args.repeats,
              "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)], "runs": rows}
    json.dump(report, sys.stdout, indent=1)
    print()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
