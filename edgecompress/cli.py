"""The `edgecompress` command: arguments -> recipe -> validated config -> pipeline.

Exit codes: 0 success, 2 bad input (recipe, model, data, artifact), 3 an accuracy check
failed, 130 interrupted (nothing half-written is left behind).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .errors import EdgeCompressError
from rich.markup import escape

from .progress import console, enabled_by_default


def _add_threads(p: argparse.ArgumentParser, default: int | None = 2) -> None:
    p.add_argument("--threads", type=int, default=default, help=f"CPU threads for the runtime (default {default})")


def _add_runtime(p: argparse.ArgumentParser) -> None:
    from edgecompress.runtimes import RUNTIMES

    p.add_argument("--runtime", default="ort-cpu", choices=list(RUNTIMES),
                   help="runtime that runs the artifact (default ort-cpu; tvm-cpu runs a TVM artifact, or "
                   "compiles an ONNX one for this CPU on first use and caches it)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edgecompress", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"edgecompress {__version__}")
    ap.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-v info, -vv debug)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run a recipe: calibrate -> compress -> export -> check -> bench -> report")
    p.add_argument("recipe", type=Path, help="recipe YAML file")
    p.add_argument("-o", "--out", type=Path, default=Path("out"), help="output root; the run writes <out>/<recipe name>/")
    p.add_argument("--force", action="store_true", help="replace an existing <out>/<recipe name>/")
    p.add_argument("--no-bench", action="store_true", help="skip the recipe's bench section")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")

    p = sub.add_parser("check", help="accuracy of an artifact on a runtime vs the uncompressed model")
    p.add_argument("artifact", type=Path, help="artifact folder (holds manifest.json)")
    _add_runtime(p)
    p.add_argument("--data", default=None, help="held-out text: a .txt/.jsonl file or pydoc:eval (default); images: "
                   "skimage:eval or a folder (default for image classifiers: the recipe's check data)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: the recipe's, else 512)")
    p.add_argument("--windows", type=int, default=None, help="number of windows or images (default: the recipe's, else 8)")
    p.add_argument("--threshold", action="append", default=[], metavar="KEY=VALUE",
                   help="perplexity_ratio=MAX, kl=MAX or top1_agreement=MIN (default: the recipe's)")
    p.add_argument("--reference", default=None, help="reference model (default: the source in the manifest)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifact files")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _add_threads(p, None)

    p = sub.add_parser("bench", help="prefill/decode speed, peak RSS, size and bits per weight of an artifact")
    p.add_argument("artifact", type=Path)
    _add_runtime(p)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", default="pydoc:eval", help="text the prompt is taken from")
    p.add_argument("--json", action="store_true")
    _add_threads(p)

    p = sub.add_parser("generate", help="greedy generation from an artifact")
    p.add_argument("artifact", type=Path)
    _add_runtime(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--json", action="store_true")
    _add_threads(p, None)

    p = sub.add_parser("steer-eval", help="effect of baked steering on held-out prompts (answer length, "
                       "sentiment) and its side effect on neutral text (perplexity, KL), vs the unsteered model")
    p.add_argument("artifact", type=Path, help="artifact folder of a recipe with a steer step")
    _add_runtime(p)
    p.add_argument("--prompts", default=None,
                   help="held-out prompts: .txt (one per line), .jsonl or builtin:NAME (default: the steer step's eval_prompts)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer budget in tokens (default 128)")
    p.add_argument("--data", default="pydoc:eval", help="neutral held-out text for perplexity/KL (default pydoc:eval)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per neutral window (default 256)")
    p.add_argument("--windows", type=int, default=4, help="neutral windows (default 4)")
    p.add_argument("--reference", default=None, help="unsteered model (default: the source in the manifest)")
    p.add_argument("--no-judge", action="store_true", help="skip the MiniLM sentiment judge")
    p.add_argument("--json", action="store_true", help="print one JSON object (with every answer) on stdout")
    _add_threads(p, None)

    p = sub.add_parser("export", help="compile an ONNX causal-LM artifact into a TVM artifact (model.so + params)")
    p.add_argument("artifact", type=Path, help="ONNX artifact folder (holds manifest.json)")
    p.add_argument("--to", required=True, choices=["tvm"], help="format to compile to")
    p.add_argument("--target", default="llvm", help="llvm (this machine's CPU, the default) or 'llvm -mcpu=NAME'")
    p.add_argument("-o", "--out", type=Path, default=None, help="artifact folder to write (default: ARTIFACT-tvm)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--json", action="store_true", help="print the new manifest's tvm section as JSON")

    p = sub.add_parser("analyze", help="plots of a causal LM's activation magnitudes, block influence and per-kernel "
                       "quantization sensitivity on calibration text (PNG + HTML + JSON)")
    p.add_argument("model", help="bundled model alias (edgecompress models) or model spec")
    p.add_argument("-o", "--out", type=Path, default=None, help="folder to write (default: analyze-<model>)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--data", default="pydoc:calib", help="calibration text: a .txt/.jsonl file or pydoc:calib (default)")
    p.add_argument("--samples", type=int, default=8, help="windows for the activation histograms (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--influence-windows", type=int, default=4, help="windows for block influence (default 4)")
    p.add_argument("--no-sensitivity", action="store_true",
                   help="skip the sensitivity probe (one forward pass per kernel and window: the slow part)")
    p.add_argument("--sensitivity-windows", type=int, default=2, help="windows for the sensitivity probe (default 2)")
    p.add_argument("--bits", type=int, default=4, help="RTN bits of the sensitivity probe (default 4)")
    p.add_argument("--group-size", type=int, default=64, help="RTN group size of the sensitivity probe (default 64)")
    p.add_argument("--json", action="store_true", help="print analysis.json's summary on stdout")

    p = sub.add_parser("models", help="the bundled models and where they come from")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("explain", help="validate a recipe and print it with every default filled in")
    p.add_argument("recipe", type=Path)
    return ap


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def cmd_run(args) -> int:
    from .pipeline import run_recipe
    from .recipe import load_recipe
    from .report import print_report

    recipe = load_recipe(args.recipe)
    report = run_recipe(recipe, args.out, force=args.force, progress=enabled_by_default(), bench=not args.no_bench)
    if args.json:
        _print_json(report)
    else:
        print_report(report)
    return 0


def _parse_thresholds(items: list[str]) -> dict[str, float]:
    from .check import THRESHOLD_DIRECTIONS

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in THRESHOLD_DIRECTIONS:
            raise EdgeCompressError(f"bad --threshold {item!r}",
                                    hint=f"write KEY=VALUE with KEY one of {', '.join(THRESHOLD_DIRECTIONS)}")
        try:
            out[key] = float(value)
        except ValueError:
            raise EdgeCompressError(f"bad --threshold {item!r}: {value!r} is not a number") from None
    return out


def cmd_check(args) -> int:
    from .artifact import Artifact
    from .check import apply_thresholds, evaluate
    from .models import load_model
    from edgecompress.runtimes import open_runtime

    art = Artifact.load(args.artifact, verify=not args.no_verify)
    recipe_check = (art.manifest.get("recipe") or {}).get("check") or {}
    seq_len = args.seq_len or recipe_check.get("seq_len", 512)
    n = args.windows or recipe_check.get("windows", 8)
    if args.data is None:
        args.data = recipe_check.get("data", "skimage:eval") if art.task == "image-classifier" else "pydoc:eval"
    thresholds = dict(recipe_check.get("thresholds") or {})
    thresholds.update(_parse_thresholds(args.threshold))
    ref_spec = args.reference or art.manifest["model"]["spec"]
    console.log(f"reference: {ref_spec}")
    reference = load_model(ref_spec, allow_code=False).model
    rt = open_runtime(args.runtime, art, threads=args.threads)
    tok = None if art.task == "image-classifier" else art.tokenizer()
    metrics = evaluate(rt, art.task, reference, tok, args.data, seq_len=seq_len, windows=n,
                       progress=enabled_by_default())
    result = apply_thresholds(metrics, thresholds)
    out = {"artifact": str(art.path), "runtime": args.runtime, "data": args.data, "seq_len": seq_len,
           **result.to_dict()}
    if args.json:
        _print_json(out)
    else:
        from .report import print_metrics

        print_metrics(out)
    result.raise_if_failed()
    return 0


def cmd_bench(args) -> int:
    from .artifact import Artifact
    from .bench import bench_artifact

    art = Artifact.load(args.artifact)
    res = bench_artifact(art, args.runtime, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                         threads=args.threads, repeats=args.repeats, data=args.data)
    if args.json:
        _print_json(res)
    else:
        from .report import print_metrics

        print_metrics(res)
    return 0


def cmd_generate(args) -> int:
    from .artifact import Artifact
    from edgecompress.runtimes import open_runtime

    art = Artifact.load(args.artifact)
    tok = art.tokenizer()
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise EdgeCompressError("this tokenizer has no chat template", hint="drop --chat")
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        ids = tok(args.prompt)["input_ids"]
    rt = open_runtime(args.runtime, art, threads=args.threads)
    stream = not args.json
    printed = ""

    def on_token(t: int, acc: list[int] = []) -> None:  # noqa: B006 - per-call accumulator
        nonlocal printed
        acc.append(t)
        text = tok.decode(acc, skip_special_tokens=True)
        if stream:
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
        printed = text

    gen = rt.generate(list(ids), args.max_new_tokens, eos_token_id=tok.eos_token_id, on_token=on_token)
    if args.json:
        _print_json({"prompt": args.prompt, "text": printed, "tokens": gen.tokens,
                     "prefill_tok_s": gen.prefill_tok_s, "decode_tok_s": gen.decode_tok_s})
    else:
        sys.stdout.write("\n")
        console.print(f"[dim]{len(gen.tokens)} tokens, prefill {gen.prefill_tok_s:.0f} tok/s, "
                      f"decode {gen.decode_tok_s:.1f} tok/s[/]")
    return 0


def cmd_export(args) -> int:
    from pydantic import ValidationError

    from .artifact import Artifact, atomic_folder
    from .pipeline import compile_tvm
    from .recipe import ExportSpec

    try:
        spec = ExportSpec.model_validate({"format": args.to, "target": args.target})
    except ValidationError as e:
        raise EdgeCompressError(f"--target {args.target!r}: {e.errors()[0]['msg']}",
                                hint="--target llvm (this machine's CPU) or --target 'llvm -mcpu=NAME'") from None
    art = Artifact.load(args.artifact)
    dest = args.out or args.artifact.parent / f"{args.artifact.name}-tvm"
    with atomic_folder(dest, force=args.force) as tmp:
        manifest = compile_tvm(art, tmp, spec, source=str(art.path))
    info = manifest["tvm"]
    if args.json:
        _print_json({"artifact": str(dest), **info})
    else:
        console.print(f"wrote {dest} (TVM {info['tvm_version']}, {info['mcpu']}, compiled in "
                      f"{info['import_seconds'] + info['compile_seconds']:.1f} s); run it with --runtime tvm-cpu")
    return 0


def _steer_eval_prompts(art, given: str | None) -> str:
    if given:
        return given
    for step in art.manifest.get("steps") or []:
        if step.get("step") == "steer" and (step.get("config") or {}).get("eval_prompts"):
            return step["config"]["eval_prompts"]
    raise EdgeCompressError(f"{art.path} names no held-out prompts (its recipe has no steer step with eval_prompts)",
                            hint="pass --prompts FILE (.txt one prompt per line, .jsonl, or builtin:NAME)")


def cmd_steer_eval(args) -> int:
    from .artifact import Artifact
    from .data import load_prompts, load_text, token_windows
    from .models import load_model
    from .steer_eval import SentimentJudge, answers, effect, runtime_generate_fn, side_effect, torch_generate_fn
    from edgecompress.runtimes import open_runtime

    art = Artifact.load(args.artifact)
    source = _steer_eval_prompts(art, args.prompts)
    prompts = load_prompts(source)[: args.limit]
    tok = art.tokenizer()
    ref_spec = args.reference or art.manifest["model"]["spec"]
    console.log(f"reference (unsteered): {ref_spec}; prompts: {source} ({len(prompts)})")
    reference = load_model(ref_spec, allow_code=False).model
    rt = open_runtime(args.runtime, art, threads=args.threads)
    show = enabled_by_default()
    steered = answers(runtime_generate_fn(rt), tok, prompts, args.max_new_tokens, what="steered answers", progress=show)
    unsteered = answers(torch_generate_fn(reference), tok, prompts, args.max_new_tokens, what="reference answers",
                        progress=show)
    judge = None if args.no_judge else SentimentJudge()
    out: dict = {"artifact": str(art.path), "runtime": args.runtime, "prompts_source": source,
                 "max_new_tokens": args.max_new_tokens, **effect(steered, unsteered, judge)}
    windows = token_windows(tok, load_text(args.data), args.seq_len, args.windows, seed=0)
    out.update({"neutral_data": args.data, **side_effect(rt.logits, reference, windows, progress=show)})
    out["steer"] = [{k: r.get(k) for k in ("layer", "mode", "method", "position", "strength", "norm", "neutral_kl")}
                    for step in art.manifest.get("steps") or [] if step.get("step") == "steer"
                    for r in step.get("modules") or []]
    out["answers"] = [{"prompt": s["prompt"], "steered": s, "reference": r} for s, r in zip(steered, unsteered)]
    if args.json:
        _print_json(out)
    else:
        from .report import print_metrics

        print_metrics({k: v for k, v in out.items() if k not in ("answers", "steer")})
        for a in out["answers"][:3]:
            console.print(f"[bold]{escape(a['prompt'])}[/]\n  steered ({a['steered']['tokens']} tok): "
                          f"{escape(a['steered']['text'][:300])}\n  reference ({a['reference']['tokens']} tok): "
                          f"{escape(a['reference']['text'][:300])}", highlight=False)
    return 0


def cmd_analyze(args) -> int:
    from .analyze import AnalyzeConfig, analyze, write_report
    from .artifact import atomic_folder
    from .models import load_model

    cfg = AnalyzeConfig(data=args.data, samples=args.samples, seq_len=args.seq_len,
                        influence_windows=args.influence_windows, sensitivity=not args.no_sensitivity,
                        sensitivity_windows=args.sensitivity_windows, bits=args.bits, group_size=args.group_size)
    dest = args.out or Path(f"analyze-{Path(args.model).name}")
    if dest.exists() and not args.force:  # before the slow part; atomic_folder checks again
        from .errors import ArtifactError

        raise ArtifactError(f"output folder {dest} already exists", hint="choose another -o folder, or pass --force")
    loaded = load_model(args.model, allow_code=False)
    if loaded.task != "causal-lm":
        raise EdgeCompressError(f"analyze: {args.model} is a {loaded.task}; analyze measures decoder LMs",
                                hint="run it on smollm2-135m, smollm2-135m-instruct or tiny-llama")
    result = {"model": args.model, **analyze(loaded.model, loaded.tokenizer, cfg, progress=enabled_by_default())}
    with atomic_folder(dest, force=args.force) as tmp:
        files = write_report(result, tmp)
    if args.json:
        _print_json({"out": str(dest), "files": files, "influence": result["influence"],
                     "sensitivity": result.get("sensitivity")})
    else:
        console.print(f"wrote {dest}/: {', '.join(files)}")
    return 0


def cmd_models(args) -> int:
    from dataclasses import asdict

    from .models import list_models

    rows = list_models()
    if args.json:
        _print_json([asdict(r) for r in rows])
        return 0
    from rich.table import Table

    t = Table(title="edgecompress models")
    for col in ("alias", "task", "package", "installed", "description"):
        t.add_column(col)
    for r in rows:
        t.add_row(r.alias, r.task, r.package or "(built in)", "yes" if r.installed else "no", r.description)
    console.print(t)
    return 0


def cmd_explain(args) -> int:
    from .recipe import load_recipe, recipe_to_dict

    import yaml

    recipe = load_recipe(args.recipe)
    sys.stdout.write(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    return 0


COMMANDS = {"run": cmd_run, "check": cmd_check, "bench": cmd_bench, "generate": cmd_generate,
            "export": cmd_export, "steer-eval": cmd_steer_eval, "analyze": cmd_analyze, "models": cmd_models, "explain": cmd_explain}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    from rich.logging import RichHandler

    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)])
    for noisy in ("transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(max(level, logging.ERROR))
    try:
        return COMMANDS[args.command](args)
    except EdgeCompressError as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return e.exit_code
    except NotImplementedError as e:  # a combination this release does not support; the message names the fix
        console.print(f"[bold red]error:[/] not supported: {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]: nothing half-written was left behind")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
