"""Shared steps of the end-to-end tests on the real SmolLM2: a shipped recipe shrunk to CI size, and the
metrics of a torch baseline on the same held-out windows the recipe's check used."""

import json
from pathlib import Path

import torch
import yaml

from edgecompress.check import check_causal_lm
from edgecompress.data import load_text, token_windows
from edgecompress.pipeline import run_recipe
from edgecompress.recipe import parse_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SEQ_LEN, WINDOWS = 256, 2


def run_small(recipe: str, out: Path, steps: dict[int, dict] | None = None) -> tuple[dict, dict]:
    """Run ``recipes/<recipe>`` on 8 x 256 calibration tokens, its first export only, checked on 2 x 256
    held-out tokens without thresholds, no bench; ``steps`` updates step ``i``'s keys (``{i: {key: value}}``);
    returns (the recipe as run, its report)."""
    spec = yaml.safe_load((RECIPES / recipe).read_text())
    spec["calibration"].update(samples=8, seq_len=SEQ_LEN)
    spec["check"].update(windows=WINDOWS, seq_len=SEQ_LEN)
    spec["check"]["thresholds"] = {}
    spec["export"] = [spec["export"][0]]
    spec.pop("bench", None)
    for i, keys in (steps or {}).items():
        next(iter(spec["steps"][i].values())).update(keys)
    return spec, run_recipe(parse_recipe(json.dumps(spec)), out, progress=False)


def baseline_check(model: torch.nn.Module, reference: torch.nn.Module, tokenizer) -> dict:
    """Check metrics of a torch ``model`` against ``reference`` on the windows :func:`run_small` checks on."""
    windows = token_windows(tokenizer, load_text("pydoc:eval"), SEQ_LEN, WINDOWS, seed=0)

    def logits(ids):
        with torch.no_grad():
            return model(input_ids=torch.as_tensor(ids)[None], use_cache=False).logits[0].numpy()

    return check_causal_lm(logits, reference, windows)
