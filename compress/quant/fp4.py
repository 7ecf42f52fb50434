"""FP4 (E2M1) weights with one scale per block: the OCP microscaling element type.

Each 4-bit code is sign (bit 3) | exponent (bits 2..1) | mantissa (bit 0), the eight
magnitudes ``0, 0.5, 1, 1.5, 2, 3, 4, 6`` (:data:`E2M1_VALUES`). A block of ``block_size``
weights along K shares a float16 scale ``absmax / 6``; ``w = E2M1[code] * scale``. Codes are
packed two per byte (lower index in the low nibble), as int4. Unlike MXFP4 the scale is a
float16, not a power of two, so it carries the block's range exactly.

``FP4Tensor.to_float()`` is the pure-torch reference; the ONNX form is the custom op
``edgecompress::MatMulFP4`` with a function body (``export.onnx_custom``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import _round_scales, pack_codes, to_blocks, unpack_codes

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = torch.tensor(E2M1_MAGNITUDES + tuple(-v for v in E2M1_MAGNITUDES), dtype=torch.float32)
E2M1_MAX = 6.0


@dataclass
class FP4Tensor:
    """A 2-D weight ``[N, K]``: E2M1 codes packed ``uint8 [N, n_blocks, block/2]``, scales ``[N, n_blocks]``."""

    qweight: torch.Tensor
    scales: torch.Tensor
    block_size: int
    shape: tuple[int, int]
    bits: int = 4
    zero_points: None = None
    kind: str = "fp4"

    @property
    def n_blocks(self) -> int:
        return self.qweight.shape[1]

    @property
    def symmetric(self) -> bool:
        return True

    def unpacked(self) -> torch.Tensor:
        return unpack_codes(self.qweight, 4, self.block_size)

    def to_float(self) -> torch.Tensor:
        """Pure-torch dequantization to float32 ``[N, K]``: the reference for every kernel."""
        n, k = self.shape
        vals = E2M1_VALUES[self.unpacked().long()].view(n, self.n_blocks, self.block_size)
        return (vals * self.scales.float().unsqueeze(-1)).reshape(n, -1)[:, :k].contiguous()

    def storage_bits(self, scale_bits: int = 16) -> int:
        return self.shape[0] * self.n_blocks * (self.block_size * 4 + scale_bits)

    def bits_per_weight(self, scale_bits: int = 16) -> float:
        return self.storage_bits(scale_bits) / (self.shape[0] * self.shape[1])

    def cat_rows(self, *others: FP4Tensor) -> FP4Tensor:
        for p in others:
            if not isinstance(p, FP4Tensor) or (p.block_size, p.shape[1]) != (self.block_size, self.shape[1]):
                raise ValueError("cannot fuse fp4 tensors with different layouts")
        parts = (self, *others)
        return FP4Tensor(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
                         self.block_size, (sum(p.shape[0] for p in parts), self.shape[1]))


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code (uint8 0..15) of each value of ``x`` (already divided by the scale);
    magnitudes above 6 saturate; a tie goes to the even mantissa (as IEEE rounding)."""
    mags = torch.tensor(E2M1_MAGNITUDES)
    a = x.abs().clamp(max=E2M1_MAX)
    mid = (mags[1:] + mags[:-1]) / 2
    idx = torch.bucketize(a, mid)  # ties (a == mid) go to the lower magnitude ...
    tie = (idx < len(mid)) & (a == mid[idx.clamp(max=len(mid) - 1)])
    idx = torch.where(tie & (idx % 2 == 1), idx + 1, idx)  # ... unless that one has an odd mantissa
    return (idx + 8 * (x < 0)).to(torch.uint8)


def quantize_fp4(w: torch.Tensor, block_size: int = 32, scale_dtype: str = "float16") -> FP4Tensor:
    """Round-to-nearest E2M1 with ``scale = absmax / 6`` per block (pure function)."""
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"fp4 needs a positive even block size, got {block_size}")
    n, k = w.shape
    blocks = to_blocks(w, block_size)
    scales = _round_scales((blocks.abs().amax(-1) / E2M1_MAX).clamp(min=1e-12), scale_dtype)
    codes = encode_e2m1(blocks / scales.unsqueeze(-1))
    return FP4Tensor(pack_codes(codes.view(n, -1), 4, block_size), scales.contiguous(), block_size, (n, k))
