"""Magnitude vs Wanda vs SparseGPT (50% unstructured and 2:4), and EoRA vs SVD low-rank compensation,
on SmolLM2-135M, in one run.

Every variant is a list of recipe steps applied by the pipeline's own step appliers
(``edgecompress.pipeline.STEP_APPLIERS``, validated by the recipe schema) to a fresh copy of the model,
calibrated on ``pydoc:calib`` windows; it is then scored against the uncompressed model on held-out
``pydoc:eval`` windows with the check's metrics (``edgecompress.check.LMMetrics``, the class behind
``check_causal_lm``; the reference logits are computed once and reused). The compressed torch model is
what the artifact computes (the tests check ONNX Runtime against it); bits per weight are those of
the ONNX export, every stored byte of the decoder's projections counted (values + bitmask for
``SparseMatMul``, codes + scales for ``MatMulNBits``, and the low-rank factors).

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/sparsity_table.py --json benchmarks/results/sparsity-table.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch

from edgecompress.check import LMMetrics
from edgecompress.compress.calibration.store import StatsStore
from edgecompress.export.onnx_export import weight_summary
from edgecompress.export.onnx_formats import EmitOptions
from edgecompress.export.onnx_llm import build_llama_decoder
from edgecompress.pipeline import STEP_APPLIERS, StepContext
from edgecompress.recipe import parse_recipe

from _common import smollm2_windows  # benchmarks/ is on sys.path when a script runs

W4 = {"quantize": {"method": "rtn", "bits": 4, "group_size": 128, "symmetric": True, "embeddings": False}}


def variants() -> dict[str, dict[str, list[dict]]]:
    """Groups of compared step lists."""
    sparse = {}
    for pattern, label in (("unstructured", "50%"), ("2:4", "2:4")):
        for method in ("magnitude", "wanda", "sparsegpt"):
            step = {"method": method, "pattern": pattern}
            if pattern == "unstructured":
                step["sparsity"] = 0.5
            sparse[f"{method} {label}"] = [{"sparsify": step}]
    lowrank = {"rtn w4 g128": [W4]}
    for rank in (16, 32):
        for method in ("svd", "eora"):
            lowrank[f"rtn w4 g128 + {method} r{rank}"] = [W4, {"lowrank": {"method": method, "rank": rank}}]
    owl = {f"{m} 50% owl": [{"sparsify": {"method": m, "sparsity": 0.5, "allocation": "owl"}}]
           for m in ("wanda", "sparsegpt")}
    g4 = {"quantize": {"method": "gptq", "bits": 4, "group_size": 128, "symmetric": True, "act_order": True,
                       "embeddings": False}}
    combo = {"gptq w4 g128": [g4],
             "sparsegpt 2:4 + gptq w4 g128": [{"sparsify": {"method": "sparsegpt", "pattern": "2:4"}}, g4]}
    return {"sparse": sparse, "lowrank": lowrank, "owl": owl, "combo": combo}


def decoder_bits(model: torch.nn.Module) -> dict:
    """Stored bits per weight of the decoder's projections in the ONNX export (embedding/head excluded)."""
    _, formats = build_llama_decoder(model, opts=EmitOptions(accuracy_level=4))
    proj = [f for f in formats if f.module.startswith("model.layers.")]
    return weight_summary(proj)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", nargs="*", default=["sparse", "lowrank"])
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all of the groups)")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=256, help="calibration tokens per window")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    reference, calib, held_out, ref_logits = smollm2_windows(args)

    rows: dict[str, dict] = {}
    header = None
    for group in args.groups:
        for name, steps in variants()[group].items():
            if args.only and name not in args.only:
                continue
            recipe = parse_recipe(json.dumps({"name": "bench", "model": {"source": "smollm2-135m"},
                                              "steps": steps, "export": [{"format": "onnx"}]}))
            model = copy.deepcopy(reference)
            ctx = StepContext(calib, StatsStore(), False, 1, reference=reference)
            t0 = time.perf_counter()
            for step in recipe.steps:
                STEP_APPLIERS[step.step_type](model, step, ctx)
            seconds = time.perf_counter() - t0
            m = LMMetrics()
            with torch.no_grad():
                for row, ref in zip(held_out, ref_logits):
                    m.update(ref, model(input_ids=row[None], use_cache=False).logits[0].float().numpy(), row.numpy())
            res = m.result()
            bits = decoder_bits(model)
            rows[name] = {"group": group, "steps": steps, **res, "decoder_bits_per_weight": bits["bits_per_weight"],
                          "decoder_weight_bytes": bits["weight_bytes"], "params_by_format": bits["params_by_format"],
                          "steps_s": round(seconds, 1)}
            print(f"{name}: ppl ratio {res['perplexity_ratio']:.4f} KL {res['kl']:.4f} "
                  f"top-1 {res['top1_agreement']:.4f} bits {bits['bits_per_weight']:.3f} ({seconds:.0f} s)", flush=True)
            header = res
            del model

    if header is not None:
        print(f"\nSmolLM2-135M; calibration pydoc:calib {args.samples} x {args.seq_len} tokens; held-out pydoc:eval "
              f"{header['tokens']} tokens (reference perplexity {header['reference_perplexity']:.3f})\n")
        print("| variant | decoder bits/weight | perplexity ratio | KL | top-1 agreement | steps s |")
        print("|---|---|---|---|---|---|")
        for n, r in rows.items():
            print(f"| {n} | {r['decoder_bits_per_weight']:.3f} | {r['perplexity_ratio']:.4f} | {r['kl']:.4f} | "
                  f"{r['top1_agreement']:.4f} | {r['steps_s']:.0f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2,
                                        default=str))


if __name__ == "__main__":
    main()
