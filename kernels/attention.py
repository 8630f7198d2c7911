"""FlashAttention-style softmax attention (non-causal): Triton kernels and their launchers.

Every tensor is addressed as [B, H, N, D] through its (batch, head, token) strides with a unit
stride on D, so q, k, v can be views of a packed [B, N, 3*H*D] qkv buffer and O can be written
straight into the [B, N, H*D] layout the output projection reads. No autograd here.

Forward: one program per (batch*head, block of BLOCK_M queries); it loops over key blocks with an
online softmax in exp2 (scale folded into log2(e)), accumulates in fp32, and writes O (input dtype)
and the row log-sum-exp LSE (fp32, natural log of sum_j exp(scale * q.k_j)).

Backward (recomputes P from LSE; no N x N buffer, no atomics, so it is deterministic), two kernels:
  1. attention_bwd_dq_kernel: one program per (batch*head, block of BLOCK_M queries), looping over
     key blocks; dQ = scale * dS K with dS = P * (dO V^T - delta). It owns its query rows, so it
     also computes delta = rowsum(dO * O) (fp32) from the dO tile it loads anyway and stores it.
  2. attention_bwd_dkdv_kernel, after it on the stream: one program per (batch*head, block of
     BLOCK_N keys), looping over query blocks and reading the stored delta; dV = P^T dO,
     dK = scale * dS^T Q.
  No separate delta pre-pass: one launch fewer per backward and one read of dO saved.
  Single pass: when one key block covers all keys (N_KV <= BLOCK_N of the dK/dV config, e.g.
  ViT's N = 197 or 257 with BLOCK_N = 256), the dK/dV program holds every key of its head and
  visits each query block once, so it computes delta itself and writes each query block's
  complete dQ: the scores are computed once instead of twice and kernel 1 is skipped, still
  without atomics.

Grids are 1-D with batch*head outermost (axis 0 allows 2^31-1 programs; B*H = 98,304 is fine), so
the query blocks of one head run next to each other and share its K/V in L2. Head dims up to 128:
a power of two is one BLOCK_D chunk; 48, 80 and 96 run as two chunks (32 + 16, 64 + 16, 64 + 32:
every tile [*, D] is a pair of tiles, every product over D two tl.dots), so no MMA work is spent on
padding; other dims are padded with masks on D (`head_chunks`). Token masks are applied only to the
ragged last block of the loop. fp32 inputs: every `tl.dot` takes input_precision="ieee" (exact fp32
products, CUDA-core FMA on a GPU, not tf32: fp32 results are fp32-accurate, ~1e-7, like torch's fp32
matmuls, at a fraction of the 16-bit speed, and spilling registers in offline sm_90 compiles: see
benchmarks/NOTES.md); fp16/bf16 inputs use the tensor cores.

Rotary position embedding (EVA-02; ``rope=(sin, cos)``, ``ROPE`` constexpr, self-attention only):
timm's EVA attention rotates q and k of the tokens past ``num_prefix_tokens`` (class / register
tokens stay as they are) with apply_rot_embed_cat, interleaved layout (rotate_half=False, EVA-02's):
x * cos + rot(x) * sin, rot(x) = [-x1, x0, -x3, x2, ...], tables [N - num_prefix_tokens, D]. Here
every q / k tile is rotated as it is loaded (``_load_roped``: the pair swap is a register
reshape/split/join, the tables' rows ``token - num_prefix_tokens`` loaded beside it, fp32 math,
rounded to the input dtype as timm's ``.type_as(v)``): no pass over q / k in memory, no rotated copy.
The forward rotates its q tile once and each key tile it visits. The backward recomputes the same
rotated tiles; its dQ / dK accumulators are then gradients of the rotated q / k, and each is mapped
back by the rotation's transpose, g * cos - rot(g * sin) (``_unrope``, exact for any tables),
right before its store (dV needs nothing). Pairs never straddle the two column chunks (both are
even), so two-chunk heads rotate chunk by chunk. The cost is the extra table loads (L2-resident: one
[N, D] pair shared by every batch and head) and registers: ``ROPE_CONFIGS``.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .host import cdiv, dot_precision, next_power_of_2, reject_bf16_dots_under_interpreter

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))
LOG2E_IN_KERNEL = tl.constexpr(LOG2E)  # kernels read only constexpr globals
LN2_IN_KERNEL = tl.constexpr(0.6931471805599453)
MAX_HEAD_DIM = 128


class Config(NamedTuple):
    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int


# Hopper table: (kernel, BLOCK_D) -> (config for fp16/bf16 inputs, config for fp32 inputs).
# 16-bit D=64 rows (fwd 128 queries x 32 keys; bwd 32 queries x 128 keys for dK/dV, 128 x 32 for dQ;
# 4 warps, 3 stages): at ViT's N = 197 or 257 narrow key tiles waste less on the ragged block while
# 128-row query tiles keep the tensor cores busy. D=128 doubles the per-row registers: 8 warps; its
# forward is the usual Hopper tile for D=128 (128 queries x 64 keys). D=80 and 96 (two chunks, see
# head_chunks) take the D=128 row, which keeps them free of spills. D <= 32 halves the registers:
# forward key tiles widen to 64. fp32 (exact "ieee" dots, CUDA-core FMA) tiles take twice the bytes:
# half the rows, and at D=128 4 warps and 2 stages, so every fp32 entry stays well inside a block's
# shared memory, with margin for other Triton versions' allocation (tests/sm90_scripts/attention.py
# checks the fit and the spills). Re-tune on the target GPU with `python benchmarks/attention.py
# --sweep`; benchmarks/NOTES.md has what each row was chosen from.
CONFIGS = {
    ("fwd", 16): (Config(128, 64, 4, 3), Config(64, 64, 4, 3)),
    ("fwd", 32): (Config(128, 64, 4, 3), Config(64, 64, 4, 3)),
    ("fwd", 64): (Config(128, 32, 4, 3), Config(64, 32, 4, 3)),
    ("fwd", 128): (Config(128, 64, 8, 3), Config(64, 32, 4, 2)),
    ("dkdv", 16): (Config(32, 128, 4, 3), Config(32, 64, 4, 3)),
    ("dkdv", 32): (Config(32, 128, 4, 3), Config(32, 64, 4, 3)),
    ("dkdv", 64): (Config(32, 128, 4, 3), Config(32, 64, 4, 3)),
    ("dkdv", 128): (Config(32, 128, 8, 3), Config(16, 64, 4, 2)),
    ("dq", 16): (Config(128, 32, 4, 3), Config(64, 32, 4, 3)),
    ("dq", 32): (Config(128, 32, 4, 3), Config(64, 32, 4, 3)),
    ("dq", 64): (Config(128, 32, 4, 3), Config(64, 32, 4, 3)),
    ("dq", 128): (Config(128, 32, 8, 3), Config(64, 32, 4, 2)),
}
# With RoPE (16-bit inputs): the rotation's sin / cos tiles and the rotated copies raise register
# pressure; the 4-warp D=64 backward tiles spill there in the sm_90 build, the same tiles on 8 warps
# do not. Other head dims take CONFIGS (the compile test prints their spills with ROPE).
ROPE_CONFIGS = {
    ("dkdv", 64): Config(32, 128, 8, 3),
    ("dq", 64): Config(128, 32, 8, 3),
}
# Single-pass backward (the dK/dV kernel writes dQ too), used when N_KV <= block_n; 16-bit inputs.
# Empty: the two-kernel backward stays the default until `python benchmarks/attention.py --sweep`
# (whose candidates include 256-key single-pass tiles) shows a faster one.
SINGLE_PASS_CONFIGS = {}


def block_d(head_dim: int) -> int:
    """The head dim padded to a power of two (>= 16: tl.dot needs K >= 16): the config tables' key."""
    return max(16, next_power_of_2(head_dim))


