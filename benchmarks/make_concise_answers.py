"""Make the bundled ``builtin:concise-answers`` steering pairs (``edgecompress/prompts/concise-answers.jsonl``).

The contrast is between two states of an answer rather than two instructions: SmolLM2-135M-Instruct
answers each question of ``builtin:concise-pairs`` (the question without its "Answer in ..." suffix;
chat template, greedy, at most ``--max-new-tokens``). An answer that ends on its own (the model emits
``<|im_end|>``) gives one pair per cut: ``positive`` is the whole answer (read at its last token: the
model is about to stop), ``negative`` the same answer cut after an interior sentence (read there: a
sentence has ended but the answer goes on). Both end a sentence, so the difference of their means is
"the answer is complete" rather than "a sentence is complete". Answers cut by the token limit are
skipped. The questions are disjoint from ``builtin:concise-eval`` (``tests/test_steer.py`` checks it).

    python benchmarks/make_concise_answers.py            # rewrites edgecompress/prompts/concise-answers.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from edgecompress.data import load_prompt_pairs
from edgecompress.models import load_model
from edgecompress.steer_eval import torch_generate_fn

OUT = Path(__file__).resolve().parents[1] / "edgecompress" / "prompts" / "concise-answers.jsonl"
SUFFIX = " Answer in one short sentence"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-new-tokens", type=int, default=320)
    ap.add_argument("--cuts", type=int, default=2, help="sentence cuts (negatives) per answer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--questions", type=Path, default=None,
                    help="more questions, one per line, after builtin:concise-pairs' (keep them disjoint from "
                    "the held-out sets)")
    args = ap.parse_args()

    lm = load_model("smollm2-135m")
    model, tok = lm.model.eval(), lm.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pos, _ = load_prompt_pairs("builtin:concise-pairs")
    questions = [p.split(SUFFIX)[0] for p in pos]
    if args.questions:
        questions += [q.strip() for q in args.questions.read_text(encoding="utf-8").splitlines() if q.strip()]
    rng = random.Random(args.seed)
    gen = torch_generate_fn(model)
    lines = []
    for q in questions:
        ids = list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True))
        out = gen(ids, args.max_new_tokens, eos)
        if eos not in out:
            print(f"skipped (no end within {args.max_new_tokens} tokens): {q}")
            continue
        answer = out[: out.index(eos)]
        # interior sentence ends, with at least 8 tokens of the answer after them
        cuts = [i + 1 for i in range(5, len(answer) - 8) if tok.decode(answer[i]).rstrip().endswith((".", "!", "?"))]
        if not cuts:
            print(f"skipped (one sentence): {q}")
            continue
        full = tok.decode(answer).strip()
        for c in sorted(rng.sample(cuts, min(args.cuts, len(cuts)))):
            lines.append({"prompt": q, "positive": full, "negative": tok.decode(answer[:c]).strip()})
    args.out.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in lines), encoding="utf-8")
    print(f"{len(lines)} pairs from {len({it['prompt'] for it in lines})} answers -> {args.out}")


if __name__ == "__main__":
    main()
