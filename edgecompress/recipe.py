"""The recipe schema: YAML validated by frozen pydantic models that forbid unknown keys.

A recipe names a model, how to calibrate it, an ordered list of compression steps, the
export targets, and optionally an accuracy check and a benchmark::

    recipe = load_recipe("recipes/smollm2-135m-int4.yaml")
    recipe.steps[0].bits            # 4
    recipe_to_dict(recipe)          # plain JSON-able dict (goes into the artifact manifest)

Every problem in a recipe is reported at once, in ONE :class:`~edgecompress.errors.RecipeError`,
one problem per line, each naming the file, the recipe line, the dotted key path and the
valid choices::

    recipes/x.yaml line 12: steps[0].quantize.bitz: unknown key; valid keys: bits, ... (did you mean 'bits'?)
    recipes/x.yaml line 13: steps[0].quantize.bits: 5 is not one of 4, 8

Adding a step type: write a ``StepConfig`` subclass with ``step_type = "name"`` and register it
in :data:`STEP_TYPES` (and extend the ``Step`` alias for type checkers); the YAML form
``- name: {...}``, its error messages and ``recipe_to_dict`` follow from the registration.
"""

from __future__ import annotations

import difflib
import re
import types
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetPydanticSchema,
    PlainSerializer,
    SerializationInfo,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from edgecompress.runtimes import RUNTIMES

from .errors import RecipeError
from .images import is_image_source

__all__ = [
    "STEP_TYPES",
    "ActSparsifyStep",
    "BenchSpec",
    "CalibrationSpec",
    "CheckSpec",
    "ExportSpec",
    "ModelSpec",
    "PruneChannelsStep",
    "PruneLayersStep",
    "LowRankStep",
    "DistillStep",
    "QuantizeStep",
    "SparsifyStep",
    "Recipe",
    "SteerStep",
    "Step",
    "StepConfig",
    "Thresholds",
    "load_recipe",
    "parse_recipe",
    "recipe_to_dict",
    "register_step_type",
]

_FROZEN = ConfigDict(frozen=True, extra="forbid")

# --------------------------------------------------------------------------------------
# Reusable field types
# --------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    """A short, YAML-flavoured rendering of a user value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        text = "a mapping " + repr(value)
    elif isinstance(value, (list, tuple)):
        text = "a list " + repr(list(value))
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _choice(*choices: Any, note: str = "") -> Any:
    """``Literal[choices]`` that rejects look-alikes (``true`` for 1, ``4.0`` for 4) with a clear message."""
    shown = ", ".join(_show(c) for c in choices)

    def check(value: Any) -> Any:
        ok = any(type(value) is type(c) and value == c for c in choices)
        if not ok:
            raise PydanticCustomError(
                "choice_error", "{value} is not one of {choices}{note}",
                {"value": _show(value), "choices": shown, "note": note},
            )
        return value

    return Annotated[Literal[choices], BeforeValidator(check)]  # type: ignore[valid-type]


_SLUG_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")


def _check_slug(value: str) -> str:
    if not _SLUG_RE.fullmatch(value) or len(value) > 100:
        raise PydanticCustomError(
            "slug_error",
            "{value} is not a valid name: use lower-case letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit, at most 100 characters); it becomes a folder name",
            {"value": _show(value)},
        )
    return value


#: A name that is used as a folder name: ``[a-z0-9][a-z0-9._-]*``.
Slug = Annotated[StrictStr, AfterValidator(_check_slug)]


def _check_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise PydanticCustomError(
            "regex_error", "invalid regular expression {value}: {error}",
            {"value": _show(value), "error": str(exc)},
        ) from None
    return value


Regex = Annotated[StrictStr, AfterValidator(_check_regex)]


def _listify(value: Any) -> Any:
    """Let a single string stand for a one-item list (``targets: '.*'``)."""
    return [value] if isinstance(value, str) else value


_DATA_RE = re.compile(r"pydoc:[a-z0-9_]+")  # skimage:* and folders: images.is_image_source


def _check_data(value: str) -> str:
    if _DATA_RE.fullmatch(value) or value.lower().endswith((".txt", ".jsonl")) or is_image_source(value):
        return value
    raise PydanticCustomError(
        "data_error",
        "{value} is not a data source: use 'pydoc:calib', 'pydoc:eval' or a path to a .txt or .jsonl file "
        "(text); 'skimage:calib', 'skimage:eval' or a folder of images (image classifiers)",
        {"value": _show(value)},
    )


DataSource = Annotated[StrictStr, AfterValidator(_check_data)]

# Quantization presets (weight bits / activation bits), expanded into explicit quantize settings.
PRESETS: dict[str, dict[str, Any]] = {
    "w4a16": {"bits": 4, "group_size": 128, "symmetric": True},
    "w3a16": {"bits": 3, "group_size": 128, "symmetric": True},
    "w8a16": {"bits": 8, "group_size": None, "symmetric": True},
    "w8a8": {"bits": 8, "group_size": None, "symmetric": True,
             "activations": {"bits": 8, "observer": "minmax"}},
}

# Choice types: extend a Literal here to add an option (e.g. a new quantization method).
QuantMethod = _choice("rtn", "gptq")
ActObserver = _choice("minmax", "percentile", "mse", "entropy")
WeightDtype = _choice("int", "fp4")
Preset = _choice(*PRESETS)
Bits = _choice(3, 4, 8)
GroupSize = Annotated[
    _choice(32, 64, 128, None, note=" (null or 0 = per-channel)"),
    BeforeValidator(lambda v: None if (type(v) is int and v == 0) else v),
]
ScaleDtype = _choice("float16", "float32")
ExportFormat = _choice("onnx", "tvm")
ExportTarget = _choice("cpu", "npu-qnn", "llvm")
NpuActivations = _choice("uint16", "uint8")
NpuRounding = _choice("gptq", "nearest")
AccuracyLevel = _choice(0, 1, 2, 3, 4)
Runtime = _choice(*RUNTIMES)  # the runtime registry is the one list of names

# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------

_MODULE_FUNCTION_RE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


class ModelSpec(BaseModel):
    """Which model to compress."""

    model_config = _FROZEN

    source: StrictStr = Field(
        min_length=1,
        description="The model: a zoo alias (smollm2-135m, tiny-llama), a Hugging Face folder, "
        "a .gguf file, or module:function returning a torch model (needs allow_code: true).",
    )
    allow_code: StrictBool = Field(
        False,
        description="Allow a module:function source, which imports and runs Python code named by the recipe.",
    )

    @property
    def is_module_function(self) -> bool:
        """True when ``source`` has the ``module:function`` form (Python code)."""
        return _is_module_function(self.source)

    @model_validator(mode="after")
    def _code_needs_consent(self) -> ModelSpec:
        if self.is_module_function and not self.allow_code:
            raise _located_error(
                ("source",), self.source, "code_not_allowed",
                "{value} is a module:function source, which imports and runs Python code; "
                "add 'allow_code: true' under model: to allow it",
                {"value": _show(self.source)},
            )
        return self


def _is_module_function(source: str) -> bool:
    return bool(_MODULE_FUNCTION_RE.fullmatch(source)) and not source.lower().endswith(".gguf")


class CalibrationSpec(BaseModel):
    """The data fed through the model to calibrate the compression steps."""

    model_config = _FROZEN

    data: DataSource = Field(
        "pydoc:calib",
        description="Calibration text: 'pydoc:calib' (built-in Python documentation) or a path to a .txt/.jsonl file; "
        "images: 'skimage:calib' or a folder of images.",
    )
    samples: StrictInt = Field(32, ge=1, description="Number of calibration sequences (sentences for encoders).")
    seq_len: StrictInt = Field(512, ge=8, description="Tokens per calibration sequence (max per sentence for encoders).")
    seed: StrictInt = Field(0, ge=0, description="Random seed for picking the calibration windows.")
    batch_size: StrictInt = Field(1, ge=1, description="Sequences per forward pass during calibration.")


class StepConfig(BaseModel):
    """Base class of every compression step; subclasses set ``step_type`` and register in STEP_TYPES."""

    model_config = _FROZEN

    step_type: ClassVar[str] = ""


