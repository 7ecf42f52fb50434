"""SmolLM2-135M's NPU form (recipes/smollm2-135m-npu.yaml) on the Qualcomm HTP simulator and on the CPU EP.

Takes the run folder of that recipe (its ``npu`` artifact and its ``fp32`` float CPU artifact) and measures:

* perplexity over the **prefill graph** on held-out 128-token windows of pydoc:eval (ratio to the fp32 torch
  model, KL, top-1 agreement), the NPU artifact on ``qnn-htp`` and on ``ort-cpu``;
* the **decode graph**'s greedy tokens vs the fp32 CPU artifact's (``ort-cpu``) for ``--steps`` steps after
  held-out prompts: ``free_running_match`` (position-wise equal tokens of the two free-running generations:
  one early flip changes every later token) and ``teacher_forced_match`` (the decode graph's top-1 at each
  step when fed the CPU artifact's tokens);
* the simulator's seconds per prefill and per decode step.

    .venv/bin/python benchmarks/npu_smollm2.py out/smollm2-135m-npu --windows 4 --prompts 2 --steps 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from edgecompress.artifact import Artifact
from edgecompress.check import check_causal_lm
from edgecompress.data import load_text, token_windows
from edgecompress.models import load_model
from edgecompress.runtimes import open_runtime


def teacher_forced(rt, prompt: list[int], ref_tokens: list[int]) -> list[int]:
    """The static runtime's top-1 at each step when the decode graph is fed ``ref_tokens`` (after a prefill);
    a running count goes to stderr (the simulator is slow)."""
    hits, t0 = [0], time.perf_counter()

    def step(i: int, logits: np.ndarray) -> None:
        hits[0] += int(logits.argmax()) == ref_tokens[i + 1]
        print(f"step {i + 1}: {hits[0]}/{i + 1} (+1 after prefill) {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)

    return [int(t) for t in rt.forced_decode(prompt, ref_tokens[:-1], on_step=step).argmax(-1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="run folder of recipes/smollm2-135m-npu.yaml")
    ap.add_argument("--windows", type=int, default=4, help="held-out prefill windows (default 4; 0: skip)")
    ap.add_argument("--prompts", type=int, default=2, help="held-out prompts for the greedy comparison (default 2)")
    ap.add_argument("--only", type=int, nargs="+", metavar="K",
                    help="run only prompts K.. (1-based) of the --prompts set (the simulator is slow)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--runtimes", default="qnn-htp,ort-cpu")
    ap.add_argument("--no-free", action="store_true", help="skip the free-running generation (teacher-forced only)")
    args = ap.parse_args()

    npu, fp32 = Artifact.load(args.run / "npu"), Artifact.load(args.run / "fp32")
    p = int(npu.manifest["npu"]["static_shapes"]["prefill_len"])
    tok = npu.tokenizer()
    reference = load_model(npu.manifest["model"]["spec"]).model
    text = load_text("pydoc:eval")
    windows = token_windows(tok, text, p, args.windows, seed=0) if args.windows else None
    prompts = [[int(t) for t in row] for row in token_windows(tok, text, args.prompt_tokens, args.prompts, seed=1)]
    if args.only:  # a subset of the same prompt set (which prompts a set holds depends on its size)
        if not all(1 <= k <= len(prompts) for k in args.only):
            ap.error(f"--only takes prompt numbers 1..{len(prompts)}")
        prompts = [prompts[k - 1] for k in args.only]
    cpu_ref = open_runtime("ort-cpu", fp32)
    ref_tokens = [cpu_ref.generate(pr, args.steps).tokens for pr in prompts]

    out = {"held_out": {"data": "pydoc:eval", "prefill_windows": args.windows, "window_tokens": p,
                        "prompts": args.prompts, "only": args.only, "prompt_tokens": args.prompt_tokens,
                        "steps": args.steps}}
    for name in args.runtimes.split(","):
        t = time.perf_counter()
        rt = open_runtime(name, npu)
        row = {"open_s": round(time.perf_counter() - t, 1)}
        if args.windows:
            t = time.perf_counter()
            row["prefill"] = check_causal_lm(rt.logits, reference, windows)
            row["prefill_s_per_window"] = round((time.perf_counter() - t) / args.windows, 2)
        free = forced = total = 0
        per_prompt = []
        decode_s = decode_steps = 0.0
        for pr, ref in zip(prompts, ref_tokens):
            if not args.no_free:
                g = rt.generate(pr, args.steps)
                decode_s, decode_steps = decode_s + g.decode_seconds, decode_steps + len(g.tokens) - 1
                free += sum(a == b for a, b in zip(g.tokens, ref))
            t = time.perf_counter()
            per_prompt.append(sum(a == b for a, b in zip(teacher_forced(rt, pr, ref), ref)))
            forced += per_prompt[-1]
            if args.no_free:
                decode_s, decode_steps = decode_s + time.perf_counter() - t, decode_steps + len(ref)  # + 1 prefill
            total += len(ref)
        row["decode_s_per_step"] = round(decode_s / max(decode_steps, 1), 3)
        row["greedy_vs_fp32_cpu"] = {"teacher_forced_match": forced / total, "steps": total,
                                     "teacher_forced_hits_per_prompt": per_prompt,
                                     **({} if args.no_free else {"free_running_match": free / total})}
        if hasattr(rt, "placement"):
            row["placement"], row["compiled_from"] = rt.placement, rt.compiled_from
        out[name] = row
        print(json.dumps({name: row}, indent=1), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
