"""Native TVM kernels (tensor expressions + hand schedules) for the operators the toolkit emits.

Each kernel is a scheduled ``PrimFunc`` with a symbolic row count ``m`` (tokens), marked
``tirx.is_scheduled`` so the generic CPU rules leave it alone and ``op_pattern = opaque`` so
Relax does not fuse it into a neighbour (which would drop the schedule). Packed weights stay
packed: the dequantization happens inside the inner loop, on 16-lane vectors.

* :func:`matmul_nbits_int8` — MatMulNBits at ``accuracy_level`` 4 on a CPU with AVX-512 VNNI or AVX2:
  activations quantized to int8 per K-block, weights repacked into 16-output tiles, byte dot
  products (:func:`byte_dot`; see :mod:`.tvm_int8`).
* :func:`act_sparse_matmul_nbits` — ``ActSparse`` feeding a 4-bit MatMulNBits: reads only the weight
  rows of the inputs above their thresholds (see :mod:`.tvm_act_sparse`).
* :func:`matmul_nbits` — ``com.microsoft::MatMulNBits`` in fp32 math (4- or 8-bit codes, blocks along K,
  optional zero points). The activation row is first deinterleaved per block (cheap: one row of
  K floats) so the 4-bit inner loop reads the low nibbles of 16 consecutive bytes against 16
  consecutive activations and the high nibbles against the next 16; the reduction is split into
  16 vector lanes (rfactor) that are summed once per output.
* :func:`gather_block_quantized` — ``com.microsoft::GatherBlockQuantized`` rows (embedding).
* :func:`attention_scores` / :func:`attention_values` — the two products of grouped-query
  attention over the KV cache (position-major ``[T, kv_heads, head_dim]``), vectorised along the
  head dimension; :func:`kv_append` writes the new positions into the cache in place.

NumPy references for every kernel live in the tests (:mod:`tests.test_tvm`).
"""

from __future__ import annotations

import os

import tvm
from tvm import s_tir, te, tirx

LANES = 16  # fp32 lanes of one AVX-512 register (LLVM splits them on narrower targets)
_OPAQUE = 8  # relax op pattern: do not fuse


def _finish(func: tirx.PrimFunc) -> tirx.PrimFunc:
    func = func.without_attr("global_symbol")  # the caller's module names it
    return func.with_attr({"tirx.is_scheduled": True, "op_pattern": _OPAQUE, "tirx.noalias": True})


def _lanes(n: int) -> int:
    lanes = LANES
    while n % lanes:
        lanes //= 2
    return lanes


def _vector_reduce(sch: s_tir.Schedule, block: str, lanes: int, *, parallel_axis: int = 0) -> None:
    """Schedule ``out[spatial...] = sum(r)`` with the last reduction loop split into ``lanes``
    vector partial sums (rfactor). The spatial loop ``parallel_axis`` is moved outermost and run
    in parallel."""
    blk = sch.get_sblock(block)
    loops = sch.get_loops(blk)
    _, lane = sch.split(loops[-1], [None, lanes])
    rf = sch.rfactor(lane, 0)
    spatial = sch.get_loops(blk)[:-1]
    if parallel_axis:  # bring the parallel loop outermost (the weight rows, for a matmul)
        order = [spatial[parallel_axis]] + [lp for i, lp in enumerate(spatial) if i != parallel_axis]
        sch.reorder(*order)
        spatial = order
    sch.parallel(spatial[0])
    sch.compute_at(rf, spatial[-1])
    rf_loops = sch.get_loops(rf)
    lane_loop, reductions = rf_loops[len(spatial)], rf_loops[len(spatial) + 1:]
    sch.reorder(*reductions, lane_loop)
    sch.vectorize(lane_loop)
    sch.decompose_reduction(rf, reductions[0])


def e2m1_value(code: tirx.PrimExpr) -> tirx.PrimExpr:
    """The float32 value of a 4-bit E2M1 code (uint8 ``0..15``): sign bit 3, exponent bits 2..1,
    mantissa bit 0 (``0, 0.5, 1, 1.5, 2, 3, 4, 6`` and their negatives), without a table: the code's
    magnitude bits shifted into float32's exponent/mantissa boundary (``m << 22``) read as a float are
    exactly ``value * 2^-126`` (denormal for ``m = 1``), so one multiply by ``2^126`` restores it."""
    c = code.astype("int32")
    bits = ((c & tirx.const(7, "int32")) << tirx.const(22, "int32")) | (
        (c & tirx.const(8, "int32")) << tirx.const(28, "int32"))
    return tirx.reinterpret("float32", bits) * tirx.const(2.0 ** 126, "float32")


