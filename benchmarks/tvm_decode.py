"""Decode speed of one ONNX decoder artifact on ONNX Runtime and on TVM, side by side in one process.

    .venv/bin/python benchmarks/tvm_decode.py ARTIFACT [--prompt 64] [--new 64] [--threads 2] [--repeats 3] [--json OUT]

Both runtimes are the toolkit's own (``ort-cpu`` and ``tvm-cpu``; the TVM one compiles the
artifact for this CPU on first use, cached). Greedy decoding of the same held-out prompt on
each, after a warm-up; the median of ``--repeats`` runs, interleaved ORT, TVM, ORT, ... (a
change in the machine's load hits both alike). Reports tok/s for each, their ratio, the
compile time, the greedy-token agreement and, on the prompt's logits, the max abs difference
and top-1 agreement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from edgecompress.artifact import Artifact
    from edgecompress.data import load_text, token_windows
    from edgecompress.runtimes import open_runtime

    art = Artifact.load(args.artifact)
    prompt = [int(t) for t in np.asarray(token_windows(art.tokenizer(), load_text("pydoc:eval"), args.prompt, 1))[0]]
    runtimes = {name: open_runtime(name, art, threads=args.threads) for name in ("ort-cpu", "tvm-cpu")}
    runs = {name: [] for name in runtimes}
    for rt in runtimes.values():
        rt.generate(prompt, 4)  # warm-up
    for _ in range(args.repeats):  # interleaved: a change in the machine's load hits both alike
        for name, rt in runtimes.items():
            runs[name].append(rt.generate(prompt, args.new))
    decode = {n: statistics.median(g.decode_tok_s for g in r) for n, r in runs.items()}
    prefill = {n: statistics.median(g.prefill_tok_s for g in r) for n, r in runs.items()}
    ort_logits, tvm_logits = (runtimes[n].logits(np.asarray(prompt)) for n in ("ort-cpu", "tvm-cpu"))
    tokens = {n: r[0].tokens for n, r in runs.items()}
    row = {
        "artifact": str(args.artifact), "threads": args.threads, "prompt_tokens": len(prompt), "new_tokens": args.new,
        "repeats": args.repeats, "ort_decode_tok_s": round(decode["ort-cpu"], 1),
        "tvm_decode_tok_s": round(decode["tvm-cpu"], 1),
        "tvm_over_ort_decode": round(decode["tvm-cpu"] / decode["ort-cpu"], 3),
        "ort_prefill_tok_s": round(prefill["ort-cpu"], 1), "tvm_prefill_tok_s": round(prefill["tvm-cpu"], 1),
        "greedy_token_agreement": float(np.mean([a == b for a, b in zip(tokens["tvm-cpu"], tokens["ort-cpu"])])),
        "prompt_logits_max_abs_diff": float(np.abs(tvm_logits - ort_logits).max()),
        "prompt_top1_agreement": float((tvm_logits.argmax(-1) == ort_logits.argmax(-1)).mean()),
        "compile": {k: runtimes["tvm-cpu"].info[k] for k in ("tvm_version", "mcpu", "import_seconds",
                                                             "compile_seconds")},
    }
    json.dump(row, sys.stdout, indent=1)
    print()
    if args.json:
        args.json.write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
