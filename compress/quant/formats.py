"""Packed integer weight formats.

A format owns its host packing and its pure-torch reference ``to_float()``: every kernel
(ONNX Runtime's ``MatMulNBits``/``GatherBlockQuantized``/``DequantizeLinear``, later TVM and
CUDA) is tested against ``to_float()``. The ONNX emission of a format lives in
``edgecompress.export.onnx_formats`` next to nothing else, and uses only the fields below.

Layout (shared with ONNX Runtime's ``MatMulNBits``): a weight ``W[N, K]`` (``nn.Linear``
layout: N outputs, K inputs) is cut into blocks of ``block_size`` along K; the last block
is zero-padded. Quantized values are unsigned ``q in [0, 2**bits)``; ``w = (q - zp) * scale``.
For ``bits == 4`` two values share a byte, the lower-index value in the low nibble.
Symmetric formats store no zero point: it is implied as ``2**(bits-1)`` (ONNX Runtime's
default for ``MatMulNBits`` and ``GatherBlockQuantized``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantScheme:
    """How to quantize one weight tensor."""

    bits: int = 4
    block_size: int = 128  # 0 means one block per output row (per-channel)
    symmetric: bool = True
    scale_dtype: str = "float16"  # scales are rounded to this storage dtype before coding
    dtype: str = "int"  # "int" (uniform grid) or "fp4" (E2M1 values, see quant.fp4)

    def __post_init__(self) -> None:
        if self.bits not in (3, 4, 8):
            raise ValueError(f"bits must be 3, 4 or 8, got {self.bits}")
        if self.dtype not in ("int", "fp4"):
            raise ValueError(f"dtype must be 'int' or 'fp4', got {self.dtype!r}")
        if self.dtype == "fp4" and (self.bits != 4 or not self.symmetric or self.block_size <= 0):
            raise ValueError("fp4 (E2M1) is 4 bits, symmetric, with a per-block scale (block_size > 0)")
        if self.block_size < 0:
            raise ValueError(f"block_size must be >= 0, got {self.block_size}")


@dataclass
class BlockQuantizedTensor:
    """A 2-D weight ``[N, K]`` quantized in blocks along K.

    ``qweight``: uint8 ``[N, n_blocks, bytes_per_block]``;
    ``scales``: float32 ``[N, n_blocks]``;
    ``zero_points``: uint8 ``[N, n_blocks]`` unpacked (one value per block) or None (symmetric).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    bits: int
    block_size: int
    shape: tuple[int, int]

    @property
    def n_blocks(self) -> int:
        return self.qweight.shape[1]

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    @property
    def default_zero_point(self) -> int:
        return 1 << (self.bits - 1)

    def unpacked(self) -> torch.Tensor:
        """Unsigned codes ``[N, n_blocks * block_size]`` (uint8, padding included)."""
        return unpack_codes(self.qweight, self.bits, self.block_size)

    def to_float(self) -> torch.Tensor:
        """Pure-torch dequantization to float32 ``[N, K]``: the reference for every kernel."""
        n, k = self.shape
        q = self.unpacked().view(n, self.n_blocks, self.block_size).to(torch.float32)
        zp = None if self.zero_points is None else self.zero_points.to(torch.float32)
        w = decode(q, self.scales.to(torch.float32), zp, self.bits)
        return w.reshape(n, -1)[:, :k].contiguous()

    def storage_bits(self, scale_bits: int = 16) -> int:
        """Bits this tensor occupies when stored (codes + scales at ``scale_bits`` + zero points)."""
        n = self.shape[0]
        codes = n * self.n_blocks * self.block_size * self.bits
        scales = n * self.n_blocks * scale_bits
        zps = n * self.n_blocks * self.bits if self.zero_points is not None else 0
        return codes + scales + zps

    def bits_per_weight(self, scale_bits: int = 16) -> float:
        return self.storage_bits(scale_bits) / (self.shape[0] * self.shape[1])

    def cat_rows(self, *others: BlockQuantizedTensor) -> BlockQuantizedTensor:
        """Concatenate along N (fusing q/k/v or gate/up); all parts must share the scheme."""
        parts = (self, *others)
        for p in others:
            if (p.bits, p.block_size, p.shape[1], p.symmetric) != (
                self.bits, self.block_size, self.shape[1], self.symmetric
            ):
                raise ValueError("cannot fuse block-quantized tensors with different schemes")
        zp = None if self.symmetric else torch.cat([p.zero_points for p in parts])
        return BlockQuantizedTensor(
            qweight=torch.cat([p.qweight for p in parts]),
            scales=torch.cat([p.scales for p in parts]),
            zero_points=zp,
            bits=self.bits,
            block_size=self.block_size,
            shape=(sum(p.shape[0] for p in parts), self.shape[1]),
        )


