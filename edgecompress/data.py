"""Text sources for calibration and evaluation, and fixed-length token windows.

Sources (one string each, as a recipe writes it):

* ``pydoc:calib`` / ``pydoc:eval`` -- English technical prose bundled with every
  Python (``pydoc_data.topics``), split into two DISJOINT parts (see
  :func:`pydoc_split`), so evaluation text never appears in calibration text.
* a path to a ``.txt`` file (the whole file) or a ``.jsonl`` file (one JSON object
  per line with a ``"text"`` field).

Token windows are non-overlapping slices of the tokenized text, chosen with a seeded
RNG, so the same text, tokenizer, length and seed always give the same tensor (see
:func:`fingerprint_tokens` for the cache key).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Union

import torch

from edgecompress.errors import DataError

#: a steering prompt: its text, or (prompt, answer) for a contrast between answers to the prompt
Prompt = Union[str, tuple[str, str]]

log = logging.getLogger(__name__)

PYDOC_SOURCES = ("pydoc:calib", "pydoc:eval")
_SOURCE_HINT = "use pydoc:calib, pydoc:eval, or a path to a .txt or .jsonl file"
_EVAL_FRACTION = 0.2
_SHINGLE = 64  # topics sharing any run of this many characters land in the same split


# ----------------------------------------------------------------------------- sources


@functools.lru_cache(maxsize=1)
def pydoc_split() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split the pydoc topic keys into (calibration keys, evaluation keys), disjointly.

    Topics quote each other (``compound`` contains ``if``, ``while``, ``try`` ...), so a
    split by key alone would leak evaluation text into calibration text. Topics that
    share any 64-character run are grouped (union-find); groups are visited in the
    order of sha256 of their smallest key and go to evaluation while that keeps it
    within ~20% of all characters, otherwise to calibration. Keys are sorted inside
    each split. Deterministic for a given Python version (the topics change between
    versions; the token fingerprint of the windows records which text was used).
    """
    from pydoc_data.topics import topics

    keys = sorted(topics)
    parent = {k: k for k in keys}

    def find(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    owner: dict[str, str] = {}
    for key in keys:
        text = topics[key]
        for i in range(max(1, len(text) - _SHINGLE + 1)):
            first = owner.setdefault(text[i : i + _SHINGLE], key)
            if first != key:
                a, b = find(first), find(key)
                if a != b:
                    parent[max(a, b)] = min(a, b)

    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(find(key), []).append(key)
    total = sum(len(t) for t in topics.values())
    budget = _EVAL_FRACTION * total
    calib: list[str] = []
    evals: list[str] = []
    eval_chars = 0
    for root in sorted(groups, key=lambda r: hashlib.sha256(r.encode()).hexdigest()):
        size = sum(len(topics[k]) for k in groups[root])
        if eval_chars + size <= budget:
            evals.extend(groups[root])
            eval_chars += size
        else:
            calib.extend(groups[root])
    return tuple(sorted(calib)), tuple(sorted(evals))


def _read_documents(source: str) -> list[str]:
    """Read ``source`` as a list of documents (topics, the whole file, or jsonl items)."""
    if source in PYDOC_SOURCES:
        from pydoc_data.topics import topics

        calib, evals = pydoc_split()
        return [topics[k] for k in (calib if source == "pydoc:calib" else evals)]
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):", source)
    if scheme and not Path(source).exists():
        raise DataError(f"unknown data source {source!r} (scheme {scheme.group(1)!r}:)", hint=_SOURCE_HINT)
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"data file not found: {path}", hint=_SOURCE_HINT)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise DataError(f"unsupported data file type {suffix or '(none)'!r}: {path}", hint=_SOURCE_HINT)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}", hint="the file must be UTF-8 text") from exc
    return [raw] if suffix == ".txt" else _parse_jsonl(raw, path)


def _parse_jsonl(raw: str, path: Path) -> list[str]:
    """The ``"text"`` fields of a jsonl file; a bad line is a DataError naming it."""
    docs: list[str] = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{lineno}: not valid JSON ({exc.msg})",
                hint='each line must be one JSON object like {"text": "..."}',
            ) from exc
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise DataError(
                f'{path}:{lineno}: expected a JSON object with a string "text" field',
                hint='each line must be one JSON object like {"text": "..."}',
            )
        docs.append(item["text"])
    return docs


def load_text(source: str) -> str:
    """Load a text source as one string (documents joined by blank lines).

    Raises DataError for an unknown ``scheme:``, a missing or unreadable file, a bad
    jsonl line, or text that is empty.
    """
    text = "\n\n".join(_read_documents(source))
    if not text.strip():
        raise DataError(f"data source {source!r} contains no text", hint=_SOURCE_HINT)
    return text


