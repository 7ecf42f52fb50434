"""GPTQ ``float_targets`` (GPTAQ's asymmetric calibration) on AWQ'd SmolLM2-135M, in torch.

AWQ (int4 symmetric blocks of 64, the recipe defaults) runs once and is cached; then sequential
GPTQ (act-order, damp 0.01, int4 symmetric blocks of 64, the tied head included) with each
``--alpha`` (0 = plain GPTQ). Held-out windows of ``pydoc:eval``; perplexity ratio, KL and top-1
agreement against the float model.

    .venv/bin/python benchmarks/float_targets_sweep.py --alpha 0 --cache /tmp/awq.pt
    .venv/bin/python benchmarks/float_targets_sweep.py --alpha 0.25 --cache /tmp/awq.pt
"""

from __future__ import annotations

import argparse
import os
import time
from argparse import Namespace

import numpy as np
import torch

from _common import held_out_metrics, smollm2_windows
from edgecompress.compress.quant.awq import AWQConfig
from edgecompress.compress.quant.formats import QuantScheme
from edgecompress.compress.quant.gptq import GPTQConfig
from edgecompress.compress.quant.sequential import apply_awq, apply_gptq
from edgecompress.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alpha", type=float, required=True, help="float_targets (0 = plain GPTQ)")
    ap.add_argument("--cache", required=True, help="where the AWQ'd float weights are cached")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--refit", action="store_true", help="refit_scales too")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    ref_model, calib, held, ref = smollm2_windows(Namespace(seq_len=512, samples=args.samples, eval_seq_len=512,
                                                            eval_windows=args.eval_windows))
    del ref_model
    s4 = QuantScheme(4, 64, True)
    model = load_model("smollm2-135m").model.eval()
    if not os.path.exists(args.cache):
        t = time.time()
        apply_awq(model, calib, AWQConfig(scheme=s4))
        print(f"awq {time.time() - t:.0f} s", flush=True)
        torch.save(model.state_dict(), args.cache)
    else:
        model.load_state_dict(torch.load(args.cache))
    cfg = GPTQConfig(damp=0.01, act_order=True, refit_scales=args.refit, float_targets=args.alpha)
    t = time.time()
    records = apply_gptq(model, calib, s4, cfg)
    print(f"gptq {time.time() - t:.0f} s", flush=True)
    if args.alpha:
        shifts = [r["gptq"]["float_target_shift"] for r in records if "float_target_shift" in r.get("gptq", {})]
        print(f"relative weight shift: median {np.median(shifts):.4f}, max {max(shifts):.4f}", flush=True)
    m = held_out_metrics(model, held, ref)
    print(f"alpha {args.alpha}: ratio {m['perplexity_ratio']:.4f} kl {m['kl']:.4f} top1 {m['top1_agreement']:.4f}",
          flush=True)

if __name__ == "__main__":
    main()