class ActivationSpec(BaseModel):
    """Static activation quantization (W8A8): each quantized linear's input gets one calibrated uint8
    scale and zero point (per tensor), exported as QuantizeLinear/DequantizeLinear, which ONNX Runtime
    runs as an integer matmul. (Per-channel input scales cannot be factored out of a matmul's
    reduction; per-channel outliers are what the smoothquant step moves into the weights.)"""

    model_config = _FROZEN

    bits: _choice(8) = Field(8, description="Activation bits: 8 (uint8, asymmetric).")
    observer: ActObserver = Field(
        "minmax", description="How the range is chosen from calibration statistics: minmax (observed min/max), "
        "percentile (clip at `percentile`), mse (clipping that minimises the squared quantization error), "
        "entropy (clipping that minimises KL between the histogram and its quantized form).")
    percentile: StrictFloat = Field(99.99, gt=50, le=100, description="percentile observer: the kept percentile.")
    samples: StrictInt | None = Field(None, ge=1, description="Calibration sequences used (default: all).")
    float_prefix: StrictBool = Field(
        False, description="PrefixQuant (Chen et al. 2024): the first token of every sequence (BOS) runs once in "
        "float at export time and ships as a KV-cache prefix that the runtimes load instead of recomputing it; its "
        "massive activations stay out of the calibrated ranges (and out of an earlier smoothquant step's "
        "statistics). Inputs must start with the tokenizer's BOS token.")
    hadamard: Annotated[tuple[Regex, ...], BeforeValidator(_listify)] = Field(
        (), description="Online Hadamard rotation (QuaRot, Ashkboos et al. 2024) of the inputs of the linears whose "
        "names match these regexes: the weight is quantized as W R and the graph computes x R (two small MatMuls, "
        "R a Kronecker product of two Hadamard matrices) before QuantizeLinear, so outliers spread over all "
        "channels and one per-tensor scale fits. For inputs SmoothQuant cannot fold (mlp.down_proj); method rtn; "
        "not for a layer tied to the embedding.")


class QuantizeStep(StepConfig):
    """Weight-only quantization of the Linear layers (and optionally the token embedding)."""

    step_type: ClassVar[str] = "quantize"

    preset: Preset | None = Field(
        None, description="Shorthand that expands to explicit settings (keys given beside it win): "
        + "; ".join(f"{k} = {v}" for k, v in PRESETS.items()) + ". `edgecompress explain` shows the expansion."
    )
    method: QuantMethod = Field(
        "rtn", description="Quantization algorithm: rtn (round-to-nearest) or gptq (Hessian-based error "
        "compensation, layer by layer on the calibration data; Frantar et al. 2022)."
    )
    bits: Bits = Field(4, description="Weight bits: 3, 4 or 8 (3-bit exports as a custom-domain op with an ONNX function body; symmetric, not for embeddings).")
    dtype: WeightDtype = Field(
        "int", description="Weight element type: int (uniform grid) or fp4 (E2M1 values x a per-block fp16 scale; "
        "bits 4, symmetric, a group_size, method rtn, embeddings false; exports as a custom-domain op with an "
        "ONNX function body).")
    group_size: GroupSize = Field(
        None,
        description="Weights per scale: 32, 64 or 128; null or 0 = one scale per output channel. "
        "Default: 128 for 4-bit, per-channel for 8-bit.",
    )
    symmetric: StrictBool = Field(True, description="Symmetric quantization (no zero point).")
    targets: Annotated[tuple[Regex, ...], BeforeValidator(_listify)] = Field(
        (".*",), min_length=1,
        description="Regexes (re.search) over module names selecting the layers to quantize.",
    )
    ignore: Annotated[tuple[Regex, ...], BeforeValidator(_listify)] = Field(
        (), description="Regexes (re.search) over module names to leave unquantized, even if targeted."
    )
    embeddings: StrictBool = Field(
        True, description="Quantize the token embedding too (and the tied lm_head with it)."
    )
    scale_dtype: ScaleDtype = Field(
        "float16", description="Storage dtype of the scales in the artifact: float16 or float32."
    )
    damp: StrictFloat = Field(
        0.01, gt=0, le=1, description="gptq: damping added to the Hessian diagonal, as a fraction of its mean."
    )
    act_order: StrictBool = Field(
        False, description="gptq: quantize input columns in order of decreasing activation energy "
        "(static groups keep the block layout)."
    )
    refit_scales: StrictBool = Field(
        False, description="gptq: after rounding, refit each row's group scales by least squares on the "
        "layer's calibration Hessian (same storage; lowers the layer's output error)."
    )
    int8_rows: StrictInt = Field(
        0, ge=0, description="gptq: rows of the LM head (and of the token embedding tied to it) kept at int8 in "
        "the same blocks: the tokens the calibration windows use most; the other rows take bits. Exports as "
        "two tables plus each row's position (2 bytes per vocabulary entry), all counted in bits per weight.")
    float_targets: StrictFloat = Field(
        0.0, ge=0, le=1, description="gptq: how far (0 = off, 1 = fully) to fit each layer to the float model's "
        "outputs rather than to its own outputs on the drifted inputs the quantized earlier layers feed it "
        "(GPTAQ's asymmetric calibration; the float blocks run alongside). 0.25 on SmolLM2; 1 overshoots.")
    activations: ActivationSpec | None = Field(
        None, description="Static activation quantization (W8A8; needs bits: 8, group_size: null); "
        "null = weight-only.")

    @model_validator(mode="after")
    def _fp4_format(self) -> QuantizeStep:
        if self.dtype == "fp4":
            bad = [f"bits: {self.bits}"] if self.bits != 4 else []
            bad += ["symmetric: false"] if not self.symmetric else []
            bad += ["group_size: null"] if self.group_size is None else []
            bad += [f"method: {self.method}"] if self.method != "rtn" else []
            bad += ["embeddings: true"] if self.embeddings else []
            if bad:
                raise _located_error(("dtype",), "fp4", "fp4_format",
                                     "dtype fp4 needs bits: 4, symmetric: true, a group_size, method: rtn and "
                                     "embeddings: false; got {bad}", {"bad": ", ".join(bad)})
        return self

    @model_validator(mode="after")
    def _w8a8_needs_int8_channels(self) -> QuantizeStep:
        if self.activations is not None and (self.bits != 8 or self.group_size is not None):
            raise _located_error(("activations",), "activations", "w8a8_format",
                                 "static activation quantization needs int8 per-channel weights (bits: 8, "
                                 "group_size: null), got bits {bits}, group_size {gs}",
                                 {"bits": self.bits, "gs": _show(self.group_size)})
        return self

    @model_validator(mode="after")
    def _refit_needs_gptq(self) -> QuantizeStep:
        if self.refit_scales and self.method != "gptq":
            raise _located_error(("refit_scales",), True, "refit_needs_gptq",
                                 "refit_scales refits the scales of GPTQ's codes on the calibration Hessian; "
                                 "method {method} has none: set method: gptq or drop refit_scales",
                                 {"method": self.method})
        if self.int8_rows and self.method != "gptq":
            raise _located_error(("int8_rows",), self.int8_rows, "int8_rows_needs_gptq",
                                 "int8_rows is chosen and quantized with GPTQ's LM-head pass; method {method} has "
                                 "none: set method: gptq or drop int8_rows", {"method": self.method})
        if self.int8_rows and self.bits != 4:
            raise _located_error(("int8_rows",), self.int8_rows, "int8_rows_needs_int4",
                                 "int8_rows keeps some rows of an int4 head at int8; with bits {bits} there is "
                                 "nothing finer to keep them at: use bits: 4 or drop int8_rows", {"bits": self.bits})
        if self.activations is not None and self.activations.hadamard and self.method != "rtn":
            raise _located_error(("activations", "hadamard"), list(self.activations.hadamard), "hadamard_needs_rtn",
                                 "activations.hadamard rotates the weights just before rounding them; method {method} "
                                 "runs the model between the two: use method: rtn (the w8a8 preset) or drop "
                                 "activations.hadamard", {"method": self.method})
        if self.float_targets and self.method != "gptq":
            raise _located_error(("float_targets",), True, "float_targets_needs_gptq",
                                 "float_targets changes the weights GPTQ rounds (sequentially, block by block); "
                                 "method {method} rounds each weight alone: set method: gptq or drop float_targets",
                                 {"method": self.method})
        return self

    @model_validator(mode="before")
    @classmethod
    def _default_group_size(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("preset"), str) and data["preset"] in PRESETS:
            data = {**PRESETS[data["preset"]], **data}
        # int4 defaults to groups of 128; int8 to per-channel.
        if isinstance(data, dict) and "group_size" not in data:
            data = {**data, "group_size": None if data.get("bits", 4) == 8 else 128}
        return data


