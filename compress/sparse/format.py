"""The compressed sparse weight format and the torch module that holds it.

:class:`SparseTensor` stores a 2-D weight ``W [N, K]`` (``nn.Linear`` layout) as

* ``values``: float32 ``[nnz]``, the kept weights in row-major order (rounded to float16 when the
  step asks for it, so storing them as float16 is lossless);
* ``bitmask``: uint8 ``[N, ceil(K / 8)]``, bit ``j % 8`` of byte ``j // 8`` (least significant bit
  first) set when ``W[n, j]`` is kept; the padding bits of the last byte are 0.

One format serves unstructured and N:M sparsity: for 2:4 the mask costs 1 bit per weight, the same
as two 2-bit indices per group of 4, and less than indices for 4:8. ``to_float()`` is the pure-torch
reference that the ONNX function body (``edgecompress.export.onnx_sparse``) and the torch runtime
are tested against: ``dense.flatten()[kept] = values``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[N, K]`` -> uint8 ``[N, ceil(K/8)]``, least significant bit first."""
    n, k = mask.shape
    padded = torch.zeros(n, math.ceil(k / 8) * 8, dtype=torch.int32)
    padded[:, :k] = mask.to(torch.int32)
    weights = 1 << torch.arange(8, dtype=torch.int32)
    return (padded.view(n, -1, 8) * weights).sum(-1).to(torch.uint8)


def unpack_bitmask(bitmask: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_bitmask`: uint8 ``[N, ceil(K/8)]`` -> bool ``[N, K]``."""
    bits = (bitmask.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :k].bool()


@dataclass
class SparseTensor:
    """A sparse 2-D weight: kept values + a bitmask (see the module docstring)."""

    values: torch.Tensor
    bitmask: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, w: torch.Tensor, mask: torch.Tensor) -> SparseTensor:
        """Keep ``w`` where ``mask`` (bool, same shape) is set."""
        if w.dim() != 2 or mask.shape != w.shape:
            raise ValueError(f"need a 2-D weight and a mask of its shape, got {tuple(w.shape)} and {tuple(mask.shape)}")
        mask = mask.bool()
        return cls(w.detach().to(torch.float32)[mask].contiguous(), pack_bitmask(mask), tuple(w.shape))

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.shape[0] * self.shape[1])

    def mask(self) -> torch.Tensor:
        return unpack_bitmask(self.bitmask, self.shape[1])

    def to_float(self) -> torch.Tensor:
        """Pure-torch decompression to float32 ``[N, K]``: the reference for every kernel."""
        dense = torch.zeros(self.shape, dtype=torch.float32)
        dense[self.mask()] = self.values.to(torch.float32)
        return dense

    def storage_bits(self, value_bits: int = 32) -> int:
        """Bits stored: the values at ``value_bits`` plus the bitmask."""
        return self.nnz * value_bits + self.bitmask.numel() * 8


class SparseLinear(nn.Module):
    """``nn.Linear`` replacement whose weight is a :class:`SparseTensor` (computes with the dense copy)."""

    def __init__(self, sparse: SparseTensor, bias: torch.Tensor | None = None, *, pattern: str = "unstructured"):
        super().__init__()
        self.sparse = sparse
        self.pattern = pattern
        self.out_features, self.in_features = sparse.shape
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._dense: torch.Tensor | None = None

    def dense_weight(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = self.sparse.to_float()
        return self._dense

    @property
    def weight(self) -> torch.Tensor:  # code that reads .weight (HF helpers, quantizers) sees the dense zeros
        return self.dense_weight()

    def mask(self) -> torch.Tensor:
        return self.sparse.mask()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"shape={self.sparse.shape}, pattern={self.pattern}, sparsity={self.sparse.sparsity:.3f}"