def pack_codes(q: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """Pack unsigned codes ``[N, n_blocks * block_size]`` into uint8 ``[N, n_blocks, bytes]``.

    8 bits: one code per byte. 4 bits: two per byte, the lower-index code in the low nibble.
    3 bits: three bit planes per block (plane ``p`` holds bit ``p`` of every code, eight codes
    per byte, lower index in the lower bit), so a block of ``b`` codes takes ``3 * b / 8`` bytes.
    """
    n, total = q.shape
    q = q.to(torch.uint8)
    if bits == 8:
        packed = q
    elif bits == 4:
        packed = q[:, 0::2] | (q[:, 1::2] << 4)
    elif bits == 3:
        if block_size % 8:
            raise ValueError(f"3-bit blocks need a multiple of 8 codes, got {block_size}")
        octets = q.view(n, total // block_size, 1, block_size // 8, 8)
        weights = (1 << torch.arange(8, dtype=torch.int32))
        planes = torch.stack([((octets.squeeze(2) >> p) & 1).to(torch.int32) for p in range(3)], 2)
        packed = (planes * weights).sum(-1).to(torch.uint8)  # [N, n_blocks, 3, block/8]
    else:
        raise NotImplementedError(f"byte packing for {bits}-bit codes")
    return packed.reshape(n, total // block_size, -1).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[N, n_blocks, bytes]`` -> ``[N, n_blocks*block_size]``."""
    n = packed.shape[0]
    flat = packed.reshape(n, -1)
    if bits == 8:
        return flat.clone()
    if bits == 4:
        out = torch.empty(n, flat.shape[1] * 2, dtype=torch.uint8)
        out[:, 0::2] = flat & 0x0F
        out[:, 1::2] = flat >> 4
        return out
    if bits == 3:
        planes = packed.reshape(n, packed.shape[1], 3, block_size // 8, 1)
        bitvals = (planes >> torch.arange(8, dtype=torch.uint8)) & 1  # [N, n_blocks, 3, block/8, 8]
        codes = (bitvals * torch.tensor([1, 2, 4], dtype=torch.uint8).view(1, 1, 3, 1, 1)).sum(2)
        return codes.to(torch.uint8).reshape(n, -1)
    raise NotImplementedError(f"byte unpacking for {bits}-bit codes")


def _round_scales(scales: torch.Tensor, dtype: str) -> torch.Tensor:
    """Round scales to their storage dtype so codes are computed with the scale that is stored."""
    if dtype == "float32":
        return scales
    if dtype != "float16":
        raise ValueError(f"scale_dtype must be float16 or float32, got {dtype!r}")
    mag = scales.abs().clamp(min=2.0**-24, max=65504.0)
    return (torch.sign(scales) * mag).to(torch.float16).to(torch.float32)


def to_blocks(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """``w [N, K]`` as float32 blocks ``[N, n_blocks, block]`` (block 0 = whole row), zero-padded."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    block = block_size or k
    n_blocks = math.ceil(k / block)
    padded = torch.zeros(n, n_blocks * block, dtype=torch.float32)
    padded[:, :k] = w.detach().to(torch.float32)
    return padded.view(n, n_blocks, block)


def block_scales(blocks: torch.Tensor, scheme: QuantScheme,
                 clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales ``[N, n_blocks]`` (rounded to ``scheme.scale_dtype``) and zero points (None if symmetric).

    Symmetric: ``scale = -clip * peak / 2**(bits-1)`` where ``peak`` is the block's value of
    largest magnitude (signed), so it maps exactly onto code 0 and all ``2**bits`` codes are
    used (llama.cpp Q4_0 / ONNX Runtime MLAS convention). Asymmetric: the block's range,
    extended to include 0 and shrunk by ``clip``, over ``2**bits - 1`` steps, ``zp = round(-min/scale)``.
    ``clip`` (scalar or ``[N, n_blocks]``) < 1 trades clipped outliers for a finer grid.
    """
    qmax = (1 << scheme.bits) - 1
    if scheme.symmetric:
        mid = 1 << (scheme.bits - 1)
        peak = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True)).squeeze(-1)
        scales = clip * peak / -mid
        scales = torch.where(scales.abs() < 1e-12, torch.full_like(scales, 1e-12), scales)
        return _round_scales(scales, scheme.scale_dtype), None
    lo = blocks.amin(-1).clamp(max=0.0) * clip
    hi = blocks.amax(-1).clamp(min=0.0) * clip
    scales = _round_scales(((hi - lo) / qmax).clamp(min=1e-12), scheme.scale_dtype)
    return scales, torch.round(-lo / scales).clamp(0, qmax)


def encode(blocks: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
           bits: int) -> torch.Tensor:
    """Codes ``clamp(round(w / scale) + zp, 0, 2**bits - 1)`` (float tensor of integers).

    ``blocks`` is ``[..., block]`` with ``scales``/``zero_points`` broadcasting over ``[...]``;
    ``zero_points`` None means the symmetric ``2**(bits-1)``.
    """
    zp = zero_points if zero_points is not None else torch.full_like(scales, float(1 << (bits - 1)))
    return (torch.round(blocks / scales.unsqueeze(-1)) + zp.unsqueeze(-1)).clamp(0, (1 << bits) - 1)


def decode(codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Inverse of :func:`encode` up to rounding: ``(codes - zp) * scale``."""
    zp = zero_points if zero_points is not None else torch.full_like(scales, float(1 << (bits - 1)))
    return (codes - zp.unsqueeze(-1)) * scales.unsqueeze(-1)


def pack(codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, scheme: QuantScheme,
         shape: tuple[int, int]) -> BlockQuantizedTensor:
    """Codes ``[N, n_blocks, block]`` + scales/zero points -> the packed tensor."""
    n, n_blocks, block = codes.shape
    if scheme.bits == 4 and block % 2:
        raise ValueError("4-bit blocks need an even block size")
    if scheme.bits == 3 and block % 8:
        raise ValueError("3-bit blocks need a multiple of 8 weights")
    return BlockQuantizedTensor(
        qweight=pack_codes(codes.to(torch.uint8).view(n, n_blocks * block), scheme.bits, block),
        scales=scales.contiguous(),
        zero_points=None if zero_points is None else zero_points.to(torch.uint8),
        bits=scheme.bits,
        block_size=block,
        shape=shape,
    )


def quantize_blockwise(w: torch.Tensor, scheme: QuantScheme,
                       clip: torch.Tensor | float = 1.0) -> BlockQuantizedTensor:
    """Round-to-nearest quantization of ``w [N, K]`` (pure function); scales as :func:`block_scales`."""
    blocks = to_blocks(w, scheme.block_size)
    scales, zp = block_scales(blocks, scheme, clip)
    return pack(encode(blocks, scales, zp, scheme.bits), scales, zp, scheme, tuple(w.shape))


@dataclass
class SplitRowsTensor:
    """A ``[V, H]`` table (a tied token embedding / LM head) whose rows are stored in two formats.

    ``rows`` (int64, ascending) are the rows kept in the finer format ``hi``; every other row,
    in ascending order, is in ``lo``. Calibration picks ``rows``: the tokens the calibration text
    uses most (their logits and embeddings are what the model computes with most of the time).
    ``position`` maps a row to its place in ``[hi; lo]``, the order both tables are stored in.
    """

    rows: torch.Tensor
    hi: BlockQuantizedTensor
    lo: BlockQuantizedTensor

    def __post_init__(self) -> None:
        if self.hi.shape[1] != self.lo.shape[1]:
            raise ValueError(f"split rows need one row length, got {self.hi.shape} and {self.lo.shape}")
        if self.rows.dim() != 1 or self.rows.numel() != self.hi.shape[0]:
            raise ValueError(f"{self.rows.numel()} row ids for {self.hi.shape[0]} fine rows")
        if self.rows.numel() > 1 and not bool((self.rows[1:] > self.rows[:-1]).all()):
            raise ValueError("split row ids must be strictly ascending")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.hi.shape[0] + self.lo.shape[0], self.hi.shape[1])

    def position(self) -> torch.Tensor:
        """int64 ``[V]``: row ``v`` is row ``position[v]`` of ``[hi; lo]``."""
        v = self.shape[0]
        is_hi = torch.zeros(v, dtype=torch.bool)
        is_hi[self.rows] = True
        pos = torch.empty(v, dtype=torch.int64)
        pos[self.rows] = torch.arange(self.rows.numel())
        pos[~is_hi] = torch.arange(self.rows.numel(), v)
        return pos

    def to_float(self) -> torch.Tensor:
        """Pure-torch dequantization to float32 ``[V, H]``."""
        both = torch.cat([self.hi.to_float(), self.lo.to_float()])
        return both[self.position()].contiguous()

    @property
    def position_bits(self) -> int:
        """Bits each stored row position takes: 16 (unsigned) while ``V <= 65536``, else 32."""
        return 16 if self.shape[0] <= 1 << 16 else 32

    def storage_bits(self, scale_bits: int = 16) -> int:
        """Both tables plus the row positions (:attr:`position_bits` each)."""
        return self.hi.storage_bits(scale_bits) + self.lo.storage_bits(scale_bits) + self.shape[0] * self.position_bits

    def bits_per_weight(self, scale_bits: int = 16) -> float:
        return self.storage_bits(scale_bits) / (self.shape[0] * self.shape[1])


def split_rows(w: torch.Tensor, rows: torch.Tensor, quantize: Callable[[torch.Tensor, bool], BlockQuantizedTensor]
               ) -> SplitRowsTensor:
    """Quantize the ``rows`` of ``w [V, H]`` with ``quantize(rows_weight, True)`` and the rest with
    ``quantize(rest, False)``."""
    rows = torch.unique(rows.to(torch.int64))  # sorted, distinct
    keep = torch.zeros(w.shape[0], dtype=torch.bool)
    keep[rows] = True
    return SplitRowsTensor(rows, quantize(w[keep], True), quantize(w[~keep], False))