class AWQStep(StepConfig):
    """AWQ: per-input-channel scales (and clip ranges) searched on calibration statistics and folded
    into the preceding norm/linear; weights stay float, so a later quantize step (rtn or gptq) with the
    same bits/group_size quantizes them (Lin et al. 2023)."""

    step_type: ClassVar[str] = "awq"

    bits: Bits = Field(4, description="Bits of the quantizer the search optimises for (use the same in quantize).")
    group_size: GroupSize = Field(128, description="Group size of that quantizer.")
    symmetric: StrictBool = Field(True, description="Symmetric quantizer (no zero point).")
    scale_dtype: ScaleDtype = Field("float16", description="Scale storage dtype of that quantizer.")
    grid: StrictInt = Field(20, ge=2, le=100, description="Points of the scale-exponent grid search in [0, 1].")
    clip: StrictBool = Field(True, description="Also search per-block clipping ranges (and clamp the weights).")
    max_shrink: StrictFloat = Field(0.5, gt=0, lt=1, description="Largest fraction a clip search may cut a range by.")


class SmoothQuantStep(StepConfig):
    """SmoothQuant: per-channel scales s = max|X|^alpha / max|W|^(1-alpha) move activation outliers into
    the weights, folded exactly into the preceding norm/linear; put it before a W8A8 quantize step
    (Xiao et al. 2023)."""

    step_type: ClassVar[str] = "smoothquant"

    alpha: Annotated[StrictFloat, Field(ge=0, le=1)] | _choice("auto") = Field(
        0.5, description="Migration strength in [0, 1] (0 = no change, 1 = the whole activation range moved "
        "into the weights), or auto: per fold site, the grid value whose W8A8 output is closest to the float "
        "layer's on sampled calibration activations.")
    grid: StrictInt = Field(11, ge=2, le=101, description="auto: points of the alpha grid in [0, 1].")
    samples: StrictInt | None = Field(None, ge=1, description="Calibration sequences used (default: all).")


class Candidate(BaseModel):
    """One weight format a layer may take."""

    model_config = _FROZEN

    bits: Bits = Field(description="Weight bits: 3, 4 or 8.")
    group_size: GroupSize = Field(64, description="Weights per scale (null = per channel).")


class MixedPrecisionStep(StepConfig):
    """Per-layer bit-widths by measured sensitivity under a bits-per-weight budget, then quantization
    (rtn or gptq) with the chosen format per layer; the manifest records each layer's choice."""

    step_type: ClassVar[str] = "mixed_precision"

    method: QuantMethod = Field("gptq", description="Quantizer applied with the chosen formats: rtn or gptq.")
    budget_bits: StrictFloat = Field(gt=0, description="Bits per weight over all weight matrices, every "
                                     "stored byte counted (codes, padding, scales, zero points).")
    candidates: tuple[Candidate, ...] = Field(
        (Candidate(bits=4, group_size=64), Candidate(bits=8, group_size=64)), min_length=1,
        description="Formats to choose from, in rising precision; each layer starts at the one storing the "
                    "fewest bits for its shape (block padding counted) and is upgraded by sensitivity.")
    symmetric: StrictBool = Field(True, description="Symmetric quantization (no zero point).")
    scale_dtype: ScaleDtype = Field("float16", description="Storage dtype of the scales.")
    samples: StrictInt = Field(4, ge=1, description="Calibration windows used to measure sensitivity "
                              "(one forward pass each per kernel: 121 kernels on SmolLM2-135M).")
    embeddings: StrictBool = Field(True, description="Include the token embedding (and its tied head).")
    damp: StrictFloat = Field(0.01, gt=0, le=1, description="gptq: Hessian damping.")
    act_order: StrictBool = Field(False, description="gptq: activation-order column processing.")
    refit_scales: StrictBool = Field(False, description="gptq: least-squares refit of the group scales after rounding.")
    float_targets: StrictFloat = Field(0.0, ge=0, le=1, description="gptq: how far to fit each layer to the "
                                       "float model's outputs (GPTAQ; see the quantize step).")


_PROMPTS_RE = re.compile(r"builtin:[a-z0-9][a-z0-9_-]*")


def _check_prompts(value: str) -> str:
    if _PROMPTS_RE.fullmatch(value) or value.lower().endswith((".txt", ".jsonl")):
        return value
    raise PydanticCustomError(
        "prompts_error",
        "{value} is not a prompt source: use a .txt file (one prompt per line), a .jsonl file "
        "(\"text\" per line; pairs: \"positive\" and \"negative\") or builtin:NAME (e.g. builtin:concise-pairs)",
        {"value": _show(value)},
    )


#: Prompts for steering: a .txt (one per line), a .jsonl, or a bundled set ``builtin:NAME``.
PromptSource = Annotated[StrictStr, AfterValidator(_check_prompts)]
SteerMethod = _choice("mean_diff", "pca")
SteerPosition = _choice("last", "mean")
SteerMode = _choice("add", "ablate", "clamp")


def _listify_int(value: Any) -> Any:
    return [value] if type(value) is int else value


class SteerStep(StepConfig):
    """Steering baked into the weights: a direction from contrasting prompt sets, added to the
    residual stream (a down_proj bias), ablated from it (orthogonalised writers) or clamped."""

    step_type: ClassVar[str] = "steer"

    pairs: PromptSource | None = Field(
        None, description="Paired prompts: a .jsonl file with \"positive\" and \"negative\" per line, or builtin:NAME. "
        "Give pairs, or positive and negative.")
    positive: PromptSource | None = Field(None, description="Prompts showing the behaviour to steer towards.")
    negative: PromptSource | None = Field(None, description="Prompts showing the behaviour to steer away from.")
    layers: Annotated[tuple[Annotated[StrictInt, Field(ge=0)], ...], BeforeValidator(_listify_int)] = Field(
        min_length=1, description="Decoder layer index(es) whose output (the residual stream after it) is read and "
        "steered; ablate and clamp take one layer.")
    position: SteerPosition = Field("last", description="Tokens read per prompt: last (the last prompt token) or "
                                    "mean (the mean over the prompt's tokens).")
    method: SteerMethod = Field("mean_diff", description="Direction: mean_diff (difference of the sets' means) or "
                                "pca (top principal direction of the paired differences; sets of equal size).")
    mode: SteerMode = Field("add", description="add: x + strength * v after each layer (a bias on its down_proj); "
                            "ablate: remove the direction everywhere (embedding, o_proj, down_proj orthogonalised); "
                            "clamp: ablate, then fix the component to strength * the positive prompts' mean.")
    strength: StrictFloat | None = Field(
        None, description="Multiple of the direction at its natural size (1 = one mean difference); omit it "
        "with kl_bound set to search the largest strength under the bound. Not for ablate.")
    kl_bound: StrictFloat | None = Field(
        None, gt=0, description="Max mean KL(unsteered || steered) per token on neutral calibration text: searched "
        "under when strength is omitted, else checked (the step fails when crossed).")
    max_strength: StrictFloat = Field(16.0, gt=0, description="Largest strength the search tries.")
    search_steps: StrictInt = Field(8, ge=1, le=30, description="Halvings, then bisection steps, of the search.")
    kl_windows: StrictInt = Field(2, ge=1, description="Calibration windows the KL is measured on.")
    kl_tokens: StrictInt = Field(256, ge=8, description="Tokens per KL window (the first of each calibration window).")
    chat: StrictBool = Field(True, description="Wrap each prompt in the tokenizer's chat template (as a user "
                             "message, with the assistant prompt after it).")
    eval_prompts: PromptSource | None = Field(
        None, description="Held-out prompts for `edgecompress steer-eval` (disjoint from the direction prompts).")

    @model_validator(mode="after")
    def _consistent(self) -> SteerStep:
        problems = []
        both = self.positive is not None and self.negative is not None
        if self.pairs is not None and (self.positive is not None or self.negative is not None):
            problems.append(_detail(("pairs",), self.pairs, "steer_sets",
                                    "give pairs, or positive and negative, not both", {}))
        elif self.pairs is None and not both:
            key = "negative" if self.positive is not None else "positive"
            problems.append(_detail((key,), None, "steer_sets",
                                    "missing prompt set: give pairs (a .jsonl of positive/negative) or both "
                                    "positive and negative", {}))
        if self.mode in ("ablate", "clamp") and len(self.layers) != 1:
            problems.append(_detail(("layers",), list(self.layers), "steer_layers",
                                    "{mode} reads one direction and removes it from every layer: give one layer, "
                                    "got {value}", {"mode": self.mode, "value": _show(list(self.layers))}))
        if len(set(self.layers)) != len(self.layers):
            problems.append(_detail(("layers",), list(self.layers), "steer_layers",
                                    "duplicate layer in {value}", {"value": _show(list(self.layers))}))
        if self.mode == "ablate" and self.strength is not None:
            problems.append(_detail(("strength",), self.strength, "steer_strength",
                                    "ablate has no strength; drop it (or use mode: clamp)", {}))
        if self.mode != "ablate" and self.strength is None and self.kl_bound is None:
            problems.append(_detail(("strength",), None, "steer_strength",
                                    "mode {mode} needs strength (e.g. 4.0) or kl_bound (e.g. 0.1, searches the "
                                    "largest strength under it)", {"mode": self.mode}))
        if self.strength is not None and self.strength == 0:
            problems.append(_detail(("strength",), self.strength, "steer_strength",
                                    "strength 0 does nothing; drop the step or give a non-zero strength", {}))
        if problems:
            raise ValidationError.from_exception_data("SteerStep", problems)
        return self


