"""Baking a steering direction into the weights of a Llama-family decoder.

The residual stream after block ``L`` is ``h_L = h_{L-1} + o_proj(...) + down_proj(...)``; every
write into it comes from the token embedding, an attention ``o_proj`` or an MLP ``down_proj``.

* **add** ``h_L <- h_L + a v``: a bias ``a v`` on block ``L``'s ``down_proj`` (exact: the bias is
  added after the matmul, before the residual add). The HF config gets ``mlp_bias: true`` so the
  model class reloads with MLP biases (the gate/up biases it then expects are zero).
* **ablate** ``x <- x - (x . u) u`` for unit ``u``: every writer ``W`` (rows = residual channels)
  becomes ``W - u (u^T W)``, the embedding ``E`` (columns = residual channels) ``E - (E u) u^T``,
  biases likewise; then no block ever writes along ``u`` and the stream has no ``u`` component
  (directional ablation, Arditi et al. 2024). A tied LM head is untied first and keeps the
  original matrix (otherwise orthogonalising the embedding would change the logits too).
* **clamp**: ablate, then add ``c u`` to every embedding row: the stream's component along
  ``u`` is exactly ``c`` after every block.

Pure tensor functions first, then thin module adapters.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from edgecompress.errors import EdgeCompressError

log = logging.getLogger(__name__)

#: model_type -> modes that can be baked (``add`` needs the config flag ``mlp_bias``, Llama only)
SUPPORTED = {"llama": ("add", "ablate", "clamp"), "mistral": ("ablate", "clamp"), "qwen2": ("ablate", "clamp")}


# ----------------------------------------------------------------------------- pure cores


def project_out_rows(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``W - u (u^T W)``: a matrix ``[C, K]`` (``y = W x`` writes the residual channels C) that
    never writes along the unit vector ``u``. Works for a bias ``[C]`` too."""
    w64, u64 = w.double(), u.double()
    if w.dim() == 1:
        return (w64 - u64 * (u64 @ w64)).to(w.dtype)
    return (w64 - torch.outer(u64, u64 @ w64)).to(w.dtype)


def project_out_cols(e: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``E - (E u) u^T``: embedding rows ``[V, C]`` without their component along ``u``."""
    e64, u64 = e.double(), u.double()
    return (e64 - torch.outer(e64 @ u64, u64)).to(e.dtype)


# ----------------------------------------------------------------------------- adapters


def decoder_layers(model: nn.Module, mode: str) -> nn.ModuleList:
    """The decoder blocks of a supported model; an error names what is supported."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    supported = ", ".join(f"{t} ({'/'.join(m)})" for t, m in SUPPORTED.items())
    if mtype not in SUPPORTED or mode not in SUPPORTED[mtype]:
        what = f"model_type {mtype!r}" if mtype else type(model).__name__
        raise EdgeCompressError(f"steer mode {mode!r} is not supported for {what}",
                                hint=f"steering supports Hugging Face causal LMs of model_type: {supported}")
    return model.model.layers


def check_layers(model: nn.Module, layers: tuple[int, ...], mode: str) -> nn.ModuleList:
    blocks = decoder_layers(model, mode)
    bad = [i for i in layers if not 0 <= i < len(blocks)]
    if bad:
        raise EdgeCompressError(
            f"steer.layers: {', '.join(map(str, bad))} out of range; this model has {len(blocks)} decoder "
            f"layers (0..{len(blocks) - 1})", hint="pick layers in that range (middle layers steer best)")
    return blocks


def _dense(mod: nn.Module, name: str) -> nn.Module:
    if type(mod) not in (nn.Linear, nn.Embedding):
        raise EdgeCompressError(f"{name} is {type(mod).__name__}; ablate/clamp rewrite float weights",
                                hint="put the steer step before any quantize step in the recipe")
    return mod


def add_bias(model: nn.Module, layer: int, vector: torch.Tensor) -> str:
    """``h_layer += vector``, as a bias on that block's ``down_proj``; returns the module name."""
    down = check_layers(model, (layer,), "add")[layer].mlp.down_proj
    vec = vector.detach().to(torch.float32)
    if down.bias is None:
        down.bias = nn.Parameter(torch.zeros(down.out_features, dtype=torch.float32), requires_grad=False)
    with torch.no_grad():
        down.bias.add_(vec.to(down.bias.dtype))
    model.config.mlp_bias = True  # the model class reloads with MLP biases (unset ones are zero)
    return f"model.layers.{layer}.mlp.down_proj"


def untie_lm_head(model: nn.Module) -> bool:
    """Give a tied LM head its own copy of the matrix; True when it was tied."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is not emb.weight:
        return False
    head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    return True


def residual_writers(model: nn.Module) -> list[str]:
    """Names of the modules that write into the residual stream: embedding, o_proj, down_proj."""
    pat = re.compile(r"^model\.(embed_tokens|layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj))$")
    return [n for n, _ in model.named_modules() if pat.match(n)]


def ablate(model: nn.Module, u: torch.Tensor, mode: str = "ablate") -> dict:
    """Remove the unit direction ``u`` from every residual writer; returns what was done."""
    decoder_layers(model, mode)
    untied = untie_lm_head(model)
    names = residual_writers(model)
    with torch.no_grad():
        for name in names:
            mod = _dense(model.get_submodule(name), name)
            if isinstance(mod, nn.Embedding):
                mod.weight.copy_(project_out_cols(mod.weight, u))
            else:
                mod.weight.copy_(project_out_rows(mod.weight, u))
                if mod.bias is not None:
                    mod.bias.copy_(project_out_rows(mod.bias, u))
    log.info("ablated a direction from %d residual writers%s", len(names), " (LM head untied)" if untied else "")
    return {"modules": names, "untied_lm_head": untied}


def set_embedding_component(model: nn.Module, u: torch.Tensor, c: float, base: torch.Tensor) -> None:
    """Embedding rows ``base + c u`` (``base`` = the ablated rows): the clamp of ``clamp`` mode."""
    emb = model.get_input_embeddings()
    with torch.no_grad():
        emb.weight.copy_((base.double() + c * u.double()[None, :]).to(emb.weight.dtype))
