"""The prefill W4A16 GEMM (cuda/gemm_w4a16.cu) without a GPU: its torch reference, its launch plan, and a
NumPy emulation of the kernel block by block, warp by warp, lane by lane.

The emulation mirrors gemm_impl: the same cp.async load mapping into the same shared-memory ring (stage
indices, XOR swizzle, zero-filled masks), the same per-lane fragment reads, the GEMV-layout dequantisation
bit for bit, mma.sync executed from its PTX ISA fragment definitions (registers -> 16x16 A, 16x8 B, 16x8 C
per lane), and the split-K epilogue with its arrival counters (blocks run in a random order). An indexing
or layout bug shows up as an O(1) error against x @ W.T here, before any GPU runs the kernel.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tinychat.ops import cuda_ops, reference
from tinychat.quant import pack
from tinychat.quant.qlinear import AWQLinear

CU = Path(__file__).resolve().parent.parent / "cuda" / "gemm_w4a16.cu"


@pytest.fixture
def gen():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def random_awq(k, n, g, scale=0.02):
    codes = torch.randint(0, 16, (k, n), dtype=torch.int32)
    zeros = torch.randint(0, 16, (k // g, n), dtype=torch.int32)
    scales = (torch.rand(k // g, n) * scale + scale / 5).half()
    return pack.pack_awq(codes), pack.pack_awq(zeros), scales


def rel(a, b):
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).norm() / b.norm())


# ---- fp16 pair arithmetic, as the PTX instructions round ------------------------------------------------

def _f16(bits):
    return (bits & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float64)


def _halves(w):
    w = np.asarray(w, dtype=np.uint32)
    return _f16(w & 0xFFFF), _f16(w >> 16)


def _h2(lo, hi):
    lo_b = np.asarray(lo).astype(np.float16).view(np.uint16).astype(np.uint32)
    hi_b = np.asarray(hi).astype(np.float16).view(np.uint16).astype(np.uint32)
    return lo_b | (hi_b << 16)


def hsub2(a, b):
    (al, ah), (bl, bh) = _halves(a), _halves(b)
    return _h2(al - bl, ah - bh)


def hmul2(a, b):
    (al, ah), (bl, bh) = _halves(a), _halves(b)
    return _h2(al * bl, ah * bh)


def hfma2(a, b, c):  # products of halves and their sums are exact in float64: one rounding, as fma
    (al, ah), (bl, bh), (cl, ch) = _halves(a), _halves(b), _halves(c)
    return _h2(al * bl + cl, ah * bh + ch)


def dequant_word(q, sz):
    """cuda/gemm_w4a16.cu dequant_word, per lane: -> 4 f16x2 words, pairs (k, k+1) .. (k+6, k+7)."""
    q, sz = np.asarray(q, dtype=np.uint32), np.asarray(sz, dtype=np.uint32)
    scale = (sz & 0xFFFF) | ((sz & 0xFFFF) << 16)
    zlo = (sz >> 16) | ((sz >> 16) << 16)
    nzhi = hsub2(zlo, np.uint32(0x63806380)) ^ np.uint32(0x80008000)
    magic, sixteenth = np.uint32(0x64006400), np.uint32(0x2C002C00)
    a, b = (q & 0x000F000F) | magic, (q & 0x00F000F0) | magic
    q = q >> 8
    c, d = (q & 0x000F000F) | magic, (q & 0x00F000F0) | magic
    return [hmul2(hsub2(a, zlo), scale), hmul2(hfma2(b, sixteenth, nzhi), scale),
            hmul2(hsub2(c, zlo), scale), hmul2(hfma2(d, sixteenth, nzhi), scale)]


# ---- mma.sync from the PTX ISA fragment layouts -----------------------------------------------------------

LANE = np.arange(32)
G, T = LANE >> 2, LANE & 3  # groupID, threadID_in_group


def mma_m16n8k16(d, a, b):
    """d [32, 4] (c0..c3 per lane) += A @ B, A 16x16 from a[0..3] [32] f16x2, B 16x8 from b[0..1].

    A: a0 (row g, k 2t..2t+1), a1 (row g+8, same k), a2 (row g, k 2t+8..2t+9), a3 (row g+8, k 2t+8..)
    B: b0 (k 2t..2t+1, col g), b1 (k 2t+8..2t+9, col g); C: c0,c1 (row g, col 2t..2t+1), c2,c3 (row g+8)."""
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    for reg, (dr, dk) in enumerate(((0, 0), (8, 0), (0, 8), (8, 8))):
        lo, hi = _halves(a[reg])
        A[G + dr, 2 * T + dk], A[G + dr, 2 * T + dk + 1] = lo, hi
    for reg, dk in enumerate((0, 8)):
        lo, hi = _halves(b[reg])
        B[2 * T + dk, G], B[2 * T + dk + 1, G] = lo, hi
    D = A @ B
    d[:, 0] += D[G, 2 * T]
    d[:, 1] += D[G, 2 * T + 1]
    d[:, 2] += D[G + 8, 2 * T]
    d[:, 3] += D[G + 8, 2 * T + 1]


def mma_m16n8k8(d, a, b):
    """sm_75's m16n8k8: A 16x8 from a0 (row g, k 2t..2t+1), a1 (row g+8); B 8x8 from b0 (k 2t..2t+1, col g)."""
    A, B = np.zeros((16, 8)), np.zeros((8, 8))
    for reg, dr in enumerate((0, 8)):
        lo, hi = _halves(a[reg])
        A[G + dr, 2 * T], A[G + dr, 2 * T + 1] = lo, hi
    lo, hi = _halves(b[0])
    B[2 * T, G], B[2 * T + 1, G] = lo, hi
    D = A @ B
    d[:, 0] += D[G, 2 * T]
    d[:, 1] += D[G, 2 * T + 1]
    d[:, 2] += D[G + 8, 2 * T]
    d[:, 3] += D[G + 8, 2 * T + 1]