_NM_PATTERN_RE = re.compile(r"(\d+):(\d+)")


def _check_pattern(value: str) -> str:
    m = _NM_PATTERN_RE.fullmatch(value)
    if value == "unstructured" or (m is not None and 0 < int(m.group(1)) < int(m.group(2))):
        return value
    raise PydanticCustomError(
        "pattern_error", "{value} is not a sparsity pattern: use 'unstructured' or 'N:M' with 0 < N < M "
        "(N kept of every M inputs, e.g. '2:4' or '4:8')", {"value": _show(value)})


SparsityPattern = Annotated[StrictStr, AfterValidator(_check_pattern)]
SparsifyMethod = _choice("magnitude", "wanda", "sparsegpt")
SparsityAllocation = _choice("uniform", "owl")


class SparsifyStep(StepConfig):
    """Weight pruning of the decoder's Linear layers (magnitude, Wanda or SparseGPT), unstructured or N:M;
    pruned layers are stored as values + bitmask. Put it before quantize: a later rtn/gptq keeps the zeros."""

    step_type: ClassVar[str] = "sparsify"

    method: SparsifyMethod = Field(
        "wanda", description="Pruning method: magnitude (|W|, per layer), wanda (|W| * input norm, per output row; "
        "Sun et al. 2023) or sparsegpt (Hessian OBS with weight update, sequential; Frantar & Alistarh 2023).")
    sparsity: StrictFloat | None = Field(
        None, ge=0, lt=1, description="Fraction of weights pruned, in [0, 1); unstructured only (default 0.5). "
        "An N:M pattern implies 1 - N/M.")
    pattern: SparsityPattern = Field(
        "unstructured", description="'unstructured' or 'N:M' (keep N of every M consecutive inputs: '2:4', '4:8').")
    targets: Annotated[tuple[Regex, ...], BeforeValidator(_listify)] = Field(
        (".*",), min_length=1, description="Regexes (re.search) over module names selecting the layers to prune "
        "(Linear layers inside the decoder blocks only).")
    ignore: Annotated[tuple[Regex, ...], BeforeValidator(_listify)] = Field(
        (), description="Regexes (re.search) over module names to leave dense, even if targeted.")
    damp: StrictFloat = Field(0.01, gt=0, le=1, description="sparsegpt: damping added to the Hessian diagonal, "
                              "as a fraction of its mean.")
    block: StrictInt = Field(128, ge=1, description="sparsegpt: columns per lazy update (and per adaptive mask).")
    value_dtype: ScaleDtype = Field("float16", description="Storage dtype of the kept values: float16 (values "
                                    "are rounded to it, so storing them is lossless) or float32.")
    allocation: SparsityAllocation = Field(
        "uniform", description="uniform (every layer at `sparsity`) or owl (per-block sparsities within "
        "sparsity +- owl_lambda, lower where Wanda scores have more outliers; Yin et al. 2023; unstructured only).")
    owl_lambda: StrictFloat = Field(0.08, ge=0, lt=0.5, description="owl: largest deviation of a block's sparsity "
                                    "from `sparsity`.")
    owl_m: StrictFloat = Field(5.0, gt=0, description="owl: a Wanda score counts as an outlier above owl_m times "
                               "its block's mean.")

    @model_validator(mode="after")
    def _sparsity_matches_pattern(self) -> SparsifyStep:
        if self.allocation == "owl" and self.pattern != "unstructured":
            raise _located_error(("allocation",), self.allocation, "allocation_pattern",
                                 "owl allocation varies the sparsity per block; it needs pattern: unstructured, "
                                 "not {pattern}", {"pattern": self.pattern})
        if self.allocation == "owl" and not self.owl_lambda < min(self.effective_sparsity,
                                                                  1 - self.effective_sparsity):
            raise _located_error(("owl_lambda",), self.owl_lambda, "owl_lambda",
                                 "owl_lambda {value} must be below min(sparsity, 1 - sparsity) = {bound}",
                                 {"value": _show(self.owl_lambda),
                                  "bound": f"{min(self.effective_sparsity, 1 - self.effective_sparsity):g}"})
        if self.pattern != "unstructured" and self.sparsity is not None:
            n, m = (int(v) for v in self.pattern.split(":"))
            if abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise _located_error(
                    ("sparsity",), self.sparsity, "sparsity_pattern",
                    "sparsity {value} contradicts pattern {pattern} (which prunes {implied}); leave sparsity out",
                    {"value": _show(self.sparsity), "pattern": self.pattern, "implied": f"{1 - n / m:g}"})
        return self

    @property
    def effective_sparsity(self) -> float:
        if self.pattern == "unstructured":
            return 0.5 if self.sparsity is None else self.sparsity
        n, m = (int(v) for v in self.pattern.split(":"))
        return 1 - n / m


LowRankMethod = _choice("eora", "svd")


class LowRankStep(StepConfig):
    """Low-rank compensation of the compression error of quantized/pruned decoder linears: W_c + B A with
    rank-r factors fitted to W - W_c (eora: weighted by the calibration input covariance; svd: plain)."""

    step_type: ClassVar[str] = "lowrank"

    method: LowRankMethod = Field(
        "eora", description="eora (eigenspace-projected SVD minimising the output error on the calibration "
        "inputs, sequential; Liu et al. 2024) or svd (truncated SVD of the weight error, no data).")
    rank: StrictInt = Field(16, ge=1, description="Rank r of the correction B [N, r] A [r, K] of every layer.")
    targets: Annotated[tuple[Regex, ...], BeforeValidator(_listify)] = Field(
        (".*",), min_length=1, description="Regexes (re.search) over module names selecting the compressed "
        "layers to compensate (quantized or pruned Linear layers inside the decoder blocks).")
    ignore: Annotated[tuple[Regex, ...], BeforeValidator(_listify)] = Field(
        (), description="Regexes (re.search) over module names to leave uncompensated.")
    value_dtype: ScaleDtype = Field("float16", description="Storage dtype of the factors: float16 (rounded to "
                                    "it, so storing them is lossless) or float32.")


ActSparseMethod = _choice("teal", "wina", "cats")
ActSparseAllocation = _choice("greedy", "uniform")


