"""The pipeline a recipe describes: model -> calibrate -> steps -> export -> check -> bench -> report.

Plain functions; the caller holds the state. Every output goes into one run folder
``<out>/<recipe.name>/`` written atomically: one artifact sub-folder per export target
plus ``report.json``.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from edgecompress.compress.calibration.driver import StatRequest, calibrate
from edgecompress.compress.calibration.store import StatsStore, model_fingerprint
from edgecompress.compress.quant.formats import QuantScheme
from edgecompress.compress.quant.gptq import GPTQConfig
from edgecompress.compress.quant.modules import QuantLinear
from edgecompress.compress.quant.rtn import RTNConfig, apply_rtn, select
from edgecompress.compress.quant.sequential import apply_awq, apply_gptq

from .artifact import MANIFEST, Artifact, atomic_folder, update_manifest, write_manifest
from .bench import bench_in_subprocess, peak_rss_mb
from .check import apply_thresholds, evaluate
from .data import (encode_prompts, fingerprint_tokens, load_prompt_pairs, load_prompts, load_text, sentence_batches,
                   token_windows)
from .errors import ArtifactError, EdgeCompressError
from .models import LoadedModel, cache_root, load_model
from .progress import console, ticker
from .recipe import (ActSparsifyStep, AWQStep, DistillStep, ExportSpec, LowRankStep, MixedPrecisionStep, QuantizeStep, Recipe, SmoothQuantStep,
                     SparsifyStep, SteerStep, recipe_to_dict)
from .recipe import PruneChannelsStep, PruneLayersStep

log = logging.getLogger(__name__)

# statistics every run gathers for the manifest's calibration summary, on the first few windows
SUMMARY_REQUESTS = (StatRequest(r".*", "minmax"),)
SUMMARY_WINDOWS = 8


@dataclass
class StepContext:
    """What a step may use: the calibration windows, the statistics gathered before the steps."""

    windows: torch.Tensor
    store: StatsStore
    progress: bool
    batch_size: int = 1
    tokenizer: Any = None
    reference: nn.Module | None = None  # the uncompressed model (kept when a step needs it, e.g. lowrank)
    data: str | None = None  # the calibration text source (for steps that draw windows of their own)
    float_prefix: bool = False  # a W8A8 step keeps the first token in float: statistics leave it out

    @property
    def tokens(self) -> str:
        """Which tokens activation statistics see (see ``StatRequest.tokens``)."""
        return "after_first" if self.float_prefix else "all"


def _scheme(step: QuantizeStep | AWQStep) -> QuantScheme:
    return QuantScheme(bits=step.bits, block_size=step.group_size or 0, symmetric=step.symmetric,
                       scale_dtype=step.scale_dtype, dtype=getattr(step, "dtype", "int"))


def _gptq_config(step: QuantizeStep | MixedPrecisionStep) -> GPTQConfig:
    return GPTQConfig(damp=step.damp, act_order=step.act_order, refit_scales=step.refit_scales,
                      float_targets=step.float_targets)


def _apply_quantize(model: nn.Module, step: QuantizeStep, ctx: StepContext) -> list[dict]:
    before = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    a = step.activations
    rotated = {}
    if a is not None and a.hadamard:
        from edgecompress.compress.quant.rotation import rotate_linear_inputs_

        # the weights now expect x R: quantize them right away
        rotated = rotate_linear_inputs_(model, a.hadamard,
                                        lambda name: select(name, tuple(step.targets), tuple(step.ignore)))
    if step.method == "gptq":
        cfg = _gptq_config(step)
        records = apply_gptq(model, ctx.windows, _scheme(step), cfg,
                             targets=tuple(step.targets), ignore=tuple(step.ignore), embeddings=step.embeddings,
                             progress=ctx.progress, batch_size=ctx.batch_size, int8_rows=step.int8_rows)
    else:
        cfg = RTNConfig.from_scheme(_scheme(step), targets=tuple(step.targets), ignore=tuple(step.ignore),
                                    embeddings=step.embeddings)
        records = [asdict(r) for r in apply_rtn(model, cfg)]
    for name, rot in rotated.items():
        mod = model.get_submodule(name)
        mod.rotation = rot
        records.append({"module": name, "input_rotation": rot.to_dict()})
    if a is not None:
        from edgecompress.compress.quant.w8a8 import calibrate_activations

        names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and n not in before]
        console.log(f"calibrating static {a.observer} activation ranges of {len(names)} linears")
        if a.float_prefix:
            from edgecompress.compress.quant.prefix import set_float_prefix

            records.append({"float_prefix": set_float_prefix(model, ctx.windows, ctx.tokenizer)})
        records += calibrate_activations(model, _first(ctx.windows, a.samples), names, method=a.observer,
                                         bits=a.bits, percentile=a.percentile, progress=ctx.progress,
                                         batch_size=ctx.batch_size, tokens="after_first" if a.float_prefix else "all")
    return records


def _first(windows: Any, n: int | None) -> Any:
    return windows if n is None else windows[:n]


def _apply_smoothquant(model: nn.Module, step: SmoothQuantStep, ctx: StepContext) -> list[dict]:
    from edgecompress.compress.quant.smoothquant import fold_sites, smoothquant_

    first = sorted({names[0] for _, _, names in fold_sites(model)})
    pattern = "^(?:" + "|".join(re.escape(n) for n in first) + ")$"
    requests = [StatRequest(pattern, "minmax", tokens=ctx.tokens)]
    requests += [StatRequest(pattern, "sample", tokens=ctx.tokens)] if step.alpha == "auto" else []
    store = calibrate(model, _first(ctx.windows, step.samples), requests, progress=ctx.progress,
                      batch_size=ctx.batch_size)

    def stats(name: str) -> dict[str, torch.Tensor]:
        return {**store.get(name, "minmax"), **(store.get(name, "sample") if step.alpha == "auto" else {})}

    return smoothquant_(model, stats, step.alpha, step.grid)


def _apply_awq(model: nn.Module, step: AWQStep, ctx: StepContext) -> list[dict]:
    from edgecompress.compress.quant.awq import AWQConfig

    cfg = AWQConfig(scheme=_scheme(step), grid=step.grid, clip=step.clip, max_shrink=step.max_shrink)
    return apply_awq(model, ctx.windows, cfg, progress=ctx.progress, batch_size=ctx.batch_size)


def _apply_mixed(model: nn.Module, step: MixedPrecisionStep, ctx: StepContext) -> list[dict]:
    from edgecompress.compress.quant.mixed import plan_mixed_precision

    schemes = [QuantScheme(bits=c.bits, block_size=c.group_size or 0, symmetric=step.symmetric,
                           scale_dtype=step.scale_dtype) for c in step.candidates]
    plan, report = plan_mixed_precision(model, ctx.windows[: step.samples], schemes, step.budget_bits,
                                        embeddings=step.embeddings, progress=ctx.progress)
    if step.method == "gptq":
        cfg = _gptq_config(step)
        records = apply_gptq(model, ctx.windows, plan.get, cfg,
                             embeddings=step.embeddings, progress=ctx.progress, batch_size=ctx.batch_size)
    else:
        records = []
        for name, s in plan.items():
            cfg = RTNConfig.from_scheme(s, targets=("^" + re.escape(name) + "$",), embeddings=True)
            records += [asdict(r) for r in apply_rtn(model, cfg)]
    return [{"mixed_precision": report}] + records


def _apply_steer(model: nn.Module, step: SteerStep, ctx: StepContext) -> list[dict]:
    from edgecompress.compress.steer import SteerConfig, apply_steering

    if step.pairs is not None:
        pos, neg = load_prompt_pairs(step.pairs)
    else:
        pos, neg = load_prompts(step.positive), load_prompts(step.negative)
    if ctx.tokenizer is None:
        raise EdgeCompressError("the steer step needs the model's tokenizer")
    cfg = SteerConfig(layers=tuple(step.layers), method=step.method, position=step.position, mode=step.mode,
                      strength=step.strength, kl_bound=step.kl_bound, max_strength=step.max_strength,
                      search_steps=step.search_steps)
    neutral = ctx.windows[: step.kl_windows, : step.kl_tokens]
    records = apply_steering(model, encode_prompts(ctx.tokenizer, pos, chat=step.chat),
                             encode_prompts(ctx.tokenizer, neg, chat=step.chat), cfg, neutral)
    for r in records:
        console.log(f"steer {r['mode']} at layer {r['layer']}: |v| {r['norm']:.3g}, strength {r['strength']}, "
                    f"KL on neutral text {r['neutral_kl']:.4f}")
    return records


def _apply_sparsify(model: nn.Module, step: SparsifyStep, ctx: StepContext) -> list[dict]:
    from edgecompress.compress.sparse.apply import SparsifyConfig, apply_sparsify

    cfg = SparsifyConfig(method=step.method, sparsity=step.effective_sparsity, pattern=step.pattern,
                         targets=tuple(step.targets), ignore=tuple(step.ignore), damp=step.damp, block=step.block,
                         value_dtype=step.value_dtype, allocation=step.allocation, owl_lambda=step.owl_lambda,
                         owl_m=step.owl_m)
    return apply_sparsify(model, ctx.windows, cfg, progress=ctx.progress, batch_size=ctx.batch_size)


def _apply_lowrank(model: nn.Module, step: LowRankStep, ctx: StepContext) -> list[dict]:
    from edgecompress.compress.lowrank.apply import LowRankConfig, apply_lowrank

    if ctx.reference is None:
        raise EdgeCompressError("the lowrank step needs the uncompressed model, and none was kept",
                                hint="run lowrank through run_recipe, or pass StepContext(reference=...)")
    cfg = LowRankConfig(method=step.method, rank=step.rank, targets=tuple(step.targets), ignore=tuple(step.ignore),
                        value_dtype=step.value_dtype)
    return apply_lowrank(model, ctx.reference, ctx.windows, cfg, progress=ctx.progress, batch_size=ctx.batch_size)


def _apply_distill(model: nn.Module, step: DistillStep, ctx: StepContext) -> list[dict]:
    from edgecompress.compress.lowrank.distill import DistillConfig, apply_distill

    if ctx.reference is None or ctx.tokenizer is None or ctx.data is None:
        raise EdgeCompressError("the distill step needs the uncompressed model, the tokenizer and the calibration "
                                "text", hint="run distill through run_recipe, or fill those StepContext fields")
    windows = token_windows(ctx.tokenizer, load_text(ctx.data), step.seq_len, step.samples, seed=step.seed)
    console.log(f"distill: rank {step.rank}, {step.steps} steps on {len(windows)} windows of {windows.shape[1]} "
                f"tokens of {ctx.data}")
    cfg = DistillConfig(rank=step.rank, steps=step.steps, lr=step.lr, targets=tuple(step.targets),
                        ignore=tuple(step.ignore), seed=step.seed)
    records = apply_distill(model, ctx.reference, windows, cfg, progress=ctx.progress)
    d = records[0]["distill"]
    console.log(f"distill: KL to the uncompressed model {d['kl_first_tenth']:.4f} (first tenth of the steps) -> "
                f"{d['kl_last_tenth']:.4f} (last tenth), {d['seconds']:.0f} s")
    return records


def _apply_act_sparsify(model: nn.Module, step: ActSparsifyStep, ctx: StepContext) -> list[dict]:
    from edgecompress.compress.sparse.activation import ActSparsifyConfig, apply_act_sparsify

    cfg = ActSparsifyConfig(method=step.method, sparsity=step.sparsity, allocation=step.allocation,
                            targets=tuple(step.targets), ignore=tuple(step.ignore), grid=step.grid,
                            max_level=step.max_level, cost_windows=step.cost_windows, cost_at=step.cost_at)
    return apply_act_sparsify(model, ctx.windows, cfg, progress=ctx.progress, batch_size=ctx.batch_size)


def _apply_prune_layers(model: nn.Module, step: PruneLayersStep, ctx: StepContext) -> list[dict]:
    from edgecompress.compress.prune.apply import PruneLayersConfig, apply_prune_layers

    cfg = PruneLayersConfig(method=step.method, granularity=step.granularity, fraction=step.fraction,
                            count=step.count, divergence=step.divergence, keep=tuple(step.keep),
                            remove=tuple(step.remove), windows=step.windows, rescore=step.rescore, stride=step.stride)
    records = apply_prune_layers(model, ctx.windows, cfg, progress=ctx.progress)
    summary = records[0]["prune_layers"]
    console.log(f"prune_layers {step.method}: removed {', '.join(r['module'] for r in records[1:]) or 'nothing'} "
                f"({summary['params_removed'] / 1e6:.2f}M parameters; {summary['layers_after']} of "
                f"{summary['layers_before']} layers left)")
    return records


def _apply_prune_channels(model: nn.Module, step: PruneChannelsStep, ctx: StepContext) -> list[dict]:
    from edgecompress.compress.prune.channels import ChannelPruneConfig, apply_prune_channels

    cfg = ChannelPruneConfig(fraction=step.fraction, multiple_of=step.multiple_of)
    return apply_prune_channels(model, ctx.windows, cfg, progress=ctx.progress, batch_size=ctx.batch_size)


STEP_APPLIERS: dict[str, Callable[[nn.Module, Any, StepContext], list[dict]]] = {
    "quantize": _apply_quantize,
    "awq": _apply_awq,
    "mixed_precision": _apply_mixed,
    "smoothquant": _apply_smoothquant,
    "steer": _apply_steer,
    "sparsify": _apply_sparsify,
    "lowrank": _apply_lowrank,
    "sparsify_activations": _apply_act_sparsify,
    "prune_layers": _apply_prune_layers,
    "prune_mlp_channels": _apply_prune_channels,
    "distill": _apply_distill,
}


def calibration_store(model: nn.Module, windows: torch.Tensor, requests, *, progress: bool,
                      cache_dir: Path | None = None, batch_size: int = 1) -> tuple[StatsStore, bool]:
    """Gather ``requests`` over ``windows``, reusing a stored pass with the same model and data."""
    mfp, dfp = model_fingerprint(model), _fingerprint(windows)
    folder = cache_root(cache_dir) / "stats" / f"{mfp[:16]}-{dfp[:16]}"
    store = StatsStore.load(folder, model_fingerprint=mfp, data_fingerprint=dfp)
    if store is not None and all(r.to_dict() in store.requests for r in requests):
        log.info("reusing calibration statistics from %s", folder)
        return store, True
    store = calibrate(model, windows, list(requests), store=StatsStore(mfp, dfp), progress=progress,
                      batch_size=batch_size)
    store.save(folder)
    return store, False


def _fingerprint(windows: torch.Tensor | list[dict[str, torch.Tensor]]) -> str:
    if isinstance(windows, torch.Tensor):
        return fingerprint_tokens(windows)
    return fingerprint_tokens(torch.cat([b["input_ids"].flatten() for b in windows]))


def calibration_windows(task: str, tok: Any, cal: Any) -> torch.Tensor | list[dict[str, torch.Tensor]]:
    """Causal LMs: ``[samples, seq_len]`` token windows; encoders: one sentence per batch (no padding)."""
    if task == "sentence-encoder":
        return sentence_batches(tok, cal.data, cal.samples, max_len=cal.seq_len, seed=cal.seed)
    return token_windows(tok, load_text(cal.data), cal.seq_len, cal.samples, seed=cal.seed)


def calibration_images(model: nn.Module, recipe: Recipe) -> np.ndarray:
    """Image classifiers: ``calibration.samples`` normalised crops ``[n, 3, S, S]`` of ``calibration.data``, S the
    npu-qnn export's ``image_size`` (the model's nominal size when no export fixes one)."""
    from .images import image_crops, is_image_source

    cal = recipe.calibration
    if not is_image_source(cal.data):
        raise EdgeCompressError(f"{recipe.model.source} is an image classifier, and calibration data {cal.data!r} "
                                "is text", hint="calibration.data: skimage:calib or a folder of images")
    sizes = {e.static_shapes["image_size"] for e in recipe.export if e.static_shapes and "image_size" in e.static_shapes}
    if len(sizes) > 1:
        raise EdgeCompressError(f"the exports fix different image sizes {sorted(sizes)}; calibration crops have one",
                                hint="use one image_size per recipe")
    size = sizes.pop() if sizes else int(getattr(model, "input_size", 224))
    return image_crops(cal.data, cal.samples, size, mean=model.mean, std=model.std, seed=cal.seed)


def calibration_summary(store: StatsStore, windows: torch.Tensor | list, source: str, reused: bool) -> dict[str, Any]:
    layers = {}
    for name in sorted(store.modules("minmax")):
        s = store.get(name, "minmax")
        layers[name] = {"input_absmax": round(float(s["absmax"].max()), 4),
                        "input_channel_absmax_median": round(float(s["absmax"].median()), 4)}
    if isinstance(windows, torch.Tensor):
        shape = {"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "tokens": int(windows.numel())}
    else:
        shape = {"sentences": len(windows), "tokens": sum(int(b["attention_mask"].sum()) for b in windows)}
    return {"data": source, **shape, "summary_windows": min(SUMMARY_WINDOWS, len(windows)),
            "data_fingerprint": store.data_fingerprint,
            "model_fingerprint": store.model_fingerprint, "reused": reused, "layers": layers}


def export_target(model: nn.Module, loaded: LoadedModel, dest: Path, spec: ExportSpec,
                  manifest: dict[str, Any], *, progress: bool = False,
                  calibration: list[dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
    """Write one artifact folder (model files, HF files, manifest) into ``dest``.

    ``calibration``: the recipe's calibration batches (image classifiers: normalised crops ``[N, 3, S, S]``), for the
    activation ranges (and weight rounding) of an NPU target."""
    from edgecompress.export.npu import export_npu_encoder, export_npu_image_classifier
    from edgecompress.export.onnx_export import export_causal_lm, export_sentence_encoder

    if spec.format == "tvm":  # the ONNX decoder first (a hidden sibling folder), then compiled
        if loaded.task != "causal-lm":
            raise EdgeCompressError(f"format tvm compiles causal-LM decoders, not {loaded.task} models",
                                    hint="export this model with format onnx")
        onnx_dir = dest.parent / f".{dest.name}.onnx"
        try:
            export_target(model, loaded, onnx_dir, spec.model_copy(update={"format": "onnx", "target": "cpu",
                                                                           "mcpu": None}),
                          manifest, progress=progress)
            console.log(f"compiling {spec.name} with TVM for {spec.mcpu or 'this CPU'}")
            return compile_tvm(Artifact.load(onnx_dir, verify=False), dest, spec, source=None)
        finally:
            shutil.rmtree(onnx_dir, ignore_errors=True)
    npu = spec.target == "npu-qnn"
    if npu and loaded.task not in ("sentence-encoder", "image-classifier", "causal-lm"):
        raise EdgeCompressError(f"the npu-qnn target exports causal LMs, sentence encoders and image classifiers, "
                                f"not {loaded.task}", hint="export it for the cpu target")
    if npu and loaded.task == "causal-lm":
        from edgecompress.export.npu_llm import export_npu_causal_lm

        if calibration is None:
            raise EdgeCompressError("the npu-qnn export of a causal LM needs the recipe's calibration windows")
        dest.mkdir(parents=True)
        with ticker(3, f"rounding weights and exporting {spec.name} (prefill + decode graphs) for the NPU",
                    progress) as advance:
            body = export_npu_causal_lm(model, dest, np.asarray(calibration), static_shapes=spec.static_shapes,
                                        activations=spec.npu_activations, rounding=spec.npu_rounding,
                                        progress=advance)
        loaded.save_hf_files(dest, model=model)
        return write_manifest(dest, {**manifest, "export": spec.model_dump(mode="json"), **body})
    exporters = {"causal-lm": export_causal_lm, "sentence-encoder": export_sentence_encoder}
    if not npu and loaded.task not in exporters:
        raise EdgeCompressError(f"ONNX export of {loaded.task} models for the cpu target is not implemented yet",
                                hint="this release exports causal LMs (smollm2-135m, tiny-llama) and sentence "
                                "encoders (minilm-l6, tiny-bert); image classifiers for target npu-qnn")
    if loaded.task == "image-classifier":
        from edgecompress.compress.quant.conv_rounding import weighted_layers

        dest.mkdir(parents=True)
        with ticker(len(weighted_layers(model)), f"rounding weights and exporting {spec.name} for the NPU",
                    progress) as advance:
            body = export_npu_image_classifier(model, dest, calibration, static_shapes=spec.static_shapes,
                                               activations=spec.npu_activations, rounding=spec.npu_rounding,
                                               bias_correction=spec.npu_bias_correction, progress=advance)
        return write_manifest(dest, {**manifest, "export": spec.model_dump(mode="json"), **body})
    dest.mkdir(parents=True)
    n_layers = model.config.num_hidden_layers
    with ticker(n_layers, f"exporting {spec.name}{' for the NPU' if npu else ''}", progress) as advance:
        if npu:
            feeds = [{k: v.numpy() for k, v in b.items()} for b in calibration or []]
            body = export_npu_encoder(model, dest, feeds, static_shapes=spec.static_shapes,
                                      activations=spec.npu_activations, progress=advance)
        else:
            body = exporters[loaded.task](model, dest, accuracy_level=spec.accuracy_level, fuse=spec.fuse_qkv,
                                          progress=advance)
    loaded.save_hf_files(dest, model=model)
    return write_manifest(dest, {**manifest, "export": spec.model_dump(mode="json"), **body})


# manifest keys that describe one export, not the model: not carried over to a compiled artifact
_EXPORT_KEYS = ("manifest_version", "created", "environment", "files", "size_bytes", "onnx", "export",
                "reference_metrics")


def compile_tvm(src: Artifact, dest: Path, spec: ExportSpec, *, source: str | None) -> dict[str, Any]:
    """Compile the ONNX causal-LM artifact ``src`` into the TVM artifact folder ``dest``: ``model.so``,
    ``params.safetensors``, ``src``'s tokenizer/config files and a manifest (``src``'s model, recipe,
    steps and weights; ``onnx_source``: the compiled graph's ops; ``tvm``: TVM version, target, CPU,
    compile seconds). ``source``: the ONNX artifact's path to record (None: a recipe's own export)."""
    from edgecompress.export.tvm import build_decoder

    if src.format != "onnx" or src.task != "causal-lm":
        raise EdgeCompressError(f"{src.path} is a {src.format} {src.task} artifact; --to tvm compiles ONNX "
                                "causal-LM decoders", hint="pass an artifact written by an onnx export of an LLM")
    onnx_info = src.manifest.get("onnx") or {}
    skip = {MANIFEST, src.onnx_path.name, onnx_info.get("external_data") or "", "report.json"}
    dest.mkdir(parents=True, exist_ok=True)
    info = build_decoder(src.onnx_path, dest, mcpu=spec.mcpu)
    info["source"] = {"artifact": source, "onnx_sha256": (src.manifest.get("files", {}).get(src.onnx_path.name)
                                                          or {}).get("sha256")}
    for p in sorted(src.path.iterdir()):
        if p.is_file() and p.name not in skip:
            shutil.copy2(p, dest / p.name)
    kept = {k: v for k, v in src.manifest.items() if k not in _EXPORT_KEYS}
    return write_manifest(dest, {**kept, "export": spec.model_dump(mode="json"), "tvm": info,
                                 "onnx_source": {k: onnx_info.get(k) for k in ("opset", "op_counts", "inputs")}})


def run_recipe(recipe: Recipe, out_root: str | Path, *, force: bool = False, progress: bool = True,
               bench: bool = True, cache_dir: Path | None = None) -> dict[str, Any]:
    """Run a whole recipe; returns the report (also written to ``<out>/<name>/report.json``).

    Raises :class:`CheckFailed` after writing everything when a check threshold fails.
    """
    dest = Path(out_root) / recipe.name
    if dest.exists() and not force:
        raise ArtifactError(f"output folder {dest} already exists",
                            hint="choose another -o folder, or pass --force to replace it")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    console.log(f"loading model [bold]{recipe.model.source}[/]")
    loaded = load_model(recipe.model.source, allow_code=recipe.model.allow_code, cache_dir=cache_dir)
    model, tok = loaded.model, loaded.tokenizer
    images = loaded.task == "image-classifier"
    if images and recipe.steps:
        raise EdgeCompressError(f"{recipe.model.source} is an image classifier: the recipe's steps are for language "
                                "models", hint="drop the steps; the npu-qnn export quantizes image classifiers itself "
                                "(npu_rounding, npu_bias_correction)")
    if tok is None and not images:
        raise EdgeCompressError(f"{recipe.model.source} has no tokenizer; text calibration needs one")
    needs_reference = recipe.check is not None or any(e.reference for e in recipe.export)
    needs_reference = needs_reference or any(s.step_type in ("lowrank", "distill") for s in recipe.steps)
    reference = copy.deepcopy(model) if needs_reference else None
    timings["load_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    cal = recipe.calibration
    if images:
        windows = calibration_images(model, recipe)
        console.log(f"calibrating on {len(windows)} {windows.shape[-1]}px crops of {cal.data}")
        summary = {"data": cal.data, "images": len(windows), "image_size": int(windows.shape[-1]), "seed": cal.seed}
    else:
        windows = calibration_windows(loaded.task, tok, cal)
        console.log(f"calibrating on {len(windows)} {'sentences' if loaded.task == 'sentence-encoder' else 'windows'} "
                    f"of at most {cal.seq_len} tokens of {cal.data}")
        store, reused = calibration_store(model, windows[:SUMMARY_WINDOWS], SUMMARY_REQUESTS, progress=progress,
                                          cache_dir=cache_dir, batch_size=cal.batch_size)
        summary = calibration_summary(store, windows, cal.data, reused)
    timings["calibrate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    steps: list[dict[str, Any]] = []
    float_prefix = any(isinstance(s, QuantizeStep) and s.activations is not None and s.activations.float_prefix
                       for s in recipe.steps)
    for i, step in enumerate(recipe.steps):
        console.log(f"step {i}: {step.step_type}")
        ctx = StepContext(windows, store, progress, cal.batch_size, tokenizer=tok, reference=reference,
                          data=None if images else cal.data, float_prefix=float_prefix)
        records = STEP_APPLIERS[step.step_type](model, step, ctx)
        steps.append({"step": step.step_type, "config": step.model_dump(mode="json"), "modules": records})
    timings["steps_s"] = time.perf_counter() - t

    base_manifest = {"task": loaded.task, "name": recipe.name, "model": loaded.source,
                     "recipe": recipe_to_dict(recipe), "calibration": summary}
    report: dict[str, Any] = {"recipe": recipe.name, "out": str(dest), "exports": {}, "timings": timings}
    check_result = None
    with atomic_folder(dest, force=force) as tmp:
        t = time.perf_counter()
        for spec in recipe.export:
            console.log(f"exporting [bold]{spec.name}[/] ({spec.format}, {'reference' if spec.reference else 'compressed'})")
            src = reference if spec.reference else model
            manifest = {**base_manifest, "steps": [] if spec.reference else steps}
            m = export_target(src, loaded, tmp / spec.name, spec, manifest, progress=progress,
                              calibration=windows if loaded.task != "causal-lm" or spec.target == "npu-qnn" else None)
            report["exports"][spec.name] = {"size_mb": m["size_bytes"] / 1e6, **m["weights"],
                                            "op_counts": (m.get("onnx") or m["onnx_source"])["op_counts"], "reference": spec.reference}
        timings["export_s"] = time.perf_counter() - t

        if recipe.check is not None:
            t = time.perf_counter()
            check_result = _run_check(recipe, tmp, reference, tok, progress)
            report["check"] = {"export": recipe.check.export, "runtime": recipe.check.runtime,
                               "data": recipe.check.data, **check_result.to_dict()}
            timings["check_s"] = time.perf_counter() - t

        if recipe.bench is not None and bench:
            t = time.perf_counter()
            report["bench"] = _run_bench(recipe, tmp)
            timings["bench_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t0
        report["timings"] = {k: round(v, 2) for k, v in timings.items()}
        report["peak_rss_mb"] = round(peak_rss_mb(), 1)  # of this process: load, calibration, steps, export, check
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
    report["out"] = str(dest)
    if check_result is not None:
        check_result.raise_if_failed(f" (report: {dest}/report.json)")
    return report


def _run_check(recipe: Recipe, tmp: Path, reference: nn.Module, tok, progress: bool):
    from edgecompress.runtimes import open_runtime

    spec = recipe.check
    art = Artifact.load(tmp / spec.export)
    console.log(f"checking [bold]{spec.export}[/] on {spec.runtime} against the uncompressed model ({spec.data})")
    rt = open_runtime(spec.runtime, art)
    metrics = evaluate(rt, art.task, reference, tok, spec.data, seq_len=spec.seq_len, windows=spec.windows,
                       progress=progress)
    result = apply_thresholds(metrics, spec.thresholds.model_dump())
    update_manifest(art.path, art.manifest,
                    reference_metrics={"runtime": spec.runtime, "data": spec.data, **result.to_dict()})
    return result


def _run_bench(recipe: Recipe, tmp: Path) -> dict[str, Any]:
    b = recipe.bench
    results = {}
    for name in b.export:
        console.log(f"benchmarking [bold]{name}[/] on {b.runtime} ({b.threads} threads)")
        results[name] = bench_in_subprocess(tmp / name, b.runtime, prompt_tokens=b.prompt_tokens,
                                            new_tokens=b.new_tokens, threads=b.threads, repeats=b.repeats)
    refs = [e.name for e in recipe.export if e.reference and e.name in results]
    if refs:
        ref = results[refs[0]]
        for name, r in results.items():
            r["vs_" + refs[0]] = {k: (r[k] / ref[k] if ref.get(k) else None)
                                  for k in ("prefill_tok_s", "decode_tok_s", "sentences_s", "size_mb", "peak_rss_mb")}
    return results
