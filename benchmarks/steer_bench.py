"""Baked steering on SmolLM2-135M-Instruct: effect, side effect, W4 retention, baked-vs-hooked, and a
strength sweep (effect vs side effect across strengths, PNG).

1. runs the shipped recipe ``recipes/smollm2-135m-steer-<task>.yaml`` (steer -> fp32 ONNX ``steered``
   + the unsteered ``fp32`` reference) and, with ``--w4``, its W4 twin ``...-<task>-w4.yaml`` (steer ->
   int4 quantize -> ``int4``) and, as its control, the twin without its steer step (``int4_unsteered``:
   quantization alone changes answers too), through the whole pipeline;
2. greedy answers (chat template) to the held-out prompts of the step's ``eval_prompts`` from each
   artifact on ORT CPU: the unsteered reference once, then each steered artifact; effect =
   ``length_reduction`` / ``sentiment_shift`` (``edgecompress.steer_eval``), side effect = perplexity
   ratio and KL on neutral held-out text (``pydoc:eval``) against the unsteered torch model. W4 retention:
   ``w4_effect_retained`` (int4 vs the unsteered fp32 model, over the fp32 effect) and
   ``w4_effect_retained_vs_unsteered_w4`` (int4 vs ``int4_unsteered``: the steering alone);
3. baked vs hooked: the steered ONNX artifact's logits against the unsteered torch model with the
   manifest's vectors added by forward hooks (max |difference|);
4. sweep: the same direction at several strengths through hooks (torch), effect and side effect
   per strength, drawn as ``<out>/steer-<task>-sweep.png`` (needs matplotlib: ``pip install -c
   constraints.txt '.[plot]'``).

    python benchmarks/steer_bench.py --task concise --w4 --json benchmarks/results/steer-concise.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from edgecompress.compress.steer import added_to_stream
from edgecompress.runtimes import open_runtime

from edgecompress.artifact import Artifact
from edgecompress.data import load_prompts, load_text, token_windows
from edgecompress.errors import CheckFailed
from edgecompress.models import load_model
from edgecompress.pipeline import run_recipe
from edgecompress.recipe import load_recipe
from edgecompress.steer_eval import (
    SentimentJudge,
    answers,
    effect,
    runtime_generate_fn,
    side_effect,
    torch_generate_fn,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
log = logging.getLogger("steer_bench")


def vectors(manifest: dict) -> dict[int, torch.Tensor]:
    """The added vectors (strength * norm * direction) of the manifest's add-mode steer records."""
    out = {}
    for step in manifest["steps"]:
        for r in step["modules"] if step["step"] == "steer" else []:
            if r["mode"] != "add":
                raise SystemExit("the hooked comparison and the sweep cover add mode")
            out[r["layer"]] = torch.tensor(r["direction"]) * (r["norm"] * r["strength"])
    return out


def run(recipe, out: Path) -> None:
    try:
        run_recipe(recipe, out, force=True, progress=False, bench=False)
    except CheckFailed as e:  # everything is written; the check's numbers are in the report
        log.warning("%s: %s", recipe.name, e)