class ActSparsifyStep(StepConfig):
    """Activation sparsity with calibrated thresholds: the inputs of q/k/v, o, gate/up and down entries with
    |x| (teal) or |x| * column norm (wina) under a per-input threshold are zeroed; thresholds are part of
    the model and of the export (edgecompress::ActSparse)."""

    step_type: ClassVar[str] = "sparsify_activations"

    method: ActSparseMethod = Field(
        "teal", description="teal (|x_j| <= t; Liu et al. 2024), wina (|x_j| * ||W[:, j]||_2 <= t, the column "
        "norms of the weights reading the input; Chen et al. 2025) or cats (|silu(gate)_j| <= t on each MLP's gated "
        "activation, skipping up_proj rows and down_proj columns; Lee et al. 2024; allocation uniform, sparsity = "
        "the fraction of gated activations zeroed).")
    sparsity: StrictFloat = Field(
        0.4, ge=0, lt=1, description="Model-wide target in [0, 1): fraction of the selected linears' inputs zeroed, "
        "weighted by each linear's parameters (the weight columns skipped).")
    allocation: ActSparseAllocation = Field(
        "greedy", description="greedy (per-input sparsities: repeatedly raise the input whose next level costs the "
        "least block-output error per skipped weight, measured on calibration windows) or uniform (every input "
        "at `sparsity`).")
    targets: Annotated[tuple[Regex, ...], BeforeValidator(_listify)] = Field(
        (".*",), min_length=1, description="Regexes (re.search) over module names selecting the linears whose "
        "input is thresholded (inside the decoder blocks).")
    ignore: Annotated[tuple[Regex, ...], BeforeValidator(_listify)] = Field(
        (), description="Regexes (re.search) over module names to leave dense.")
    grid: StrictFloat = Field(0.05, gt=0, lt=1, description="greedy: spacing of the sparsity levels whose cost is "
                              "measured per input.")
    max_level: StrictFloat = Field(0.95, gt=0, lt=1, description="greedy: highest sparsity one input may get.")
    cost_windows: StrictInt = Field(4, ge=1, description="greedy: calibration windows the costs are measured on.")
    cost_at: _choice("block", "final") = Field(
        "block", description="greedy: unit of the costs: block (the block-output error) or final (each input's "
        "block-output error curve rescaled to the error it causes in the final hidden states; twice the time, "
        "no better on SmolLM2-135M).")

    @model_validator(mode="before")
    @classmethod
    def _cats_is_uniform(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("method") == "cats" and "allocation" not in data:
            data = {**data, "allocation": "uniform"}  # CATS has one sparsity for every MLP
        return data

    @model_validator(mode="after")
    def _target_reachable(self) -> ActSparsifyStep:
        if self.method == "cats" and self.allocation != "uniform":
            raise _located_error(("allocation",), self.allocation, "cats_uniform",
                                 "method cats puts every MLP at the same sparsity: allocation must be uniform "
                                 "(or left out), got {value}", {"value": _show(self.allocation)})
        if self.grid > self.max_level:
            raise _located_error(("grid",), self.grid, "grid_level", "grid {value} is above max_level {bound}",
                                 {"value": _show(self.grid), "bound": _show(self.max_level)})
        if self.allocation == "greedy" and self.sparsity > self.max_level:
            raise _located_error(("sparsity",), self.sparsity, "sparsity_level",
                                 "sparsity {value} is above max_level {bound}; raise max_level",
                                 {"value": _show(self.sparsity), "bound": _show(self.max_level)})
        return self


_PRUNE_NAME_RE = re.compile(r"model\.layers\.\d+(?:\.(?:self_attn|mlp))?")


def _check_prune_name(value: str) -> str:
    if _PRUNE_NAME_RE.fullmatch(value):
        return value
    what = ("the embedding" if "embed" in value else "the LM head" if "lm_head" in value
            else "the final norm" if value.endswith("norm") else None)
    raise PydanticCustomError(
        "prune_name", "{value}{what} cannot be removed: prune_layers removes decoder blocks 'model.layers.N' or their "
        "sublayers 'model.layers.N.self_attn' / 'model.layers.N.mlp'",
        {"value": _show(value), "what": f" ({what})" if what else ""})


PruneName = Annotated[StrictStr, AfterValidator(_check_prune_name)]
PruneMethod = _choice("greedy", "block_influence", "given")
PruneGranularity = _choice("sublayer", "block")


class PruneLayersStep(StepConfig):
    """Structured pruning of a Llama-family decoder: whole blocks or single attention/MLP sublayers removed
    (the model, its config and the export get smaller), chosen by calibration evidence."""

    step_type: ClassVar[str] = "prune_layers"

    method: PruneMethod = Field(
        "greedy", description="greedy (remove one unit at a time, the one whose removal gives the smallest output "
        "divergence from the unpruned model on the calibration windows, re-scoring after each; FinerCut, Zhang et al. "
        "2024), block_influence (1 - cos(x_in, x_out) of each unit, scored once, lowest removed; ShortGPT, Men et al. "
        "2024) or given (the `remove` list).")
    granularity: PruneGranularity = Field(
        "sublayer", description="sublayer (attention and MLP sublayers separately: 2L units) or block (whole decoder "
        "layers: L units).")
    fraction: StrictFloat | None = Field(
        None, ge=0, lt=1, description="Fraction of the model's units (blocks or sublayers) to remove, rounded; "
        "give this or count.")
    count: StrictInt | None = Field(None, ge=0, description="Number of units to remove; give this or fraction.")
    divergence: _choice("kl", "js") = Field(
        "kl", description="greedy: KL(unpruned || pruned) or Jensen-Shannon of the next-token distributions, "
        "averaged over the calibration tokens.")
    keep: Annotated[tuple[Regex, ...], BeforeValidator(_listify)] = Field(
        (), description="Regexes (re.search) over unit names (model.layers.N, model.layers.N.self_attn|mlp) never "
        "removed.")
    remove: Annotated[tuple[PruneName, ...], BeforeValidator(_listify)] = Field(
        (), description="given: the units to remove, e.g. ['model.layers.20', 'model.layers.7.mlp'].")
    windows: StrictInt | None = Field(None, ge=1, description="Calibration windows the scores use (default: all).")
    rescore: StrictInt | None = Field(
        None, ge=1, description="greedy: after the first round (every unit scored), re-score only this many units, "
        "those with the smallest divergence at their last scoring (default: all, as FinerCut; much slower).")
    stride: StrictInt = Field(1, ge=1, description="greedy: measure the divergence at every stride-th token (the "
                              "decoder still runs on all of them; the LM head only where measured).")

    @model_validator(mode="after")
    def _how_many(self) -> PruneLayersStep:
        if self.method == "given":
            if not self.remove:
                raise _located_error(("remove",), [], "prune_remove", "method given needs a non-empty remove list", {})
            extra = [k for k in ("fraction", "count") if getattr(self, k) is not None]
            if extra:
                raise _located_error((extra[0],), getattr(self, extra[0]), "prune_count",
                                     "method given removes the `remove` list; leave {key} out", {"key": extra[0]})
        else:
            if self.remove:
                raise _located_error(("remove",), list(self.remove), "prune_remove",
                                     "remove is for method given; method {method} chooses by itself",
                                     {"method": self.method})
            if (self.fraction is None) == (self.count is None):
                loc = ("count",) if self.count is not None else ("fraction",)
                raise _located_error(loc, self.count if self.count is not None else self.fraction, "prune_count",
                                     "give exactly one of fraction, count (how many units to remove)", {})
        return self


class PruneChannelsStep(StepConfig):
    """MLP channel pruning: each decoder layer keeps the intermediate channels with the largest calibrated
    importance E[a_j^2] * ||W_down[:, j]||^2 (smaller gate/up/down matrices)."""

    step_type: ClassVar[str] = "prune_mlp_channels"

    fraction: StrictFloat = Field(0.25, ge=0, lt=1, description="Fraction of each layer's intermediate channels "
                                  "removed (the kept count is rounded to multiple_of).")
    multiple_of: StrictInt = Field(64, ge=1, description="Kept channels per layer are a multiple of this (64 keeps "
                                   "down_proj's input size divisible by the quantization blocks).")


class DistillStep(StepConfig):
    """Low-rank distillation: rank-r deltas of the float decoder linears trained to match the uncompressed
    model's next-token distributions on calibration windows, then merged into the weights (no runtime cost);
    heals activation thresholds or pruning before quantization."""

    step_type: ClassVar[str] = "distill"

    rank: StrictInt = Field(16, ge=1, description="Rank r of each layer's trained delta B [N, r] A [r, K] "
                            "(merged into W afterwards: the export keeps its shapes).")
    steps: StrictInt = Field(200, ge=1, description="Optimiser steps (Adam, cosine decay), one window each.")
    lr: StrictFloat = Field(1e-3, gt=0, description="Adam learning rate at the start.")
    samples: StrictInt = Field(64, ge=1, description="Training windows drawn from calibration.data (cycled).")
    seq_len: StrictInt = Field(256, ge=8, description="Tokens per training window.")
    seed: StrictInt = Field(1, ge=0, description="Seed for picking the training windows (calibration.seed "
                            "picks the calibration windows) and initialising the deltas.")
    targets: Annotated[tuple[Regex, ...], BeforeValidator(_listify)] = Field(
        (".*",), min_length=1, description="Regexes (re.search) over module names selecting the float linears "
        "inside the decoder blocks that get a delta.")
    ignore: Annotated[tuple[Regex, ...], BeforeValidator(_listify)] = Field(
        (), description="Regexes (re.search) over module names to leave as they are.")


#: Registered step types: the YAML key of a step item -> its config model.
STEP_TYPES: dict[str, type[StepConfig]] = {
    QuantizeStep.step_type: QuantizeStep,
    AWQStep.step_type: AWQStep,
    MixedPrecisionStep.step_type: MixedPrecisionStep,
    SmoothQuantStep.step_type: SmoothQuantStep,
    SteerStep.step_type: SteerStep,
    SparsifyStep.step_type: SparsifyStep,
    LowRankStep.step_type: LowRankStep,
    ActSparsifyStep.step_type: ActSparsifyStep,
    PruneLayersStep.step_type: PruneLayersStep,
    PruneChannelsStep.step_type: PruneChannelsStep,
    DistillStep.step_type: DistillStep,
}


def _build_step_entry() -> type[BaseModel]:
    """A model with one optional field per step type: validates ``{step_type: config}``."""
    fields: dict[str, Any] = {
        name: (cls | None, Field(None, description=(cls.__doc__ or "").strip().split("\n")[0] or None))
        for name, cls in STEP_TYPES.items()
    }
    return create_model("StepEntry", __config__=_FROZEN, **fields)


def register_step_type(cls: type[StepConfig]) -> type[StepConfig]:
    """Make ``cls`` available as ``- <cls.step_type>: {...}`` in recipes (usable as a decorator).

    Shipped step types are listed in :data:`STEP_TYPES` directly; this is for adding one later.
    """
    if not (isinstance(cls, type) and issubclass(cls, StepConfig)) or not cls.step_type:
        raise TypeError("a step type is a StepConfig subclass with a non-empty step_type")
    if STEP_TYPES.get(cls.step_type, cls) is not cls:
        raise ValueError(f"step type {cls.step_type!r} is already registered")
    STEP_TYPES[cls.step_type] = cls
    _rebuild_steps()
    return cls


def _rebuild_steps() -> None:
    """Rebuild the step-item model (and the Recipe schema using it) from STEP_TYPES."""
    global _StepEntry
    _StepEntry = _build_step_entry()
    recipe_cls = globals().get("Recipe")
    if recipe_cls is not None:
        recipe_cls.model_rebuild(force=True)


_StepEntry = _build_step_entry()
_STEP_EXAMPLE = "a one-key mapping like '- quantize: {bits: 4}'"


def _validate_step(value: Any, handler: Any) -> StepConfig:
    if isinstance(value, StepConfig):
        return value
    valid = ", ".join(STEP_TYPES)
    if not isinstance(value, dict) or not value:
        raise PydanticCustomError(
            "step_shape", "expected {example}, got {got}; step types: {valid}",
            {"example": _STEP_EXAMPLE, "got": _show(value), "valid": valid},
        )
    # `- quantize:` with nothing under it means "all defaults".
    value = {k: ({} if (v is None and k in STEP_TYPES) else v) for k, v in value.items()}
    known = [k for k in value if k in STEP_TYPES]
    # Unknown keys are reported (with the valid step types) by the entry model's extra=forbid.
    entry = handler(value)
    if len(known) > 1:
        raise PydanticCustomError(
            "step_shape", "one step per list item, got {keys}; write each as its own '- {first}: ...' item",
            {"keys": ", ".join(known), "first": known[0]},
        )
    return getattr(entry, known[0])


def _dump_step(step: StepConfig, info: SerializationInfo) -> dict[str, Any]:
    return {step.step_type: step.model_dump(mode=info.mode)}


#: One item of ``steps``: in YAML ``{step_type: config}``, in Python the config model.
Step = Annotated[
    StepConfig,
    GetPydanticSchema(lambda _source, handler: handler(_StepEntry)),  # validation + JSON schema
    WrapValidator(_validate_step),
    PlainSerializer(_dump_step, return_type=dict),
]


class ExportSpec(BaseModel):
    """One export target: a runnable file set in its own sub-folder of the artifact."""

    model_config = _FROZEN

    format: ExportFormat = Field("onnx", description="Export format: onnx, or tvm (the ONNX decoder compiled by "
                                 "TVM into model.so + params.safetensors; causal LMs; runs on --runtime tvm-cpu).")
    name: Slug | None = Field(
        None,
        description="Sub-folder name of this target, unique within the recipe; default: format + index (onnx0, onnx1, ...).",
    )
    target: ExportTarget = Field(
        "cpu",
        description="Hardware the export is built for: cpu, or npu-qnn (Qualcomm HTP through onnxruntime-qnn: "
        "static shapes, QDQ with calibrated activations, int8 per-channel weights; sentence encoders, image "
        "classifiers, causal LMs as a prefill graph + a decode graph); format tvm: llvm (the default; TVM's old string form 'llvm -mcpu=NAME' is translated).",
    )
    mcpu: StrictStr | None = Field(
        None, min_length=1,
        description="target llvm: the LLVM CPU name to compile for (default: this machine's, e.g. znver3); "
        "the tvm-cpu runtime refuses a library compiled for another CPU.",
    )
    static_shapes: dict[str, StrictInt] | None = Field(
        None,
        description="npu-qnn: the value of every symbolic input dimension, e.g. {batch_size: 1, sequence_length: 64}; "
        "image classifiers: {batch_size: 1, image_size: 224}; causal LMs: {prefill_len: 128, max_context: 256} (the "
        "prefill graph's length and the fixed KV cache's size).",
    )
    npu_activations: NpuActivations = Field(
        "uint16", description="npu-qnn: activation type of the QDQ graph, uint16 or uint8."
    )
    npu_rounding: NpuRounding = Field(
        "gptq", description="npu-qnn, image classifiers and causal LMs: how Conv/Linear/MatMul weights reach their "
        "int8 per-channel grid: gptq (error feedback on the calibration images or windows) or nearest.")
    npu_bias_correction: StrictBool = Field(
        True, description="npu-qnn, image classifiers: subtract the mean output shift the rounded weights cause on "
        "calibration images from each layer's bias.")
    accuracy_level: AccuracyLevel = Field(
        4,
        description="MatMulNBits accuracy_level, 0-4 (4 = int8 activations in the matmul on CPU: ONNX Runtime, and "
        "format tvm on an x86 CPU with AVX2 or AVX-512 VNNI; 0 = fp32 math).",
    )
    opset: StrictInt = Field(21, ge=17, description="ONNX opset version (>= 17).")
    fuse_qkv: StrictBool = Field(
        True, description="Fuse q/k/v and gate/up projections into one MatMulNBits each."
    )
    reference: StrictBool = Field(
        False,
        description="Export the UNCOMPRESSED model instead (the steps are not applied), for side-by-side runs.",
    )

    @model_validator(mode="before")
    @classmethod
    def _tvm_target(cls, data: Any) -> Any:
        """format tvm: target defaults to llvm; TVM's old CLI string 'llvm -mcpu=NAME' -> llvm + mcpu."""
        if not isinstance(data, dict) or data.get("format") != "tvm":
            return data
        target = data.get("target", "llvm")
        if isinstance(target, str) and target.split()[:1] == ["llvm"] and len(target.split()) > 1:
            flags = dict(f.partition("=")[::2] for f in target.split()[1:])
            other = sorted(k for k in flags if k != "-mcpu")
            if other or not flags.get("-mcpu"):
                raise _located_error(
                    ("target",), target, "tvm_target",
                    "{value} is TVM's old target string, which TVM 0.27 rejects; only -mcpu=NAME is translated "
                    "(write target: llvm and mcpu: NAME){other}",
                    {"value": _show(target), "other": f"; not supported: {', '.join(other)}" if other else ""})
            if data.get("mcpu") not in (None, flags["-mcpu"]):
                raise _located_error(("mcpu",), data["mcpu"], "tvm_target",
                                     "mcpu {value} contradicts the target string {target}",
                                     {"value": _show(data["mcpu"]), "target": _show(target)})
            return {**data, "target": "llvm", "mcpu": flags["-mcpu"]}
        return {**data, "target": target}

    @model_validator(mode="after")
    def _format_fits_target(self) -> ExportSpec:
        if (self.format == "tvm") != (self.target == "llvm"):
            raise _located_error(
                ("target",), self.target, "tvm_target",
                "format {format} cannot target {value}: format tvm targets llvm (a CPU); onnx targets cpu or npu-qnn",
                {"format": self.format, "value": _show(self.target)})
        if self.mcpu is not None and self.target != "llvm":
            raise _located_error(("mcpu",), self.mcpu, "tvm_target",
                                 "mcpu is for target llvm (format tvm); this export's target is {target}",
                                 {"target": self.target})
        return self

    @model_validator(mode="after")
    def _npu_needs_static_shapes(self) -> ExportSpec:
        if self.target == "npu-qnn":
            shapes = self.static_shapes or {}
            llm = ("prefill_len", "max_context")
            if set(llm) & set(shapes):  # a causal LM's prefill/decode pair
                missing = [d for d in llm if d not in shapes]
            else:
                missing = [d for d in ("batch_size",) if d not in shapes]
                if not {"sequence_length", "image_size"} & set(shapes):
                    missing.append("sequence_length (encoders), image_size (images) or prefill_len and max_context "
                                   "(causal LMs)")
            if missing:
                raise _located_error(
                    ("static_shapes",), self.static_shapes, "npu_static_shapes",
                    "target npu-qnn needs static shapes; missing dimension(s): {missing} "
                    "(e.g. static_shapes with batch_size: 1 and sequence_length: 64, or image_size: 224, or "
                    "prefill_len: 128 and max_context: 256)",
                    {"missing": ", ".join(missing)},
                )
            bad = {k: v for k, v in self.static_shapes.items() if v < 1}
            if bad:
                raise _located_error(("static_shapes",), self.static_shapes, "npu_static_shapes",
                                     "static dimensions must be at least 1: {bad}", {"bad": _show(bad)})
        elif self.static_shapes is not None:
            raise _located_error(("static_shapes",), self.static_shapes, "npu_static_shapes",
                                 "static_shapes is for target npu-qnn; this export's target is {target}",
                                 {"target": self.target})
        return self


class Thresholds(BaseModel):
    """Pass/fail bounds of the accuracy check; a metric fails when it crosses its bound."""

    model_config = _FROZEN

    perplexity_ratio: StrictFloat | None = Field(
        None, gt=0, description="Max perplexity(compressed) / perplexity(reference)."
    )
    kl: StrictFloat | None = Field(
        None, ge=0, description="Max mean KL divergence of the next-token distributions (reference || compressed)."
    )
    top1_agreement: StrictFloat | None = Field(
        None, ge=0, le=1, description="Min fraction of positions (causal LMs) or images (image classifiers) where "
        "both models' top-1 agree."
    )
    cosine_mean: StrictFloat | None = Field(
        None, ge=-1, le=1, description="Sentence encoders: min mean cosine of the embeddings to the reference's."
    )
    cosine_worst: StrictFloat | None = Field(
        None, ge=-1, le=1, description="Sentence encoders: min cosine of the worst sentence."
    )
    top5_agreement: StrictFloat | None = Field(
        None, ge=0, le=1, description="Image classifiers: min fraction of images whose reference top-1 class is "
        "in the compressed model's top 5.")
    neighbor_agreement: StrictFloat | None = Field(
        None, ge=0, le=1, description="Sentence encoders: min fraction of sentences whose nearest neighbour "
        "(among the evaluated ones) is the reference's.")


class CheckSpec(BaseModel):
    """Accuracy check of one export target against the uncompressed model."""

    model_config = _FROZEN

    runtime: Runtime = Field("ort-cpu", description=f"Runtime to run the export on: {', '.join(RUNTIMES)}.")
    export: Slug | None = Field(
        None, description="Name of the export target to check; default: the first non-reference one."
    )
    data: DataSource = Field(
        "pydoc:eval", description="Evaluation text: 'pydoc:eval' or a path to a .txt/.jsonl file; images: "
        "'skimage:eval' or a folder of images."
    )
    seq_len: StrictInt = Field(512, ge=8, description="Tokens per evaluation window (max tokens per sentence for encoders).")
    windows: StrictInt = Field(8, ge=1, description="Number of evaluation windows (sentences for encoders).")
    thresholds: Annotated[Thresholds, BeforeValidator(lambda v: {} if v is None else v)] = Field(
        default_factory=Thresholds,
        description="Bounds that fail the check: perplexity_ratio (max), kl (max), top1_agreement (min) for "
        "causal LMs; cosine_mean, cosine_worst, neighbor_agreement (min) for sentence encoders.",
    )


class BenchSpec(BaseModel):
    """Speed benchmark of one or more export targets, side by side."""

    model_config = _FROZEN

    runtime: Runtime = Field("ort-cpu", description=f"Runtime to benchmark on: {', '.join(RUNTIMES)}.")
    export: Annotated[tuple[Slug, ...] | None, BeforeValidator(_listify)] = Field(
        None, min_length=1, description="Names of the export targets to benchmark; default: all of them."
    )
    prompt_tokens: StrictInt = Field(512, ge=1, description="Prompt length (prefill tokens).")
    new_tokens: StrictInt = Field(128, ge=1, description="Tokens generated after the prompt (decode).")
    threads: StrictInt = Field(2, ge=1, description="CPU threads for the runtime.")
    repeats: StrictInt = Field(3, ge=1, description="Timed repetitions (the median is reported).")


class Recipe(BaseModel):
    """A compression recipe: model, calibration, steps, exports, check and bench."""

    model_config = _FROZEN

    name: Slug = Field(description="Recipe name, [a-z0-9._-]+; used as the artifact folder name.")
    description: StrictStr | None = Field(None, description="Free text describing the recipe.")
    model: ModelSpec = Field(description="The model to compress.")
    calibration: Annotated[CalibrationSpec, BeforeValidator(lambda v: {} if v is None else v)] = Field(
        default_factory=CalibrationSpec, description="Calibration data for the steps."
    )
    steps: Annotated[tuple[Step, ...], BeforeValidator(lambda v: () if v is None else v)] = Field(
        (), description="Ordered compression steps; each item is a one-key mapping {step_type: config}."
    )
    export: tuple[ExportSpec, ...] = Field(min_length=1, description="Export targets, at least one.")
    check: CheckSpec | None = Field(None, description="Optional accuracy check of one export target.")
    bench: BenchSpec | None = Field(None, description="Optional speed benchmark of export targets.")

    # -- cross-field checks (field validators run in field order, so `export` is in info.data)

    @field_validator("steps")
    @classmethod
    def _distill_not_after_steer(cls, steps: tuple[StepConfig, ...]) -> tuple[StepConfig, ...]:
        types = [s.step_type for s in steps]
        if "steer" in types and "distill" in types[types.index("steer"):]:
            raise _located_error(("steps", types.index("distill", types.index("steer"))), "distill", "step_order",
                                 "distill pulls the model toward the model as loaded, so after a steer step it would "
                                 "train the steering away; put distill before steer", {})
        return steps

    @field_validator("export")
    @classmethod
    def _name_exports(cls, exports: tuple[ExportSpec, ...]) -> tuple[ExportSpec, ...]:
        named = tuple(
            e if e.name is not None else e.model_copy(update={"name": f"{e.format}{i}"})
            for i, e in enumerate(exports)
        )
        seen: dict[str, int] = {}
        problems = []
        for i, e in enumerate(named):
            if e.name in seen:
                problems.append(_detail(
                    (i, "name"), e.name, "duplicate_export",
                    "duplicate export name {value} (also export[{first}]); export names must be unique",
                    {"value": _show(e.name), "first": seen[e.name]},
                ))
            else:
                seen[e.name] = i  # type: ignore[index]
        if problems:
            raise ValidationError.from_exception_data("ExportSpec", problems)
        return named

    @field_validator("export")
    @classmethod
    def _npu_shapes_fit_data(cls, exports: tuple[ExportSpec, ...], info: ValidationInfo) -> tuple[ExportSpec, ...]:
        cal: CalibrationSpec | None = info.data.get("calibration")
        if cal is None:
            return exports
        need = "image_size" if is_image_source(cal.data) else "sequence_length"
        problems = [_detail((i, "static_shapes"), e.static_shapes, "npu_static_shapes",
                            "target npu-qnn needs static shapes; missing dimension(s): {missing} (calibration data "
                            "{data} is {kind})", {"missing": need, "data": _show(cal.data),
                                                 "kind": "images" if need == "image_size" else "text"})
                    for i, e in enumerate(exports) if e.target == "npu-qnn" and need not in (e.static_shapes or {})
                    and not (need == "sequence_length" and "prefill_len" in (e.static_shapes or {}))]  # causal LMs
        if problems:
            raise ValidationError.from_exception_data("ExportSpec", problems)
        return exports

    @field_validator("check")
    @classmethod
    def _resolve_check(cls, check: CheckSpec | None, info: ValidationInfo) -> CheckSpec | None:
        exports: tuple[ExportSpec, ...] | None = info.data.get("export")
        if check is None or not exports:
            return check
        names = [e.name for e in exports]
        if check.export is None:
            first = next((e for e in exports if not e.reference), exports[0])
            return check.model_copy(update={"export": first.name})
        if check.export not in names:
            raise _unknown_export(("export",), check.export, names)
        return check

    @field_validator("bench")
    @classmethod
    def _resolve_bench(cls, bench: BenchSpec | None, info: ValidationInfo) -> BenchSpec | None:
        exports: tuple[ExportSpec, ...] | None = info.data.get("export")
        if bench is None or not exports:
            return bench
        names = [e.name for e in exports]
        if bench.export is None:
            return bench.model_copy(update={"export": tuple(names)})
        problems = [
            _unknown_export_detail(("export", i), n, names)
            for i, n in enumerate(bench.export) if n not in names
        ]
        if problems:
            raise ValidationError.from_exception_data("BenchSpec", problems)
        return bench

    # -- conveniences

    def export_named(self, name: str) -> ExportSpec:
        """The export target called ``name`` (RecipeError if there is none)."""
        for e in self.export:
            if e.name == name:
                return e
        raise RecipeError(
            f"recipe {self.name!r} has no export target {name!r}",
            hint="export targets: " + ", ".join(str(e.name) for e in self.export),
        )


def _detail(loc: tuple, value: Any, kind: str, message: str, ctx: dict) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError(kind, message, ctx), loc=loc, input=value)


