"""Torch modules that hold packed weights (the compressed torch model).

They compute with ``to_float()`` of their packed tensor (cached, not persisted), so the torch
model and every exported artifact share one definition of the numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .activation import ActQuant
from .formats import BlockQuantizedTensor, SplitRowsTensor
from .rotation import HadamardRotation


class _Packed(nn.Module):
    def __init__(self, packed: BlockQuantizedTensor | SplitRowsTensor):
        super().__init__()
        self.packed = packed
        self._dense: torch.Tensor | None = None

    def dense_weight(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = self.packed.to_float()
        return self._dense

    def extra_repr(self) -> str:
        p = self.packed
        if isinstance(p, SplitRowsTensor):
            return f"shape={p.shape}, {p.rows.numel()} int8 rows, others bits={p.lo.bits}, block_size={p.lo.block_size}"
        kind = "sym" if p.symmetric else "asym"
        return f"shape={p.shape}, bits={p.bits}, block_size={p.block_size}, {kind}"


class QuantLinear(_Packed):
    """``nn.Linear`` replacement whose weight is a :class:`BlockQuantizedTensor`.

    ``act`` (W8A8): static quantization of the input, applied before the matmul as the
    exported ``QuantizeLinear``/``DequantizeLinear`` pair does; None = float input.
    ``rotation``: an online Hadamard rotation of the input (:mod:`.rotation`), applied first; the
    weight was quantized already rotated. None = no rotation.
    """

    def __init__(self, packed: BlockQuantizedTensor, bias: torch.Tensor | None = None,
                 act: ActQuant | None = None, rotation: HadamardRotation | None = None):
        super().__init__(packed)
        self.out_features, self.in_features = packed.shape
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.act = act
        self.rotation = rotation

    @property
    def weight(self) -> torch.Tensor:  # lets code that reads .weight (e.g. HF helpers) keep working
        return self.dense_weight()

    def matmul_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the (stored) weight multiplies, before any activation quantization: ``x``, rotated when
        the layer has an input rotation. Calibration observers of this layer's input see this tensor."""
        return x if self.rotation is None else self.rotation.apply(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.matmul_input(x)
        if self.act is not None:
            x = self.act.fake_quant(x)
        return F.linear(x, self.dense_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        act = "" if self.act is None else f", act=uint{self.act.bits}-{self.act.method}"
        rot = "" if self.rotation is None else f", hadamard={self.rotation.a}x{self.rotation.b}"
        return super().extra_repr() + act + rot


class QuantEmbedding(_Packed):
    """``nn.Embedding`` replacement; rows are quantized along the hidden dimension."""

    def __init__(self, packed: BlockQuantizedTensor, padding_idx: int | None = None):
        super().__init__(packed)
        self.num_embeddings, self.embedding_dim = packed.shape
        self.padding_idx = padding_idx

    @property
    def weight(self) -> torch.Tensor:
        return self.dense_weight()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.dense_weight(), self.padding_idx)
