"""End to end on the real SmolLM2-135M-Instruct: the shipped concise-steering recipe with a small
budget (a few prompts, short answers). Slow: it loads the real model and generates."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from edgecompress.compress.steer import added_to_stream
from edgecompress.runtimes import open_runtime

from edgecompress.artifact import Artifact
from edgecompress.data import load_prompts, load_text, token_windows
from edgecompress.models import load_model
from edgecompress.pipeline import run_recipe
from edgecompress.recipe import parse_recipe
from edgecompress.steer_eval import answers, runtime_generate_fn

pytestmark = pytest.mark.slow
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m-steer-concise.yaml"


def test_concise_steering_is_baked_exported_and_shortens_answers(tmp_path):
    spec = yaml.safe_load(RECIPE.read_text())
    spec["calibration"].update(samples=2, seq_len=128)
    spec["steps"][0]["steer"].update(kl_tokens=128, search_steps=4)  # 4 halvings reach 0.125
    spec.pop("check", None)
    run_recipe(parse_recipe(json.dumps(spec)), tmp_path, progress=False, bench=False)
    steered = Artifact.load(tmp_path / spec["name"] / "steered")
    recs = [r for s in steered.manifest["steps"] if s["step"] == "steer" for r in s["modules"]]
    assert [r["layer"] for r in recs] == spec["steps"][0]["steer"]["layers"]  # one record per steered layer
    for rec in recs:
        assert rec["strength"] > 0 and rec["neutral_kl"] <= spec["steps"][0]["steer"]["kl_bound"]

    # the baked ONNX artifact equals the unsteered model with the vector added by a hook, to within
    # 1e-4 or the difference ORT and torch already have on the unsteered model, whichever is larger
    reference = load_model("smollm2-135m").model
    tok = steered.tokenizer()
    ids = token_windows(tok, load_text("pydoc:eval"), 64, 1, seed=0)[0]
    fp32 = Artifact.load(tmp_path / spec["name"] / "fp32")
    with torch.no_grad():
        floor = float(np.abs(open_runtime("ort-cpu", fp32).logits(ids.numpy())
                             - reference(input_ids=ids[None], use_cache=False).logits[0].numpy()).max())
    vecs = {r["layer"]: torch.tensor(r["direction"]) * r["norm"] * r["strength"] for r in recs}
    with torch.no_grad(), added_to_stream(reference, vecs):
        hooked = reference(input_ids=ids[None], use_cache=False).logits[0].numpy()
    baked = open_runtime("ort-cpu", steered).logits(ids.numpy())
    assert float(np.abs(baked - hooked).max()) <= max(1e-4, 1.5 * floor)
    assert float(np.abs(hooked - reference(input_ids=ids[None], use_cache=False).logits[0].detach().numpy()).max()) > 0.1

    # and its answers to held-out prompts are shorter than the unsteered model's
    prompts = load_prompts("builtin:concise-eval")[:4]
    ref = answers(runtime_generate_fn(open_runtime("ort-cpu", fp32)), tok, prompts, 96)
    got = answers(runtime_generate_fn(open_runtime("ort-cpu", steered)), tok, prompts, 96)
    assert sum(a["tokens"] for a in got) < sum(a["tokens"] for a in ref)