def headline(e: dict, task: str) -> float:
    return e["length_reduction"] if task == "concise" else e["sentiment_shift"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=["concise", "sentiment"], required=True)
    ap.add_argument("--w4", action="store_true", help="also run the W4 twin recipe (steer, then int4)")
    ap.add_argument("--prompts", type=int, default=12, help="held-out prompts used (default 12)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--windows", type=int, default=2, help="neutral windows of --seq-len tokens")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--sweep", type=float, nargs="*", default=[0.5, 1.0, 1.5],
                    help="strengths as multiples of the recipe's (searched) strength; empty: no sweep")
    ap.add_argument("--sweep-prompts", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path("out/steer-bench"))
    ap.add_argument("--reuse", action="store_true", help="reuse the run folders already under --out")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    res: dict = {"task": args.task, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens}
    t0 = time.perf_counter()

    def build(recipe) -> None:  # run the pipeline (or, with --reuse, take its finished run folder)
        t = time.perf_counter()
        if args.reuse and (args.out / recipe.name / "report.json").is_file():
            log.info("reusing %s", args.out / recipe.name)
        else:
            run(recipe, args.out)
        res.setdefault("pipeline_s", {})[recipe.name] = round(time.perf_counter() - t, 1)

    names = [f"smollm2-135m-steer-{args.task}"] + ([f"smollm2-135m-steer-{args.task}-w4"] if args.w4 else [])
    arts: dict[str, Artifact] = {}
    for name in names:
        recipe = load_recipe(RECIPES / f"{name}.yaml")
        t = time.perf_counter()
        build(recipe)
        for spec in recipe.export:
            arts[spec.name] = Artifact.load(args.out / name / spec.name)
        log.info("%s done in %.0fs", name, time.perf_counter() - t)
    if args.w4:  # control: the W4 twin's quantization without its steer step (quantization alone moves lengths too)
        control = recipe.model_copy(update={"name": f"{recipe.name}-unsteered",  # recipe: the loop's last, the twin
                                            "steps": tuple(s for s in recipe.steps if s.step_type != "steer")})
        build(control)
        arts["int4_unsteered"] = Artifact.load(args.out / control.name / "int4")
    steered = arts["steered"]
    step = next(s for s in steered.manifest["steps"] if s["step"] == "steer")
    res["checks"] = {n: json.loads((args.out / n / "report.json").read_text()).get("check") for n in names}
    res["steer"] = [{k: r[k] for k in ("layer", "mode", "method", "position", "strength", "norm", "neutral_kl")}
                    | {"search": r["search"]} for r in step["modules"]]

    tok = steered.tokenizer()
    prompts = load_prompts(step["config"]["eval_prompts"])[: args.prompts]
    windows = token_windows(tok, load_text("pydoc:eval"), args.seq_len, args.windows, seed=0)
    reference = load_model("smollm2-135m").model
    judge = SentimentJudge() if args.task == "sentiment" else None

    ref_answers = answers(runtime_generate_fn(open_runtime("ort-cpu", arts["fp32"], threads=1)), tok, prompts,
                          args.max_new_tokens)
    res["reference_answers"] = ref_answers
    for name in ("steered", "int4", "int4_unsteered"):
        if name not in arts:
            continue
        rt = open_runtime("ort-cpu", arts[name], threads=1)
        got = answers(runtime_generate_fn(rt), tok, prompts, args.max_new_tokens)
        res[name] = {**effect(got, ref_answers, judge), **side_effect(rt.logits, reference, windows), "answers": got}
        log.info("%s: %s", name, {k: v for k, v in res[name].items() if k != "answers"})
    if "int4" in res:  # against the unsteered fp32 model, and against the unsteered W4 model (steering alone)
        res["w4_effect_retained"] = headline(res["int4"], args.task) / headline(res["steered"], args.task)
        res["int4_vs_int4_unsteered"] = effect(res["int4"]["answers"], res["int4_unsteered"]["answers"], judge)
        res["w4_effect_retained_vs_unsteered_w4"] = (headline(res["int4_vs_int4_unsteered"], args.task)
                                                     / headline(res["steered"], args.task))

    # baked (ONNX on ORT) vs hooked (torch + forward hooks)
    vecs = vectors(steered.manifest)
    ids = windows[0, :128]
    with torch.no_grad(), added_to_stream(reference, vecs):
        hooked = reference(input_ids=ids[None], use_cache=False).logits[0].numpy()
    baked = open_runtime("ort-cpu", steered, threads=1).logits(ids.numpy())
    res["baked_vs_hooked_max_abs_logit_diff"] = float(np.abs(baked - hooked).max())
    log.info("baked vs hooked: %.3g", res["baked_vs_hooked_max_abs_logit_diff"])

    # sweep through hooks
    sweep = []
    few = prompts[: args.sweep_prompts]
    plain = load_model("smollm2-135m").model if args.sweep else None
    for mult in args.sweep:
        scaled = {i: v * mult for i, v in vecs.items()}
        with added_to_stream(reference, scaled):
            got = answers(torch_generate_fn(reference), tok, few, args.max_new_tokens)
            e = effect(got, ref_answers[: len(few)], judge)
            s = side_effect(lambda x: reference(input_ids=torch.as_tensor(x)[None], use_cache=False)
                            .logits[0].detach().numpy(), plain, windows[:1])
        row = {"multiple": mult, "strength": mult * res["steer"][0]["strength"], "effect": headline(e, args.task),
               **{k: e[k] for k in e if k != "prompts"}, "perplexity_ratio": s["perplexity_ratio"], "kl": s["kl"]}
        sweep.append(row)
        log.info("sweep %s", row)
    res["sweep"] = sweep
    res["total_s"] = round(time.perf_counter() - t0, 1)
    if sweep:
        plot(res, args.out / f"steer-{args.task}-sweep.png")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1, default=float))
    print(json.dumps({k: v for k, v in res.items() if k not in ("reference_answers",)}, indent=1, default=float)[:6000])


def plot(res: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install -c constraints.txt '.[plot]')")
        return
    rows = [{"strength": 0.0, "effect": 0.0, "perplexity_ratio": 1.0}] + res["sweep"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([r["perplexity_ratio"] for r in rows], [r["effect"] for r in rows], "o-")
    for r in rows:
        ax.annotate(f"a={r['strength']:.2g}", (r["perplexity_ratio"], r["effect"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xlabel("perplexity ratio on neutral text (side effect)")
    ax.set_ylabel("length reduction" if res["task"] == "concise" else "sentiment shift (MiniLM)")
    if "steered" in res:  # the recipe's own strength, measured on the ORT artifact (more prompts)
        st = res["steered"]
        ax.plot([st["perplexity_ratio"]], [headline(st, res["task"])], "s", color="C3",
                label=f"baked artifact, a={res['steer'][0]['strength']:.3g}")
        ax.legend(fontsize=8)
    ax.set_title(f"SmolLM2-135M {res['task']} steering", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    log.info("wrote %s", path)


if __name__ == "__main__":
    main()
