"""RTN block quantization against an independent NumPy oracle, on awkward shapes."""

import numpy as np
import pytest
import torch
from torch import nn

from edgecompress.compress.quant.formats import (BlockQuantizedTensor, QuantScheme, pack_codes, quantize_blockwise,
                                                 unpack_codes)
from edgecompress.compress.quant.modules import QuantEmbedding, QuantLinear
from edgecompress.compress.quant.rtn import RTNConfig, apply_rtn


def numpy_rtn(w: np.ndarray, bits: int, block: int, symmetric: bool) -> np.ndarray:
    """Independent reference: fake-quantized weights, block by block, with fp16-rounded scales."""
    n, k = w.shape
    out = np.zeros_like(w, dtype=np.float64)
    qmax = 2**bits - 1
    for r in range(n):
        for s in range(0, k, block):
            x = w[r, s:s + block].astype(np.float64)
            if symmetric:  # the signed peak maps onto code 0 (= -2**(bits-1)), as llama.cpp's Q4_0
                mid = 2 ** (bits - 1)
                peak = x[np.argmax(np.abs(x))]
                scale = np.float64(np.float16(-peak / mid))
                q = np.clip(np.round(x / scale) + mid, 0, qmax)
                out[r, s:s + block] = (q - mid) * scale
            else:
                lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
                scale = np.float64(np.float16(max((hi - lo) / qmax, 1e-12)))
                zp = np.clip(np.round(-lo / scale), 0, qmax)
                q = np.clip(np.round(x / scale) + zp, 0, qmax)
                out[r, s:s + block] = (q - zp) * scale
    return out


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum()))


