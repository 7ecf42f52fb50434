"""Layer pruning on SmolLM2-135M: greedy-KL (FinerCut-style) vs block influence (ShortGPT), 0-40% of the 60
attention/MLP sublayers removed, in one run.

Both orders come from ``edgecompress.compress.prune.scores`` (the ``prune_layers`` step's core) on the same
``pydoc:calib`` windows: block influence ``1 - cos(h_in, h_out)`` of every sublayer, scored once on the unpruned
model, lowest first (and, as a third curve, of every whole block, half as many blocks); the greedy search removes
one sublayer at a time, the one whose removal gives the smallest KL from the unpruned model's next-token
distributions, re-scoring after each removal (``--rescore``: only the best units of the previous round are
re-scored). Both methods are nested (the k-removal model is the first k of the order), so one search gives
every point. Each point is the model with those sublayers removed (``remove_sublayers``, what the step does),
scored against the unpruned model on held-out ``pydoc:eval`` windows with the check's metrics
(``edgecompress.check.LMMetrics``), plus its KL on the calibration windows (the greedy objective).

    .venv/bin/python benchmarks/prune_table.py --json benchmarks/results/prune-table.json

Defaults (8 x 64 calibration tokens, KL at every 2nd token, 4 units re-scored per round, 4 x 256 held-out
tokens, one thread) keep it to ~half an hour on a busy 2-core machine; the greedy search is the expensive
part (60 trials in the first round, then 4 per removal).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch

from edgecompress.compress.prune.layers import remove_sublayers, sublayer_name
from edgecompress.compress.prune.scores import SublayerChain, block_influence, greedy_removal, kl_divergence

from _common import held_out_metrics, smollm2_windows  # benchmarks/ is on sys.path when a script runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--counts", type=int, nargs="*", default=[6, 12, 15, 18, 24], help="sublayers removed (of 60)")
    ap.add_argument("--samples", type=int, default=8, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=64, help="calibration tokens per window")
    ap.add_argument("--stride", type=int, default=2, help="greedy: KL measured at every stride-th calibration token")
    ap.add_argument("--rescore", type=int, default=4, help="greedy: units re-scored per round after the first "
                    "(0: all, exact FinerCut)")
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared 2-core machine two "
                    "threads ran the small matmuls ~10x slower)")
    ap.add_argument("--channels", type=float, nargs="*", help="instead: MLP channel pruning (prune_mlp_channels) at "
                    "these fractions of every layer's intermediate channels")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    reference, calib, held_out, ref_logits = smollm2_windows(args)

    if args.channels:
        return channel_rows(args, reference, calib, held_out, ref_logits)
    chain = SublayerChain(reference, calib, stride=args.stride)
    n = chain.n
    t0 = time.perf_counter()
    sub_bi = block_influence(chain, [(s,) for s in range(n)])
    blk_bi = block_influence(chain, [(2 * i, 2 * i + 1) for i in range(n // 2)])
    bi_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    greedy = greedy_removal(chain, [(s,) for s in range(n)], max(args.counts), divergence="kl",
                            rescore=args.rescore or None, allowed=lambda r: any(s % 2 == 0 for s in set(range(n)) - r),
                            progress=True)
    greedy_s = time.perf_counter() - t0
    print(f"block influence: {bi_s:.0f} s; greedy ({max(args.counts)} removals): {greedy_s:.0f} s", flush=True)

    orders = {"greedy KL": [u[0] for u, _ in greedy],
              "block influence (sublayers)": sorted(range(n), key=lambda s: sub_bi[(s,)]),
              "block influence (blocks)": [s for b in sorted(range(n // 2), key=lambda i: blk_bi[(2 * i, 2 * i + 1)])
                                           for s in (2 * b, 2 * b + 1)]}
    calib_ref = chain.reference()
    rows: list[dict] = []
    for count in args.counts:
        for label, order in orders.items():
            if label.endswith("(blocks)") and count % 2:
                continue
            removed = order[:count]
            t0 = time.perf_counter()
            calib_kl = chain.divergence(calib_ref, chain.states(set(removed))[-1], kl_divergence)
            model = copy.deepcopy(reference)
            remove_sublayers(model, removed)
            res = held_out_metrics(model, held_out, ref_logits)
            params = sum(p.numel() for p in model.parameters())
            row = {"method": label, "removed": count, "fraction": round(count / n, 4), **res,
                   "calibration_kl": calib_kl, "params": params,
                   "removed_sublayers": [sublayer_name(s) for s in removed],
                   "attention_removed": sum(1 for s in removed if s % 2 == 0), "eval_s": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(f"{label} {count}/{n}: ppl ratio {res['perplexity_ratio']:.4f} KL {res['kl']:.4f} top-1 "
                  f"{res['top1_agreement']:.4f} calib KL {calib_kl:.4f} ({params / 1e6:.1f}M params, "
                  f"{row['attention_removed']} attention)", flush=True)
            del model

    ref_ppl = rows[0]["reference_perplexity"] if rows else float("nan")
    total = sum(p.numel() for p in reference.parameters())
    print(f"\nSmolLM2-135M ({total / 1e6:.1f}M parameters); calibration pydoc:calib {args.samples} x {args.seq_len} "
          f"tokens (greedy KL at every {args.stride}th token, rescore {args.rescore or 'all'}); held-out pydoc:eval "
          f"{args.eval_windows} x {args.eval_seq_len} tokens (reference perplexity {ref_ppl:.3f})\n")
    print("| sublayers removed | method | attention removed | parameters | perplexity ratio | KL | top-1 agreement "
          "| calibration KL |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['removed']}/{n} ({r['fraction']:.0%}) | {r['method']} | {r['attention_removed']} | "
              f"{r['params'] / 1e6:.1f}M | {r['perplexity_ratio']:.4f} | {r['kl']:.4f} | {r['top1_agreement']:.4f} | "
              f"{r['calibration_kl']:.4f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "args": vars(args) | {"json": str(args.json)}, "timings_s": {"block_influence": bi_s, "greedy": greedy_s},
            "greedy_order": [{"sublayer": sublayer_name(u[0]), "calibration_kl": d} for u, d in greedy],
            "sublayer_influence": {sublayer_name(u[0]): v for u, v in sub_bi.items()},
            "block_influence": {f"model.layers.{u[0] // 2}": v for u, v in blk_bi.items()}, "rows": rows},
            indent=2, default=str))


def channel_rows(args, reference, calib, held_out, ref_logits) -> None:
    """MLP channel pruning rows: every layer keeps (1 - fraction) of its 1536 intermediate channels (multiple of
    64) by calibrated importance, scored like the layer rows."""
    from edgecompress.compress.prune.channels import ChannelPruneConfig, apply_prune_channels

    rows = []
    for fraction in args.channels:
        model = copy.deepcopy(reference)
        t0 = time.perf_counter()
        records = apply_prune_channels(model, calib, ChannelPruneConfig(fraction=fraction))
        res = held_out_metrics(model, held_out, ref_logits)
        rows.append({"fraction": fraction, "intermediate": records[0]["intermediate_after"], **res,
                     "params": sum(p.numel() for p in model.parameters()), "s": round(time.perf_counter() - t0, 1)})
        print(f"| {fraction:.0%} | {rows[-1]['intermediate']} | {rows[-1]['params'] / 1e6:.1f}M | "
              f"{res['perplexity_ratio']:.4f} | {res['kl']:.4f} | {res['top1_agreement']:.4f} |", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
