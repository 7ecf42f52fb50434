"""Choose the concise steering's layers and KL bound on one held-out set, then measure the choice on another.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/steer_choose_layers.py [--pairs builtin:concise-answers]
        [--cands '[[29], [27, 29], [25, 27, 29], [23, 25, 27, 29]]'] [--bounds 0.09 0.12] [--max-ppl 1.09]
        [--max-new-tokens 96] [--json OUT]

For each candidate layer set and bound (hooked torch, SmolLM2-135M-Instruct): the difference-of-means
direction at each layer from ``--pairs`` (last token), one strength for all layers searched as the
steer step does (largest under the KL bound on 2 x 256 calibration tokens; ``search_strength``),
then the perplexity ratio on 2 x 256 held-out ``pydoc:eval`` tokens and the mean greedy answer
length (at most ``--max-new-tokens``, default 96, chat template) on the 20 prompts of ``builtin:concise-eval`` against
the unsteered model's. The candidate with the largest length reduction among those under
``--max-ppl`` is then run once on ``builtin:concise-test`` (40 prompts none of this touched).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from edgecompress.compress.steer.apply import (SteerConfig, added_to_stream, directions, log_probs, neutral_kl,
                                               search_strength)
from edgecompress.data import encode_prompts, load_prompt_pairs, load_prompts, load_text, token_windows
from edgecompress.models import load_model
from edgecompress.steer_eval import answers, torch_generate_fn


def perplexity_ratio(ref: list[torch.Tensor], steered: list[torch.Tensor], windows: torch.Tensor) -> float:
    def nll(lps):
        total = sum(-float(lp[:-1].gather(1, w[1:, None]).sum()) for lp, w in zip(lps, windows))
        return total / sum(len(w) - 1 for w in windows)
    return float(np.exp(nll(steered) - nll(ref)))


def mean_tokens(items: list[dict]) -> float:
    return float(np.mean([a["tokens"] for a in items]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", default="builtin:concise-answers")
    ap.add_argument("--cands", default="[[29], [27, 29], [25, 27, 29], [23, 25, 27, 29]]")
    ap.add_argument("--bounds", type=float, nargs="*", default=[0.09, 0.12])
    ap.add_argument("--max-ppl", type=float, default=1.09)
    ap.add_argument("--max-new-tokens", type=int, default=96, help="answer budget in tokens")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    lm = load_model("smollm2-135m")
    model, tok = lm.model.eval(), lm.tokenizer
    pos, neg = load_prompt_pairs(args.pairs)
    pos, neg = encode_prompts(tok, pos, chat=True), encode_prompts(tok, neg, chat=True)
    calib = token_windows(tok, load_text("pydoc:calib"), 256, 8, seed=0)[:2, :256]
    held = token_windows(tok, load_text("pydoc:eval"), 256, 2, seed=0)
    ref_calib, ref_held = log_probs(model, calib), log_probs(model, held)
    gen = torch_generate_fn(model)
    selection, test = load_prompts("builtin:concise-eval"), load_prompts("builtin:concise-test")
    budget = args.max_new_tokens
    ref_answers = answers(gen, tok, selection, budget)
    ref_selection = mean_tokens(ref_answers)
    rows = []
    for layers in (tuple(c) for c in json.loads(args.cands)):
        found = directions(model, pos, neg, SteerConfig(layers=layers, kl_bound=args.bounds[0]))

        def vectors(a: float) -> dict[int, torch.Tensor]:
            return {i: found[i]["v"] * a for i in layers}

        def kl_at(a: float) -> float:
            with added_to_stream(model, vectors(a)):
                return neutral_kl(model, ref_calib, calib)

        for bound in args.bounds:
            strength, _ = search_strength(kl_at, bound, 2.0, 6)
            with added_to_stream(model, vectors(strength)):
                ppl = perplexity_ratio(ref_held, log_probs(model, held), held)
                steered = answers(gen, tok, selection, budget)
            length = mean_tokens(steered)
            rows.append({"layers": list(layers), "bound": bound, "strength": strength, "perplexity_ratio": ppl,
                         "selection_mean_tokens": length, "selection_reduction": length / ref_selection - 1,
                         "selection_tokens": [a["tokens"] for a in steered]})
            print(json.dumps(rows[-1]), flush=True)
    report = {"pairs": args.pairs, "max_new_tokens": budget, "selection_reference_mean_tokens": ref_selection,
              "selection_reference_tokens": [a["tokens"] for a in ref_answers], "candidates": rows}
    ok = [r for r in rows if r["perplexity_ratio"] <= args.max_ppl]
    if ok:
        best = min(ok, key=lambda r: r["selection_reduction"])
        found = directions(model, pos, neg, SteerConfig(layers=tuple(best["layers"]), kl_bound=best["bound"]))
        ref_test = answers(gen, tok, test, budget)
        with added_to_stream(model, {i: found[i]["v"] * best["strength"] for i in best["layers"]}):
            steered_test = answers(gen, tok, test, budget)
        report["chosen"] = best | {"test_reference_mean_tokens": mean_tokens(ref_test),
                                   "test_mean_tokens": mean_tokens(steered_test),
                                   "test_reduction": mean_tokens(steered_test) / mean_tokens(ref_test) - 1,
                                   "test_reference_tokens": [a["tokens"] for a in ref_test],
                                   "test_tokens": [a["tokens"] for a in steered_test]}
        print(json.dumps(report["chosen"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