def matmul_nbits(k: int, n: int, bits: int, block_size: int, *, zero_points: bool,
                 e2m1: bool = False) -> tirx.PrimFunc:
    """``Y[m, n] = A[m, :K] @ dequant(B)[n, :K]`` for MatMulNBits' layout:
    ``B`` uint8 ``[N, n_blocks, block_size * bits / 8]`` (4-bit: low nibble = even k), ``scales``
    float32 ``[N * n_blocks]``, optional ``zero_points`` uint8 (4-bit: two per byte, low first;
    8-bit: one per byte; default 8 / 128). With ``e2m1`` the 4-bit codes are FP4 (E2M1) values,
    ``w = e2m1(code) * scale`` (``edgecompress::MatMulFP4``'s layout; no zero points)."""
    if bits not in (4, 8):
        raise NotImplementedError(f"MatMulNBits kernel: {bits}-bit codes (4 and 8 are supported)")
    if e2m1 and (bits != 4 or zero_points):
        raise ValueError("E2M1 codes are 4-bit, without zero points")
    nb = -(-k // block_size)
    blob = block_size * bits // 8
    m = tirx.Var("m", "int64")
    a = te.placeholder((m, k), "float32", name="A")
    b = te.placeholder((n, nb, blob), "uint8", name="B")
    s = te.placeholder((n * nb,), "float32", name="scales")
    zp = te.placeholder((n, (nb + 1) // 2 if bits == 4 else nb), "uint8", name="zero_points") if zero_points else None
    half = block_size // 2
    padded = nb * block_size

    def a_index(m_, i):  # deinterleaved position i -> original k (4-bit blocks: evens then odds)
        if bits == 8:
            return i
        blk, r = i // block_size, i % block_size
        return blk * block_size + (r % half) * 2 + r // half

    a2 = te.compute((m, padded), lambda m_, i: tirx.if_then_else(
        a_index(m_, i) < k, a[m_, tirx.min(a_index(m_, i), k - 1)], tirx.const(0.0, "float32")), name="A_blocked")

    def zero(n_, blk):
        if zp is None:
            return tirx.const(8.0 if bits == 4 else 128.0, "float32")
        if bits == 8:
            return zp[n_, blk].astype("float32")
        byte = zp[n_, blk // 2]
        return ((byte >> (blk % 2 * 4).astype("uint8")) & tirx.const(15, "uint8")).astype("float32")

    rb = te.reduce_axis((0, nb), "rb")
    if bits == 4:
        rj = te.reduce_axis((0, half), "rj")

        def body(m_, n_):
            byte = b[n_, rb, rj]
            if e2m1:
                lo, hi = e2m1_value(byte & tirx.const(15, "uint8")), e2m1_value(byte >> tirx.const(4, "uint8"))
            else:
                z = zero(n_, rb)
                lo = (byte & tirx.const(15, "uint8")).astype("float32") - z
                hi = (byte >> tirx.const(4, "uint8")).astype("float32") - z
            base = rb * block_size + rj
            return te.sum(s[n_ * nb + rb] * (a2[m_, base] * lo + a2[m_, base + half] * hi), axis=[rb, rj])
        lanes = _lanes(half)
    else:
        rj = te.reduce_axis((0, block_size), "rj")

        def body(m_, n_):
            w = b[n_, rb, rj].astype("float32") - zero(n_, rb)
            return te.sum(s[n_ * nb + rb] * a2[m_, rb * block_size + rj] * w, axis=[rb, rj])
        lanes = _lanes(block_size)
    y = te.compute((m, n), body, name="Y")
    args = [a, b, s] + ([zp] if zp is not None else []) + [y]
    sch = s_tir.Schedule(te.create_prim_func(args))
    _vector_reduce(sch, "Y", lanes, parallel_axis=1)
    # the deinterleave is one activation row: a plain loop beside the kernel
    return _finish(sch.mod["main"])


def matmul_int3(k: int, n: int, block_size: int) -> tirx.PrimFunc:
    """``Y[m, n] = A[m, :K] @ dequant(B)[n, :K]`` for ``edgecompress::MatMulBlockQuantized``: symmetric
    3-bit codes as three bit planes per block (``B`` uint8 ``[N, n_blocks, 3 * block / 8]``, plane ``p``
    holds bit ``p`` of codes ``8j .. 8j + 7`` in byte ``j``), ``scales`` float32 ``[N * n_blocks]``,
    ``w = (code - 4) * scale``. The activation row is deinterleaved per block (position ``8j + b`` to
    ``b * block/8 + j``) so that for each bit ``b`` the inner loop reads ``block/8`` consecutive bytes of
    each plane against ``block/8`` consecutive activations, on vector lanes."""
    if block_size % 8:
        raise ValueError(f"3-bit blocks are multiples of 8 codes, got {block_size}")
    nb = -(-k // block_size)
    plane = block_size // 8
    m = tirx.Var("m", "int64")
    a = te.placeholder((m, k), "float32", name="A")
    b = te.placeholder((n, nb, 3 * plane), "uint8", name="B")
    s = te.placeholder((n * nb,), "float32", name="scales")

    def a_index(i):  # deinterleaved position i -> original k
        blk, r = i // block_size, i % block_size
        return blk * block_size + (r % plane) * 8 + r // plane

    a2 = te.compute((m, nb * block_size), lambda m_, i: tirx.if_then_else(
        a_index(i) < k, a[m_, tirx.min(a_index(i), k - 1)], tirx.const(0.0, "float32")), name="A_blocked")
    rb = te.reduce_axis((0, nb), "rb")
    rbit = te.reduce_axis((0, 8), "rbit")
    rj = te.reduce_axis((0, plane), "rj")
    zero = tirx.const(0.0, "float32")

    def body(m_, n_):
        # (code - 4) * x as the sum of x over the code's set bits, weighted 1, 2, 4: a bit test and
        # a masked add per plane, no integer unpacking
        bit = tirx.const(1, "uint8") << rbit.astype("uint8")
        x = a2[m_, rb * block_size + rbit * plane + rj]
        planes = [tirx.Select((b[n_, rb, p * plane + rj] & bit) != tirx.const(0, "uint8"), x, zero) for p in range(3)]
        w = planes[0] + planes[1] * tirx.const(2.0, "float32") + planes[2] * tirx.const(4.0, "float32") \
            - x * tirx.const(4.0, "float32")
        return te.sum(s[n_ * nb + rb] * w, axis=[rb, rbit, rj])
    y = te.compute((m, n), body, name="Y")
    sch = s_tir.Schedule(te.create_prim_func([a, b, s, y]))
    _vector_reduce(sch, "Y", _lanes(plane), parallel_axis=1)
    return _finish(sch.mod["main"])


def gather_block_quantized(v: int, nb: int, blob: int, bits: int, block_size: int, *,
                           zero_points: bool) -> tirx.PrimFunc:
    """Rows ``ids[t]`` of ``GatherBlockQuantized(data [V, nb, blob], ids, scales [V, nb, 1])``
    (``gather_axis=0, quantize_axis=2``), dequantized: ``out [T, nb, block]``."""
    t = tirx.Var("t", "int64")
    data = te.placeholder((v, nb, blob), "uint8", name="data")
    ids = te.placeholder((t,), "int64", name="ids")
    s = te.placeholder((v, nb, 1), "float32", name="scales")
    zp = te.placeholder((v, nb, 1), "uint8", name="zero_points") if zero_points else None
    per_byte = 8 // bits

    def body(t_, blk, j):
        row = ids[t_]
        byte = data[row, blk, j // per_byte]
        if bits == 4:
            code = (byte >> (j % 2 * 4).astype("uint8")) & tirx.const(15, "uint8")
        else:
            code = byte
        z = zp[row, blk, 0].astype("float32") if zp is not None else tirx.const(8.0 if bits == 4 else 128.0, "float32")
        return (code.astype("float32") - z) * s[row, blk, 0]
    out = te.compute((t, nb, blob * per_byte), body, name="rows")
    args = [data, ids, s] + ([zp] if zp is not None else []) + [out]
    sch = s_tir.Schedule(te.create_prim_func(args))
    return _finish(sch.mod["main"])


def rms_norm(hidden: int, epsilon: float) -> tirx.PrimFunc:
    """``y[i, :] = x[i, :] * w / sqrt(mean(x[i, :]^2) + epsilon)`` on ``[m, hidden]`` rows: one
    thread (a decode row is a few hundred floats: a parallel launch costs more than the work),
    the scaling vectorised. Relax's generic ``rms_norm`` took ~50 us per decode row here, and
    ~1 ms with static shapes."""
    m = tirx.Var("m", "int64")
    x = te.placeholder((m, hidden), "float32", name="x")
    w = te.placeholder((hidden,), "float32", name="w")
    r = te.reduce_axis((0, hidden), "r")
    sq = te.compute((m,), lambda i: te.sum(x[i, r] * x[i, r], axis=r), name="sumsq")
    inv = te.compute((m,), lambda i: tirx.rsqrt(sq[i] / tirx.const(hidden, "float32")
                                                + tirx.const(epsilon, "float32")), name="inv")
    y = te.compute((m, hidden), lambda i, j: x[i, j] * w[j] * inv[i], name="y")
    sch = s_tir.Schedule(te.create_prim_func([x, w, y]))
    _, j = sch.get_loops(sch.get_sblock("y"))
    _, lane = sch.split(j, [None, _lanes(hidden)])
    sch.vectorize(lane)
    return _finish(sch.mod["main"])


def kv_append(kv_heads: int, head_dim: int) -> tirx.PrimFunc:
    """In place (``call_tir_inplace`` on argument 0): ``cache[T - S + s, h, :] = new[s, h, :]``, the
    ``S`` new positions written at the end of a ``[T, kv_heads, head_dim]`` cache view."""
    from tvm.script import tirx as T

    @T.prim_func(private=True)
    def append(var_cache: T.handle, var_new: T.handle):
        T.func_attr({"tirx.noalias": True})
        t = T.int64()
        s = T.int64()
        cache = T.match_buffer(var_cache, (t, kv_heads, head_dim), "float32")
        new = T.match_buffer(var_new, (s, kv_heads, head_dim), "float32")
        for i, h, d in T.grid(s, kv_heads, head_dim):
            cache[t - s + i, h, d] = new[i, h, d]

    return append.with_attr({"op_pattern": _OPAQUE})


def attention_scores(kv_heads: int, group: int, head_dim: int, scale: float) -> tirx.PrimFunc:
    """``scores[h, g*S + s, t] = scale * q[h, g*S + s, :] . k[t, h, :]`` with the causal mask of a
    query at position ``P + s`` (``P = T - S``): keys after it get -inf. One batch row; the cache
    is position-major, ``[T, kv_heads, head_dim]``."""
    r, t = tirx.Var("r", "int64"), tirx.Var("t", "int64")  # r = group * S query rows per kv head
    q = te.placeholder((kv_heads, r, head_dim), "float32", name="q")
    kc = te.placeholder((t, kv_heads, head_dim), "float32", name="k")
    d = te.reduce_axis((0, head_dim), "d")
    dot = te.compute((kv_heads, r, t), lambda h, i, j: te.sum(q[h, i, d] * kc[j, h, d], axis=d), name="dot")
    seq = r // group
    neg = tirx.const(-3.0e38, "float32")
    out = te.compute((kv_heads, r, t), lambda h, i, j: tirx.if_then_else(
        j <= t - seq + i % seq, dot[h, i, j] * tirx.const(scale, "float32"), neg), name="scores")
    sch = s_tir.Schedule(te.create_prim_func([q, kc, out]))
    # keys split across threads (fusing heads with the symbolic row count is not affine)
    _vector_reduce(sch, "dot", _lanes(head_dim // 2), parallel_axis=2)  # >= 2 chunks: a reduction loop remains
    return _finish(sch.mod["main"])


def attention_values(kv_heads: int, head_dim: int) -> tirx.PrimFunc:
    """``out[h, i, :] = sum_t p[h, i, t] * v[t, h, :]``, vectorised along the head dimension."""
    r, t = tirx.Var("r", "int64"), tirx.Var("t", "int64")
    p = te.placeholder((kv_heads, r, t), "float32", name="p")
    v = te.placeholder((t, kv_heads, head_dim), "float32", name="v")
    j = te.reduce_axis((0, t), "j")
    out = te.compute((kv_heads, r, head_dim), lambda h, i, dd: te.sum(p[h, i, j] * v[j, h, dd], axis=j), name="pv")
    sch = s_tir.Schedule(te.create_prim_func([p, v, out]))
    blk = sch.get_sblock("pv")
    h, i, dd, jj = sch.get_loops(blk)
    lanes = _lanes(head_dim)
    chunk, lane = sch.split(dd, [None, lanes])
    sch.reorder(chunk, h, i, jj, lane)  # head-dimension chunks across threads, keys inner
    sch.parallel(chunk)
    sch.vectorize(lane)
    sch.decompose_reduction(blk, jj)
    return _finish(sch.mod["main"])


def set_threads(threads: int | None) -> int:
    """Run TVM's parallel loops on ``threads`` threads (None: every CPU this process may use);
    returns the count. TVM sizes its thread pool once, when it first starts, from ``TVM_NUM_THREADS``
    or else its own count of physical cores, which is 1 on this 2-vCPU machine: ``config_threadpool``
    alone then cannot go above one thread, and every "2-thread" TVM number measured before this
    existed ran on one. So the pool is sized here, before it starts (a ``TVM_NUM_THREADS`` the user
    set is kept), then set to ``threads``."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("TVM_NUM_THREADS", str(cpus))
    n = int(threads) if threads else cpus
    tvm.get_global_func("runtime.config_threadpool")(0, n)
    return n


def target_llvm(mcpu: str | None = None, threads: int | None = None) -> tvm.target.Target:
    """An LLVM CPU target for this machine's CPU (``mcpu`` from LLVM's host detection)."""
    from tvm.target import codegen

    if mcpu and not codegen.llvm_is_valid_cpu(mcpu, codegen.llvm_get_system_triple()):
        from edgecompress.errors import EdgeCompressError

        raise EdgeCompressError(f"LLVM does not know the CPU {mcpu!r}",
                                hint=f"name an LLVM CPU, e.g. {codegen.llvm_get_system_cpu()} (this machine's)")
    spec = {"kind": "llvm", "mcpu": mcpu or codegen.llvm_get_system_cpu()}
    if threads:
        spec["num-cores"] = int(threads)
    return tvm.target.Target(spec)


def host() -> dict[str, str]:
    """What a compiled library depends on, for this process: TVM version, LLVM host triple and CPU."""
    from tvm.target import codegen

    return {"tvm_version": tvm.__version__, "triple": str(codegen.llvm_get_system_triple()),
            "mcpu": str(codegen.llvm_get_system_cpu())}


# ----------------------------------------------------------------------------- activation-sparse int4 GEMV

SPARSE_LANES = 16  # bytes of one input channel's packed row read per vector step (32 outputs)
PREFETCH_ROWS = 4  # active weight rows a thread prefetches ahead
_LINE = 64  # cache line bytes


def prefetch_line(address) -> tirx.PrimExpr:
    """``llvm.prefetch`` (read, keep in all cache levels, data) of ``address`` (a ``T.address_of``),
    for ``T.evaluate`` inside a kernel."""
    return tirx.call_llvm_intrin("void", "llvm.prefetch.p0", address, tirx.const(0, "int32"),
                                 tirx.const(3, "int32"), tirx.const(1, "int32"))


def pack_act_sparse_nbits(b, scales, zero_points, k: int, n: int, block_size: int, *, lanes: int = SPARSE_LANES):
    """MatMulNBits' 4-bit ``B [N, n_blocks, block/2]`` (+ ``scales [N * n_blocks]``, optional packed
    ``zero_points``) in the input-major layout of :func:`act_sparse_matmul_nbits`: returns
    ``(w [K, Np/2] uint8, scales [n_blocks, Np] float32, zeros [n_blocks, Np] float32 or None)``,
    ``Np = N`` rounded up to a multiple of ``2 * lanes``. In row ``k``, byte ``c*lanes + l`` holds
    output ``c*2*lanes + l`` in its low nibble and output ``c*2*lanes + lanes + l`` in its high nibble,
    so one active input channel is one contiguous stretch of ``Np/2`` bytes. Padded outputs get scale 0."""
    import numpy as np

    nb = -(-k // block_size)
    step = 2 * lanes
    npad = -(-n // step) * step
    b = np.asarray(b, np.uint8).reshape(n, nb, block_size // 2)
    codes = np.stack([b & 15, b >> 4], -1).reshape(n, nb * block_size)[:, :k]  # [N, K], low nibble = even k
    codes = np.concatenate([codes, np.full((npad - n, k), 8, np.uint8)]).T.reshape(k, npad // step, 2, lanes)
    w = np.ascontiguousarray(codes[:, :, 0, :] | (codes[:, :, 1, :] << 4)).reshape(k, npad // 2)
    s = np.zeros((nb, npad), np.float32)
    s[:, :n] = np.asarray(scales, np.float32).reshape(n, nb).T
    z = None
    if zero_points is not None:
        zp = np.asarray(zero_points, np.uint8).reshape(n, -1)
        z = np.full((nb, npad), 8.0, np.float32)
        z[:, :n] = np.stack([zp & 15, zp >> 4], -1).reshape(n, -1)[:, :nb].T
    return w, s, z


def _act_sparse_func(body, k: int, n: int, nb: int, npad: int, zero_points: bool) -> tirx.PrimFunc:
    """The PrimFunc of an activation-sparse kernel around its ``body`` macro: ``(A [m, K], thr [K],
    w [K, Np/2], scales [nb, Np][, zeros [nb, Np]], Y [m, N])`` (without zero points the macro gets
    the scales in their place and does not read them)."""
    from tvm.script import tirx as T

    if zero_points:
        @T.prim_func(private=True)
        def func(var_a: T.handle, thr: T.Buffer((k,), "float32"), w: T.Buffer((k, npad // 2), "uint8"),
                 s: T.Buffer((nb, npad), "float32"), z: T.Buffer((nb, npad), "float32"), var_y: T.handle):
            T.func_attr({"tirx.noalias": True})
            m = T.int64()
            a = T.match_buffer(var_a, (m, k), "float32")
            y = T.match_buffer(var_y, (m, n), "float32")
            body(a, thr, w, s, z, y, m)
    else:
        @T.prim_func(private=True)
        def func(var_a: T.handle, thr: T.Buffer((k,), "float32"), w: T.Buffer((k, npad // 2), "uint8"),
                 s: T.Buffer((nb, npad), "float32"), var_y: T.handle):
            T.func_attr({"tirx.noalias": True})
            m = T.int64()
            a = T.match_buffer(var_a, (m, k), "float32")
            y = T.match_buffer(var_y, (m, n), "float32")
            body(a, thr, w, s, s, y, m)
    return _finish(func)


def act_sparse_matmul_nbits(k: int, n: int, block_size: int, *, zero_points: bool, parts: int = 2,
                            prefetch: int = PREFETCH_ROWS) -> tirx.PrimFunc:
    """``Y[m, :N] = dequant(W) @ where(|A[m]| > thr, A[m], 0)`` reading only the weights of active inputs.

    Arguments: ``A [m, K]`` float32, ``thr [K]`` float32, ``w [K, Np/2]`` uint8, ``scales [nb, Np]``,
    optional ``zeros [nb, Np]`` float32 (default 8), the layout of :func:`pack_act_sparse_nbits`. Per
    row: a serial pass compacts the active channels (indices and values, where each K-block's
    start in that list); then the list is cut into ``parts`` equal shares, one per thread, so each
    thread streams whole contiguous weight rows of its own stretch of inputs (splitting the outputs
    instead made both threads read half of every active row, a strided pattern that ran slower than
    the dense kernel once the weights came from DRAM). Per block with an active channel in its share,
    a thread accumulates ``x_k * code[k, :]`` over those rows (four rows per pass; 16-byte vectors:
    two nibbles -> 32 outputs) into its own accumulator, then adds ``scale * (acc - zero * sum_x)``
    to its own partial output; the partial outputs are summed at the end. Each thread prefetches
    the weight row ``prefetch`` active channels ahead (``llvm.prefetch``): the hardware prefetchers
    do not follow the gaps between active rows. Inactive channels' rows are never read. ``m > 1``
    (prefill) runs the same per row."""
    from tvm.script import tirx as T
    nb = -(-k // block_size)
    step = 2 * SPARSE_LANES
    chunks = -(-n // step)
    npad = chunks * step
    half = SPARSE_LANES
    rowb = npad // 2
    parts = max(1, parts)
    lines = -(-rowb // _LINE)

    @T.macro
    def pf(w, row):
        for l in T.serial(lines):
            T.evaluate(prefetch_line(T.address_of(w[row, l * _LINE])))

    @T.macro
    def body(a, thr, w, s, z, y, m):
        idx = T.alloc_buffer((k + prefetch,), "int32")
        xa = T.alloc_buffer((k,), "float32")
        start = T.alloc_buffer((nb + 1,), "int32")
        acc = T.alloc_buffer((parts, npad), "float32")
        out = T.alloc_buffer((parts, npad), "float32")
        cnt = T.alloc_buffer((1,), "int32")
        for r in T.serial(m):
            cnt[0] = 0
            for bi in T.serial(nb):
                start[bi] = cnt[0]
                for j in T.serial(block_size):
                    if bi * block_size + j < k:
                        kk = bi * block_size + j
                        v = a[r, kk]
                        idx[cnt[0]] = kk
                        xa[cnt[0]] = v
                        cnt[0] = cnt[0] + T.Cast("int32", T.abs(v) > thr[kk])
            start[nb] = cnt[0]
            for e in T.serial(prefetch):
                idx[cnt[0] + e] = idx[T.max(cnt[0] - 1, 0)]
            for p in T.parallel(parts):
                for c in T.serial(chunks):
                    for lane in T.vectorized(step):
                        out[p, c * step + lane] = T.float32(0)
                lo = p * cnt[0] // parts
                hi = (p + 1) * cnt[0] // parts
                if hi > lo:
                    for e in T.serial(prefetch):
                        pf(w, idx[lo + e])
                for bi in T.serial(nb):
                    b0 = T.max(start[bi], lo)
                    b1 = T.min(start[bi + 1], hi)
                    if b1 > b0:
                        xs = T.alloc_buffer((1,), "float32", scope="local")
                        xs[0] = T.float32(0)
                        for c in T.serial(chunks):
                            for lane in T.vectorized(step):
                                acc[p, c * step + lane] = T.float32(0)
                        for q in T.serial((b1 - b0) // 4):
                            j0 = b0 + q * 4
                            for e in T.serial(4):
                                if j0 + e + prefetch < hi:
                                    pf(w, idx[j0 + e + prefetch])
                            r0 = idx[j0]
                            r1 = idx[j0 + 1]
                            r2 = idx[j0 + 2]
                            r3 = idx[j0 + 3]
                            x0 = xa[j0]
                            x1 = xa[j0 + 1]
                            x2 = xa[j0 + 2]
                            x3 = xa[j0 + 3]
                            xs[0] = xs[0] + x0 + x1 + x2 + x3
                            for c in T.serial(chunks):
                                for lane in T.vectorized(half):
                                    acc[p, c * step + lane] = acc[p, c * step + lane] + (
                                        x0 * T.Cast("float32", T.bitwise_and(w[r0, c * half + lane], T.uint8(15)))
                                        + x1 * T.Cast("float32", T.bitwise_and(w[r1, c * half + lane], T.uint8(15)))
                                        + x2 * T.Cast("float32", T.bitwise_and(w[r2, c * half + lane], T.uint8(15)))
                                        + x3 * T.Cast("float32", T.bitwise_and(w[r3, c * half + lane], T.uint8(15))))
                                    acc[p, c * step + half + lane] = acc[p, c * step + half + lane] + (
                                        x0 * T.Cast("float32", T.shift_right(w[r0, c * half + lane], T.uint8(4)))
                                        + x1 * T.Cast("float32", T.shift_right(w[r1, c * half + lane], T.uint8(4)))
                                        + x2 * T.Cast("float32", T.shift_right(w[r2, c * half + lane], T.uint8(4)))
                                        + x3 * T.Cast("float32", T.shift_right(w[r3, c * half + lane], T.uint8(4))))
                        for jj in T.serial(b0 + (b1 - b0) // 4 * 4, b1):
                            if jj + prefetch < hi:
                                pf(w, idx[jj + prefetch])
                            row = idx[jj]
                            xv = xa[jj]
                            xs[0] = xs[0] + xv
                            for c in T.serial(chunks):
                                for lane in T.vectorized(half):
                                    acc[p, c * step + lane] = acc[p, c * step + lane] + xv * T.Cast(
                                        "float32", T.bitwise_and(w[row, c * half + lane], T.uint8(15)))
                                    acc[p, c * step + half + lane] = acc[p, c * step + half + lane] + xv * T.Cast(
                                        "float32", T.shift_right(w[row, c * half + lane], T.uint8(4)))
                        for c in T.serial(chunks):
                            for lane in T.vectorized(step):
                                if zero_points:
                                    out[p, c * step + lane] = out[p, c * step + lane] + s[bi, c * step + lane] * (
                                        acc[p, c * step + lane] - z[bi, c * step + lane] * xs[0])
                                else:
                                    out[p, c * step + lane] = out[p, c * step + lane] + s[bi, c * step + lane] * (
                                        acc[p, c * step + lane] - T.float32(8) * xs[0])
            for c in T.serial(chunks):
                for lane in T.vectorized(step):
                    acc[0, c * step + lane] = out[0, c * step + lane]
                for pp in T.serial(1, parts):
                    for lane in T.vectorized(step):
                        acc[0, c * step + lane] = acc[0, c * step + lane] + out[pp, c * step + lane]
                for lane in T.serial(step):
                    if c * step + lane < n:
                        y[r, c * step + lane] = acc[0, c * step + lane]

    return _act_sparse_func(body, k, n, nb, npad, zero_points)


# ----------------------------------------------------------------------------- int8-activation GEMV (VNNI or AVX2)

VNNI_TILE = 16  # outputs per int32x16 accumulator
ROW_TILE = 4  # activation rows per weight read in the int8 kernel's prefill (GEMM) loop
VNNI_FEATURES = ("avx512vnni", "avx512bw")


def _cpu_has(target: tvm.target.Target, *features: str) -> bool:
    """Whether ``target`` is an LLVM CPU target with every one of ``features``."""
    from tvm.target import codegen

    return target.kind.name == "llvm" and bool(codegen.target_has_features(list(features), target))


def has_vnni(target: tvm.target.Target) -> bool:
    """Whether ``target``'s CPU has the AVX-512 VNNI byte dot product (``vpdpbusd``)."""
    return _cpu_has(target, *VNNI_FEATURES)


INT8_ISA_CODES = {"vnni": 1, "avx2": 2}  # the ``int8`` attribute of the rewritten nodes (0: fp32 kernel)


def isa_of_code(code: int, codes: dict[str, int] = INT8_ISA_CODES) -> str:
    """The instruction set a rewritten node's attribute names (:data:`INT8_ISA_CODES`, or
    :data:`PERMUTE_ISA_CODES` for the 2:4 kernel's)."""
    for isa, c in codes.items():
        if c == code:
            return isa
    raise ValueError(f"kernel instruction-set attribute {code}: expected one of {sorted(codes.values())}")


def int8_isa(target: tvm.target.Target) -> str | None:
    """The byte dot product the int8-activation kernels use on ``target``'s CPU: ``"vnni"``
    (AVX-512 VNNI ``vpdpbusd``), ``"avx2"`` (``vpmaddubsw`` + ``vpmaddwd``), or None (no int8
    kernels: MatMulNBits keeps the fp32 kernel)."""
    if has_vnni(target):
        return "vnni"
    if _cpu_has(target, "avx2"):
        return "avx2"
    return None


def avx2_dot8(codes32, act, weight: int = 1) -> tirx.PrimExpr:
    """Eight int32 dot products of 4 unsigned code bytes (``codes32``, uint8x32) with the 4 signed
    bytes packed in ``act``, times ``weight``: ``vpmaddubsw`` (byte pairs -> int16) then
    ``vpmaddwd`` by ``weight`` (-> int32); exact for codes below 16 (|pair| <= 2 * 15 * 128)."""
    p16 = tirx.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", tirx.reinterpret("int8x32", codes32),
                                     tirx.reinterpret("int8x32", tirx.Broadcast(act, 8)))
    return tirx.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", p16,
                                      tirx.Broadcast(tirx.const(weight, "int16"), 16))


def byte_dot(isa: str, acc, codes, act, *, wide: bool = False) -> tirx.PrimExpr:
    """``acc`` (int32x16) plus, per lane ``o``, the dot product of the unsigned bytes
    ``codes[4o:4o+4]`` (uint8x64) with the four signed bytes packed in the int32 ``act``.

    ``"vnni"``: one ``vpdpbusd``. ``"avx2"``: per 8 lanes, ``vpmaddubsw`` (byte pairs -> int16) then
    ``vpmaddwd`` by ones (-> int32); exact for codes below 16 (|pair| <= 2 * 15 * 128). ``wide``
    (codes up to 255, which would saturate the int16 pairs): the codes are split into nibbles,
    the high one's pair sums weighted 16 in ``vpmaddwd``: twice the instructions, still exact."""
    if isa == "vnni":
        return tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc,
                                          tirx.reinterpret("int8x64", codes),
                                          tirx.reinterpret("int8x64", tirx.Broadcast(act, 16)))
    if isa != "avx2":
        raise ValueError(f"int8 kernels: unknown instruction set {isa!r} (expected 'vnni' or 'avx2')")
    halves = []
    for h in range(2):
        c32 = tirx.Shuffle([codes], [tirx.const(32 * h + i, "int32") for i in range(32)])
        part = tirx.Shuffle([acc], [tirx.const(8 * h + i, "int32") for i in range(8)])
        if wide:
            part = part + avx2_dot8(tirx.bitwise_and(c32, tirx.Broadcast(tirx.const(15, "uint8"), 32)), act) + avx2_dot8(
                tirx.shift_right(c32, tirx.Broadcast(tirx.const(4, "uint8"), 32)), act, weight=16)
        else:
            part = part + avx2_dot8(c32, act)
        halves.append(part)
    return tirx.Shuffle(halves, [tirx.const(i, "int32") for i in range(16)])


def pack_nbits_int8(b, scales, zero_points, k: int, n: int, bits: int, block_size: int):
    """MatMulNBits' ``B [N, n_blocks, block*bits/8]`` (+ ``scales [N * n_blocks]``, optional
    ``zero_points``) in the layout of :func:`matmul_nbits_int8`: returns ``(w, scales [nt, nb, 16]
    float32, zeros [nt, nb, 16] float32 or None)``, ``nt = ceil(N / 16)`` tiles of 16 outputs.

    ``w [nt, nb, block/8 or block/4, 64]`` uint8: for a tile, a block and a step, 16 outputs x 4
    bytes, byte ``(o, q)`` holding output ``o``'s code for input ``4s + q`` (8-bit: one step per 4
    inputs) or, 4-bit, its codes for inputs ``8s + q`` (low nibble) and ``8s + 4 + q`` (high nibble):
    one 64-byte load feeds ``vpdpbusd`` directly (8-bit) or after a mask and a shift (4-bit), still
    ``bits`` per weight. Padded outputs get scale 0; padded inputs meet zero activations."""
    import numpy as np

    nb = -(-k // block_size)
    nt = -(-n // VNNI_TILE)
    zero = 8 if bits == 4 else 128
    b = np.asarray(b, np.uint8).reshape(n, nb, block_size * bits // 8)
    codes = np.stack([b & 15, b >> 4], -1).reshape(n, nb * block_size) if bits == 4 else b.reshape(n, nb * block_size)
    codes = np.concatenate([codes, np.full((nt * VNNI_TILE - n, nb * block_size), zero, np.uint8)])
    if bits == 4:
        c = codes.reshape(nt, VNNI_TILE, nb, block_size // 8, 2, 4)  # [t, o, b, step, nibble, q]
        w = (c[:, :, :, :, 0, :] | (c[:, :, :, :, 1, :] << 4)).transpose(0, 2, 3, 1, 4)
    else:
        w = codes.reshape(nt, VNNI_TILE, nb, block_size // 4, 4).transpose(0, 2, 3, 1, 4)
    w = np.ascontiguousarray(w).reshape(nt, nb, -1, 4 * VNNI_TILE)

    def tiles(per_output):  # [N, nb] -> [nt, nb, 16]
        return np.ascontiguousarray(per_output.reshape(nt, VNNI_TILE, nb).transpose(0, 2, 1))

    s = np.zeros((nt * VNNI_TILE, nb), np.float32)
    s[:n] = np.asarray(scales, np.float32).reshape(n, nb)
    z = None
    if zero_points is not None:
        zp = np.asarray(zero_points, np.uint8).reshape(n, -1)
        zz = np.full((nt * VNNI_TILE, nb), float(zero), np.float32)
        zz[:n] = (np.stack([zp & 15, zp >> 4], -1).reshape(n, -1) if bits == 4 else zp)[:, :nb]
        z = tiles(zz)
    return w, tiles(s), z


def matmul_nbits_int8(k: int, n: int, bits: int, block_size: int, *, zero_points: bool,
                      isa: str = "vnni") -> tirx.PrimFunc:
    """``Y[m, :N] = A[m] @ dequant(B).T`` with the activations quantized to int8, as ONNX Runtime's
    MatMulNBits does at ``accuracy_level`` 4: per row and K-block, ``a_q = round(a * 127 / max|a|)``;
    per output and block, ``(sum_k code * a_q - zero * sum_k a_q) * scale * max|a| / 127``.

    Arguments: ``A [m, K]`` float32 and the layout of :func:`pack_nbits_int8`. A serial pass
    quantizes every row's activations (four int8 values packed per int32); then the tiles of 16
    outputs are split between the threads, and per block each tile accumulates byte dot products
    (:func:`byte_dot`: 64 unsigned-code x signed-activation byte products into 16 int32 lanes, one
    ``vpdpbusd`` with ``isa="vnni"``, ``vpmaddubsw`` + ``vpmaddwd`` per 32 bytes with ``"avx2"``;
    4-bit codes need one mask or shift per 64 bytes) before one float multiply-add per block. Rows
    go :data:`ROW_TILE` at a time (a GEMM for prefill: each weight load serves four rows), the
    remainder (decode's single row) one at a time. ``isa``: what the target CPU has (:func:`int8_isa`)."""
    from tvm.script import tirx as T

    if bits not in (4, 8):
        raise NotImplementedError(f"int8 MatMulNBits kernel: {bits}-bit codes (4 and 8 are supported)")
    nb = -(-k // block_size)
    nt = -(-n // VNNI_TILE)
    quads = block_size // 4
    steps = block_size // 8 if bits == 4 else quads
    lanes = VNNI_TILE
    zero = 8.0 if bits == 4 else 128.0

    @T.macro
    def dot(acc, rr, c, codes, act):
        acc[rr, c, T.ramp(0, 1, lanes)] = byte_dot(isa, acc[rr, c, T.ramp(0, 1, lanes)], codes, act, wide=bits == 8)

    def row_tile(rows):
        """``rows`` activation rows against one tile of 16 outputs: each 64-byte weight load feeds
        ``2 * rows`` vpdpbusd (two chains per row, low and high nibbles / even and odd steps)."""
        @T.macro
        def tile(w, s, z, y, aq, sa, qs, t, r0):
            acci = T.alloc_buffer((rows, 2, lanes), "int32", scope="local")
            accf = T.alloc_buffer((rows, lanes), "float32", scope="local")
            for rr in T.unroll(rows):
                accf[rr, T.ramp(0, 1, lanes)] = T.broadcast(T.float32(0), lanes)
            for bi in T.serial(nb):
                for rr in T.unroll(rows):
                    for c in T.unroll(2):
                        acci[rr, c, T.ramp(0, 1, lanes)] = T.broadcast(T.int32(0), lanes)
                if bits == 4:
                    for j in T.serial(steps):
                        wv = w[t, bi, j, T.ramp(0, 1, 4 * lanes)]
                        lo = T.bitwise_and(wv, T.broadcast(T.uint8(15), 4 * lanes))
                        hi = T.shift_right(wv, T.broadcast(T.uint8(4), 4 * lanes))
                        for rr in T.unroll(rows):
                            dot(acci, rr, 0, lo, aq[r0 + rr, bi, 2 * j])
                            dot(acci, rr, 1, hi, aq[r0 + rr, bi, 2 * j + 1])
                else:
                    for j in T.serial(steps // 2):
                        for rr in T.unroll(rows):
                            dot(acci, rr, 0, w[t, bi, 2 * j, T.ramp(0, 1, 4 * lanes)], aq[r0 + rr, bi, 2 * j])
                            dot(acci, rr, 1, w[t, bi, 2 * j + 1, T.ramp(0, 1, 4 * lanes)], aq[r0 + rr, bi, 2 * j + 1])
                for rr in T.unroll(rows):
                    if zero_points:
                        zv = z[t, bi, T.ramp(0, 1, lanes)] * T.broadcast(qs[r0 + rr, bi], lanes)
                    else:
                        zv = T.broadcast(T.float32(zero) * qs[r0 + rr, bi], lanes)
                    accf[rr, T.ramp(0, 1, lanes)] = accf[rr, T.ramp(0, 1, lanes)] + (T.Cast(
                        "float32x16", acci[rr, 0, T.ramp(0, 1, lanes)] + acci[rr, 1, T.ramp(0, 1, lanes)]) - zv) * (
                        s[t, bi, T.ramp(0, 1, lanes)] * T.broadcast(sa[r0 + rr, bi], lanes))
            for rr in T.unroll(rows):
                for o in T.serial(lanes):
                    if t * lanes + o < n:
                        y[r0 + rr, t * lanes + o] = accf[rr, o]
        return tile

    gemm_tile, gemv_tile = row_tile(ROW_TILE), row_tile(1)

    @T.macro
    def body(a, w, s, z, y, m):
        aq = T.alloc_buffer((m, nb, quads), "int32")
        sa = T.alloc_buffer((m, nb), "float32")
        qs = T.alloc_buffer((m, nb), "float32")
        amax = T.alloc_buffer((1,), "float32")
        qsum = T.alloc_buffer((1,), "int32")
        for r in T.serial(m):  # quantize every row first: the weights are then read once per row tile
            for bi in T.serial(nb):
                amax[0] = T.float32(0)
                for i in T.serial(block_size):
                    if bi * block_size + i < k:
                        amax[0] = T.max(amax[0], T.abs(a[r, bi * block_size + i]))
                sa[r, bi] = amax[0] / T.float32(127)
                qsum[0] = 0
                for q in T.serial(quads):
                    packed = T.uint32(0)
                    for e in T.unroll(4):
                        kk = bi * block_size + q * 4 + e
                        v = T.Select(kk < k, a[r, T.min(kk, k - 1)], T.float32(0))
                        qv = T.Select(amax[0] > T.float32(0), T.Cast("int32", T.round(
                            v * (T.float32(127) / T.max(amax[0], T.float32(1e-30))))), 0)
                        qsum[0] = qsum[0] + qv
                        packed = packed | T.shift_left(T.Cast("uint32", T.bitwise_and(qv, 255)), T.uint32(8 * e))
                    aq[r, bi, q] = T.reinterpret("int32", packed)
                qs[r, bi] = T.Cast("float32", qsum[0])
        if m >= ROW_TILE:
            for t in T.parallel(nt):
                for g in T.serial(m // ROW_TILE):  # prefill: ROW_TILE rows per weight read
                    gemm_tile(w, s, z, y, aq, sa, qs, t, g * ROW_TILE)
        if m % ROW_TILE > 0:
            for t in T.parallel(nt):  # decode (m = 1) and the last rows: a parallel region of its own
                for r in T.serial(m % ROW_TILE):
                    gemv_tile(w, s, z, y, aq, sa, qs, t, m // ROW_TILE * ROW_TILE + r)

    if zero_points:
        @T.prim_func(private=True)
        def func(var_a: T.handle, w: T.Buffer((nt, nb, steps, 4 * lanes), "uint8"),
                 s: T.Buffer((nt, nb, lanes), "float32"), z: T.Buffer((nt, nb, lanes), "float32"), var_y: T.handle):
            T.func_attr({"tirx.noalias": True})
            m = T.int64()
            a = T.match_buffer(var_a, (m, k), "float32")
            y = T.match_buffer(var_y, (m, n), "float32")
            body(a, w, s, z, y, m)
    else:
        @T.prim_func(private=True)
        def func(var_a: T.handle, w: T.Buffer((nt, nb, steps, 4 * lanes), "uint8"),
                 s: T.Buffer((nt, nb, lanes), "float32"), var_y: T.handle):
            T.func_attr({"tirx.noalias": True})
            m = T.int64()
            a = T.match_buffer(var_a, (m, k), "float32")
            y = T.match_buffer(var_y, (m, n), "float32")
            body(a, w, s, s, y, m)
    return _finish(func)


SPARSE_INT8_CHUNK = 64  # outputs per 32 bytes of an input-major row (int8 sparse kernel)


# AVX2's byte unpacks work within 128-bit lanes: after unpacking four rows' 32 bytes (bytes, then
# 16-bit words), result v holds the bytes at these positions of each row, 4 rows per position
AVX2_UNPACK_ORDER = [[0, 1, 2, 3, 16, 17, 18, 19], [4, 5, 6, 7, 20, 21, 22, 23],
                     [8, 9, 10, 11, 24, 25, 26, 27], [12, 13, 14, 15, 28, 29, 30, 31]]


def pack_act_sparse_int8(b, scales, zero_points, k: int, n: int, block: int, *, isa: str = "vnni"):
    """MatMulNBits' 4-bit weights in the input-major layout of :func:`act_sparse_matmul_nbits_int8`:
    :func:`pack_act_sparse_nbits` with 32-byte chunks, so that in row ``k`` byte ``c*32 + l`` holds
    output ``c*64 + l`` (low nibble) and ``c*64 + 32 + l`` (high), ``Np`` a multiple of 64: four rows'
    32 bytes make the four ``vpdpbusd`` operands of 64 outputs after one byte permutation each.
    ``isa="avx2"``: the bytes of each 32-byte chunk are permuted so that AVX2's in-lane unpacks of
    four rows yield outputs in order (byte ``AVX2_UNPACK_ORDER[v][j]`` holds output ``8v + j``)."""
    import numpy as np

    w, s, z = pack_act_sparse_nbits(b, scales, zero_points, k, n, block, lanes=SPARSE_INT8_CHUNK // 2)
    if isa == "avx2":
        order = np.empty(32, np.int64)
        order[np.array(AVX2_UNPACK_ORDER).reshape(-1)] = np.arange(32)  # stored position -> output slot
        w = np.ascontiguousarray(w.reshape(k, -1, 32)[:, :, order].reshape(k, -1))
    return w, s, z


def _unpack(a, b, lo: bool, width: int):
    """``vpunpck{l,h}{bw,wd}`` on two 32-byte vectors: per 128-bit lane, the low (``lo``) or high
    halves of ``a`` and ``b`` interleaved in ``width``-byte elements, as one byte shuffle."""
    idx = []
    for lane in range(2):
        for i in range(8 // width):
            base = 16 * lane + (0 if lo else 8) + i * width
            idx += [base + e for e in range(width)] + [32 + base + e for e in range(width)]
    return tirx.Shuffle([a, b], [tirx.const(i, "int32") for i in idx])


def avx2_rows4(v: int, r0, r1, r2, r3):
    """Result ``v`` (0-3) of the AVX2 unpack network on four rows' 32 bytes: per output (4 bytes),
    the four rows' bytes at positions ``AVX2_UNPACK_ORDER[v]``: two byte unpacks, one word unpack."""
    lo8 = v < 2
    return _unpack(_unpack(r0, r1, lo8, 1), _unpack(r2, r3, lo8, 1), v % 2 == 0, 2)


def act_sparse_matmul_nbits_int8(k: int, n: int, block_size: int, *, zero_points: bool, parts: int = 2,
                                 prefetch: int = 2 * PREFETCH_ROWS, isa: str = "vnni") -> tirx.PrimFunc:
    """:func:`act_sparse_matmul_nbits` with the activations quantized to int8 and byte dot products:
    ``ActSparse`` then MatMulNBits at ``accuracy_level`` 4 (each K-block's active values quantized
    with scale ``max|active| / 127``, as ORT quantizes the sparsified input).

    Arguments: ``A [m, K]``, ``thr [K]`` and the layout of :func:`pack_act_sparse_int8`. Per row, a
    serial pass compacts each block's active channels (branch-free), pads the block's list to a
    multiple of four with its last row at value 0 (already fetched, so no extra reads) and packs the
    quantized values four per int32. The list is cut into ``parts`` shares (multiples of four) and
    each thread, for four active rows at a time, loads 32 bytes of each per 64 outputs, unpacks
    the nibbles, interleaves the four rows' codes with one byte permutation per 16 outputs
    (``vpermt2b`` with AVX-512 VBMI; with ``isa="avx2"`` three in-lane unpacks per 8 outputs on the
    layout permuted for them, :func:`avx2_rows4`) and accumulates :func:`byte_dot` against the four broadcast
    activations into int32 partial sums, flushed to float with the scales at the end of each block;
    it prefetches the rows ``prefetch`` list entries ahead, spread over the chunks. ``isa``: the
    target's byte dot product (:func:`int8_isa`)."""
    from tvm.script import tirx as T
    nb = -(-k // block_size)
    chunks = -(-n // SPARSE_INT8_CHUNK)
    npad = chunks * SPARSE_INT8_CHUNK
    rowb = npad // 2
    lines = -(-rowb // _LINE)
    cap = k + 4 * nb + 4 * parts + prefetch  # compact list with each block padded to a multiple of 4
    quads_cap = cap // 4 + 1
    interleave = [[l + 16 * h + 32 * i for l in range(16) for i in range(4)] for h in range(2)]

    @T.macro
    def pf(w, row):
        for l in T.serial(lines):
            T.evaluate(prefetch_line(T.address_of(w[row, l * _LINE])))

    @T.macro
    def dot(acc, p, base, codes, act):
        acc[p, T.ramp(base, 1, 16)] = byte_dot(isa, acc[p, T.ramp(base, 1, 16)], codes, act)

    @T.macro
    def dot8(acc, p, base, codes, act):
        acc[p, T.ramp(base, 1, 8)] = acc[p, T.ramp(base, 1, 8)] + avx2_dot8(codes, act)

    @T.macro
    def body(a, thr, w, s, z, y, m):
        idx = T.alloc_buffer((cap,), "int32")
        xq = T.alloc_buffer((quads_cap,), "int32")
        start = T.alloc_buffer((nb + 1,), "int32")
        sa = T.alloc_buffer((nb,), "float32")
        acc = T.alloc_buffer((parts, npad), "int32")
        out = T.alloc_buffer((parts, npad), "float32")
        cnt = T.alloc_buffer((1,), "int32")
        real = T.alloc_buffer((1,), "int32")
        amax = T.alloc_buffer((1,), "float32")
        inv = T.alloc_buffer((1,), "float32")
        xval = T.alloc_buffer((cap,), "float32")
        for r in T.serial(m):
            cnt[0] = 0
            for bi in T.serial(nb):
                start[bi] = cnt[0]
                amax[0] = T.float32(0)
                for j in T.serial(block_size):
                    if bi * block_size + j < k:  # branch-free compaction: written always, kept if active
                        kk = bi * block_size + j
                        v = a[r, kk]
                        on = T.abs(v) > thr[kk]
                        idx[cnt[0]] = kk
                        xval[cnt[0]] = v
                        amax[0] = T.max(amax[0], T.Select(on, T.abs(v), T.float32(0)))
                        cnt[0] = cnt[0] + T.Cast("int32", on)
                sa[bi] = amax[0] / T.float32(127)
                real[0] = cnt[0]
                inv[0] = T.Select(amax[0] > T.float32(0), T.float32(127) / T.max(amax[0], T.float32(1e-30)), T.float32(0))
                # pad the block's list to a multiple of 4 with its last row (already fetched), value 0
                for e in T.serial((4 - (cnt[0] - start[bi]) % 4) % 4):
                    idx[cnt[0]] = T.Select(cnt[0] > start[bi], idx[T.max(cnt[0] - 1, 0)], bi * block_size)
                    cnt[0] = cnt[0] + 1
                # quantized values, four per int32 (the padding is 0)
                for q in T.serial((cnt[0] - start[bi]) // 4):
                    packed = T.uint32(0)
                    for e in T.unroll(4):
                        j = start[bi] + q * 4 + e
                        qv = T.Select(j < real[0], T.Cast("int32", T.round(xval[j] * inv[0])), 0)
                        packed = packed | T.shift_left(T.Cast("uint32", T.bitwise_and(qv, 255)), T.uint32(8 * e))
                    xq[(start[bi] + q * 4) // 4] = T.reinterpret("int32", packed)
            start[nb] = cnt[0]
            for e in T.serial(prefetch):
                idx[cnt[0] + e] = idx[T.max(cnt[0] - 1, 0)]
            for p in T.parallel(parts):
                for c in T.serial(npad // 16):
                    out[p, T.ramp(c * 16, 1, 16)] = T.broadcast(T.float32(0), 16)
                lo = p * (cnt[0] // 4) // parts * 4
                hi = (p + 1) * (cnt[0] // 4) // parts * 4
                if hi > lo:
                    for e in T.serial(prefetch):
                        pf(w, idx[lo + e])
                for bi in T.serial(nb):
                    b0 = T.max(start[bi], lo)
                    b1 = T.min(start[bi + 1], hi)
                    if b1 > b0:
                        qs = T.alloc_buffer((1,), "int32", scope="local")
                        qs[0] = 0
                        for c in T.serial(npad // 16):
                            acc[p, T.ramp(c * 16, 1, 16)] = T.broadcast(T.int32(0), 16)
                        for q in T.serial((b1 - b0) // 4):
                            j0 = b0 + q * 4
                            r0 = idx[j0]
                            r1 = idx[j0 + 1]
                            r2 = idx[j0 + 2]
                            r3 = idx[j0 + 3]
                            xv = xq[j0 // 4]
                            qs[0] = qs[0] + T.Cast("int32", T.Cast("int8", T.bitwise_and(xv, 255))) + T.Cast(
                                "int32", T.Cast("int8", T.bitwise_and(T.shift_right(xv, 8), 255))) + T.Cast(
                                "int32", T.Cast("int8", T.bitwise_and(T.shift_right(xv, 16), 255))) + T.Cast(
                                "int32", T.Cast("int8", T.bitwise_and(T.shift_right(xv, 24), 255)))
                            for c in T.serial(chunks):
                                if c % 2 == 0 and j0 + prefetch + 3 < hi:
                                    for e in T.unroll(4):
                                        T.evaluate(prefetch_line(T.address_of(w[idx[j0 + prefetch + e], c * 32])))
                                w0 = w[r0, T.ramp(c * 32, 1, 32)]
                                w1 = w[r1, T.ramp(c * 32, 1, 32)]
                                w2 = w[r2, T.ramp(c * 32, 1, 32)]
                                w3 = w[r3, T.ramp(c * 32, 1, 32)]
                                m15 = T.broadcast(T.uint8(15), 32)
                                s4 = T.broadcast(T.uint8(4), 32)
                                l0 = T.bitwise_and(w0, m15)
                                l1 = T.bitwise_and(w1, m15)
                                l2 = T.bitwise_and(w2, m15)
                                l3 = T.bitwise_and(w3, m15)
                                h0 = T.shift_right(w0, s4)
                                h1 = T.shift_right(w1, s4)
                                h2 = T.shift_right(w2, s4)
                                h3 = T.shift_right(w3, s4)
                                if isa == "avx2":  # in-lane unpacks (the layout is permuted for them)
                                    dot8(acc, p, c * 64, avx2_rows4(0, l0, l1, l2, l3), xv)
                                    dot8(acc, p, c * 64 + 8, avx2_rows4(1, l0, l1, l2, l3), xv)
                                    dot8(acc, p, c * 64 + 16, avx2_rows4(2, l0, l1, l2, l3), xv)
                                    dot8(acc, p, c * 64 + 24, avx2_rows4(3, l0, l1, l2, l3), xv)
                                    dot8(acc, p, c * 64 + 32, avx2_rows4(0, h0, h1, h2, h3), xv)
                                    dot8(acc, p, c * 64 + 40, avx2_rows4(1, h0, h1, h2, h3), xv)
                                    dot8(acc, p, c * 64 + 48, avx2_rows4(2, h0, h1, h2, h3), xv)
                                    dot8(acc, p, c * 64 + 56, avx2_rows4(3, h0, h1, h2, h3), xv)
                                else:
                                    dot(acc, p, c * 64, T.Shuffle([l0, l1, l2, l3], interleave[0]), xv)
                                    dot(acc, p, c * 64 + 16, T.Shuffle([l0, l1, l2, l3], interleave[1]), xv)
                                    dot(acc, p, c * 64 + 32, T.Shuffle([h0, h1, h2, h3], interleave[0]), xv)
                                    dot(acc, p, c * 64 + 48, T.Shuffle([h0, h1, h2, h3], interleave[1]), xv)
                        for c in T.serial(npad // 16):
                            if zero_points:
                                zv = z[bi, T.ramp(c * 16, 1, 16)] * T.broadcast(T.Cast("float32", qs[0]), 16)
                            else:
                                zv = T.broadcast(T.float32(8) * T.Cast("float32", qs[0]), 16)
                            out[p, T.ramp(c * 16, 1, 16)] = out[p, T.ramp(c * 16, 1, 16)] + (
                                T.Cast("float32x16", acc[p, T.ramp(c * 16, 1, 16)]) - zv) * (
                                s[bi, T.ramp(c * 16, 1, 16)] * T.broadcast(sa[bi], 16))
            for c in T.serial(npad // 16):
                for pp in T.serial(1, parts):
                    out[0, T.ramp(c * 16, 1, 16)] = out[0, T.ramp(c * 16, 1, 16)] + out[pp, T.ramp(c * 16, 1, 16)]
                for l in T.serial(16):
                    if c * 16 + l < n:
                        y[r, c * 16 + l] = out[0, c * 16 + l]

    return _act_sparse_func(body, k, n, nb, npad, zero_points)


# ----------------------------------------------------------------------------- sparse weights (bitmask -> CSR)

def pack_sparse_csr(values, bitmask, n: int, k: int):
    """``edgecompress::SparseMatMul``'s compressed weight (``values [nnz]`` row-major kept weights,
    LSB-first ``bitmask [N, ceil(K/8)]``) as CSR for :func:`sparse_matmul_csr`: ``(row_ptr [N+1]
    int32, cols [nnz + 16] uint16, vals [nnz + 16])``, ``vals`` in the dtype of ``values`` (fp16
    when the export stored them so). The 16 padding entries (column 0, value 0) let the kernel
    read whole vectors; nothing is decompressed."""
    import numpy as np

    if k > 65535:
        raise ValueError(f"K = {k}: CSR columns are uint16")
    keep = np.unpackbits(np.asarray(bitmask, np.uint8).reshape(n, -1), axis=1, bitorder="little")[:, :k].astype(bool)
    values = np.asarray(values)
    if int(keep.sum()) != values.size:
        raise ValueError(f"bitmask keeps {int(keep.sum())} weights, values has {values.size}")
    row_ptr = np.concatenate([[0], np.cumsum(keep.sum(1))]).astype(np.int32)
    cols = np.concatenate([np.nonzero(keep)[1], np.zeros(16, np.int64)]).astype(np.uint16)
    vals = np.concatenate([values.reshape(-1), np.zeros(16, values.dtype)])
    return row_ptr, cols, vals


def sparse_matmul_csr(k: int, n: int, nnz: int, value_dtype: str = "float16") -> tirx.PrimFunc:
    """``Y[m, :N] = A[m] @ W.T`` for a sparse ``W [N, K]`` in CSR (:func:`pack_sparse_csr`): only the
    kept weights and their column indices are read (2 + 2 bytes per kept fp16 weight, against 4 per
    weight for a dense fp32 matrix). The output rows are split between the threads; each row is a
    dot product of its values with the activations gathered at its columns, 16 at a time."""
    from tvm.script import tirx as T

    lanes = 16
    total = nnz + lanes

    @T.prim_func(private=True)
    def func(var_a: T.handle, row_ptr: T.Buffer((n + 1,), "int32"), cols: T.Buffer((total,), "uint16"),
             vals: T.Buffer((total,), value_dtype), var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        a = T.match_buffer(var_a, (m, k), "float32")
        y = T.match_buffer(var_y, (m, n), "float32")
        for r in T.serial(m):
            for o in T.parallel(n):
                acc = T.alloc_buffer((lanes,), "float32", scope="local")
                acc[T.ramp(0, 1, lanes)] = T.broadcast(T.float32(0), lanes)
                start = row_ptr[o]
                count = row_ptr[o + 1] - row_ptr[o]
                for c in T.serial(count // lanes):
                    j = start + c * lanes
                    acc[T.ramp(0, 1, lanes)] = acc[T.ramp(0, 1, lanes)] + T.Cast(
                        f"float32x{lanes}", vals[T.ramp(j, 1, lanes)]) * a[r, T.Cast(
                            f"int32x{lanes}", cols[T.ramp(j, 1, lanes)])]
                for t in T.serial(count % lanes):
                    j = start + count // lanes * lanes + t
                    acc[0] = acc[0] + T.Cast("float32", vals[j]) * a[r, T.Cast("int32", cols[j])]
                total_ = T.alloc_buffer((1,), "float32", scope="local")
                total_[0] = T.float32(0)
                for l in T.serial(lanes):
                    total_[0] = total_[0] + acc[l]
                y[r, o] = total_[0]

    return _finish(func)


F32_TILE = 8  # outputs per pass of the fp32 GEMV: eight weight rows streamed against one activation load


def matmul_f32(k: int, n: int, tile: int = F32_TILE) -> tirx.PrimFunc:
    """``Y[m, :N] = A[m] @ W.T`` for a constant fp32 weight stored ``W [N, K]`` (each output's weights
    contiguous). Tiles of ``tile`` outputs split between the threads; per tile and row, each 16-wide
    slice of the activations meets the tile's weight rows (one 16-lane accumulator per output, that
    many row streams in flight: one output at a time left the DRAM idle between rows, 6-9 GB/s at
    K = 576 on a Zen 3 against 10-12 with tiles of 4-8), then each accumulator is summed, plus the
    K % 16 tail. A tile's rows serve every row of ``A`` from cache (prefill). Relax's generic
    ``matmul`` read SmolLM2's 576 x 49152 head at under 1 GB/s."""
    from tvm.script import tirx as T

    lanes = LANES
    body, tail = k // lanes, k % lanes
    nt = -(-n // tile)

    @T.prim_func(private=True)
    def func(var_a: T.handle, w: T.Buffer((n, k), "float32"), var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        a = T.match_buffer(var_a, (m, k), "float32")
        y = T.match_buffer(var_y, (m, n), "float32")
        for t in T.parallel(nt):
            for r in T.serial(m):
                acc = T.alloc_buffer((tile, lanes), "float32", scope="local")
                tot = T.alloc_buffer((1,), "float32", scope="local")
                for o in T.unroll(tile):
                    acc[o, T.ramp(0, 1, lanes)] = T.broadcast(T.float32(0), lanes)
                for c in T.serial(body):
                    for o in T.unroll(tile):  # the last tile repeats row n - 1 (not stored)
                        acc[o, T.ramp(0, 1, lanes)] = acc[o, T.ramp(0, 1, lanes)] + a[r, T.ramp(c * lanes, 1, lanes)] * w[
                            T.min(t * tile + o, n - 1), T.ramp(c * lanes, 1, lanes)]
                for o in T.unroll(tile):
                    if t * tile + o < n:
                        tot[0] = T.float32(0)
                        for l in T.unroll(lanes):
                            tot[0] = tot[0] + acc[o, l]
                        for j in T.serial(tail):
                            tot[0] = tot[0] + a[r, body * lanes + j] * w[t * tile + o, body * lanes + j]
                        y[r, t * tile + o] = tot[0]

    return _finish(func)


def has_avx512(target: tvm.target.Target) -> bool:
    """Whether ``target``'s CPU has AVX-512F (the N:M kernel's 16-lane ``vpermps``)."""
    return _cpu_has(target, "avx512f")


PERMUTE_ISA_CODES = {"avx512": 1, "avx2": 2}  # the ``isa`` attribute of SparseMatMul2of4 nodes


def permute_isa(target: tvm.target.Target) -> str | None:
    """The lane permute the 2:4 kernel uses on ``target``'s CPU: ``"avx512"`` (16-lane ``vpermps``),
    ``"avx2"`` (8-lane ``vpermps``), or None (pruned linears take the CSR kernel)."""
    if has_avx512(target):
        return "avx512"
    if _cpu_has(target, "avx2"):
        return "avx2"
    return None


def permute4(isa: str, x4, pick) -> tirx.PrimExpr:
    """Per lane of the float32x16 result, ``x4[pick]`` (``pick`` int32x16 in 0-3; ``x4`` float32x16
    holding four values four times): one 16-lane ``vpermps`` (``"avx512"``) or two 8-lane ones."""
    if isa == "avx512":
        return tirx.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.permvar.sf.512", x4, pick)
    if isa != "avx2":
        raise ValueError(f"2:4 kernel: unknown instruction set {isa!r} (expected 'avx512' or 'avx2')")

    def lanes(v, lo, count):
        return tirx.Shuffle([v], [tirx.const(lo + i, "int32") for i in range(count)])

    x8 = lanes(x4, 0, 8)
    halves = [tirx.call_llvm_pure_intrin("float32x8", "llvm.x86.avx2.permps", x8, lanes(pick, 8 * h, 8)) for h in range(2)]
    return tirx.Shuffle(halves, [tirx.const(i, "int32") for i in range(16)])


def is_2of4(mask) -> bool:
    """Whether a keep-mask ``[N, K]`` has at most two kept weights in every group of four inputs."""
    import numpy as np

    n, k = mask.shape
    return k % 4 == 0 and int(np.asarray(mask).reshape(n, k // 4, 4).sum(-1).max(initial=0)) <= 2


def pack_sparse_2of4(w, mask, value_dtype: str = "float16"):
    """A pruned ``W [N, K]`` with at most 2 of every 4 inputs kept (:func:`is_2of4`) in the layout of
    :func:`sparse_matmul_2of4`: ``(idx [nt, K/4, 16] uint8, vals [nt, K/4, 2, 16])`` for tiles of 16
    outputs: per output and group of four inputs, the positions of its (up to) two kept weights in
    the group (``i0 | i1 << 2``) and their values (an empty slot: value 0). 5 bytes per 4 weights at
    fp16: values and 2-bit indices, nothing else."""
    import numpy as np

    w, mask = np.asarray(w, np.float32), np.asarray(mask, bool)
    n, k = w.shape
    nt, groups = -(-n // 16), k // 4
    pad = nt * 16 - n
    w = np.concatenate([w, np.zeros((pad, k), np.float32)]).reshape(nt * 16, groups, 4)
    mask = np.concatenate([mask, np.zeros((pad, k), bool)]).reshape(nt * 16, groups, 4)
    order = np.argsort(~mask, axis=-1, kind="stable")[..., :2]          # kept positions first
    kept = np.take_along_axis(mask, order, -1)
    vals = np.where(kept, np.take_along_axis(w, order, -1), 0.0)        # [N', G, 2]
    pos = np.where(kept, order, 0).astype(np.uint8)
    idx = pos[..., 0] | (pos[..., 1] << 2)
    idx = np.ascontiguousarray(idx.reshape(nt, 16, groups).transpose(0, 2, 1))
    vals = np.ascontiguousarray(vals.reshape(nt, 16, groups, 2).transpose(0, 2, 3, 1)).astype(value_dtype)
    return idx, vals


def sparse_matmul_2of4(k: int, n: int, value_dtype: str = "float16", isa: str = "avx512") -> tirx.PrimFunc:
    """``Y[m, :N] = A[m] @ W.T`` for a 2:4-sparse ``W`` in :func:`pack_sparse_2of4`'s layout, with no
    gather: per tile of 16 outputs and group of four inputs, the four activations are broadcast into
    a vector and each output lane picks its two with ``vpermps`` by its 2-bit indices, then two
    multiply-adds with the kept values. Tiles split between the threads. ``isa``: the target's lane
    permute (:func:`permute_isa`)."""
    from tvm.script import tirx as T

    nt, groups = -(-n // 16), k // 4

    @T.prim_func(private=True)
    def func(var_a: T.handle, idx: T.Buffer((nt, groups, 16), "uint8"),
             vals: T.Buffer((nt, groups, 2, 16), value_dtype), var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        a = T.match_buffer(var_a, (m, k), "float32")
        y = T.match_buffer(var_y, (m, n), "float32")
        for r in T.serial(m):
            for t in T.parallel(nt):
                acc = T.alloc_buffer((2, 16), "float32", scope="local")
                acc[0, T.ramp(0, 1, 16)] = T.broadcast(T.float32(0), 16)
                acc[1, T.ramp(0, 1, 16)] = T.broadcast(T.float32(0), 16)
                for g in T.serial(groups):
                    x4 = T.Shuffle([a[r, T.ramp(g * 4, 1, 4)]] * 4, list(range(16)))  # the four, four times
                    iv = T.Cast("int32x16", idx[t, g, T.ramp(0, 1, 16)])
                    for s in T.unroll(2):
                        pick = T.bitwise_and(T.shift_right(iv, T.broadcast(T.int32(2 * s), 16)),
                                             T.broadcast(T.int32(3), 16))
                        acc[s, T.ramp(0, 1, 16)] = acc[s, T.ramp(0, 1, 16)] + T.Cast(
                            "float32x16", vals[t, g, s, T.ramp(0, 1, 16)]) * permute4(isa, x4, pick)
                for o in T.serial(16):
                    if t * 16 + o < n:
                        y[r, t * 16 + o] = acc[0, o] + acc[1, o]

    return _finish(func)
