"""Does baked steering work? Effect and side effect of a steered model on held-out prompts.

* **effect**: greedy answers of the steered model and of the unsteered reference to the same
  held-out prompts (chat template): mean answer length in tokens (``length_reduction`` =
  steered / reference - 1, negative = shorter) and a judged sentiment score per answer
  (``sentiment_shift`` = steered - reference). The judge is the bundled MiniLM sentence encoder:
  score = cos(answer, positive label descriptions) - cos(answer, negative label descriptions)
  (the mean embedding of each side's descriptions in :data:`LABELS`). A word-count lexicon
  score (:data:`LEXICON`, (positive - negative words) per 100 words) is reported beside it.
* **side effect**: perplexity ratio and KL(reference || steered) on neutral held-out text
  (:func:`edgecompress.check.check_causal_lm`).

Plain functions over callables, so the same numbers come from an artifact on a runtime
(``edgecompress steer-eval``) or from a hooked torch model (the benchmark's strength sweep).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .check import check_causal_lm
from .progress import track

log = logging.getLogger(__name__)

#: text -> generated token ids (greedy), given prompt ids, a token budget and the EOS id
GenerateFn = Callable[[list[int], int, "int | None"], list[int]]

LABELS = {
    "positive": ["This is a happy, cheerful and positive text.", "Everything is wonderful, delightful and great.",
                 "I love it; it makes me joyful and grateful."],
    "negative": ["This is a sad, gloomy and negative text.", "Everything is terrible, awful and miserable.",
                 "I hate it; it makes me angry and bitter."],
}

LEXICON = {
    "positive": {
        "good", "great", "wonderful", "delightful", "happy", "happiness", "joy", "joyful", "love",
        "lovely", "loved", "beautiful", "amazing", "excellent", "fantastic", "cheerful", "bright",
        "warm", "pleasant", "enjoy", "enjoyed", "enjoying", "fun", "glad", "grateful", "exciting",
        "excited", "perfect", "smile", "smiles", "smiling", "laugh", "laughter", "delight", "hope",
        "hopeful", "peaceful", "best", "brilliant", "charming", "awesome", "marvelous", "magical",
        "vibrant", "thrilled", "blessed"
    },
    "negative": {
        "bad", "terrible", "awful", "horrible", "sad", "sadness", "gloomy", "miserable", "hate",
        "hated", "angry", "anger", "bitter", "dull", "boring", "ugly", "worst", "pain", "painful",
        "cry", "tears", "lonely", "alone", "fear", "afraid", "dark", "grim", "dreary", "depressing",
        "depressed", "unpleasant", "disappointing", "disappointed", "annoying", "annoyed", "tired",
        "hopeless", "despair", "gray", "grey", "cold", "suffering", "broken", "nasty", "sorrow",
        "misery", "tragic"
    },
}


def lexicon_score(text: str) -> float:
    """(positive words - negative words) per 100 words of ``text`` (0 for an empty text)."""
    words = re.findall(r"[a-z]+", text.lower())
    if not words:
        return 0.0
    pos = sum(w in LEXICON["positive"] for w in words)
    neg = sum(w in LEXICON["negative"] for w in words)
    return 100.0 * (pos - neg) / len(words)


class SentimentJudge:
    """MiniLM cosine to positive minus cosine to negative label descriptions."""

    def __init__(self, encoder: nn.Module | None = None, tokenizer: Any = None):
        if encoder is None:
            from .models import load_model

            lm = load_model("minilm-l6")
            encoder, tokenizer = lm.model, lm.tokenizer
        self.encoder, self.tokenizer = encoder.eval(), tokenizer
        self.labels = {k: self._centroid(v) for k, v in LABELS.items()}

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=256, return_tensors="pt")
        return self.encoder(enc["input_ids"], enc["attention_mask"])

    def _centroid(self, texts: Sequence[str]) -> torch.Tensor:
        c = self.embed(texts).mean(0)
        return c / c.norm()

    def score(self, texts: Sequence[str]) -> list[float]:
        if not texts:
            return []
        e = self.embed([t if t.strip() else "." for t in texts])
        return (e @ self.labels["positive"] - e @ self.labels["negative"]).tolist()


def torch_generate_fn(model: nn.Module) -> GenerateFn:
    """Greedy generation with a torch causal LM (``model.generate``), as a :data:`GenerateFn`."""

    @torch.no_grad()
    def gen(prompt_ids: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
        ids = torch.tensor([prompt_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=eos if eos is not None else 0)
        return out[0, len(prompt_ids):].tolist()

    return gen


def runtime_generate_fn(rt: Any) -> GenerateFn:
    """An artifact runtime's greedy generation as a :data:`GenerateFn`."""
    return lambda ids, n, eos: rt.generate(list(ids), n, eos_token_id=eos).tokens


def answers(gen: GenerateFn, tok: Any, prompts: Sequence[str], max_new_tokens: int, *, what: str = "generating",
            progress: bool = False) -> list[dict]:
    """Greedy answers to ``prompts`` (chat template when the tokenizer has one): text and token count
    (the end-of-sequence token not counted)."""
    eos = tok.eos_token_id
    out = []
    for p in track(prompts, len(prompts), what, progress):
        if getattr(tok, "chat_template", None):
            ids = list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
        else:
            ids = tok(p)["input_ids"]
        toks = gen(ids, max_new_tokens, eos)
        if eos is not None and eos in toks:
            toks = toks[: toks.index(eos)]
        out.append({"prompt": p, "tokens": len(toks), "text": tok.decode(toks, skip_special_tokens=True)})
    return out


def effect(steered: list[dict], reference: list[dict], judge: SentimentJudge | None) -> dict[str, Any]:
    """Length and sentiment of the steered answers against the reference answers (same prompts)."""
    ls, lr = float(np.mean([a["tokens"] for a in steered])), float(np.mean([a["tokens"] for a in reference]))
    res: dict[str, Any] = {"prompts": len(steered), "mean_length": ls, "reference_mean_length": lr,
                           "length_reduction": ls / lr - 1.0 if lr else None}
    lex_s = [lexicon_score(a["text"]) for a in steered]
    lex_r = [lexicon_score(a["text"]) for a in reference]
    res.update({"lexicon_score": float(np.mean(lex_s)), "reference_lexicon_score": float(np.mean(lex_r)),
                "lexicon_shift": float(np.mean(lex_s) - np.mean(lex_r))})
    if judge is not None:
        ss, sr = judge.score([a["text"] for a in steered]), judge.score([a["text"] for a in reference])
        res.update({"sentiment_score": float(np.mean(ss)), "reference_sentiment_score": float(np.mean(sr)),
                    "sentiment_shift": float(np.mean(ss) - np.mean(sr)),
                    "sentiment_positive_fraction": float(np.mean([a > b for a, b in zip(ss, sr)]))})
        for a, s in zip(steered, ss):
            a["sentiment"] = s
        for a, s in zip(reference, sr):
            a["sentiment"] = s
    return res


def side_effect(logits_fn: Callable[[np.ndarray], np.ndarray], reference: nn.Module, windows: torch.Tensor,
                *, progress: bool = False) -> dict[str, float]:
    """Perplexity ratio and KL(reference || steered) on neutral text windows."""
    m = check_causal_lm(logits_fn, reference, windows, progress=progress)
    return {"perplexity_ratio": m["perplexity_ratio"], "kl": m["kl"], "perplexity": m["perplexity"],
            "reference_perplexity": m["reference_perplexity"], "top1_agreement": m["top1_agreement"],
            "neutral_tokens": m["tokens"]}