def test_mma_fragments_compute_a_matrix_product(gen):
    """Registers laid out by the fragment definitions multiply as matrices, and the k16 step equals the two
    k8 steps sm_75 runs on the same registers (mma_16816's Turing branch)."""
    A, B = gen.standard_normal((16, 16)), gen.standard_normal((16, 8))
    a = [_h2(A[G + dr, 2 * T + dk], A[G + dr, 2 * T + dk + 1]) for dr, dk in ((0, 0), (8, 0), (0, 8), (8, 8))]
    b = [_h2(B[2 * T + dk, G], B[2 * T + dk + 1, G]) for dk in (0, 8)]
    d16, d8 = np.zeros((32, 4)), np.zeros((32, 4))
    mma_m16n8k16(d16, a, b)
    mma_m16n8k8(d8, a[0:2], b[0:1])
    mma_m16n8k8(d8, a[2:4], b[1:2])
    want = A.astype(np.float16).astype(np.float64) @ B.astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(d16, d8, rtol=1e-12, atol=1e-12)
    got = np.zeros((16, 8))
    got[G, 2 * T], got[G, 2 * T + 1], got[G + 8, 2 * T], got[G + 8, 2 * T + 1] = d16.T
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


# ---- the kernel, emulated --------------------------------------------------------------------------------

def swz(cpr, r, c):
    return c ^ ((r & 1) << 2) if cpr == 8 else c


class SharedAccessLog:
    """Byte addresses of every shared-memory read per warp instruction, for the bank-conflict test."""

    def __init__(self):
        self.lds128, self.lds32 = [], []