def head_chunks(head_dim: int):
    """(BLOCK_D, BLOCK_D_TAIL, PAD_D, PAD_D_TAIL): the column chunks the kernels split a head into.

    Triton tiles are powers of two, so a head of 80 padded to one 128-wide chunk wastes 37.5% of
    every QK^T and PV product; as 64 + 16 it wastes none (96 = 64 + 32, 48 = 32 + 16 likewise).
    A second chunk is used when it is smaller than the first (else one padded chunk is as good);
    BLOCK_D_TAIL = 0 means one chunk. PAD_D / PAD_D_TAIL: that chunk reaches past head_dim (masked).
    """
    first = max(16, 1 << (head_dim.bit_length() - 1))  # the largest power of two <= head_dim, >= 16
    tail = max(16, next_power_of_2(head_dim - first)) if head_dim > first else 0
    if tail == 0 or tail >= first:
        width = block_d(head_dim)
        return width, 0, width != head_dim, False
    return first, tail, False, first + tail != head_dim


def config(kernel: str, head_dim: int, dtype, rope: bool = False) -> Config:
    """The table's config for kernel 'fwd', 'dkdv' or 'dq' (``ROPE_CONFIGS`` first with ``rope``, 16 bits)."""
    if rope and dtype != torch.float32 and (kernel, block_d(head_dim)) in ROPE_CONFIGS:
        return ROPE_CONFIGS[kernel, block_d(head_dim)]
    return CONFIGS[kernel, block_d(head_dim)][dtype == torch.float32]


def bwd_configs(head_dim: int, n_kv: int, dtype, rope: bool = False):
    """(dK/dV config, dQ config), or (single-pass config, None) when one key block covers N_KV."""
    single = SINGLE_PASS_CONFIGS.get(block_d(head_dim))
    if single is not None and n_kv <= single.block_n and dtype != torch.float32 and not rope:
        return single, None
    return config("dkdv", head_dim, dtype, rope), config("dq", head_dim, dtype, rope)


# ----------------------------------------------------------------------------- tile helpers


@triton.jit
def _program_rows(n_rows, H, BLOCK: tl.constexpr):
    # 1-D grid with batch*head outermost: (batch, head, batch*head, this program's BLOCK row indices)
    pid = tl.program_id(0).to(tl.int64)
    num_blocks = tl.cdiv(n_rows, BLOCK)
    bh = pid // num_blocks
    return bh // H, bh % H, bh, (pid % num_blocks) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _tile_ptrs(X, b, h, rows, offs_d, stride_b, stride_h, stride_n):
    # [len(rows), BLOCK_D] pointers into X[b, h, rows, :]
    return X + b * stride_b + h * stride_h + rows[:, None] * stride_n + offs_d[None, :]