def _located_error(loc: tuple, value: Any, kind: str, message: str, ctx: dict) -> ValidationError:
    return ValidationError.from_exception_data("Recipe", [_detail(loc, value, kind, message, ctx)])


def _unknown_export_detail(loc: tuple, name: str, names: list) -> InitErrorDetails:
    return _detail(
        loc, name, "unknown_export", "{value} is not an export target; export targets: {names}{suggest}",
        {"value": _show(name), "names": ", ".join(names), "suggest": _suggest(name, names)},
    )


def _unknown_export(loc: tuple, name: str, names: list) -> ValidationError:
    return ValidationError.from_exception_data("Recipe", [_unknown_export_detail(loc, name, names)])


def _suggest(word: Any, choices: list) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------------------
# YAML with line numbers
# --------------------------------------------------------------------------------------

_MAX_LINE_ENTRIES = 100_000  # guards the walk against alias bombs


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that records the line of every mapping key and sequence item by path."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.lines: dict[tuple, int] = {}
        self.duplicates: list[tuple[tuple, int, int]] = []  # (path, line, first line)

    def load_with_lines(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        self.lines[()] = node.start_mark.line + 1
        self._walk(node, (), set())
        return self.construct_document(node)

    def _walk(self, node: yaml.Node, path: tuple, active: set[int]) -> None:
        if id(node) in active or len(self.lines) > _MAX_LINE_ENTRIES:
            return  # recursive alias, or a pathological file
        active = active | {id(node)}
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                if not isinstance(key_node, yaml.ScalarNode):
                    continue  # construction reports unhashable keys
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in first_line:
                    self.duplicates.append((path + (key,), line, first_line[key]))
                    continue
                first_line[key] = line
                self.lines[path + (key,)] = line
                self._walk(value_node, path + (key,), active)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.lines[path + (i,)] = item.start_mark.line + 1
                self._walk(item, path + (i,), active)


def _load_yaml(text: str, source: str) -> tuple[Any, _LineLoader]:
    loader = _LineLoader(text)
    try:
        data = loader.load_with_lines()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" line {mark.line + 1}" if mark is not None else ""
        col = f" (column {mark.column + 1})" if mark is not None else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise RecipeError(
            f"{source}{where}: YAML syntax error{col}: {problem}",
            hint="check the indentation (spaces, not tabs), colons and quoting on that line",
        ) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: YAML syntax error: {exc}") from None
    finally:
        loader.dispose()
    return data, loader


# --------------------------------------------------------------------------------------
# ValidationError -> one RecipeError
# --------------------------------------------------------------------------------------


def _format_path(loc: tuple) -> str:
    out = ""
    for el in loc:
        if isinstance(el, int) and not isinstance(el, bool):
            out += f"[{el}]"
        else:
            out += ("." if out else "") + str(el)
    return out


def _line_for(loc: tuple, lines: dict[tuple, int]) -> int | None:
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


class _StepMarker:
    """Stands for "a step item" while walking the schema along an error location."""


def _unwrap(tp: Any) -> Any:
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            args = get_args(tp)
            if args[0] is StepConfig:
                return _StepMarker
            tp = args[0]
        elif origin is Union or origin is types.UnionType:
            rest = [a for a in get_args(tp) if a is not type(None)]
            if len(rest) != 1:
                return tp
            tp = rest[0]
        else:
            return tp


def _schema_at(loc: tuple) -> Any:
    """The model class (or _StepMarker) that the location ``loc`` points into, or None."""
    cur: Any = Recipe
    for el in loc:
        if cur is _StepMarker:
            cur = STEP_TYPES.get(el) if isinstance(el, str) else None
        elif isinstance(cur, type) and issubclass(cur, BaseModel):
            field = cur.model_fields.get(el) if isinstance(el, str) else None
            if field is None:
                return None
            cur = _unwrap(field.annotation)
            if cur is StepConfig:
                cur = _StepMarker
        elif get_origin(cur) is tuple and isinstance(el, int):
            cur = _unwrap(get_args(cur)[0])
        else:
            return None
        if cur is None:
            return None
    return cur


def _field_at(loc: tuple) -> Any:
    parent = _schema_at(loc[:-1]) if loc else None
    if isinstance(parent, type) and issubclass(parent, BaseModel) and isinstance(loc[-1], str):
        return parent.model_fields.get(loc[-1])
    return None


_TYPE_WORDS = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number",
    "bool_type": "true or false", "bool_parsing": "true or false",
    "string_type": "a string",
    "tuple_type": "a list", "list_type": "a list",
    "model_type": "a mapping", "model_attributes_type": "a mapping", "dict_type": "a mapping",
}


