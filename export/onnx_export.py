"""Write an ONNX artifact body (model.onnx + external data) for a (compressed) torch model."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx
from torch import nn

from .onnx_formats import EmitOptions, LayerFormat
from .onnx_llm import attention_layers, build_llama_decoder

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
PREFIX_FILE = "prefix.safetensors"


def weight_summary(formats: list[LayerFormat]) -> dict[str, Any]:
    """Bits per weight over all weight matrices, every stored byte counted (scales and zero points too).

    A tensor shared by two layers (tied embedding and LM head) counts its parameters once.
    """
    params = sum(f.params for f in formats if not f.shared_with)
    stored = sum(f.stored_bytes for f in formats)
    by_format: dict[str, int] = {}
    for f in formats:
        if not f.shared_with:
            by_format[f.format] = by_format.get(f.format, 0) + f.params
    return {
        "weight_params": params,
        "weight_bytes": stored,
        "bits_per_weight": round(8 * stored / params, 4) if params else None,
        "params_by_format": by_format,
    }


def export_causal_lm(model: nn.Module, dest: Path, *, accuracy_level: int = 4, fuse: bool = True,
                     max_positions: int | None = None, progress=None) -> dict[str, Any]:
    """Write ``dest/model.onnx`` + ``dest/model.onnx.data``; return the manifest's ``onnx`` section."""
    opts = EmitOptions(accuracy_level=accuracy_level)
    proto, formats = build_llama_decoder(model, opts=opts, fuse=fuse, max_positions=max_positions,
                                         progress=progress)
    body = {**_save(proto, formats, dest, accuracy_level), **_layer_pruning(model)}
    body["onnx"]["kv_cache"] = {"layout": "[batch, kv_heads, seq, head_dim]", "dtype": "float32",
                                "past": "past_key_values.{i}.key|value", "present": "present.{i}.key|value"}
    tokens = getattr(model.config, "float_prefix", None)
    if tokens:
        body["prefix"] = write_prefix(model, list(tokens), dest)
    return body


def write_prefix(model: nn.Module, tokens: list[int], dest: Path) -> dict[str, Any]:
    """Compute the model's float prefix (PrefixQuant) and save it as ``dest/prefix.safetensors``."""
    from safetensors.torch import save_file

    from edgecompress.compress.quant.prefix import prefix_state

    state = prefix_state(model, tokens)
    save_file(state, str(dest / PREFIX_FILE))
    log.info("wrote the float prefix %s (%d tokens)", dest / PREFIX_FILE, len(tokens))
    return {"file": PREFIX_FILE, "tokens": tokens, "contents": "{i}.key, {i}.value [1, kv_heads, P, head_dim] "
            "(the KV cache after the prefix, float32), logits [P, vocab]",
            "use": "runtimes start every sequence that begins with these tokens from this cache"}


def export_sentence_encoder(model: nn.Module, dest: Path, *, accuracy_level: int = 4, fuse: bool = True,
                            progress=None) -> dict[str, Any]:
    """Write a BERT sentence encoder (with pooling) as ``dest/model.onnx`` + external data."""
    from .onnx_encoder import build_bert_encoder

    proto, formats = build_bert_encoder(model, opts=EmitOptions(accuracy_level=accuracy_level), fuse=fuse,
                                        progress=progress)
    return _save(proto, formats, dest, accuracy_level)


def _save(proto: onnx.ModelProto, formats: list[LayerFormat], dest: Path, accuracy_level: int) -> dict[str, Any]:
    onnx.save(proto, str(dest / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
              location=DATA_FILE, size_threshold=1024)
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        key = f"{node.domain + '::' if node.domain else ''}{node.op_type}"
        ops[key] = ops.get(key, 0) + 1
    log.info("wrote %s (%d nodes)", dest / MODEL_FILE, len(proto.graph.node))
    return {
        "onnx": {
            "model": MODEL_FILE,
            "external_data": DATA_FILE,
            "opset": {imp.domain or "ai.onnx": imp.version for imp in proto.opset_import},
            "accuracy_level": accuracy_level,
            "accuracy_level_note": ("4: MatMulNBits quantizes activations to int8 per block (changes numerics)"
                                    if accuracy_level == 4 else "activations stay float in MatMulNBits"),
            "op_counts": dict(sorted(ops.items())),
            "inputs": [i.name for i in proto.graph.input if not i.name.startswith("past_key_values.")],
        },
        "layers": [asdict(f) for f in formats],
        "weights": weight_summary(formats),
    }


def _layer_pruning(model: nn.Module) -> dict[str, Any]:
    """prune_layers / prune_mlp_channels: the config's record, and which decoder layer each KV cache entry
    ``past_key_values.{i}`` belongs to (layers without attention have none)."""
    pruning = getattr(model.config, "layer_pruning", None)
    return {"layer_pruning": {**pruning, "kv_cache_layers": attention_layers(model)}} if pruning else {}
