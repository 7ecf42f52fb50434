"""The quantization table on SmolLM2-135M, in one run: RTN vs AWQ vs GPTQ vs AWQ+GPTQ at W4 (group 64)
and W3 (block 128), the shipped W4 recipe (int8 head rows), and W8A8 (SmoothQuant, auto alpha; float BOS
prefix; Hadamard-rotated down_proj input) with each activation observer, plus W8A8 without the rotation.

Each variant is the shipped `recipes/smollm2-135m-gptq-w4.yaml` with its steps replaced, run
through the whole pipeline (calibrate -> steps -> ONNX export -> check on ORT CPU against the
uncompressed model on held-out text); the artifacts are then benched side by side, interleaved,
with the fp32 export of the same run.

    python benchmarks/quant_table.py --out out/quant-table --json benchmarks/results/quant-table.json
    python benchmarks/quant_table.py --only w4:rtn w8a8:mse     # a subset
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
ROWS = BASE.with_name("smollm2-135m-awq-gptq-w4-rows.yaml")


def weight_only(bits: int, group: int) -> dict[str, list[dict]]:
    """RTN / AWQ+RTN / GPTQ / AWQ+GPTQ at one format. 3-bit has no embedding kernel: there the
    embedding and the tied head it shares are RTN int8 (group 64) in every variant."""
    fmt = {"bits": bits, "group_size": group, "symmetric": True}
    emb = bits != 3
    first = [] if emb else [{"quantize": {"method": "rtn", "bits": 8, "group_size": 64,
                                          "targets": ["embed_tokens"], "embeddings": True}}]
    q = {"embeddings": emb}
    return {
        "rtn": first + [{"quantize": {"method": "rtn", **fmt, **q}}],
        "awq+rtn": [{"awq": fmt}] + first + [{"quantize": {"method": "rtn", **fmt, **q}}],
        "gptq": first + [{"quantize": {"method": "gptq", **fmt, "act_order": True, **q}}],
        "awq+gptq": [{"awq": fmt}] + first + [{"quantize": {"method": "gptq", **fmt, "act_order": True, **q}}],
    }


def variants() -> dict[str, list[dict]]:
    out = {f"w4:{k}": v for k, v in weight_only(4, 64).items()}
    # the shipped W4 recipe: its int8 head rows and down_proj blocks of 128 under the same 4.25 bits
    out["w4:awq+gptq-rows"] = yaml.safe_load(ROWS.read_text())["steps"]
    out.update({f"w3:{k}": v for k, v in weight_only(3, 128).items()})
    # W8A8 as shipped (float BOS prefix, Hadamard-rotated down_proj input) per observer, and mse without the rotation
    for obs in ("minmax", "percentile", "mse", "entropy"):
        act = {"observer": obs, "float_prefix": True, "hadamard": r"mlp\.down_proj$"}
        out[f"w8a8:{obs}"] = [{"smoothquant": {"alpha": "auto"}}, {"quantize": {"preset": "w8a8", "activations": act}}]
    out["w8a8:mse-no-hadamard"] = [{"smoothquant": {"alpha": "auto"}},
                                   {"quantize": {"preset": "w8a8",
                                                 "activations": {"observer": "mse", "float_prefix": True}}}]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("out/quant-table"))
    ap.add_argument("--only", nargs="*", help="variant names to run, e.g. w4:gptq w8a8:mse (default: all)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved bench rounds")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    base = yaml.safe_load(BASE.read_text())
    base["export"] = [{"format": "onnx", "name": "q"}]
    base.pop("bench", None)
    base["check"] = {**base["check"], "export": "q", "thresholds": {}}
    rows: dict[str, dict] = {}
    for name, steps in variants().items():
        if args.only and name not in args.only:
            continue
        slug = name.replace(":", "-").replace("+", "-").replace(".", "")
        spec = {**base, "name": slug, "steps": steps}
        if name == "w4:rtn":  # the one variant that also exports the fp32 reference, for the speed ratio
            spec["export"] = spec["export"] + [{"format": "onnx", "name": "fp32", "reference": True}]
        t0 = time.perf_counter()
        report = run_recipe(parse_recipe(json.dumps(spec)), args.out, force=True, progress=False)
        rows[name] = {"check": report["check"], "export": report["exports"]["q"], "timings": report["timings"],
                      "seconds": round(time.perf_counter() - t0, 1), "path": f"{report['out']}/q"}
        if "fp32" in report["exports"]:
            rows["fp32"] = {"export": report["exports"]["fp32"], "path": f"{report['out']}/fp32"}
        c = report["check"]
        print(f"{name}: ppl ratio {c['perplexity_ratio']:.4f} KL {c['kl']:.4f} top-1 {c['top1_agreement']:.4f} "
              f"({rows[name]['seconds']:.0f} s)", flush=True)
    speeds: dict[str, list[float]] = {n: [] for n in rows}
    for _ in range(args.rounds):
        for n, r in rows.items():
            speeds[n].append(bench_in_subprocess(Path(r["path"]), "ort-cpu", prompt_tokens=512, new_tokens=128,
                                                 threads=2, repeats=1)["decode_tok_s"])
    any_check = next(r["check"] for r in rows.values() if "check" in r)
    print(f"\nSmolLM2-135M; held-out pydoc:eval, {any_check['tokens']} tokens; calibration "
          f"{base['calibration']['samples']} x {base['calibration']['seq_len']} tokens of pydoc:calib; "
          f"decode: ORT CPU, 2 threads, 512-token prompt + 128 new tokens, median of {args.rounds} interleaved rounds\n")
    print("| variant | bits/weight | size MB | perplexity ratio | KL | top-1 agreement | decode tok/s | steps s |")
    print("|---|---|---|---|---|---|---|---|")
    for n, r in rows.items():
        e = r["export"]
        if "check" not in r:
            print(f"| {n} | {e['bits_per_weight']:.3f} | {e['size_mb']:.1f} | 1 | 0 | 1 | "
                  f"{statistics.median(speeds[n]):.1f} | - |")
            continue
        c = r["check"]
        print(f"| {n} | {e['bits_per_weight']:.3f} | {e['size_mb']:.1f} | {c['perplexity_ratio']:.4f} | {c['kl']:.4f} | "
              f"{c['top1_agreement']:.4f} | {statistics.median(speeds[n]):.1f} | {r['timings']['steps_s']:.0f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "decode_tok_s": speeds}, indent=2, default=str))


if __name__ == "__main__":
    main()