def _describe(err: dict) -> str:
    kind, loc, value = err["type"], tuple(err["loc"]), err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        parent = _schema_at(loc[:-1])
        key = loc[-1] if loc else "?"
        if parent is _StepMarker:
            valid = sorted(STEP_TYPES)
            return f"unknown step type; valid step types: {', '.join(valid)}{_suggest(key, valid)}"
        if isinstance(parent, type) and issubclass(parent, BaseModel):
            valid = sorted(parent.model_fields)
            return f"unknown key; valid keys: {', '.join(valid)}{_suggest(key, valid)}"
        return "unknown key"
    if kind == "missing":
        field = _field_at(loc)
        desc = f" ({field.description.rstrip('.')})" if field is not None and field.description else ""
        return f"missing required key{desc}"
    if kind in _TYPE_WORDS:
        return f"expected {_TYPE_WORDS[kind]}, got {_show(value)}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()), "?")
        return f"must be {op} {bound}, got {_show(value)}"
    if kind in ("too_short", "string_too_short"):
        n = ctx.get("min_length", 1)
        what = "character" if kind == "string_too_short" else "item"
        return f"must have at least {n} {what}{'s' if n != 1 else ''}, got {_show(value)}"
    if kind == "invalid_key":
        return f"keys must be strings, got {_show(value)}"
    if kind == "literal_error":
        return f"{_show(value)} is not one of {ctx.get('expected', '?')}"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    return str(err.get("msg", kind))


