"""Do TVM and ONNX Runtime compute the same thing on one artifact? Top-1 agreement and logit differences on held-out text.

    .venv/bin/python benchmarks/tvm_ort_agreement.py ARTIFACT [--windows 4] [--seq-len 512]
        [--accuracy-level 0] [--prefix-rows 96] [--threads 2] [--json OUT]

Runs the ONNX decoder artifact on ``ort-cpu`` and on ``tvm-cpu`` (compiled on first use, cached)
over ``--windows`` held-out ``pydoc:eval`` windows and reports, over every position, how often
the two runtimes' top-1 tokens agree and the largest |logit difference|. ``--accuracy-level N``
first writes a copy of the artifact (in a temporary folder) with every MatMulNBits set to level
``N``: at 0 both runtimes compute in fp32, at 4 both quantize the activations to int8.

``--prefix-rows R`` also checks each runtime against itself: for the first window's positions
``L - 1 < R``, the last row of a prefill of the ``L``-token prefix against the same position in the
whole window's prefill (the same computation, only the batch's row count differs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np


def with_accuracy_level(src: Path, dest: Path, level: int) -> Path:
    """A copy of the ONNX artifact ``src`` at ``dest`` with every ``accuracy_level`` attribute set to
    ``level`` (the graph is rewritten, so the copy is loaded without the sha256 check)."""
    import onnx

    shutil.copytree(src, dest)
    model = onnx.load(str(dest / "model.onnx"), load_external_data=False)
    for node in model.graph.node:
        for a in node.attribute:
            if a.name == "accuracy_level":
                a.i = level
    onnx.save(model, str(dest / "model.onnx"))
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4], default=None)
    ap.add_argument("--prefix-rows", type=int, default=0,
                    help="also compare each runtime with itself over prefixes of this many lengths")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from edgecompress.artifact import Artifact
    from edgecompress.data import load_text, token_windows
    from edgecompress.runtimes import open_runtime

    with tempfile.TemporaryDirectory() as tmp:
        path, verify = args.artifact, True
        if args.accuracy_level is not None:
            path, verify = with_accuracy_level(args.artifact, Path(tmp) / "artifact", args.accuracy_level), False
        art = Artifact.load(path, verify=verify)
        windows = token_windows(art.tokenizer(), load_text("pydoc:eval"), args.seq_len, args.windows, seed=0)
        ort_rt = open_runtime("ort-cpu", art, threads=args.threads)
        tvm_rt = open_runtime("tvm-cpu", art, threads=args.threads)
        agree, total, worst = 0, 0, 0.0
        for w in windows:
            a, b = ort_rt.logits(w.numpy()), tvm_rt.logits(w.numpy())
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.shape[0]
            worst = max(worst, float(np.abs(a - b).max()))
        self_check = {}
        ids = windows[0].numpy()
        for name, rt in (("ort-cpu", ort_rt), ("tvm-cpu", tvm_rt)) if args.prefix_rows else ():
            full = rt.logits(ids)[:args.prefix_rows]
            rows = np.stack([rt.logits(ids[:n])[-1] for n in range(1, len(full) + 1)])
            self_check[name] = {"positions": len(full),
                                "top1_agreement": round(float((rows.argmax(-1) == full.argmax(-1)).mean()), 5),
                                "max_abs_logit_diff": round(float(np.abs(rows - full).max()), 5)}
    report = {"artifact": str(args.artifact), "accuracy_level": args.accuracy_level, "tokens": total,
              "top1_agreement": round(agree / total, 5), "max_abs_logit_diff": round(worst, 5)}
    if self_check:
        report["prefix_vs_full_prefill"] = self_check
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