def emulate_gemm(x, qweight_t, scales_zeros, group, name, splits=None, bias=None, sms=4, order_seed=0,
                 log: SharedAccessLog | None = None):
    """y [M, N] fp16 as cuda/gemm_w4a16.cu gemm_impl computes it (fp32 accumulators held in float64)."""
    cfg = cuda_ops.GEMM_CONFIGS[name]
    m, k = x.shape
    n = qweight_t.shape[0]
    grid, per = cuda_ops.gemm_launch_plan(m, n, k, name, sms, splits)
    bm, bn, bk, st = cfg.bm, cfg.bn, cfg.bk, cfg.stages
    cpr, kc = bk // 8, bk // 32
    threads = cuda_ops.GEMM_THREADS
    a_loads, b_loads = bm * cpr // threads, bn * kc // threads
    assert a_loads * threads == bm * cpr and b_loads * threads == bn * kc
    xw = x.numpy().view(np.uint32).reshape(-1)                  # fp16 pairs
    qw = qweight_t.numpy().view(np.uint32).reshape(-1)
    szw = scales_zeros.numpy().view(np.uint32).reshape(-1)      # (scale, 1024 + zero) words
    k_chunks = k >> 5
    group_shift = int(math.log2(group)) - 5
    groups = k_chunks >> group_shift
    k_tiles = -(-k // bk)
    n_splits = grid[2]
    y = np.full((m, n), np.nan, dtype=np.float16)
    ws = np.full((n_splits, m, n), np.nan, dtype=np.float32)
    counters = np.zeros(grid[0] * grid[1], dtype=np.int64)
    tid = np.arange(threads)
    bias_f = None if bias is None else bias.float().numpy().astype(np.float32)

    def run_block(bx, by, bz):
        m0, n0 = bx * bm, by * bn
        kt0 = bz * per
        nk = min(kt0 + per, k_tiles) - kt0
        assert nk >= 1, "empty split"
        sA = np.full((st, bm * cpr, 4), 0xDEADBEEF, dtype=np.uint32)  # garbage until written
        sB = np.full((st, kc, bn, 4), 0xDEADBEEF, dtype=np.uint32)
        sS = np.full((st, kc, bn), 0xDEADBEEF, dtype=np.uint32)

        def load_stage(stage, kt):
            k0 = kt * bk
            for u in range(a_loads):
                i = tid + u * threads
                r, c = i // cpr, i % cpr
                ok = (m0 + r < m) & (k0 + 8 * c < k)
                src = np.where(ok, ((m0 + r) * k + k0 + 8 * c) // 2, 0)
                slot = r * cpr + swz(cpr, r, c)
                assert len(set(slot.tolist())) == threads  # every thread its own 16 bytes
                for e in range(4):
                    sA[stage, slot, e] = np.where(ok, xw[src + e], 0)
            for u in range(b_loads):
                i = tid + u * threads
                r, c = i // kc, i % kc
                chunk = kt * kc + c
                ok = (n0 + r < n) & (chunk < k_chunks)
                row = np.where(ok, n0 + r, 0)
                for e in range(4):
                    sB[stage, c, r, e] = np.where(ok, qw[(row * k_chunks + np.where(ok, chunk, 0)) * 4 + e], 0)
                sS[stage, c, r] = np.where(ok, szw[row * groups + (np.where(ok, chunk, 0) >> group_shift)], 0)

        acc = np.zeros((cfg.wm * cfg.wn, cfg.mt, cfg.nt, 32, 4))
        for s in range(st - 1):
            if s < nk:
                load_stage(s, kt0 + s)
        read, write = 0, st - 1
        for it in range(nk):
            if it + st - 1 < nk:
                assert write != read
                load_stage(write, kt0 + it + st - 1)
            write = 0 if write == st - 1 else write + 1
            for warp in range(cfg.wm * cfg.wn):
                wm, wn = warp // cfg.wn, warp % cfg.wn
                for c in range(kc):
                    b = []
                    for j in range(cfg.nt):
                        r = wn * cfg.nt * 8 + j * 8 + G
                        if log is not None:
                            log.lds32.append((((read * kc + c) * bn + r) * 4 + T) * 4)
                        b.append(dequant_word(sB[read, c, r, T], sS[read, c, r]))
                    for i in range(cfg.mt):
                        r = wm * cfg.mt * 16 + i * 16 + G
                        ch = swz(cpr, r, 4 * c + T)
                        xa, xb = sA[read, r * cpr + ch], sA[read, (r + 8) * cpr + ch]
                        if log is not None:
                            log.lds128.append(((read * bm * cpr) + r * cpr + ch) * 16)
                            log.lds128.append(((read * bm * cpr) + (r + 8) * cpr + ch) * 16)
                        for j in range(cfg.nt):
                            mma_m16n8k16(acc[warp, i, j], [xa[:, 0], xb[:, 0], xa[:, 1], xb[:, 1]], b[j][0:2])
                        for j in range(cfg.nt):
                            mma_m16n8k16(acc[warp, i, j], [xa[:, 2], xb[:, 2], xa[:, 3], xb[:, 3]], b[j][2:4])
            read = 0 if read == st - 1 else read + 1

        acc = acc.astype(np.float32)  # the hardware's fp32 accumulators
        if n_splits > 1:
            for warp in range(cfg.wm * cfg.wn):
                wm, wn = warp // cfg.wn, warp % cfg.wn
                for i in range(cfg.mt):
                    for j in range(cfg.nt):
                        row, col = m0 + wm * cfg.mt * 16 + G + 16 * i, n0 + wn * cfg.nt * 8 + 2 * T + 8 * j
                        for dr, e in ((0, 0), (8, 2)):
                            ok = (col < n) & (row + dr < m)
                            ws[bz, (row + dr)[ok], col[ok]] = acc[warp, i, j, ok, e]
                            ws[bz, (row + dr)[ok], col[ok] + 1] = acc[warp, i, j, ok, e + 1]
            tile = by * grid[0] + bx
            counters[tile] += 1
            if counters[tile] != n_splits:
                return
            counters[tile] = 0
            acc = np.zeros_like(acc)
            for warp in range(cfg.wm * cfg.wn):
                wm, wn = warp // cfg.wn, warp % cfg.wn
                for i in range(cfg.mt):
                    for j in range(cfg.nt):
                        row, col = m0 + wm * cfg.mt * 16 + G + 16 * i, n0 + wn * cfg.nt * 8 + 2 * T + 8 * j
                        for z in range(n_splits):
                            for dr, e in ((0, 0), (8, 2)):
                                ok = (col < n) & (row + dr < m)
                                acc[warp, i, j, ok, e] += ws[z, (row + dr)[ok], col[ok]]
                                acc[warp, i, j, ok, e + 1] += ws[z, (row + dr)[ok], col[ok] + 1]
        for warp in range(cfg.wm * cfg.wn):
            wm, wn = warp // cfg.wn, warp % cfg.wn
            for i in range(cfg.mt):
                for j in range(cfg.nt):
                    row, col = m0 + wm * cfg.mt * 16 + G + 16 * i, n0 + wn * cfg.nt * 8 + 2 * T + 8 * j
                    for dr, e in ((0, 0), (8, 2)):
                        ok = (col < n) & (row + dr < m)
                        v0, v1 = acc[warp, i, j, ok, e], acc[warp, i, j, ok, e + 1]
                        if bias_f is not None:
                            v0, v1 = v0 + bias_f[col[ok]], v1 + bias_f[col[ok] + 1]
                        assert np.isnan(y[(row + dr)[ok], col[ok]]).all(), "an output written twice"
                        y[(row + dr)[ok], col[ok]] = v0.astype(np.float16)
                        y[(row + dr)[ok], col[ok] + 1] = v1.astype(np.float16)

    blocks = [(bx, by, bz) for bz in range(n_splits) for by in range(grid[1]) for bx in range(grid[0])]
    for idx in np.random.default_rng(order_seed).permutation(len(blocks)):
        run_block(*blocks[idx])
    assert not counters.any(), "split-K counters must be left at zero"
    assert not np.isnan(y).any(), "an output never written"
    return torch.from_numpy(y)


def exact_product(x, qweight_t, scales_zeros, group, bias=None):
    """x @ W.T in float64 with W the fp16-rounded dequantized weight (what the tensor cores multiply)."""
    w = pack.gemv_layout_dequant(qweight_t, scales_zeros, group).half().double()
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("name,m,n,k,g,splits", [
    ("m16", 13, 136, 352, 32, 1),     # partial M tile, partial N tile (128 + 8), K tail (352 % 64 = 32), G 32
    ("m16", 16, 128, 512, 128, 3),    # split-K: 8 k tiles over 3 splits (3 + 3 + 2)
    ("m32", 27, 64, 320, 64, 2),      # N smaller than one tile, split-K with a short last split
    ("m64", 40, 136, 384, 128, None), # the launch plan's own split choice (4 SMs)
    ("m128", 130, 136, 160, 32, 1),   # two M tiles (the second 2 rows), BK 32: 5 k tiles in a 4-deep ring
    ("m128", 70, 256, 256, 64, 2),    # 2 x 2 warps of 64 x 64, split-K
])
def test_emulated_gemm_matches_the_product(gen, name, m, n, k, g, splits):
    qweight, qzeros, scales = random_awq(k, n, g)
    qweight_t, scales_zeros = pack.awq_to_gemv_layout(qweight, qzeros, scales, g)
    x = torch.randn(m, k).half()
    bias = torch.randn(n).half() if splits == 1 else None
    got = emulate_gemm(x, qweight_t, scales_zeros, g, name, splits, bias, order_seed=int(gen.integers(1 << 30)))
    want = exact_product(x, qweight_t, scales_zeros, g, bias)
    assert got.shape == (m, n)
    # only fp32 accumulation and the final fp16 rounding separate the two
    assert rel(got, want) < 1e-3, rel(got, want)
    assert rel(got, reference.gemm_w4a16(x.float(), qweight_t, scales_zeros, g,
                                         None if bias is None else bias.float())) < 2e-3


def test_shared_memory_reads_are_bank_conflict_free(gen):
    """Every 16-byte x fragment read serves its 4 quarter-warps without conflicts (8 lanes, 8 different
    16-byte bank groups, swizzled rows for BK = 64), and every weight word read hits 32 different banks."""
    for name, m in (("m16", 16), ("m128", 128)):
        k, n, g = 128, 128, 64
        qweight, qzeros, scales = random_awq(k, n, g)
        qweight_t, scales_zeros = pack.awq_to_gemv_layout(qweight, qzeros, scales, g)
        log = SharedAccessLog()
        emulate_gemm(torch.randn(m, k).half(), qweight_t, scales_zeros, g, name, 1, log=log)
        assert log.lds128 and log.lds32
        for addr in log.lds128:
            for quarter in range(4):
                lanes = addr[quarter * 8:(quarter + 1) * 8]
                assert len({(a // 16) % 8 for a in lanes.tolist()}) == 8, (name, lanes)
        for addr in log.lds32:
            assert len({(a // 4) % 32 for a in addr.tolist()}) == 32, (name, addr)


# ---- the configuration table, the launch plan, the reference and the dispatch -----------------------------

def test_configs_mirror_the_kernel_source():
    lines = re.findall(r"^TC_GEMM_KERNEL\((\w+), (\d+), (\d+), (\d+), (\d+), (\d+), (\d+)\)\s*$", CU.read_text(),
                       re.MULTILINE)
    parsed = {name: cuda_ops.GemmConfig(*map(int, rest)) for name, *rest in lines}
    assert parsed == cuda_ops.GEMM_CONFIGS
    for name, cfg in cuda_ops.GEMM_CONFIGS.items():
        assert cfg.wm * cfg.wn * 32 == cuda_ops.GEMM_THREADS
        assert name == f"m{cfg.bm}"
        smem = cfg.stages * (cfg.bm * cfg.bk * 2 + cfg.bn * cfg.bk // 2 + cfg.bn * cfg.bk // 8) + 4
        assert smem <= 48 * 1024, (name, smem)  # static shared memory, no opt-in; sm_75 has 64 KB


@pytest.mark.parametrize("m", [9, 16, 17, 33, 64, 65, 128, 512, 4096])
@pytest.mark.parametrize("n,k", [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (960, 576)])
def test_launch_plan_covers_the_output_once(m, n, k):
    name = cuda_ops.gemm_config_name(m)
    cfg = cuda_ops.GEMM_CONFIGS[name]
    assert m <= cfg.bm or name == "m128"
    for sms in (16, 108, 132):
        (gx, gy, gz), per = cuda_ops.gemm_launch_plan(m, n, k, name, sms)
        k_tiles = -(-k // cfg.bk)
        assert gx * cfg.bm >= m > (gx - 1) * cfg.bm and gy * cfg.bn >= n > (gy - 1) * cfg.bn
        assert (gz - 1) * per < k_tiles <= gz * per  # every split has work, together all of K
        assert gy <= 65535 and gz <= cuda_ops.GEMM_MAX_SPLITS
        if gz > 1:
            assert gx * gy < 2 * sms and per >= cuda_ops.GEMM_MIN_TILES_PER_SPLIT
            assert gz * m * n * 4 <= n * k  # fp32 partials at most twice the int4 weight bytes


def test_gemm_reference_matches_awq_linear(gen):
    k, n, g = 256, 96, 64
    qweight, qzeros, scales = random_awq(k, n, g)
    bias = torch.randn(n)
    layer = AWQLinear(qweight, qzeros, scales, g, bias=bias, dtype=torch.float32)
    qweight_t, scales_zeros = pack.awq_to_gemv_layout(qweight, qzeros, scales, g)
    x = torch.randn(2, 37, k)
    assert rel(reference.gemm_w4a16(x, qweight_t, scales_zeros, g, bias), layer(x)) < 1e-5
    assert torch.equal(reference.dequant_w4a16(qweight_t, scales_zeros, g),
                       pack.awq_to_dequant(qweight, qzeros, scales, g).half())


def test_awq_linear_cuda_path_sends_prefill_to_the_gemm(gen, monkeypatch):
    """The "cuda" path: <= 8 tokens -> gemv_w4a16, more -> gemm_w4a16 (here on the CPU, so their references)."""
    from tinychat import ops

    k, n, g = 128, 64, 32
    qweight, qzeros, scales = random_awq(k, n, g)
    layer = AWQLinear(qweight, qzeros, scales, g, dtype=torch.float32, implementation="cuda")
    assert layer.implementation == "cuda"
    calls = []
    monkeypatch.setattr(ops, "gemv_w4a16", lambda *a, **kw: calls.append("gemv") or reference.gemv_w4a16(*a, **kw))
    monkeypatch.setattr(ops, "gemm_w4a16", lambda *a, **kw: calls.append("gemm") or reference.gemm_w4a16(*a, **kw))
    w = pack.awq_to_dequant(qweight, qzeros, scales, g)
    for t, want in ((8, "gemv"), (9, "gemm"), (512, "gemm")):
        x = torch.randn(1, t, k)
        assert rel(layer(x), x @ w.T) < 1e-5
        assert calls[-1] == want


def test_gemm_op_falls_back_to_the_reference_off_gpu(gen):
    k, n, g = 96, 40, 32
    qweight, qzeros, scales = random_awq(k, n, g)
    qweight_t, scales_zeros = pack.awq_to_gemv_layout(qweight, qzeros, scales, g)
    x = torch.randn(20, k).half()
    assert not cuda_ops.gemm_supported(x, qweight_t, g)
    assert torch.equal(cuda_ops.gemm_w4a16(x, qweight_t, scales_zeros, g),
                       reference.gemm_w4a16(x, qweight_t, scales_zeros, g))


def _declared_params(kernel: str) -> list[str]:
    """Parameter kinds of a kernel in cuda/gemm_w4a16.cu (the GEMM variants share the macro's list)."""
    text = CU.read_text()
    decl = "gemm_w4a16_##NAME(" if kernel.startswith("gemm_w4a16_") else kernel + "("
    at = text.index(decl) + len(decl)
    params = text[at:text.index(")", at)].replace("\\", " ").split(",")
    return ["ptr" if "*" in p else "float" if p.split()[0] == "float" else "int" for p in params]


def test_launchers_pass_what_the_kernels_declare(monkeypatch):
    """With a stand-in for kernels.launch: argument kinds and count per kernel, 128-thread blocks, the grid
    of the launch plan, a workspace and counters exactly when split."""
    from tinychat.ops import kernels

    launches = []
    monkeypatch.setattr(kernels, "launch", lambda source, name, grid, block, args, device=None, shared_mem=0:
                        launches.append((source, name, grid, block, args)))
    monkeypatch.setattr(cuda_ops, "_sm_count", lambda device: 132)
    kinds = {np.uint64: "ptr", np.int32: "int", np.float32: "float"}
    qweight_t, scales_zeros = pack.awq_to_gemv_layout(*random_awq(4096, 256, 128), 128)
    for m in (9, 40, 300):
        y = cuda_ops._launch_gemm(torch.randn(1, m, 4096).half(), qweight_t, scales_zeros, 128)
        assert y.shape == (1, m, 256) and y.dtype == torch.float16
    cuda_ops._launch_dequant(qweight_t, scales_zeros, 128)
    assert [l[1] for l in launches] == ["gemm_w4a16_m16", "gemm_w4a16_m64", "gemm_w4a16_m128", "dequant_w4a16"]
    for source, name, grid, block, args in launches:
        assert source == "gemm_w4a16.cu"
        assert [kinds[type(a)] for a in args] == _declared_params(name), name
        if name.startswith("gemm"):
            assert block == (cuda_ops.GEMM_THREADS,)
            m = int(args[7])
            assert (grid, int(args[11])) == cuda_ops.gemm_launch_plan(m, 256, 4096, name[len("gemm_w4a16_"):], 132)
            split = grid[2] > 1
            assert (int(args[5]) != 0) == split and (int(args[6]) != 0) == split
    assert launches[0][2][2] > 1  # M = 9 on 2 N tiles: split-K