def _to_recipe_error(
    errors: list[tuple[int | None, str, str]], source: str
) -> RecipeError:
    errors = sorted(errors, key=lambda e: (e[0] is None, e[0] or 0))
    lines = []
    for line, path, msg in errors:
        where = f"{source} line {line}" if line is not None else source
        lines.append(f"{where}: {path}: {msg}" if path else f"{where}: {msg}")
    err = RecipeError(
        "\n".join(lines),
        hint="run `edgecompress explain` to list every recipe key with its choices",
    )
    err.problems = errors  # type: ignore[attr-defined]
    return err


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def parse_recipe(text: str, source_name: str = "<recipe>") -> Recipe:
    """Validate recipe YAML ``text``; ``source_name`` prefixes every error line."""
    data, loader = _load_yaml(text, source_name)
    if data is None:
        raise RecipeError(
            f"{source_name}: the recipe is empty",
            hint="a recipe needs at least: name, model: {source: ...}, steps, export",
        )
    if not isinstance(data, dict):
        line = loader.lines.get((), 1)
        raise RecipeError(
            f"{source_name} line {line}: the top level of a recipe must be a mapping of keys "
            f"({', '.join(Recipe.model_fields)}), got {_show(data)}",
        )
    problems: list[tuple[int | None, str, str]] = [
        (line, _format_path(path), f"duplicate key (first set on line {first})")
        for path, line, first in loader.duplicates
    ]
    recipe: Recipe | None = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        nested = [tuple(e["loc"]) for e in errors]
        for err in errors:
            loc = tuple(err["loc"])
            if err["type"] == "too_short" and any(len(n) > len(loc) and n[: len(loc)] == loc for n in nested):
                continue  # pydantic counts only the valid items; the item errors say it all
            problems.append((_line_for(loc, loader.lines), _format_path(loc), _describe(err)))
    if problems or recipe is None:
        raise _to_recipe_error(problems, source_name)
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate the recipe file at ``path`` (RecipeError on any problem)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise RecipeError(
            f"recipe file not found: {p}",
            hint="pass the path of a .yaml recipe, e.g. recipes/smollm2-135m-int4.yaml",
        ) from None
    except IsADirectoryError:
        raise RecipeError(f"recipe path is a folder, not a file: {p}",
                          hint="pass the path of a .yaml recipe file") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{p}: not a UTF-8 text file ({exc.reason} at byte {exc.start})",
                          hint="a recipe is a UTF-8 YAML text file") from None
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {p}: {exc.strerror or exc}") from None
    return parse_recipe(text, str(path))


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """A plain JSON-able dict of ``recipe`` (defaults resolved) that ``parse_recipe`` accepts back."""
    return recipe.model_dump(mode="json")