def load_sentences(source: str, *, min_chars: int = 16, max_chars: int = 512) -> list[str]:
    """Load a source as short texts for encoder models (one sentence or line each).

    jsonl items are kept whole (one per item). Other text is split into paragraphs at
    blank lines, indented paragraphs (code) are skipped, and paragraphs are split into
    sentences at ``.!?``; whitespace is collapsed. Texts shorter than ``min_chars`` are
    dropped and longer than ``max_chars`` are cut at word boundaries.
    """
    docs = _read_documents(source)
    if source.lower().endswith(".jsonl"):
        pieces = [" ".join(d.split()) for d in docs]
    else:
        pieces = []
        for doc in docs:
            for para in re.split(r"\n\s*\n", doc):
                lines = [ln for ln in para.splitlines() if ln.strip()]
                if not lines or all(ln.startswith(" ") for ln in lines):
                    continue
                flat = " ".join(" ".join(lines).split())
                pieces.extend(re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])", flat))
    out: list[str] = []
    for piece in pieces:
        out.extend(_cut(piece.strip(), max_chars))
    out = [s for s in out if len(s) >= min_chars]
    if not out:
        raise DataError(
            f"data source {source!r} has no sentences of at least {min_chars} characters", hint=_SOURCE_HINT
        )
    return out


def _cut(text: str, max_chars: int) -> list[str]:
    """Split ``text`` at spaces into pieces of at most ``max_chars`` (longer words kept whole)."""
    if len(text) <= max_chars:
        return [text]
    pieces, cur = [], ""
    for word in text.split(" "):
        if cur and len(cur) + 1 + len(word) > max_chars:
            pieces.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    if cur:
        pieces.append(cur)
    return pieces


# ----------------------------------------------------------------------------- windows


def token_windows(
    tokenizer: Any,
    text: str,
    seq_len: int,
    n: int | None,
    seed: int = 0,
    add_bos: bool = True,
) -> torch.Tensor:
    """Cut tokenized ``text`` into ``n`` non-overlapping windows of ``seq_len`` tokens.

    The text is tokenized once without special tokens. When ``add_bos`` and the
    tokenizer has a BOS token, every window starts with BOS (counted in ``seq_len``)
    followed by ``seq_len - 1`` text tokens. ``n`` windows are chosen with a seeded RNG
    and returned in text order; all of them when ``n`` is None or exceeds what is
    available. Returns a LongTensor ``[n, seq_len]``.
    """
    bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
    body = seq_len - (1 if bos is not None else 0)
    if body < 1:
        raise DataError(f"seq_len={seq_len} is too small", hint="use seq_len of at least 2")
    if n is not None and n < 1:
        raise DataError(f"number of windows must be at least 1, got {n}", hint="set n to a positive number")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    available = len(ids) // body
    if available == 0:
        raise DataError(
            f"a window of seq_len={seq_len} needs at least {body} text tokens"
            f"{' (plus BOS)' if bos is not None else ''}, got {len(ids)}",
            hint="use a longer text file or a smaller seq_len",
        )
    if n is None or n >= available:
        if n is not None and n > available:
            log.warning("asked for %d windows of %d tokens, only %d available; using all", n, seq_len, available)
        chosen = torch.arange(available)
    else:
        gen = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(available, generator=gen)[:n].sort().values
    flat = torch.tensor(ids[: available * body], dtype=torch.long).view(available, body)
    windows = flat[chosen]
    if bos is not None:
        windows = torch.cat([torch.full((len(chosen), 1), int(bos), dtype=torch.long), windows], dim=1)
    return windows.contiguous()


def fingerprint_tokens(t: torch.Tensor) -> str:
    """sha256 hex of token ids and shape, independent of the integer dtype."""
    ids = t.detach().to("cpu", torch.int64).contiguous()
    h = hashlib.sha256(repr(tuple(ids.shape)).encode())
    h.update(ids.numpy().tobytes())
    return h.hexdigest()


