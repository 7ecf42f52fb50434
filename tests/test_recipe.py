"""Recipe schema: shipped recipes, round trip, immutability, and error messages with lines."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import ClassVar

import pytest
from pydantic import ValidationError

import edgecompress.recipe as recipe_mod
from edgecompress.errors import RecipeError
from edgecompress.recipe import (
    STEP_TYPES,
    ExportSpec,
    QuantizeStep,
    Recipe,
    StepConfig,
    load_recipe,
    parse_recipe,
    recipe_to_dict,
    register_step_type,
)

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
SHIPPED = sorted(RECIPES.glob("*.yaml"))

MINIMAL = """\
name: mini
model:
  source: tiny-llama
steps:
  - quantize: {}
export:
  - format: onnx
"""


def errors_of(text: str, source: str = "x.yaml") -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe(textwrap.dedent(text), source)
    return str(info.value)


def problem_lines(message: str) -> list[str]:
    return [line for line in message.splitlines() if not line.lstrip().startswith("hint:")]


# -- shipped recipes ---------------------------------------------------------------------


def test_both_shipped_recipes_exist():
    names = {p.name for p in SHIPPED}
    assert {"smollm2-135m-int4.yaml", "tiny-llama-int4.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipe_parses_and_round_trips(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    as_dict = recipe_to_dict(recipe)
    text = json.dumps(as_dict)  # plain JSON-able
    again = parse_recipe(text, "manifest")
    assert again == recipe
    assert recipe_to_dict(again) == as_dict


def test_smollm2_recipe_values():
    r = load_recipe(RECIPES / "smollm2-135m-int4.yaml")
    assert r.model.source == "smollm2-135m" and r.model.allow_code is False
    assert (r.calibration.data, r.calibration.samples, r.calibration.seq_len) == ("pydoc:calib", 16, 512)
    emb, down, rest = r.steps
    assert all(isinstance(q, QuantizeStep) and q.method == "rtn" and q.symmetric for q in r.steps)
    assert (emb.bits, emb.group_size, emb.targets, emb.embeddings) == (8, 64, ("embed_tokens",), True)
    assert (down.bits, down.group_size, down.targets, down.embeddings) == (4, 128, ("down_proj",), False)
    assert (rest.bits, rest.group_size, rest.targets, rest.embeddings) == (4, 64, (".*",), False)
    assert rest.ignore == () and rest.scale_dtype == "float16"
    assert [e.name for e in r.export] == ["int4", "fp32"]
    assert r.export[0].reference is False and r.export[0].accuracy_level == 4 and r.export[0].target == "cpu"
    assert r.export[1].reference is True
    assert r.check is not None and r.check.export == "int4" and r.check.runtime == "ort-cpu"
    assert (r.check.data, r.check.seq_len, r.check.windows) == ("pydoc:eval", 512, 8)
    t = r.check.thresholds
    assert (t.perplexity_ratio, t.kl, t.top1_agreement) == (1.5, 0.45, 0.65)
    assert r.bench is not None and r.bench.export == ("int4", "fp32")
    assert (r.bench.prompt_tokens, r.bench.new_tokens, r.bench.threads, r.bench.repeats) == (512, 128, 2, 3)


def test_tiny_recipe_values():
    r = load_recipe(RECIPES / "tiny-llama-int4.yaml")
    assert r.model.source == "tiny-llama"
    assert (r.calibration.samples, r.calibration.seq_len) == (4, 64)
    assert r.steps[0].group_size == 32
    assert [e.name for e in r.export] == ["int4", "fp32"] and r.export[1].reference
    assert (r.check.windows, r.check.seq_len) == (2, 64)
    assert (r.check.thresholds.perplexity_ratio, r.check.thresholds.kl, r.check.thresholds.top1_agreement) == (
        1.5, None, 0.5)
    assert (r.bench.prompt_tokens, r.bench.new_tokens, r.bench.repeats) == (32, 8, 1)


# -- defaults, round trip, immutability ------------------------------------------------------


def test_minimal_recipe_defaults_are_resolved():
    r = parse_recipe(MINIMAL + "  - format: onnx\n    reference: true\ncheck: {}\nbench: {}\n")
    assert r.calibration.samples == 32 and r.calibration.data == "pydoc:calib"
    assert r.steps[0].group_size == 128  # int4 default
    assert [e.name for e in r.export] == ["onnx0", "onnx1"]  # format + index
    assert r.check.export == "onnx0"  # first non-reference
    assert r.bench.export == ("onnx0", "onnx1")  # all targets
    assert parse_recipe(json.dumps(recipe_to_dict(r))) == r


def test_check_defaults_to_first_non_reference_export():
    r = parse_recipe(textwrap.dedent("""\
        name: a
        model: {source: tiny-llama}
        export:
          - {name: ref, reference: true}
          - {name: q}
        check: {}
    """))
    assert r.check.export == "q"


def test_int8_defaults_to_per_channel_and_zero_means_per_channel():
    r = parse_recipe(MINIMAL.replace("quantize: {}", "quantize: {bits: 8}"))
    assert r.steps[0].group_size is None
    r = parse_recipe(MINIMAL.replace("quantize: {}", "quantize: {bits: 4, group_size: 0}"))
    assert r.steps[0].group_size is None
    r = parse_recipe(MINIMAL.replace("quantize: {}", "quantize: {bits: 8, group_size: 64}"))
    assert r.steps[0].group_size == 64


def test_empty_step_config_means_defaults():
    r = parse_recipe(MINIMAL.replace("quantize: {}", "quantize:"))
    assert r.steps[0] == QuantizeStep()


def test_module_function_source_with_allow_code():
    r = parse_recipe(MINIMAL.replace("source: tiny-llama", "source: mypkg.models:build\n  allow_code: true"))
    assert r.model.is_module_function


def test_recipe_is_frozen():
    r = load_recipe(RECIPES / "tiny-llama-int4.yaml")
    with pytest.raises(ValidationError):
        r.name = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        r.steps[0].bits = 8  # type: ignore[misc]
    with pytest.raises(ValidationError):
        r.export[0].reference = True  # type: ignore[misc]
    assert isinstance(r.steps, tuple) and isinstance(r.export, tuple)
    hash(r)  # frozen models of tuples are hashable


def test_every_field_has_a_description():
    models = [Recipe, recipe_mod.ModelSpec, recipe_mod.CalibrationSpec, ExportSpec, recipe_mod.CheckSpec,
              recipe_mod.Thresholds, recipe_mod.BenchSpec, *STEP_TYPES.values()]
    for model in models:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
    schema = Recipe.model_json_schema()
    assert "QuantizeStep" in schema["$defs"]


def test_python_construction():
    r = Recipe(name="py", model={"source": "tiny-llama"}, steps=[QuantizeStep(bits=8)], export=[ExportSpec()])
    assert r.steps[0].bits == 8 and r.export[0].name == "onnx0"
    (step,) = recipe_to_dict(r)["steps"]
    assert list(step) == ["quantize"] and step["quantize"]["bits"] == 8 and step["quantize"]["group_size"] is None


# -- error messages ------------------------------------------------------------------------


def test_unknown_key_names_line_path_valid_keys_and_suggestion():
    msg = errors_of("""\
        name: a
        model:
          source: tiny-llama
        steps:
          - quantize:
              bitz: 4
        export:
          - format: onnx
    """, "recipes/x.yaml")
    assert "recipes/x.yaml line 6: steps[0].quantize.bitz: unknown key; valid keys: act_order, activations, bits, damp, dtype, embeddings, float_targets, group_size, " in msg
    assert "did you mean 'bits'?" in msg


def test_bad_choice_names_line_and_choices():
    msg = errors_of(MINIMAL.replace("quantize: {}", "quantize:\n      bits: 5"))
    assert "x.yaml line 6: steps[0].quantize.bits: 5 is not one of 3, 4, 8" in msg
    msg = errors_of(MINIMAL.replace("quantize: {}", "quantize: {group_size: 48, scale_dtype: bf16}"))
    assert "line 5: steps[0].quantize.group_size: 48 is not one of 32, 64, 128, null" in msg
    assert "line 5: steps[0].quantize.scale_dtype: 'bf16' is not one of 'float16', 'float32'" in msg
    msg = errors_of(MINIMAL + "    accuracy_level: true\n")
    assert "line 8: export[0].accuracy_level: true is not one of 0, 1, 2, 3, 4" in msg


def test_wrong_type_names_line_and_expected_type():
    msg = errors_of("""\
        name: a
        calibration:
          samples: many
        model: {source: tiny-llama}
        export: [{format: onnx}]
    """)
    assert "x.yaml line 3: calibration.samples: expected an integer, got 'many'" in msg
    msg = errors_of(MINIMAL.replace("quantize: {}", "quantize: {symmetric: 'yes'}"))
    assert "steps[0].quantize.symmetric: expected true or false, got 'yes'" in msg


def test_refit_scales_needs_gptq():
    msg = errors_of(MINIMAL.replace("quantize: {}", "quantize: {method: rtn, refit_scales: true}"))
    assert "steps[0].quantize.refit_scales: refit_scales refits the scales of GPTQ's codes" in msg
    assert "method rtn has none: set method: gptq or drop refit_scales" in msg
    step = parse_recipe(textwrap.dedent(MINIMAL.replace("quantize: {}", "quantize: {method: gptq, refit_scales: true}")),
                        "x.yaml").steps[0]
    assert step.refit_scales and step.method == "gptq"


def test_int8_rows_and_float_targets_need_gptq_int4():
    msg = errors_of(MINIMAL.replace("quantize: {}", "quantize: {method: rtn, int8_rows: 512, float_targets: 0.25}"))
    assert "steps[0].quantize.int8_rows: int8_rows is chosen and quantized with GPTQ's LM-head pass" in msg
    msg = errors_of(MINIMAL.replace("quantize: {}", "quantize: {method: gptq, bits: 8, int8_rows: 512}"))
    assert "with bits 8 there is nothing finer to keep them at: use bits: 4 or drop int8_rows" in msg
    msg = errors_of(MINIMAL.replace("quantize: {}", "quantize: {method: rtn, float_targets: 0.25}"))
    assert "steps[0].quantize.float_targets: float_targets changes the weights GPTQ rounds" in msg
    step = parse_recipe(textwrap.dedent(MINIMAL.replace(
        "quantize: {}", "quantize: {method: gptq, int8_rows: 512, float_targets: 0.25}")), "x.yaml").steps[0]
    assert step.int8_rows == 512 and step.float_targets == 0.25


def test_out_of_range_value():
    msg = errors_of(MINIMAL + "calibration: {samples: 0, seq_len: 4}\n")
    assert "line 8: calibration.samples: must be >= 1, got 0" in msg
    assert "line 8: calibration.seq_len: must be >= 8, got 4" in msg


def test_bad_regex_names_the_regex():
    msg = errors_of(MINIMAL.replace("quantize: {}", "quantize:\n      targets:\n        - '.*'\n        - '['"))
    assert "line 8: steps[0].quantize.targets[1]: invalid regular expression '['" in msg


def test_unknown_step_type_lists_valid_types():
    msg = errors_of(MINIMAL.replace("quantize: {}", "quantise: {}"))
    from edgecompress.recipe import STEP_TYPES

    valid = ", ".join(sorted(STEP_TYPES))
    assert "quantize" in STEP_TYPES and "awq" in STEP_TYPES
    assert f"line 5: steps[0].quantise: unknown step type; valid step types: {valid} (did you mean 'quantize'?)" in msg


def test_malformed_step_items():
    msg = errors_of(MINIMAL.replace("- quantize: {}", "- quantize\n  - {}"))
    assert "line 5: steps[0]: expected a one-key mapping" in msg
    assert "line 6: steps[1]: expected a one-key mapping" in msg
    assert "step types: quantize" in msg


def test_check_and_bench_must_name_existing_exports():
    msg = errors_of(MINIMAL + "    name: int4\n  - name: fp32\n    reference: true\n"
                    "check:\n  export: int5\nbench:\n  export: [int4, fp16]\n")
    assert "line 12: check.export: 'int5' is not an export target; export targets: int4, fp32 (did you mean 'int4'?)" in msg
    assert "line 14: bench.export[1]: 'fp16' is not an export target; export targets: int4, fp32" in msg


def test_duplicate_export_names():
    msg = errors_of(MINIMAL + "    name: int4\n  - format: onnx\n    name: int4\n")
    assert "line 10: export[1].name: duplicate export name 'int4' (also export[0]); export names must be unique" in msg


def test_module_function_needs_allow_code():
    msg = errors_of(MINIMAL.replace("source: tiny-llama", "source: mypkg.models:build"))
    assert "line 3: model.source: 'mypkg.models:build' is a module:function source" in msg
    assert "allow_code: true" in msg


def test_threshold_keys_are_limited():
    msg = errors_of(MINIMAL + "check:\n  thresholds:\n    ppl: 1.5\n")
    assert "line 10: check.thresholds.ppl: unknown key; valid keys: cosine_mean, cosine_worst, kl, neighbor_agreement, perplexity_ratio, top1_agreement" in msg


def test_missing_required_keys():
    msg = errors_of("name: a\nmodel: {}\n")
    assert "x.yaml line 2: model.source: missing required key" in msg
    assert "export: missing required key" in msg


def test_bad_name():
    msg = errors_of(MINIMAL.replace("name: mini", "name: SmolLM/x"))
    assert "line 1: name: 'SmolLM/x' is not a valid name" in msg


def test_duplicate_yaml_key():
    msg = errors_of(MINIMAL + "calibration:\n  samples: 4\n  samples: 8\n")
    assert "line 10: calibration.samples: duplicate key (first set on line 9)" in msg


def test_multiple_errors_in_one_recipe_error_sorted_by_line():
    msg = errors_of("""\
        name: a
        model:
          source: tiny-llama
        calibration:
          samples: many
        steps:
          - quantize:
              bitz: 4
              bits: 5
          - shrink: {}
        export:
          - format: tflite
        bench:
          threads: 0
    """)
    lines = problem_lines(msg)
    assert lines == [
        "x.yaml line 5: calibration.samples: expected an integer, got 'many'",
        "x.yaml line 8: steps[0].quantize.bitz: unknown key; valid keys: act_order, activations, bits, damp, dtype, "
        "embeddings, float_targets, group_size, ignore, int8_rows, method, preset, refit_scales, scale_dtype, symmetric, "
        "targets (did you mean 'bits'?)",
        "x.yaml line 9: steps[0].quantize.bits: 5 is not one of 3, 4, 8",
        f"x.yaml line 10: steps[1].shrink: unknown step type; valid step types: {', '.join(sorted(STEP_TYPES))}",
        "x.yaml line 12: export[0].format: 'tflite' is not one of 'onnx', 'tvm'",
        "x.yaml line 14: bench.threads: must be >= 1, got 0",
    ]
    assert "hint:" in msg


# -- file-level errors -----------------------------------------------------------------------


def test_file_not_found(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found: .*nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")


def test_path_is_a_folder(tmp_path):
    with pytest.raises(RecipeError, match="folder"):
        load_recipe(tmp_path)


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: a\nmodel:\n  source: x\n   allow_code: true\nexport: [\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert msg.startswith(f"{path} line 4: YAML syntax error")


def test_yaml_tab_indentation_error():
    msg = errors_of("name: a\nmodel:\n\tsource: x\n")
    assert "x.yaml line 3: YAML syntax error" in msg


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(text, tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match="empty"):
        load_recipe(path)


@pytest.mark.parametrize("text, got", [("- a\n- b\n", "a list"), ("just a string\n", "'just a string'")])
def test_top_level_not_a_mapping(text, got):
    msg = errors_of(text)
    assert "x.yaml line 1: the top level of a recipe must be a mapping" in msg and got in msg


def test_recursive_yaml_alias_does_not_hang():
    msg = errors_of("name: a\nmodel: &m {source: x, self: *m}\nexport: [{}]\n")
    assert "model.self: unknown key" in msg


# -- extensibility ---------------------------------------------------------------------------


@pytest.fixture
def restore_step_types():
    saved = dict(STEP_TYPES)
    yield
    STEP_TYPES.clear()
    STEP_TYPES.update(saved)
    recipe_mod._rebuild_steps()


def test_register_a_new_step_type(restore_step_types):
    class ThinStep(StepConfig):
        """Thinning (test-only)."""

        step_type: ClassVar[str] = "thin_out"
        sparsity: float = 0.5

    register_step_type(ThinStep)
    r = parse_recipe(MINIMAL.replace("- quantize: {}", "- thin_out: {sparsity: 0.25}\n  - quantize: {}"))
    assert isinstance(r.steps[0], ThinStep) and r.steps[0].sparsity == 0.25
    assert parse_recipe(json.dumps(recipe_to_dict(r))) == r
    msg = errors_of(MINIMAL.replace("quantize: {}", "thin_ou: {}"))
    assert f"valid step types: {', '.join(sorted(STEP_TYPES))} (did you mean 'thin_out'?)" in msg
    assert "thin_out" in STEP_TYPES
    with pytest.raises(ValueError):
        register_step_type(type("Other", (StepConfig,), {"step_type": "thin_out", "__annotations__": {}}))


def test_every_shipped_recipe_validates_and_names_a_known_model():
    from edgecompress.models import list_models

    aliases = {m.alias for m in list_models()}
    recipes = sorted(RECIPES.glob("*.yaml"))
    assert len(recipes) >= 4
    for path in recipes:
        r = load_recipe(path)
        assert r.model.source in aliases, path
        assert r.name == path.stem, f"{path.name}: name {r.name!r} should match the file name"