@pytest.mark.parametrize("shape", [(7, 72), (33, 576), (5, 100), (3, 1536)])
@pytest.mark.parametrize("bits,block", [(4, 32), (4, 64), (4, 128), (8, 128), (4, 0), (8, 0), (3, 32), (3, 128)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_matches_numpy_oracle(shape, bits, block, symmetric):
    torch.manual_seed(1)
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 3
    p = quantize_blockwise(w, QuantScheme(bits=bits, block_size=block, symmetric=symmetric))
    ref = numpy_rtn(w.numpy(), bits, block or shape[1], symmetric)
    np.testing.assert_allclose(p.to_float().numpy(), ref, rtol=1e-6, atol=1e-7)
    assert p.to_float().shape == w.shape
    # error bound: half a step, except where a code was clipped at the top of the grid (the
    # symmetric grid has one code fewer above zero than below; the asymmetric zero point is
    # rounded): there at most one step
    step = p.scales.abs().repeat_interleave(p.block_size, 1)[:, : shape[1]]
    err = (p.to_float() - w).abs()
    codes = p.unpacked()[:, : shape[1]]
    clipped = codes == 2**bits - 1
    assert torch.all(err <= step * 1.0 + 1e-6)
    assert torch.all(err[~clipped] <= step[~clipped] * 0.5 * (1 + 1e-3) + 1e-6)


def test_sqnr_floor_on_linear():
    torch.manual_seed(0)
    lin = nn.Linear(576, 1536)
    for bits, block, floor in [(4, 128, 17.0), (4, 32, 19.0), (8, 0, 38.0)]:
        p = quantize_blockwise(lin.weight, QuantScheme(bits, block, True))
        assert sqnr_db(lin.weight.detach(), p.to_float()) > floor, (bits, block)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_pack_unpack_roundtrip(bits):
    q = torch.randint(0, 2**bits, (6, 3 * 64), dtype=torch.uint8)
    packed = pack_codes(q, bits, 64)
    assert packed.shape == (6, 3, 64 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, 64), q)
    if bits == 4:  # low nibble holds the even-index value (ONNX Runtime's layout)
        assert int(packed[0, 0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)
    if bits == 3:  # byte j of plane p holds bit p of codes 8j..8j+7, lowest index in the lowest bit
        assert int(packed[0, 0, 8]) == sum(((int(q[0, i]) >> 1) & 1) << i for i in range(8))


def test_bits_per_weight_counts_scales_and_zero_points():
    w = torch.randn(16, 576)
    sym = quantize_blockwise(w, QuantScheme(4, 64, True))
    asym = quantize_blockwise(w, QuantScheme(4, 64, False))
    assert sym.bits_per_weight(16) == pytest.approx(4 + 16 / 64)
    assert asym.bits_per_weight(16) == pytest.approx(4 + 16 / 64 + 4 / 64)
    padded = quantize_blockwise(w, QuantScheme(4, 128, True))  # 576 = 4.5 blocks of 128: padding is stored
    assert padded.n_blocks == 5 and padded.bits_per_weight(16) > 4 + 16 / 128


def test_cat_rows_fuses_and_refuses_mixed_schemes():
    a = quantize_blockwise(torch.randn(8, 64), QuantScheme(4, 32, True))
    b = quantize_blockwise(torch.randn(4, 64), QuantScheme(4, 32, True))
    fused = a.cat_rows(b)
    assert torch.equal(fused.to_float(), torch.cat([a.to_float(), b.to_float()]))
    c = quantize_blockwise(torch.randn(4, 64), QuantScheme(4, 32, False))
    with pytest.raises(ValueError):
        a.cat_rows(c)


def test_scheme_rejects_unsupported_bits():
    with pytest.raises(ValueError, match="bits"):
        QuantScheme(bits=5)
    with pytest.raises(ValueError, match="multiple of 8"):
        quantize_blockwise(torch.randn(4, 36), QuantScheme(bits=3, block_size=0))


def test_apply_rtn_quantizes_embedding_and_tied_head_together(tiny_llama):
    recs = apply_rtn(tiny_llama, RTNConfig(bits=4, group_size=32))
    emb, head = tiny_llama.model.embed_tokens, tiny_llama.lm_head
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear)
    assert head.packed is emb.packed  # one tensor, stored once
    names = {r.module for r in recs}
    assert "model.embed_tokens" in names and "lm_head" not in names
    assert next(r for r in recs if r.module == "model.embed_tokens").shared_with == ["lm_head"]
    n_linear = 2 * 7
    assert len(recs) == n_linear + 1
    with torch.no_grad():
        out = tiny_llama(torch.randint(0, 260, (1, 12))).logits
    assert torch.isfinite(out).all()


def test_apply_rtn_targets_ignore_and_embeddings_off(tiny_llama):
    recs = apply_rtn(tiny_llama, RTNConfig(bits=8, group_size=0, targets=(r"mlp\.",), ignore=(r"down_proj",),
                                           embeddings=False))
    names = {r.module for r in recs}
    assert names == {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj")}
    assert type(tiny_llama.lm_head) is nn.Linear  # tied to the fp32 embedding, left as is
    assert type(tiny_llama.model.embed_tokens) is nn.Embedding


def test_quant_linear_matches_dense_dequantized():
    torch.manual_seed(0)
    lin = nn.Linear(72, 40)
    p = quantize_blockwise(lin.weight, QuantScheme(4, 32, False))
    ql = QuantLinear(p, lin.bias)
    x = torch.randn(3, 72)
    assert torch.allclose(ql(x), x @ p.to_float().T + lin.bias, atol=1e-6)
    assert isinstance(p, BlockQuantizedTensor)


def test_targets_matching_nothing_is_a_clear_error(tiny_llama):
    from edgecompress.errors import EdgeCompressError

    with pytest.raises(EdgeCompressError, match="down_projection") as e:
        apply_rtn(tiny_llama, RTNConfig(targets=("down_projection",)))
    assert "down_proj" in str(e.value)  # close matches and module leaf names are listed


# ------------------------------------------------------------------ fp4 (E2M1)
def test_e2m1_encoding_matches_a_numpy_nearest_value_oracle():
    from edgecompress.compress.quant.fp4 import E2M1_VALUES, encode_e2m1

    torch.manual_seed(0)
    x = torch.cat([torch.randn(5000) * 3, torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, 7.0, -9.0, 0.0])])
    codes = encode_e2m1(x)
    vals = E2M1_VALUES.numpy()
    got = vals[codes.numpy()]
    clipped = np.clip(x.numpy(), -6, 6)
    dist = np.abs(clipped[:, None] - vals[None, :])
    best = dist.min(1)
    assert np.allclose(np.abs(got - clipped), best)  # always a nearest representable value
    # ties go to the even mantissa: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4
    assert got[-11:-4].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert got[-4:].tolist() == [-4.0, 6.0, -6.0, 0.0]


