"""The torch reference runtime: runs an artifact's own weights in PyTorch.

It reads the ONNX initializers, decodes every packed weight with its format's pure-torch
``to_float()`` (the reference every kernel is tested against) and loads them into the
Hugging Face model class named by the artifact's config. A second, independent execution
path for the same bits that ONNX Runtime runs.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from edgecompress.artifact import Artifact
from edgecompress.compress.quant.formats import BlockQuantizedTensor
from edgecompress.compress.prune.layers import restore_pruned_layers
from edgecompress.compress.quant.fp4 import FP4Tensor
from edgecompress.compress.sparse.activation import ActSparseLinear, CatsActivation
from edgecompress.compress.sparse.format import SparseTensor

from .base import Generation, Runtime, Timer


ACT_SPARSE_OP = "edgecompress::ActSparse"


def _unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out[..., :count]


class _Initializers:
    def __init__(self, model: onnx.ModelProto):
        self.arrays = {t.name: t for t in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}

    def __call__(self, name: str) -> np.ndarray:
        """The initializer behind ``name``, following Cast nodes (stored fp16 scales)."""
        while name not in self.arrays:
            name = self.producer[name].input[0]
        return numpy_helper.to_array(self.arrays[name])


def decode_layer(layer: dict, get: _Initializers) -> torch.Tensor:
    """Dense float32 weight ``[N, K]`` of one manifest layer record."""
    n, k = layer["shape"]
    inits = layer["initializers"]
    op = layer["onnx_op"]
    if "input_scale" in layer["initializers"]:
        raise NotImplementedError(f"torch runtime does not simulate the static activation quantization of "
                                  f"{layer['module']} (W8A8); run this artifact on ort-cpu")
    if op.startswith(f"{ACT_SPARSE_OP}+"):  # the input threshold is applied by load_torch_model
        return decode_layer({**layer, "onnx_op": op.split("+", 1)[1]}, get)
    if "lowrank_a" in inits:  # a low-rank correction: base weight + (A^T B^T)^T
        base = {**layer, "initializers": {k_: v for k_, v in inits.items() if not k_.startswith("lowrank_")}}
        a_t = np.asarray(get(inits["lowrank_a"]), dtype=np.float32)  # [K, r]
        b_t = np.asarray(get(inits["lowrank_b"]), dtype=np.float32)  # [r, N]
        return decode_layer(base, get) + torch.from_numpy((a_t @ b_t).T.copy())
    if op.startswith("SplitRows:"):  # int8 rows + other rows, each in its own table, and each row's place
        sub = op.split(":", 1)[1]
        parts = []
        for side in ("hi", "lo"):
            sub_inits = {k_[3:]: v for k_, v in inits.items() if k_.startswith(f"{side}.")}
            rows = get(sub_inits["B"]).shape[0]
            parts.append(decode_layer({**layer, "onnx_op": sub, "shape": (rows, k), "initializers": sub_inits}, get))
        position = torch.from_numpy(get(inits["row_position"]).astype(np.int64))
        return torch.cat(parts)[position]
    if op in ("MatMulNBits", "GatherBlockQuantized"):
        b = get(inits["B"])
        scales = np.array(get(inits["scales"]), dtype=np.float32).reshape(n, -1)  # a writable copy
        bits = 8 if b.shape[-1] == layer["block_size"] else 4
        zp = None
        if "zero_points" in inits:  # MatMulNBits packs 4-bit zero points two per byte
            z = get(inits["zero_points"])
            zp = _unpack_nibbles(z, scales.shape[1]) if op == "MatMulNBits" and bits == 4 else z.reshape(n, -1).copy()
        packed = BlockQuantizedTensor(torch.from_numpy(b.reshape(n, scales.shape[1], -1).copy()),
                                      torch.from_numpy(scales), None if zp is None else torch.from_numpy(zp),
                                      bits, layer["block_size"], (n, k))
        return packed.to_float()
    if op == "edgecompress::MatMulBlockQuantized":  # symmetric 3-bit bit planes
        b = torch.from_numpy(get(inits["B"]).copy())
        scales = torch.from_numpy(np.array(get(inits["scales"]), dtype=np.float32).reshape(n, -1))
        return BlockQuantizedTensor(b, scales, None, 3, layer["block_size"], (n, k)).to_float()
    if op == "edgecompress::MatMulFP4":
        b = torch.from_numpy(get(inits["B"]).copy())
        scales = torch.from_numpy(np.array(get(inits["scales"]), dtype=np.float32).reshape(n, -1))
        return FP4Tensor(b, scales, layer["block_size"], (n, k)).to_float()
    if op == "edgecompress::SparseMatMul":  # kept values + LSB-first bitmask
        values = torch.from_numpy(np.array(get(inits["values"]), dtype=np.float32).reshape(-1))
        bitmask = torch.from_numpy(get(inits["bitmask"]).copy())
        return SparseTensor(values, bitmask, (n, k)).to_float()
    if op == "DequantizeLinear+MatMul":
        q = get(inits["qweight"]).astype(np.float32)  # [K, N]
        s = get(inits["scales"]).astype(np.float32)
        z = get(inits["zero_points"]).astype(np.float32) if "zero_points" in inits else np.zeros_like(s)
        if s.ndim == 2:  # blocked along K
            s = np.repeat(s, layer["block_size"], axis=0)[:k]
            z = np.repeat(z, layer["block_size"], axis=0)[:k]
        return torch.from_numpy(((q - z) * s).T.copy())
    if op == "Gather+Mul":  # int8 embedding rows with one scale each
        q = get(inits["qweight"]).astype(np.float32)
        z = get(inits["zero_points"]).astype(np.float32) if "zero_points" in inits else 0.0
        return torch.from_numpy(((q - z) * get(inits["scales"]).astype(np.float32)).copy())
    if op in ("MatMul", "Gather"):
        w = get(inits.get("weight_t") or inits["weight"])
        return torch.from_numpy(w.T.copy() if "weight_t" in inits else w.copy())
    raise NotImplementedError(f"torch runtime cannot decode {op} ({layer['module']})")


def load_torch_model(artifact: Artifact) -> torch.nn.Module:
    """A Hugging Face model whose weights are the artifact's decoded weights."""
    from transformers import AutoModelForCausalLM

    model_proto = onnx.load(str(artifact.onnx_path), load_external_data=True)
    get = _Initializers(model_proto)
    config = artifact.config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        restore_pruned_layers(model)  # prune_layers: the sublayers config.layer_pruning lists are gone
    state: dict[str, torch.Tensor] = {}
    for layer in artifact.manifest["layers"]:
        w = decode_layer(layer, get)
        parts = layer.get("parts") or [(layer["module"], w.shape[0])]
        for (name, rows), chunk in zip(parts, torch.split(w, [r for _, r in parts])):
            state[f"{name}.weight"] = chunk.contiguous()
        if "bias" in layer["initializers"]:
            state[f"{layer['module']}.bias"] = torch.from_numpy(get(layer["initializers"]["bias"]).copy())
    for key in model.state_dict():
        if key.endswith("norm.weight"):
            state[key] = torch.from_numpy(get(key).copy())
    if getattr(config, "mlp_bias", False):  # baked steering: only some down projections carry a bias
        for key, t in model.state_dict().items():
            if key.endswith("_proj.bias") and ".mlp." in key and key not in state:
                state[key] = torch.zeros(t.shape, dtype=torch.float32)
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"artifact weights do not match the model: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    # buffers (rotary inv_freq) were created on the meta device: rebuild them on the CPU
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    _wrap_act_sparse(model, artifact.manifest["layers"], get)
    return model.eval()


