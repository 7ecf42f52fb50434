"""Make the bundled ``builtin:sentiment-answers`` steering pairs (``edgecompress/prompts/sentiment-answers.jsonl``).

The contrast is between two answers to one neutral prompt rather than between two instructions:
SmolLM2-135M-Instruct answers each prompt of ``builtin:sentiment-pairs`` ("Write about <topic>. Be
joyful, warm and enthusiastic..." and "... Be gloomy, bitter and miserable..."; chat template,
greedy, at most ``--max-new-tokens``), and each topic gives one pair ``{"prompt": "Write about
<topic>.", "positive": the joyful answer, "negative": the gloomy answer}``: the steer step reads both
as the assistant's answer to the neutral prompt, so the difference of their means is "this answer is
joyful" with the instruction that caused it left out. Both answers are cut to the same number of
tokens (the shorter one's), so with ``position: mean`` the shared chat prefix weighs the same on both
sides and nearly cancels (re-encoding an answer can change its length by a token). The topics are
disjoint from ``builtin:sentiment-eval`` (``tests/test_steer.py`` checks it).

    python benchmarks/make_sentiment_answers.py          # rewrites edgecompress/prompts/sentiment-answers.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgecompress.data import load_prompt_pairs
from edgecompress.models import load_model
from edgecompress.steer_eval import torch_generate_fn

OUT = Path(__file__).resolve().parents[1] / "edgecompress" / "prompts" / "sentiment-answers.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--min-tokens", type=int, default=16, help="skip a topic whose shorter answer is shorter")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    lm = load_model("smollm2-135m")
    model, tok = lm.model.eval(), lm.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pos, neg = load_prompt_pairs("builtin:sentiment-pairs")

    gen = torch_generate_fn(model)

    def answer(instruction: str) -> list[int]:
        ids = list(tok.apply_chat_template([{"role": "user", "content": instruction}], add_generation_prompt=True))
        out = gen(ids, args.max_new_tokens, eos)
        return out[: out.index(eos)] if eos in out else out

    lines = []
    for p, n in zip(pos, neg):
        if not (isinstance(p, str) and isinstance(n, str)):
            raise SystemExit("builtin:sentiment-pairs should hold instruction pairs, not (prompt, answer) pairs")
        prompt = p.split(". Be ")[0] + "."  # "Write about <topic>."
        if n.split(". Be ")[0] + "." != prompt:
            raise SystemExit(f"the pair's instructions are about different topics: {p!r} / {n!r}")
        a, b = answer(p), answer(n)
        k = min(len(a), len(b))
        if k < args.min_tokens:
            print(f"skipped (an answer of {k} tokens): {prompt}")
            continue
        lines.append({"prompt": prompt, "positive": tok.decode(a[:k]).strip(), "negative": tok.decode(b[:k]).strip()})
        print(f"{prompt} ({k} tokens)\n  + {lines[-1]['positive'][:100]!r}\n  - {lines[-1]['negative'][:100]!r}",
              flush=True)
    args.out.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in lines), encoding="utf-8")
    print(f"{len(lines)} pairs -> {args.out}")


if __name__ == "__main__":
    main()