def sentence_batches(tokenizer: Any, source: str, n: int, *, max_len: int = 128, batch_size: int = 1,
                     seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` sentences of ``source`` (seeded choice, source order kept) tokenized with the encoder's
    special tokens, truncated to ``max_len`` and padded per batch: ``[{input_ids, attention_mask}]``."""
    if n < 1:
        raise DataError(f"number of sentences must be at least 1, got {n}", hint="set samples/windows to a positive number")
    sentences = load_sentences(source)
    if n < len(sentences):
        g = torch.Generator().manual_seed(seed)
        pick = sorted(torch.randperm(len(sentences), generator=g)[:n].tolist())
        sentences = [sentences[i] for i in pick]
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i: i + batch_size], padding=True, truncation=True, max_length=max_len,
                        return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


# ----------------------------------------------------------------------------- prompt sets

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
_PROMPTS_HINT = ("use a .txt file (one prompt per line), a .jsonl file ({\"text\": ...} per line; pairs: "
                 "{\"positive\": ..., \"negative\": ...}, optionally with a \"prompt\" they answer) or builtin:NAME")


def builtin_prompt_sets() -> list[str]:
    """Names of the bundled prompt sets (``builtin:NAME``)."""
    return sorted(p.stem for p in PROMPTS_DIR.glob("*.jsonl"))


def _prompt_file(source: str) -> Path:
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        path = PROMPTS_DIR / f"{name}.jsonl"
        if not path.is_file():
            raise DataError(f"no bundled prompt set {source!r}",
                            hint="bundled sets: " + ", ".join(f"builtin:{n}" for n in builtin_prompt_sets()))
        return path
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"prompt file not found: {path}", hint=_PROMPTS_HINT)
    if path.suffix.lower() not in (".txt", ".jsonl"):
        raise DataError(f"unsupported prompt file type {path.suffix or '(none)'!r}: {path}", hint=_PROMPTS_HINT)
    return path


def _jsonl_items(path: Path, keys: tuple[str, ...]) -> list[dict]:
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})", hint=_PROMPTS_HINT) from exc
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in keys):
            raise DataError(f"{path}:{lineno}: expected a JSON object with string fields {', '.join(keys)}",
                            hint=_PROMPTS_HINT)
        items.append(item)
    return items


def load_prompts(source: str) -> list[str]:
    """One prompt per non-empty line of a .txt file, or per ``"text"`` of a .jsonl file (or ``builtin:NAME``).

    An empty set is a DataError naming the source.
    """
    path = _prompt_file(source)
    if path.suffix.lower() == ".txt":
        prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    else:
        prompts = [it["text"] for it in _jsonl_items(path, ("text",))]
    if not prompts:
        raise DataError(f"prompt set {source!r} is empty", hint="give at least one prompt (a few dozen steer well)")
    return prompts


def load_prompt_pairs(source: str) -> tuple[list[Prompt], list[Prompt]]:
    """(positive, negative) prompts from a .jsonl of ``{"positive": ..., "negative": ...}`` lines.

    A line may also carry ``"prompt"``: then ``positive`` and ``negative`` are two answers to it (the
    assistant's turn after the prompt), and each is read where that answer stops: a contrast between
    completions rather than between instructions. Such items come back as ``(prompt, answer)`` tuples."""
    path = _prompt_file(source)
    if path.suffix.lower() != ".jsonl":
        raise DataError(f"paired prompts must be a .jsonl file, got {path.name}",
                        hint='one {"positive": ..., "negative": ...} object per line; or use positive: and negative:')
    items = _jsonl_items(path, ("positive", "negative"))
    if not items:
        raise DataError(f"prompt set {source!r} is empty", hint="give at least one pair (a few dozen steer well)")
    for lineno, it in enumerate(items, start=1):
        if "prompt" in it and not isinstance(it["prompt"], str):
            raise DataError(f"{path}: pair {lineno}: \"prompt\" must be a string", hint=_PROMPTS_HINT)
    if "prompt" in items[0] and not all("prompt" in it for it in items):
        raise DataError(f"{path}: some pairs have a \"prompt\" and some do not",
                        hint="give every pair a prompt (answers contrasted) or none (prompts contrasted)")
    if "prompt" in items[0]:
        return [(it["prompt"], it["positive"]) for it in items], [(it["prompt"], it["negative"]) for it in items]
    return [it["positive"] for it in items], [it["negative"] for it in items]


def encode_prompts(tokenizer: Any, prompts: list[Prompt], *, chat: bool) -> list[torch.Tensor]:
    """Token ids of each prompt; with ``chat`` as a user message in the chat template, the
    assistant's turn opened after it (so the last token is where the answer starts). A ``(prompt,
    answer)`` item is the prompt so encoded followed by the answer's tokens (its last token is where
    the answer stops)."""
    if chat and not getattr(tokenizer, "chat_template", None):
        raise DataError("this tokenizer has no chat template", hint="set chat: false in the steer step")
    out = []
    for p in prompts:
        text, answer = (p, None) if isinstance(p, str) else p
        if chat:
            ids = list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))
        else:
            ids = list(tokenizer(text)["input_ids"])
        if answer is not None:
            ids += list(tokenizer(answer, add_special_tokens=False)["input_ids"])
        out.append(torch.tensor(ids, dtype=torch.long))
    return out