def _wrap_act_sparse(model: torch.nn.Module, layers: list[dict], get: _Initializers) -> None:
    """Activation-sparse layers (``edgecompress::ActSparse`` before the linear): wrap each with its site's
    stored threshold, as the compressed torch model was."""
    for layer in layers:
        cats = layer["initializers"].get("cats_threshold")
        if cats is not None:  # CATS: the threshold is the MLP activation's (listed on its down_proj row)
            mlp = model.get_submodule(cats.removesuffix(".cats_threshold"))
            mlp.act_fn = CatsActivation(mlp.act_fn, torch.from_numpy(np.array(get(cats), dtype=np.float32)),
                                        site=cats.removesuffix(".cats_threshold"))
        thr = layer["initializers"].get("act_threshold")
        if thr is None:
            continue
        threshold = torch.from_numpy(np.array(get(thr), dtype=np.float32))
        site, method = thr.removesuffix(".act_threshold"), layer["format"].rsplit("-", 1)[-1]
        for name, _ in layer.get("parts") or [(layer["module"], 0)]:
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent)
            setattr(owner, child, ActSparseLinear(getattr(owner, child), threshold, site=site, method=method))


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, artifact: Artifact, *, threads: int | None = None):
        super().__init__(artifact, threads=threads)
        if threads:
            torch.set_num_threads(threads)
        self.model = load_torch_model(artifact)

    @torch.no_grad()
    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        ids = torch.as_tensor(np.asarray(input_ids, np.int64)).reshape(1, -1)
        return self.model(input_ids=ids, use_cache=False).logits[0].float().numpy()

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, *, eos_token_id: int | None = None,
                 on_token: Callable[[int], None] | None = None) -> Generation:
        from transformers import DynamicCache

        cache = DynamicCache()
        ids = torch.tensor([prompt_ids])
        with Timer() as prefill:
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = int(out.logits[0, -1].argmax())
        tokens = [tok]
        if on_token:
            on_token(tok)
        with Timer() as decode:
            while len(tokens) < max_new_tokens and not (eos_token_id is not None and tok == eos_token_id):
                out = self.model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
                tok = int(out.logits[0, -1].argmax())
                tokens.append(tok)
                if on_token:
                    on_token(tok)
        return Generation(tokens, len(prompt_ids), prefill.seconds, decode.seconds)
