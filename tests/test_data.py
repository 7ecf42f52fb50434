"""Text sources and token windows against direct oracles."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from edgecompress.data import (
    fingerprint_tokens,
    load_sentences,
    load_text,
    pydoc_split,
    token_windows,
)
from edgecompress.errors import DataError


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with no merges: 256 byte tokens + <s> (256) + </s> (257)."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


# ------------------------------------------------------------------ pydoc


def test_pydoc_splits_are_disjoint_and_substantial() -> None:
    from pydoc_data.topics import topics

    calib_keys, eval_keys = pydoc_split()
    assert not set(calib_keys) & set(eval_keys)
    assert set(calib_keys) | set(eval_keys) == set(topics)
    calib, evals = load_text("pydoc:calib"), load_text("pydoc:eval")
    assert len(calib) > 200_000 and len(evals) > 50_000
    assert 0.1 < len(evals) / (len(calib) + len(evals)) < 0.3
    assert calib == load_text("pydoc:calib")  # deterministic
    checked = 0
    for key in eval_keys[::3]:
        text = topics[key]
        for start in range(0, max(1, len(text) - 200), max(1, len(text) // 5)):
            assert text[start : start + 200] not in calib, (key, start)
            checked += 1
    assert checked > 20


def test_sentences() -> None:
    sents = load_sentences("pydoc:eval", min_chars=16, max_chars=200)
    assert len(sents) > 100
    assert all(16 <= len(s) <= 200 for s in sents)
    assert all("\n" not in s for s in sents)


# ------------------------------------------------------------------ files


def test_txt_and_jsonl(tmp_path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("hello world\nsecond line\n", encoding="utf-8")
    assert load_text(str(txt)) == "hello world\nsecond line\n"
    jl = tmp_path / "a.jsonl"
    jl.write_text(
        json.dumps({"text": "First item is here."}) + "\n\n" + json.dumps({"text": "Second one, id 2.", "id": 2}) + "\n"
    )
    assert load_text(str(jl)) == "First item is here.\n\nSecond one, id 2."
    assert load_sentences(str(jl), min_chars=5) == ["First item is here.", "Second one, id 2."]


@pytest.mark.parametrize(
    ("line", "match"),
    [("{bad json", r"bad\.jsonl:2: not valid JSON"), ('{"txt": "x"}', r"bad\.jsonl:2: .*\"text\""), ("[1]", ":2:")],
)
def test_jsonl_bad_line(tmp_path, line: str, match: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(DataError, match=match) as err:
        load_text(str(path))
    assert err.value.hint


def test_source_errors(tmp_path) -> None:
    for source, match in [
        (str(tmp_path / "missing.txt"), "not found"),
        ("hf:wikitext", "unknown data source"),
        ("pydoc:train", "unknown data source"),
    ]:
        with pytest.raises(DataError, match=match) as err:
            load_text(source)
        assert err.value.hint
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(DataError, match="no text"):
        load_text(str(empty))
    other = tmp_path / "a.csv"
    other.write_text("a,b")
    with pytest.raises(DataError, match="unsupported"):
        load_text(str(other))


# ------------------------------------------------------------------ windows


def test_token_windows_oracle(tokenizer) -> None:
    text = load_text("pydoc:eval")[:20_000]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    every = token_windows(tokenizer, text, seq_len=64, n=None)
    assert every.dtype == torch.long and every.shape == (len(ids) // 63, 64)
    assert (every[:, 0] == tokenizer.bos_token_id).all()
    assert every[:, 1:].reshape(-1).tolist() == ids[: every.shape[0] * 63]  # non-overlapping, in order
    some = token_windows(tokenizer, text, seq_len=64, n=5, seed=7)
    assert some.shape == (5, 64)
    assert torch.equal(some, token_windows(tokenizer, text, seq_len=64, n=5, seed=7))
    assert not torch.equal(some, token_windows(tokenizer, text, seq_len=64, n=5, seed=8))
    rows = {tuple(r) for r in every.tolist()}
    assert all(tuple(r) in rows for r in some.tolist())
    assert torch.equal(token_windows(tokenizer, text, 64, n=10_000), every)
    plain = token_windows(tokenizer, text, seq_len=50, n=3, add_bos=False)
    assert plain.shape == (3, 50) and (plain != tokenizer.bos_token_id).all()


def test_token_windows_too_short(tokenizer) -> None:
    with pytest.raises(DataError, match="needs at least 127 text tokens.*got 11") as err:
        token_windows(tokenizer, "hello world", seq_len=128, n=4)
    assert "smaller seq_len" in (err.value.hint or "")


def test_fingerprint_tokens() -> None:
    t = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert fingerprint_tokens(t) == fingerprint_tokens(t.to(torch.int32))
    u = t.clone()
    u[1, 2] = 7
    assert fingerprint_tokens(u) != fingerprint_tokens(t)
    assert fingerprint_tokens(t.reshape(3, 2)) != fingerprint_tokens(t)
    assert len(fingerprint_tokens(t)) == 64
