"""Activation sparsity on SmolLM2-135M: uniform thresholds vs TEAL-greedy vs WINA vs CATS at 25/40/50%, in one run.

Every variant applies ``edgecompress.compress.sparse.activation.apply_act_sparsify`` (the
``sparsify_activations`` step's core) to a fresh copy of the model, calibrated on ``pydoc:calib``
windows, and is scored against the uncompressed model on held-out ``pydoc:eval`` windows with the
check's metrics (``edgecompress.check.LMMetrics``). The greedy allocation's per-site costs are
measured once per method and shared by the three targets (the step measures them itself; the costs
depend on the method, not on the target). Sparsity is parameter-weighted over the decoder linears
(the fraction of their weight columns whose input is zero), measured on the held-out text as well
as on the calibration text; for CATS (which thresholds only the MLPs' gated activations) the MLP
sparsity is set so that the skipped up/down weights are the target fraction of the decoder's weights.
The torch model is what the ONNX artifact computes (tests check ORT against it).

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/act_sparsity_table.py --json benchmarks/results/act-sparsity-table.json
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
from edgecompress.compress.sparse.activation import (ActSparsifyConfig, apply_act_sparsify, greedy_costs,
                                                      measure_cats_sparsity, measure_sparsity)

from _common import smollm2_windows  # benchmarks/ is on sys.path when a script runs

# (label, method, allocation, greedy cost unit)
VARIANTS = (("uniform", "teal", "uniform", None), ("WINA uniform", "wina", "uniform", None),
            ("TEAL greedy (block-output costs)", "teal", "greedy", "block"),
            ("WINA greedy (block-output costs)", "wina", "greedy", "block"),
            ("TEAL greedy (final-state costs)", "teal", "greedy", "final"),
            ("WINA greedy (final-state costs)", "wina", "greedy", "final"),
            ("CATS (MLP gated activation)", "cats", "uniform", None))


def cats_share(model: torch.nn.Module) -> float:
    """Fraction of the decoder linears' weights a CATS zero lets a kernel skip at 100%: up_proj + down_proj."""
    layers = model.model.layers
    skip = sum(b.mlp.up_proj.weight.numel() + b.mlp.down_proj.weight.numel() for b in layers)
    total = sum(m.weight.numel() for b in layers for m in b.modules() if isinstance(m, torch.nn.Linear))
    return skip / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sparsities", type=float, nargs="*", default=[0.25, 0.4, 0.5])
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    ap.add_argument("--samples", type=int, default=16, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=256, help="calibration tokens per window")
    ap.add_argument("--cost-windows", type=int, default=4, help="calibration windows the greedy costs are measured on")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    reference, calib, held_out, ref_logits = smollm2_windows(args)

    costs: dict[str, dict] = {}
    rows: list[dict] = []
    header = None
    for label, method, allocation, cost_at in VARIANTS:
        if args.only and label not in args.only:
            continue
        for target in args.sparsities:
            # CATS: the MLP sparsity whose skipped up/down weights are `target` of the decoder's weights
            level = target / cats_share(reference) if method == "cats" else target
            if level >= 0.95:
                print(f"{label} {target:.0%}: needs {level:.0%} of every MLP's activations zeroed; skipped")
                continue
            cfg = ActSparsifyConfig(method=method, sparsity=level, allocation=allocation,
                                    cost_windows=args.cost_windows, cost_at=cost_at or "block")
            t0 = time.perf_counter()
            if allocation == "greedy" and (method, cost_at) not in costs:
                costs[method, cost_at] = greedy_costs(reference, calib, cfg)
                print(f"{method} greedy costs ({cost_at}): {time.perf_counter() - t0:.0f} s", flush=True)
            model = copy.deepcopy(reference)
            records = apply_act_sparsify(model, calib, cfg, costs=costs.get((method, cost_at)))
            seconds = time.perf_counter() - t0
            m = LMMetrics()
            with torch.no_grad():
                for row, ref in zip(held_out, ref_logits):
                    m.update(ref, model(input_ids=row[None], use_cache=False).logits[0].float().numpy(), row.numpy())
            res = m.result()
            if method == "cats":  # model-wide: the skipped up/down weights over all decoder linears
                held = {"sparsity": measure_cats_sparsity(model, held_out)["sparsity"] * cats_share(reference)}
                calib_sp = sum(r["calibration_sparsity"] for r in records) / len(records) * cats_share(reference)
            else:
                held = measure_sparsity(model, held_out)
                total = sum(r["params"] for r in records)
                calib_sp = sum(r["calibration_sparsity"] * r["params"] for r in records) / total
            row = {"variant": label, "method": method, "allocation": allocation, "cost_at": cost_at,
                   "target": target, **res,
                   "heldout_sparsity": held["sparsity"], "calibration_sparsity": calib_sp,
                   "levels": {r["module"]: r["target_sparsity"] for r in records}, "steps_s": round(seconds, 1)}
            rows.append(row)
            header = res
            print(f"{label} {target:.0%}: ppl ratio {res['perplexity_ratio']:.4f} KL {res['kl']:.4f} "
                  f"top-1 {res['top1_agreement']:.4f} held-out sparsity {held['sparsity']:.4f} "
                  f"calib {calib_sp:.4f} ({seconds:.0f} s)", flush=True)
            del model

    if header is not None:
        print(f"\nSmolLM2-135M; calibration pydoc:calib {args.samples} x {args.seq_len} tokens (greedy costs on "
              f"{args.cost_windows} windows); held-out pydoc:eval {header['tokens']} tokens (reference perplexity "
              f"{header['reference_perplexity']:.3f})\n")
        print("| variant | target | held-out sparsity | perplexity ratio | KL | top-1 agreement |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['variant']} | {r['target']:.0%} | {r['heldout_sparsity']:.3f} | {r['perplexity_ratio']:.4f} | "
                  f"{r['kl']:.4f} | {r['top1_agreement']:.4f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2,
                                        default=str))


if __name__ == "__main__":
    main()