@pytest.mark.parametrize("shape,block", [((16, 64), 32), ((10, 72), 32), ((8, 64), 16)])
def test_fp4_to_float_round_trip_and_sqnr(shape, block):
    from edgecompress.compress.quant.fp4 import E2M1_VALUES, quantize_fp4

    torch.manual_seed(0)
    w = torch.randn(*shape)
    p = quantize_fp4(w, block)
    wq = p.to_float()
    assert wq.shape == w.shape
    # every dequantized value is a table value times its block's scale
    n, k = shape
    padded = torch.zeros(n, p.n_blocks * block)
    padded[:, :k] = wq
    ratio = padded.view(n, p.n_blocks, block) / p.scales.unsqueeze(-1)
    assert torch.isin(ratio.round(decimals=5), E2M1_VALUES).all()
    sqnr = 10 * torch.log10(w.square().sum() / (w - wq).square().sum())
    assert sqnr > 15  # E2M1 with a per-block absmax scale on Gaussian weights: ~17-18 dB
    assert quantize_fp4(wq, block).to_float().allclose(wq)  # idempotent on its own grid
    assert p.bits_per_weight() == pytest.approx((block * 4 + 16) * p.n_blocks / k)


def test_fp4_custom_op_function_body_equals_torch():
    import onnxruntime as ort

    from edgecompress.compress.quant.fp4 import quantize_fp4
    from edgecompress.export.graph import FLOAT, GraphBuilder
    from edgecompress.export.onnx_formats import EmitOptions, WeightCache, emit_linear
    from edgecompress.compress.quant.modules import QuantLinear

    torch.manual_seed(0)
    lin = QuantLinear(quantize_fp4(torch.randn(24, 80), 32))
    g = GraphBuilder("fp4")
    x = g.input("x", FLOAT, [3, 80])
    y, fmt = emit_linear(g, x, lin, "lin", EmitOptions(), WeightCache())
    g.node("Identity", [y], outputs=["y"])
    g.output("y", FLOAT, [3, 24])
    assert fmt.onnx_op == "edgecompress::MatMulFP4" and fmt.bits == pytest.approx((32 * 4 + 16) * 3 / 80)
    sess = ort.InferenceSession(g.model().SerializeToString(), providers=["CPUExecutionProvider"])
    a = torch.randn(3, 80)
    np.testing.assert_allclose(sess.run(None, {"x": a.numpy()})[0], lin(a).detach().numpy(), atol=1e-4)


def test_split_rows_tensor_assembles_rows_in_place_and_counts_every_bit():
    from edgecompress.compress.quant.formats import SplitRowsTensor, split_rows

    g = torch.Generator().manual_seed(5)
    w = torch.randn(50, 40, generator=g)
    s4, s8 = QuantScheme(4, 16, True), QuantScheme(8, 16, True)
    p = split_rows(w, torch.tensor([31, 2, 2, 49]), lambda rows, hi: quantize_blockwise(rows, s8 if hi else s4))
    assert p.rows.tolist() == [2, 31, 49] and p.shape == (50, 40)
    dense = p.to_float()
    rest = [v for v in range(50) if v not in (2, 31, 49)]
    torch.testing.assert_close(dense[[2, 31, 49]], quantize_blockwise(w[[2, 31, 49]], s8).to_float())
    torch.testing.assert_close(dense[rest], quantize_blockwise(w[rest], s4).to_float())
    assert p.position()[[2, 31, 49]].tolist() == [0, 1, 2] and p.position()[rest].tolist() == list(range(3, 50))
    assert p.storage_bits() == p.hi.storage_bits() + p.lo.storage_bits() + 50 * 16
    with pytest.raises(ValueError, match="ascending"):
        SplitRowsTensor(torch.tensor([3, 1]), quantize_blockwise(w[:2], s8), p.lo)
