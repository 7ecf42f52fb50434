"""RTN vs AWQ vs GPTQ vs AWQ+GPTQ on SmolLM2-135M at one weight format, in one run.

Each variant is the shipped `recipes/smollm2-135m-gptq-w4.yaml` with its steps replaced, run
through the whole pipeline (calibrate -> steps -> ONNX export -> check on ORT CPU against the
uncompressed model on held-out text); the artifacts are then benched side by side, interleaved.

    python benchmarks/quant_table.py --out out/quant-table --json benchmarks/results/quant-table.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml

from edgecompress.bench import bench_in_subprocess
from edgecompress.pipeline import run_recipe
from edgecompress.recipe import parse_recipe

BASE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m-gptq-w4.yaml"


def variants(bits: int, group: int) -> dict[str, list[dict]]:
    """The compared step lists. 3-bit has no embedding kernel: there the embedding and the tied head
    it shares are RTN int8 (group 64) in every variant, and the variants differ in the decoder only."""
    fmt = {"bits": bits, "group_size": group, "symmetric": True}
    first: list[dict] = []
    emb = bits != 3
    if not emb:
        first = [{"quantize": {"method": "rtn", "bits": 8, "group_size": 64, "targets": ["embed_tokens"],
                               "embeddings": True}}]
    return {
        "rtn": first + [{"quantize": {"method": "rtn", **fmt, "embeddings": emb}}],
        "awq+rtn": [{"awq": fmt}] + first + [{"quantize": {"method": "rtn", **fmt, "embeddings": emb}}],
        "gptq": first + [{"quantize": {"method": "gptq", **fmt, "act_order": True, "embeddings": emb}}],
        "awq+gptq": [{"awq": fmt}] + first + [{"quantize": {"method": "gptq", **fmt, "act_order": True,
                                                             "embeddings": emb}}],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("out/quant-table"))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved bench rounds")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    base = yaml.safe_load(BASE.read_text())
    base["export"] = [base["export"][0]]
    base.pop("bench", None)
    base["check"]["thresholds"] = {}
    rows = {}
    for name, steps in variants(args.bits, args.group_size).items():
        if args.only and name not in args.only:
            continue
        spec = {**base, "name": f"{name.replace('+', '-')}-w{args.bits}g{args.group_size}", "steps": steps}
        t0 = time.perf_counter()
        report = run_recipe(parse_recipe(json.dumps(spec)), args.out, force=True, progress=False)
        rows[name] = {"check": report["check"], "export": report["exports"]["int4"],
                      "seconds": round(time.perf_counter() - t0, 1), "path": f"{report['out']}/int4"}
        c = report["check"]
        print(f"{name}: ppl ratio {c['perplexity_ratio']:.4f} KL {c['kl']:.4f} top-1 {c['top1_agreement']:.4f}",
              flush=True)
    speeds: dict[str, list[float]] = {n: [] for n in rows}
    for _ in range(args.rounds):
        for n, r in rows.items():
            speeds[n].append(bench_in_subprocess(Path(r["path"]), "ort-cpu", prompt_tokens=512, new_tokens=128,
                                                 threads=2, repeats=1)["decode_tok_s"])
    print(f"\nSmolLM2-135M, int{args.bits} group {args.group_size} symmetric "
          f"({'embedding/tied head included' if args.bits != 3 else 'embedding/tied head RTN int8'}); "
          f"held-out pydoc:eval, {next(iter(rows.values()))['check']['tokens']} tokens; decode: ORT CPU, 2 threads, "
          f"median of {args.rounds} interleaved rounds\n")
    print("| method | bits/weight | size MB | perplexity ratio | KL | top-1 agreement | decode tok/s | time s |")
    print("|---|---|---|---|---|---|---|---|")
    for n, r in rows.items():
        c, e = r["check"], r["export"]
        print(f"| {n} | {e['bits_per_weight']:.3f} | {e['size_mb']:.1f} | {c['perplexity_ratio']:.4f} | {c['kl']:.4f} | "
              f"{c['top1_agreement']:.4f} | {statistics.median(speeds[n]):.1f} | {r['seconds']:.0f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "decode_tok_s": speeds}, indent=2, default=str))


if __name__ == "__main__":
    main()