@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, n_cols, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    # [R, C] tile; only the dimensions flagged ragged get a predicate (zeros where masked)
    if MASK_ROWS and MASK_COLS:
        tile = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :], other=0.0)
    elif MASK_ROWS:
        tile = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
    elif MASK_COLS:
        tile = tl.load(ptrs, mask=(cols < n_cols)[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_rows(ptrs, tile, rows, n_rows, cols, n_cols, PAD_D: tl.constexpr):
    # one store per program: the row mask is always applied, the column mask when D is padded
    if PAD_D:
        tl.store(ptrs, tile, mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :])
    else:
        tl.store(ptrs, tile, mask=(rows < n_rows)[:, None])


@triton.jit
def _rotate_pairs(x, R: tl.constexpr, C: tl.constexpr):
    # timm's rot() on a [R, C] tile in registers: [x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...]
    even, odd = tl.split(tl.reshape(x, (R, C // 2, 2)))
    return tl.reshape(tl.join(-odd, even), (R, C))


@triton.jit
def _rope(x, rows, cols, n_rows, head_dim, SIN, COS, stride_sn, stride_cn, n_prefix, INVERSE: tl.constexpr,
          R: tl.constexpr, C: tl.constexpr):
    """fp32 [R, C] tile x at token rows `rows`, head-dim columns `cols`: x * cos + rot(x) * sin, timm's
    apply_rot_embed_cat (interleaved pairs), with the tables' row ``row - n_prefix``; prefix rows
    (row < n_prefix), rows past n_rows and padded columns keep x (cos = 1, sin = 0 there).
    INVERSE: the transpose, g * cos - rot(g * sin): the gradient through the rotation."""
    t = rows - n_prefix
    inside = (rows >= n_prefix) & (rows < n_rows)
    mask = inside[:, None] & (cols < head_dim)[None, :]
    t = tl.where(inside, t, 0).to(tl.int64)
    sin = tl.load(SIN + t[:, None] * stride_sn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(COS + t[:, None] * stride_cn + cols[None, :], mask=mask, other=1.0).to(tl.float32)
    x = x.to(tl.float32)
    if INVERSE:
        return x * cos - _rotate_pairs(x * sin, R, C)
    else:
        return x * cos + _rotate_pairs(x, R, C) * sin


@triton.jit
def _load_roped(ptrs, rows, n_rows, cols, head_dim, MASK_ROWS: tl.constexpr, PAD: tl.constexpr,
                SIN, COS, stride_sn, stride_cn, n_prefix, ROPE: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    # a q or k tile as _load_tile loads it, rotated (ROPE) in fp32 and rounded back to its dtype, as
    # timm's .type_as(v): the tile the dots read, rotated where it is loaded (no pass over q / k)
    tile = _load_tile(ptrs, rows, n_rows, cols, head_dim, MASK_ROWS, PAD)
    if ROPE:
        tile = _rope(tile, rows, cols, n_rows, head_dim, SIN, COS, stride_sn, stride_cn, n_prefix, False, R,
                     C).to(tile.dtype)
    return tile


@triton.jit
def _unrope(g, rows, cols, n_rows, head_dim, SIN, COS, stride_sn, stride_cn, n_prefix, ROPE: tl.constexpr,
            R: tl.constexpr, C: tl.constexpr):
    # an fp32 gradient with respect to the rotated q / k -> with respect to q / k (identity without ROPE)
    if ROPE:
        g = _rope(g, rows, cols, n_rows, head_dim, SIN, COS, stride_sn, stride_cn, n_prefix, True, R, C)
    return g


# ----------------------------------------------------------------------------- forward


@triton.jit
def _next_key_block(k_ptrs, v_ptrs, kt_ptrs, vt_ptrs, BLOCK_N: tl.constexpr, stride_kn, stride_vn,
                    BLOCK_D_TAIL: tl.constexpr):
    # the K / V pointer tiles one key block on (the second column chunk's too when there is one;
    # without it kt_ptrs / vt_ptrs are stand-ins and stay as they are)
    k_ptrs += BLOCK_N * stride_kn
    v_ptrs += BLOCK_N * stride_vn
    if BLOCK_D_TAIL > 0:
        kt_ptrs += BLOCK_N * stride_kn
        vt_ptrs += BLOCK_N * stride_vn
    return k_ptrs, v_ptrs, kt_ptrs, vt_ptrs


@triton.jit
def _fwd_key_block(acc, acc_t, m_i, l_i, q, q_t, k_ptrs, v_ptrs, kt_ptrs, vt_ptrs, keys, n_kv, offs_d, offs_dt,
                   head_dim, qk_scale, SIN, COS, stride_sn, stride_cn, n_prefix,
                   MASK_KEYS: tl.constexpr, PAD_D: tl.constexpr, PAD_D_TAIL: tl.constexpr,
                   BLOCK_D_TAIL: tl.constexpr, DOT_PRECISION: tl.constexpr, ROPE: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # acc [BLOCK_M, BLOCK_D] (+ acc_t [BLOCK_M, BLOCK_D_TAIL]) fp32, m_i / l_i [BLOCK_M] running max
    # (log2 units) and sum
    k = _load_roped(k_ptrs, keys, n_kv, offs_d, head_dim, MASK_KEYS, PAD_D, SIN, COS, stride_sn, stride_cn,
                    n_prefix, ROPE, BLOCK_N, BLOCK_D)  # [BLOCK_N, BLOCK_D]
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    if BLOCK_D_TAIL > 0:
        k_t = _load_roped(kt_ptrs, keys, n_kv, offs_dt, head_dim, MASK_KEYS, PAD_D_TAIL, SIN, COS, stride_sn,
                          stride_cn, n_prefix, ROPE, BLOCK_N, BLOCK_D_TAIL)
        s = tl.dot(q_t, tl.trans(k_t), s, input_precision=DOT_PRECISION)
    s = s * qk_scale  # log2 units
    if MASK_KEYS:
        s = tl.where((keys < n_kv)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)  # the online-softmax rescale of what was summed so far
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(v_ptrs, keys, n_kv, offs_d, head_dim, MASK_KEYS, PAD_D)  # [BLOCK_N, BLOCK_D]
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    if BLOCK_D_TAIL > 0:
        v_t = _load_tile(vt_ptrs, keys, n_kv, offs_dt, head_dim, MASK_KEYS, PAD_D_TAIL)
        acc_t = tl.dot(p.to(v_t.dtype), v_t, acc_t * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, acc_t, m_new, l_i


@triton.jit
def attention_fwd_kernel(
    Q, K, V,  # [B, H, N_Q | N_KV, D] through strides
    O,  # [B, H, N_Q, D] through strides, input dtype
    LSE,  # [B*H, N_Q] fp32, contiguous
    SIN, COS,  # ROPE: [N - n_prefix, D] tables through row strides (unit stride on D); else placeholders
    qk_scale,  # scale * log2(e)
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_sn, stride_cn,
    H, N_Q, N_KV, head_dim,
    n_prefix,  # ROPE: the first n_prefix tokens (class / register tokens) are not rotated
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D_TAIL: tl.constexpr,
    PAD_D: tl.constexpr, PAD_D_TAIL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROPE: tl.constexpr = False,  # rotary embedding of q and k (self-attention, N_Q == N_KV)
):
    b, h, bh, offs_m = _program_rows(N_Q, H, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q_ptrs = _tile_ptrs(Q, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qn)
    q = _load_roped(q_ptrs, offs_m, N_Q, offs_d, head_dim, True, PAD_D, SIN, COS, stride_sn, stride_cn, n_prefix,
                    ROPE, BLOCK_M, BLOCK_D)  # [BLOCK_M, BLOCK_D]
    k_ptrs = _tile_ptrs(K, b, h, offs_n, offs_d, stride_kb, stride_kh, stride_kn)
    v_ptrs = _tile_ptrs(V, b, h, offs_n, offs_d, stride_vb, stride_vh, stride_vn)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BLOCK_D_TAIL > 0:  # the head dim's second column chunk (D = 80: 64 + 16, not 80 padded to 128)
        offs_dt = BLOCK_D + tl.arange(0, BLOCK_D_TAIL)
        q_t = _load_roped(_tile_ptrs(Q, b, h, offs_m, offs_dt, stride_qb, stride_qh, stride_qn),
                          offs_m, N_Q, offs_dt, head_dim, True, PAD_D_TAIL, SIN, COS, stride_sn, stride_cn,
                          n_prefix, ROPE, BLOCK_M, BLOCK_D_TAIL)  # [BLOCK_M, BLOCK_D_TAIL]
        kt_ptrs = _tile_ptrs(K, b, h, offs_n, offs_dt, stride_kb, stride_kh, stride_kn)
        vt_ptrs = _tile_ptrs(V, b, h, offs_n, offs_dt, stride_vb, stride_vh, stride_vn)
        acc_t = tl.zeros([BLOCK_M, BLOCK_D_TAIL], dtype=tl.float32)
    else:  # stand-ins that no code reads
        offs_dt, q_t, kt_ptrs, vt_ptrs, acc_t = offs_d, q, k_ptrs, v_ptrs, acc
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    n_full = N_KV - N_KV % BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, acc_t, m_i, l_i = _fwd_key_block(acc, acc_t, m_i, l_i, q, q_t, k_ptrs, v_ptrs, kt_ptrs, vt_ptrs,
                                              start_n + offs_n, N_KV, offs_d, offs_dt, head_dim, qk_scale, SIN, COS,
                                              stride_sn, stride_cn, n_prefix, False, PAD_D, PAD_D_TAIL,
                                              BLOCK_D_TAIL, DOT_PRECISION, ROPE, BLOCK_N, BLOCK_D)
        k_ptrs, v_ptrs, kt_ptrs, vt_ptrs = _next_key_block(k_ptrs, v_ptrs, kt_ptrs, vt_ptrs, BLOCK_N, stride_kn,
                                                           stride_vn, BLOCK_D_TAIL)
    if n_full < N_KV:  # the ragged last key block
        acc, acc_t, m_i, l_i = _fwd_key_block(acc, acc_t, m_i, l_i, q, q_t, k_ptrs, v_ptrs, kt_ptrs, vt_ptrs,
                                              n_full + offs_n, N_KV, offs_d, offs_dt, head_dim, qk_scale, SIN, COS,
                                              stride_sn, stride_cn, n_prefix, True, PAD_D, PAD_D_TAIL,
                                              BLOCK_D_TAIL, DOT_PRECISION, ROPE, BLOCK_N, BLOCK_D)

    acc = acc / l_i[:, None]
    o_ptrs = _tile_ptrs(O, b, h, offs_m, offs_d, stride_ob, stride_oh, stride_on)
    _store_rows(o_ptrs, acc.to(O.dtype.element_ty), offs_m, N_Q, offs_d, head_dim, PAD_D)
    if BLOCK_D_TAIL > 0:
        _store_rows(_tile_ptrs(O, b, h, offs_m, offs_dt, stride_ob, stride_oh, stride_on),
                    (acc_t / l_i[:, None]).to(O.dtype.element_ty), offs_m, N_Q, offs_dt, head_dim, PAD_D_TAIL)
    lse = (m_i + tl.math.log2(l_i)) * LN2_IN_KERNEL  # back to natural-log units
    tl.store(LSE + bh * N_Q + offs_m, lse, mask=offs_m < N_Q)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _row_delta(o, do):
    # delta = rowsum(dO * O) in fp32: the softmax backward's per-query correction term
    return tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)


@triton.jit
def _dkdv_query_block(dk, dv, dk_t, dv_t, k, v, k_t, v_t, keys, n_kv,
                      q_ptrs, do_ptrs, o_ptrs, dq_ptrs, qt_ptrs, dot_ptrs, ot_ptrs, dqt_ptrs, lse_ptrs, delta_ptrs,
                      queries, n_q, offs_d, offs_dt, head_dim, qk_scale, scale, SIN, COS, stride_sn, stride_cn,
                      n_prefix, MASK_QUERIES: tl.constexpr, PAD_D: tl.constexpr, PAD_D_TAIL: tl.constexpr,
                      BLOCK_D_TAIL: tl.constexpr, WRITE_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      ROPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # dk, dv [BLOCK_N, BLOCK_D] (+ dk_t, dv_t [BLOCK_N, BLOCK_D_TAIL]) fp32 accumulators for the keys
    # k, v (+ k_t, v_t) (rotated with ROPE: dk, dk_t are then gradients of the rotated keys)
    q = _load_roped(q_ptrs, queries, n_q, offs_d, head_dim, MASK_QUERIES, PAD_D, SIN, COS, stride_sn, stride_cn,
                    n_prefix, ROPE, BLOCK_M, BLOCK_D)  # [BLOCK_M, BLOCK_D]
    do = _load_tile(do_ptrs, queries, n_q, offs_d, head_dim, MASK_QUERIES, PAD_D)
    if BLOCK_D_TAIL > 0:
        q_t = _load_roped(qt_ptrs, queries, n_q, offs_dt, head_dim, MASK_QUERIES, PAD_D_TAIL, SIN, COS, stride_sn,
                          stride_cn, n_prefix, ROPE, BLOCK_M, BLOCK_D_TAIL)
        do_t = _load_tile(dot_ptrs, queries, n_q, offs_dt, head_dim, MASK_QUERIES, PAD_D_TAIL)
    if MASK_QUERIES:  # masked queries: q = dO = delta = 0 and P = 0, so they add nothing
        lse = tl.load(lse_ptrs, mask=queries < n_q, other=float("inf"))
    else:
        lse = tl.load(lse_ptrs)
    if WRITE_DQ:  # single pass: this program is the only one to visit these queries
        delta = _row_delta(_load_tile(o_ptrs, queries, n_q, offs_d, head_dim, MASK_QUERIES, PAD_D), do)
        if BLOCK_D_TAIL > 0:
            delta += _row_delta(_load_tile(ot_ptrs, queries, n_q, offs_dt, head_dim, MASK_QUERIES, PAD_D_TAIL), do_t)
    elif MASK_QUERIES:
        delta = tl.load(delta_ptrs, mask=queries < n_q, other=0.0)
    else:
        delta = tl.load(delta_ptrs)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
    if BLOCK_D_TAIL > 0:
        s_t = tl.dot(k_t, tl.trans(q_t), s_t, input_precision=DOT_PRECISION)
    s_t = s_t * qk_scale  # log2 units
    p_t = tl.math.exp2(s_t - (lse * LOG2E_IN_KERNEL)[None, :])
    if WRITE_DQ:  # padding keys must not reach dQ (with k = 0 their P is exp(-lse), not 0)
        p_t = tl.where((keys < n_kv)[:, None], p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
    if BLOCK_D_TAIL > 0:
        dv_t = tl.dot(p_t.to(do_t.dtype), do_t, dv_t, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v_t, tl.trans(do_t), dp_t, input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    if BLOCK_D_TAIL > 0:
        dk_t = tl.dot(ds_t.to(q_t.dtype), q_t, dk_t, input_precision=DOT_PRECISION)
    if WRITE_DQ:  # this program holds every key of the head: dQ of these queries is complete
        dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=DOT_PRECISION) * scale  # [BLOCK_M, BLOCK_D]
        dq = _unrope(dq, queries, offs_d, n_q, head_dim, SIN, COS, stride_sn, stride_cn, n_prefix, ROPE, BLOCK_M,
                     BLOCK_D)
        _store_rows(dq_ptrs, dq.to(dq_ptrs.dtype.element_ty), queries, n_q, offs_d, head_dim, PAD_D)
        if BLOCK_D_TAIL > 0:
            dq_t = tl.dot(tl.trans(ds_t.to(k_t.dtype)), k_t, input_precision=DOT_PRECISION) * scale
            dq_t = _unrope(dq_t, queries, offs_dt, n_q, head_dim, SIN, COS, stride_sn, stride_cn, n_prefix, ROPE,
                           BLOCK_M, BLOCK_D_TAIL)
            _store_rows(dqt_ptrs, dq_t.to(dqt_ptrs.dtype.element_ty), queries, n_q, offs_dt, head_dim, PAD_D_TAIL)
    return dk, dv, dk_t, dv_t


@triton.jit
def _key_tiles(K, V, b, h, keys, n_kv, cols, head_dim, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
               stride_vn, PAD: tl.constexpr, SIN, COS, stride_sn, stride_cn, n_prefix, ROPE: tl.constexpr,
               R: tl.constexpr, C: tl.constexpr):
    # K (rotated with ROPE) and V of this program's keys, columns `cols`: two [R, C] tiles
    k = _load_roped(_tile_ptrs(K, b, h, keys, cols, stride_kb, stride_kh, stride_kn), keys, n_kv, cols, head_dim,
                    True, PAD, SIN, COS, stride_sn, stride_cn, n_prefix, ROPE, R, C)
    v = _load_tile(_tile_ptrs(V, b, h, keys, cols, stride_vb, stride_vh, stride_vn), keys, n_kv, cols, head_dim,
                   True, PAD)
    return k, v


@triton.jit
def _query_side_ptrs(Q, DO, O, DQ, b, h, rows, cols, stride_qb, stride_qh, stride_qn, stride_dob, stride_doh,
                     stride_don, stride_ob, stride_oh, stride_on, stride_dqb, stride_dqh, stride_dqn):
    # pointer tiles [len(rows), len(cols)] into Q, dO, O and dQ at these query rows
    return (_tile_ptrs(Q, b, h, rows, cols, stride_qb, stride_qh, stride_qn),
            _tile_ptrs(DO, b, h, rows, cols, stride_dob, stride_doh, stride_don),
            _tile_ptrs(O, b, h, rows, cols, stride_ob, stride_oh, stride_on),
            _tile_ptrs(DQ, b, h, rows, cols, stride_dqb, stride_dqh, stride_dqn))


@triton.jit
def _next_query_block(q_ptrs, do_ptrs, o_ptrs, dq_ptrs, BLOCK_M: tl.constexpr, stride_qn, stride_don, stride_on,
                      stride_dqn):
    return (q_ptrs + BLOCK_M * stride_qn, do_ptrs + BLOCK_M * stride_don, o_ptrs + BLOCK_M * stride_on,
            dq_ptrs + BLOCK_M * stride_dqn)


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, DO,  # [B, H, N_Q | N_KV, D] through strides
    O,  # [B, H, N_Q, D] through strides; read only when WRITE_DQ (delta computed here)
    DK, DV,  # [B, H, N_KV, D] through strides
    DQ,  # [B, H, N_Q, D] through strides; written only when WRITE_DQ
    LSE, DELTA,  # [B*H, N_Q] fp32; DELTA (from attention_bwd_dq_kernel) read only when not WRITE_DQ
    SIN, COS,  # as in attention_fwd_kernel
    qk_scale, scale,  # scale * log2(e), scale
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_ob, stride_oh, stride_on,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_dqb, stride_dqh, stride_dqn,
    stride_sn, stride_cn,
    H, N_Q, N_KV, head_dim,
    n_prefix,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D_TAIL: tl.constexpr,
    PAD_D: tl.constexpr, PAD_D_TAIL: tl.constexpr, WRITE_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROPE: tl.constexpr = False,  # q and k rotated where loaded; dk (and dq) rotated back before the stores
):
    b, h, bh, offs_n = _program_rows(N_KV, H, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    k, v = _key_tiles(K, V, b, h, offs_n, N_KV, offs_d, head_dim, stride_kb, stride_kh, stride_kn, stride_vb,
                      stride_vh, stride_vn, PAD_D, SIN, COS, stride_sn, stride_cn, n_prefix, ROPE, BLOCK_N,
                      BLOCK_D)  # [BLOCK_N, BLOCK_D] each
    q_ptrs, do_ptrs, o_ptrs, dq_ptrs = _query_side_ptrs(
        Q, DO, O, DQ, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qn, stride_dob, stride_doh, stride_don,
        stride_ob, stride_oh, stride_on, stride_dqb, stride_dqh, stride_dqn)
    lse_ptrs = LSE + bh * N_Q + offs_m
    delta_ptrs = DELTA + bh * N_Q + offs_m

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if BLOCK_D_TAIL > 0:  # the head dim's second column chunk (see attention_fwd_kernel)
        offs_dt = BLOCK_D + tl.arange(0, BLOCK_D_TAIL)
        k_t, v_t = _key_tiles(K, V, b, h, offs_n, N_KV, offs_dt, head_dim, stride_kb, stride_kh, stride_kn,
                              stride_vb, stride_vh, stride_vn, PAD_D_TAIL, SIN, COS, stride_sn, stride_cn, n_prefix,
                              ROPE, BLOCK_N, BLOCK_D_TAIL)  # [BLOCK_N, BLOCK_D_TAIL] each
        qt_ptrs, dot_ptrs, ot_ptrs, dqt_ptrs = _query_side_ptrs(
            Q, DO, O, DQ, b, h, offs_m, offs_dt, stride_qb, stride_qh, stride_qn, stride_dob, stride_doh, stride_don,
            stride_ob, stride_oh, stride_on, stride_dqb, stride_dqh, stride_dqn)
        dk_t = tl.zeros([BLOCK_N, BLOCK_D_TAIL], dtype=tl.float32)
        dv_t = tl.zeros([BLOCK_N, BLOCK_D_TAIL], dtype=tl.float32)
    else:  # stand-ins that no code reads
        offs_dt, k_t, v_t, dk_t, dv_t = offs_d, k, v, dk, dv
        qt_ptrs, dot_ptrs, ot_ptrs, dqt_ptrs = q_ptrs, do_ptrs, o_ptrs, dq_ptrs
    m_full = N_Q - N_Q % BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv, dk_t, dv_t = _dkdv_query_block(
            dk, dv, dk_t, dv_t, k, v, k_t, v_t, offs_n, N_KV, q_ptrs, do_ptrs, o_ptrs, dq_ptrs,
            qt_ptrs, dot_ptrs, ot_ptrs, dqt_ptrs, lse_ptrs, delta_ptrs, start_m + offs_m, N_Q, offs_d, offs_dt,
            head_dim, qk_scale, scale, SIN, COS, stride_sn, stride_cn, n_prefix, False, PAD_D, PAD_D_TAIL,
            BLOCK_D_TAIL, WRITE_DQ, DOT_PRECISION, ROPE, BLOCK_M, BLOCK_D)
        q_ptrs, do_ptrs, o_ptrs, dq_ptrs = _next_query_block(q_ptrs, do_ptrs, o_ptrs, dq_ptrs, BLOCK_M, stride_qn,
                                                             stride_don, stride_on, stride_dqn)
        if BLOCK_D_TAIL > 0:
            qt_ptrs, dot_ptrs, ot_ptrs, dqt_ptrs = _next_query_block(qt_ptrs, dot_ptrs, ot_ptrs, dqt_ptrs, BLOCK_M,
                                                                     stride_qn, stride_don, stride_on, stride_dqn)
        lse_ptrs += BLOCK_M
        delta_ptrs += BLOCK_M
    if m_full < N_Q:  # the ragged last query block
        dk, dv, dk_t, dv_t = _dkdv_query_block(
            dk, dv, dk_t, dv_t, k, v, k_t, v_t, offs_n, N_KV, q_ptrs, do_ptrs, o_ptrs, dq_ptrs,
            qt_ptrs, dot_ptrs, ot_ptrs, dqt_ptrs, lse_ptrs, delta_ptrs, m_full + offs_m, N_Q, offs_d, offs_dt,
            head_dim, qk_scale, scale, SIN, COS, stride_sn, stride_cn, n_prefix, True, PAD_D, PAD_D_TAIL,
            BLOCK_D_TAIL, WRITE_DQ, DOT_PRECISION, ROPE, BLOCK_M, BLOCK_D)

    dk = _unrope(dk * scale, offs_n, offs_d, N_KV, head_dim, SIN, COS, stride_sn, stride_cn, n_prefix, ROPE,
                 BLOCK_N, BLOCK_D)
    dk_ptrs = _tile_ptrs(DK, b, h, offs_n, offs_d, stride_dkb, stride_dkh, stride_dkn)
    _store_rows(dk_ptrs, dk.to(DK.dtype.element_ty), offs_n, N_KV, offs_d, head_dim, PAD_D)
    dv_ptrs = _tile_ptrs(DV, b, h, offs_n, offs_d, stride_dvb, stride_dvh, stride_dvn)
    _store_rows(dv_ptrs, dv.to(DV.dtype.element_ty), offs_n, N_KV, offs_d, head_dim, PAD_D)
    if BLOCK_D_TAIL > 0:
        dk_t = _unrope(dk_t * scale, offs_n, offs_dt, N_KV, head_dim, SIN, COS, stride_sn, stride_cn, n_prefix,
                       ROPE, BLOCK_N, BLOCK_D_TAIL)
        _store_rows(_tile_ptrs(DK, b, h, offs_n, offs_dt, stride_dkb, stride_dkh, stride_dkn),
                    dk_t.to(DK.dtype.element_ty), offs_n, N_KV, offs_dt, head_dim, PAD_D_TAIL)
        _store_rows(_tile_ptrs(DV, b, h, offs_n, offs_dt, stride_dvb, stride_dvh, stride_dvn),
                    dv_t.to(DV.dtype.element_ty), offs_n, N_KV, offs_dt, head_dim, PAD_D_TAIL)


@triton.jit
def _dq_key_block(dq, dq_t, q, q_t, do, do_t, lse, delta, k_ptrs, v_ptrs, kt_ptrs, vt_ptrs, keys, n_kv,
                  offs_d, offs_dt, head_dim, qk_scale, SIN, COS, stride_sn, stride_cn, n_prefix,
                  MASK_KEYS: tl.constexpr, PAD_D: tl.constexpr,
                  PAD_D_TAIL: tl.constexpr, BLOCK_D_TAIL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  ROPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # dq [BLOCK_M, BLOCK_D] (+ dq_t [BLOCK_M, BLOCK_D_TAIL]) fp32 accumulators for the queries q (+ q_t)
    k = _load_roped(k_ptrs, keys, n_kv, offs_d, head_dim, MASK_KEYS, PAD_D, SIN, COS, stride_sn, stride_cn,
                    n_prefix, ROPE, BLOCK_N, BLOCK_D)  # [BLOCK_N, BLOCK_D]
    v = _load_tile(v_ptrs, keys, n_kv, offs_d, head_dim, MASK_KEYS, PAD_D)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    if BLOCK_D_TAIL > 0:
        k_t = _load_roped(kt_ptrs, keys, n_kv, offs_dt, head_dim, MASK_KEYS, PAD_D_TAIL, SIN, COS, stride_sn,
                          stride_cn, n_prefix, ROPE, BLOCK_N, BLOCK_D_TAIL)
        v_t = _load_tile(vt_ptrs, keys, n_kv, offs_dt, head_dim, MASK_KEYS, PAD_D_TAIL)
        s = tl.dot(q_t, tl.trans(k_t), s, input_precision=DOT_PRECISION)
    s = s * qk_scale  # log2 units
    p = tl.math.exp2(s - (lse * LOG2E_IN_KERNEL)[:, None])
    if MASK_KEYS:
        p = tl.where((keys < n_kv)[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if BLOCK_D_TAIL > 0:
        dp = tl.dot(do_t, tl.trans(v_t), dp, input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    if BLOCK_D_TAIL > 0:
        dq_t = tl.dot(ds.to(k_t.dtype), k_t, dq_t, input_precision=DOT_PRECISION)
    return dq, dq_t


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, DO,  # [B, H, N_Q | N_KV, D] through strides
    O,  # [B, H, N_Q, D] through strides: the forward's output, for delta
    DQ,  # [B, H, N_Q, D] through strides
    LSE,  # [B*H, N_Q] fp32, read
    DELTA,  # [B*H, N_Q] fp32, written here for attention_bwd_dkdv_kernel
    SIN, COS,  # as in attention_fwd_kernel
    qk_scale, scale,  # scale * log2(e), scale
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_ob, stride_oh, stride_on,
    stride_dqb, stride_dqh, stride_dqn,
    stride_sn, stride_cn,
    H, N_Q, N_KV, head_dim,
    n_prefix,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D_TAIL: tl.constexpr,
    PAD_D: tl.constexpr, PAD_D_TAIL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROPE: tl.constexpr = False,  # q and k rotated where loaded; dq rotated back before its store
):
    b, h, bh, offs_m = _program_rows(N_Q, H, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    # padding query rows load q = dO = O = 0, lse = 0 (so delta = 0): finite, and never stored
    q = _load_roped(_tile_ptrs(Q, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qn),
                    offs_m, N_Q, offs_d, head_dim, True, PAD_D, SIN, COS, stride_sn, stride_cn, n_prefix, ROPE,
                    BLOCK_M, BLOCK_D)  # [BLOCK_M, BLOCK_D]
    do = _load_tile(_tile_ptrs(DO, b, h, offs_m, offs_d, stride_dob, stride_doh, stride_don),
                    offs_m, N_Q, offs_d, head_dim, True, PAD_D)
    lse = tl.load(LSE + bh * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)
    delta = _row_delta(_load_tile(_tile_ptrs(O, b, h, offs_m, offs_d, stride_ob, stride_oh, stride_on),
                                  offs_m, N_Q, offs_d, head_dim, True, PAD_D), do)
    if BLOCK_D_TAIL > 0:  # the head dim's second column chunk (see attention_fwd_kernel)
        offs_dt = BLOCK_D + tl.arange(0, BLOCK_D_TAIL)
        q_t = _load_roped(_tile_ptrs(Q, b, h, offs_m, offs_dt, stride_qb, stride_qh, stride_qn),
                          offs_m, N_Q, offs_dt, head_dim, True, PAD_D_TAIL, SIN, COS, stride_sn, stride_cn,
                          n_prefix, ROPE, BLOCK_M, BLOCK_D_TAIL)  # [BLOCK_M, BLOCK_D_TAIL]
        do_t = _load_tile(_tile_ptrs(DO, b, h, offs_m, offs_dt, stride_dob, stride_doh, stride_don),
                          offs_m, N_Q, offs_dt, head_dim, True, PAD_D_TAIL)
        delta += _row_delta(_load_tile(_tile_ptrs(O, b, h, offs_m, offs_dt, stride_ob, stride_oh, stride_on),
                                       offs_m, N_Q, offs_dt, head_dim, True, PAD_D_TAIL), do_t)
        kt_ptrs = _tile_ptrs(K, b, h, offs_n, offs_dt, stride_kb, stride_kh, stride_kn)
        vt_ptrs = _tile_ptrs(V, b, h, offs_n, offs_dt, stride_vb, stride_vh, stride_vn)
        dq_t = tl.zeros([BLOCK_M, BLOCK_D_TAIL], dtype=tl.float32)
    tl.store(DELTA + bh * N_Q + offs_m, delta, mask=offs_m < N_Q)
    k_ptrs = _tile_ptrs(K, b, h, offs_n, offs_d, stride_kb, stride_kh, stride_kn)
    v_ptrs = _tile_ptrs(V, b, h, offs_n, offs_d, stride_vb, stride_vh, stride_vn)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BLOCK_D_TAIL == 0:  # stand-ins that no code reads
        offs_dt, q_t, do_t, kt_ptrs, vt_ptrs, dq_t = offs_d, q, do, k_ptrs, v_ptrs, dq
    n_full = N_KV - N_KV % BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq, dq_t = _dq_key_block(dq, dq_t, q, q_t, do, do_t, lse, delta, k_ptrs, v_ptrs, kt_ptrs, vt_ptrs,
                                 start_n + offs_n, N_KV, offs_d, offs_dt, head_dim, qk_scale, SIN, COS, stride_sn,
                                 stride_cn, n_prefix, False, PAD_D, PAD_D_TAIL, BLOCK_D_TAIL, DOT_PRECISION, ROPE,
                                 BLOCK_N, BLOCK_D)
        k_ptrs, v_ptrs, kt_ptrs, vt_ptrs = _next_key_block(k_ptrs, v_ptrs, kt_ptrs, vt_ptrs, BLOCK_N, stride_kn,
                                                           stride_vn, BLOCK_D_TAIL)
    if n_full < N_KV:  # the ragged last key block
        dq, dq_t = _dq_key_block(dq, dq_t, q, q_t, do, do_t, lse, delta, k_ptrs, v_ptrs, kt_ptrs, vt_ptrs,
                                 n_full + offs_n, N_KV, offs_d, offs_dt, head_dim, qk_scale, SIN, COS, stride_sn,
                                 stride_cn, n_prefix, True, PAD_D, PAD_D_TAIL, BLOCK_D_TAIL, DOT_PRECISION, ROPE,
                                 BLOCK_N, BLOCK_D)

    dq = _unrope(dq * scale, offs_m, offs_d, N_Q, head_dim, SIN, COS, stride_sn, stride_cn, n_prefix, ROPE,
                 BLOCK_M, BLOCK_D)
    dq_ptrs = _tile_ptrs(DQ, b, h, offs_m, offs_d, stride_dqb, stride_dqh, stride_dqn)
    _store_rows(dq_ptrs, dq.to(DQ.dtype.element_ty), offs_m, N_Q, offs_d, head_dim, PAD_D)
    if BLOCK_D_TAIL > 0:
        dq_t = _unrope(dq_t * scale, offs_m, offs_dt, N_Q, head_dim, SIN, COS, stride_sn, stride_cn, n_prefix,
                       ROPE, BLOCK_M, BLOCK_D_TAIL)
        _store_rows(_tile_ptrs(DQ, b, h, offs_m, offs_dt, stride_dqb, stride_dqh, stride_dqn),
                    dq_t.to(DQ.dtype.element_ty), offs_m, N_Q, offs_dt, head_dim, PAD_D_TAIL)


# ----------------------------------------------------------------------------- launchers


def _bhn_strides(t: torch.Tensor):
    return t.stride()[:3]  # one call: the launch path is host-bound at ViT sizes


def _rope_args(rope, num_prefix_tokens, n_q, n_kv, head_dim, placeholder):
    """(SIN, COS, stride_sn, stride_cn, n_prefix, ROPE) for the kernels from rope = (sin, cos) or None."""
    if rope is None or n_q - num_prefix_tokens == 0:  # nothing to rotate
        return placeholder, placeholder, 0, 0, 0, False
    sin, cos = rope
    if n_q != n_kv:
        raise ValueError(f"rope: self-attention only (N_Q == N_KV), got N_Q={n_q}, N_KV={n_kv}")
    if head_dim % 2:
        raise ValueError(f"rope: the head dim must be even (pairs are rotated), got {head_dim}")
    expected = (n_q - num_prefix_tokens, head_dim)
    for name, t in (("sin", sin), ("cos", cos)):
        if tuple(t.shape) != expected:
            raise ValueError(f"rope: {name} must be [N - num_prefix_tokens, D] = {list(expected)}, got {list(t.shape)}")
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"rope: {name} needs a unit stride on D, got strides {tuple(t.stride())}")
    return sin, cos, sin.stride(0), cos.stride(0), num_prefix_tokens, True


def attention_fwd(q, k, v, o, lse, scale: float, fwd_cfg: Config = None, rope=None, num_prefix_tokens: int = 0):
    """Writes o = softmax(scale * q k^T) v and lse = logsumexp(scale * q k^T) (fp32, natural log).

    q, o: [B, H, N_Q, D]; k, v: [B, H, N_KV, D] (any strides, unit stride on D); lse: [B, H, N_Q]
    contiguous fp32. ``fwd_cfg`` overrides the table (benchmark sweeps). ``rope`` = (sin, cos), each
    [N - num_prefix_tokens, D] (row strides free, unit stride on D, any float dtype, read as fp32):
    q and k of tokens num_prefix_tokens.. rotated as timm's apply_rot_embed_cat (interleaved pairs)
    as each tile is loaded, rounded to q's dtype (self-attention only).
    """
    reject_bf16_dots_under_interpreter("attention", attention_fwd_kernel, q.dtype)
    B, H, n_q, head_dim = q.shape
    n_kv = k.shape[2]
    if B * H * n_q == 0:
        return
    sin, cos, stride_sn, stride_cn, n_prefix, use_rope = _rope_args(rope, num_prefix_tokens, n_q, n_kv, head_dim, lse)
    cfg = config("fwd", head_dim, q.dtype, use_rope) if fwd_cfg is None else fwd_cfg
    bd, bd_tail, pad_d, pad_d_tail = head_chunks(head_dim)
    grid = (B * H * cdiv(n_q, cfg.block_m),)
    attention_fwd_kernel[grid](
        q, k, v, o, lse, sin, cos, scale * LOG2E,
        *_bhn_strides(q), *_bhn_strides(k), *_bhn_strides(v), *_bhn_strides(o), stride_sn, stride_cn,
        H, n_q, n_kv, head_dim, n_prefix,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=bd, BLOCK_D_TAIL=bd_tail, PAD_D=pad_d,
        PAD_D_TAIL=pad_d_tail, DOT_PRECISION=dot_precision(q.dtype), ROPE=use_rope, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def attention_bwd(do, q, k, v, o, lse, dq, dk, dv, scale: float, bwd_cfgs=None, rope=None,
                  num_prefix_tokens: int = 0):
    """Writes dq, dk, dv (shapes and strides of q, k, v: any, unit stride on D) for upstream do.

    o, lse: the forward's outputs. ``bwd_cfgs`` overrides the table: (dK/dV config, dQ config), or
    (single-pass config with block_n >= N_KV, None), as `bwd_configs` returns them. ``rope``,
    ``num_prefix_tokens``: the forward's; q and k are rotated again where loaded, and dq / dk (the
    gradients of the rotated tiles, in fp32) are rotated back (the transpose) before their stores.
    """
    reject_bf16_dots_under_interpreter("attention backward", attention_bwd_dkdv_kernel, q.dtype)
    B, H, n_q, head_dim = q.shape
    n_kv = k.shape[2]
    if B * H * n_q == 0:
        return
    use_rope = rope is not None and n_q - num_prefix_tokens > 0
    dkdv_cfg, dq_cfg = bwd_configs(head_dim, n_kv, q.dtype, use_rope) if bwd_cfgs is None else bwd_cfgs
    write_dq = dq_cfg is None
    if write_dq and n_kv > dkdv_cfg.block_n:
        raise ValueError(f"single-pass backward needs block_n >= N_KV, got {dkdv_cfg.block_n} < {n_kv}")
    bd, bd_tail, pad_d, pad_d_tail = head_chunks(head_dim)
    qk_scale = scale * LOG2E
    precision = dot_precision(q.dtype)
    sin, cos, stride_sn, stride_cn, n_prefix, use_rope = _rope_args(rope, num_prefix_tokens, n_q, n_kv, head_dim, lse)

    if write_dq:
        delta = lse  # placeholder: the single-pass kernel computes delta itself and reads no DELTA
    else:
        delta = torch.empty_like(lse)
        cfg = dq_cfg  # dQ first: it stores delta, which the dK/dV kernel reads
        attention_bwd_dq_kernel[(B * H * cdiv(n_q, cfg.block_m),)](
            q, k, v, do, o, dq, lse, delta, sin, cos, qk_scale, scale,
            *_bhn_strides(q), *_bhn_strides(k), *_bhn_strides(v), *_bhn_strides(do), *_bhn_strides(o),
            *_bhn_strides(dq), stride_sn, stride_cn,
            H, n_q, n_kv, head_dim, n_prefix,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=bd, BLOCK_D_TAIL=bd_tail, PAD_D=pad_d,
            PAD_D_TAIL=pad_d_tail, DOT_PRECISION=precision, ROPE=use_rope, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    cfg = dkdv_cfg
    attention_bwd_dkdv_kernel[(B * H * cdiv(n_kv, cfg.block_n),)](
        q, k, v, do, o, dk, dv, dq, lse, delta, sin, cos, qk_scale, scale,
        *_bhn_strides(q), *_bhn_strides(k), *_bhn_strides(v), *_bhn_strides(do), *_bhn_strides(o),
        *_bhn_strides(dk), *_bhn_strides(dv), *_bhn_strides(dq), stride_sn, stride_cn,
        H, n_q, n_kv, head_dim, n_prefix,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=bd, BLOCK_D_TAIL=bd_tail, PAD_D=pad_d,
        PAD_D_TAIL=pad_d_tail, WRITE_DQ=write_dq, DOT_PRECISION=precision, ROPE=use_rope, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
