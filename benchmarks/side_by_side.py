"""Bench several artifacts side by side, interleaved, and print ratios to a reference.

Each round runs every artifact once, in its own process (`edgecompress bench --json`), so a
burst of load on this shared machine hits all of them alike; medians over rounds are
reported with each artifact's ratio to the reference (the first artifact unless --reference).

    python benchmarks/side_by_side.py out/smollm2-135m-int4/int4 out/smollm2-135m-int4/fp32 \
        --reference fp32 --rounds 5 --json benchmarks/results/smollm2-int4.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from edgecompress.bench import BENCH_KEYS, bench_in_subprocess


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--reference", help="artifact folder name the ratios are taken against (default: the first)")
    ap.add_argument("--runtime", default="ort-cpu")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    args = ap.parse_args()

    names = [p.name for p in args.artifacts]
    ref = args.reference or names[0]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for path, name in zip(args.artifacts, names):
            res = bench_in_subprocess(path, args.runtime, prompt_tokens=args.prompt_tokens,
                                      new_tokens=args.new_tokens, threads=args.threads, repeats=1)
            runs[name].append(res)
            print(f"round {r + 1}/{args.rounds} {name}: prefill {res['prefill_tok_s']:.0f} tok/s, "
                  f"decode {res['decode_tok_s']:.1f} tok/s", flush=True)
    med = {n: {k: statistics.median(x[k] for x in runs[n]) if runs[n][0][k] is not None else None
               for k in BENCH_KEYS} for n in names}
    print(f"\n{args.runtime}, {args.threads} threads, prompt {args.prompt_tokens}, {args.new_tokens} new tokens, "
          f"median of {args.rounds} interleaved rounds ({platform.processor() or platform.machine()})\n")
    print("| artifact | bits/weight | size MB | prefill tok/s | decode tok/s | peak RSS MB | decode vs " + ref + " |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        m = med[n]
        print(f"| {n} | {m['bits_per_weight']:.3f} | {m['size_mb']:.1f} | {m['prefill_tok_s']:.0f} | "
              f"{m['decode_tok_s']:.1f} | {m['peak_rss_mb']:.0f} | {m['decode_tok_s'] / med[ref]['decode_tok_s']:.2f}x |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "args": vars(args) | {
            "artifacts": [str(p) for p in args.artifacts], "json": str(args.json)}, "median": med, "runs": runs},
            indent=2, default=str))


if __name__ == "__main__":
    main()
