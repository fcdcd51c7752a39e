"""The kernel net's hidden features Z in one pass forward and one pass backward (issues 9, 13).

The layer's SIREN (relaxedconv/kernel_net.py) is evaluated on the broadcast of its coordinate
groups [N, P, N_in, K*K]. Its first pre-activation splits exactly into a part that does not
depend on the output position and a part that depends on nothing else (design.md §4):

    pre[n, p, j, :] = R[n, j, :] + Q[p, :]        R: [N, J, H]   Q: [P, H] (absent: P = 1)
    h1 = sin(pre);  t = h1 W2^T + b2;  Z_h = sin(t)                (depth 3; depth 2: Z_h = sin(pre))
    z[n, p, j, :] = [Z_h | 1] * m[j]                                 [N, P, J, H+1]

In PyTorch that is ~30 memory passes over N*P*J*H values (T2) or ~100 small operators (T1); here
it is one launch forward and one backward.

Forward: the rows (p, j) of one rotation n are z's rows in memory order; a program takes tiles of
BLOCK_M consecutive rows (any number of positions), gathers their rows of R and Q (a few hundred KB,
L2-resident), and writes the tile once.

Backward: one program per (rotation n, window tile of BLOCK_J rows, chunk of positions) keeps R's
tile in registers, loops over its positions recomputing pre, h1 and t, and accumulates

    dt = dZ_h m cos(t);  db2 = sum dt;  dW2 = dt^T h1;  dh1 = dt W2;  dpre = dh1 cos(pre)
    dR[n, j] = sum_p dpre;  dQ[p] = sum_{n, j} dpre

in per-program partial buffers that the host adds in a fixed order: no atomics, so a rerun gives
the same bits. BLOCK_J and the number of chunks are functions of the shape alone, for the same
reason.

The H x H products run on tensor cores as three TF32 products ("tf32x3": the operands split into
a TF32 high part and a TF32 remainder, the remainders' product dropped), whose error, ~1e-6 of
the result, is near that of fp32 arithmetic; the first kernels used exact fp32 FMA products
(input_precision "ieee"), and on an H200 their backward took 1.12 ms at T2, issue-bound on ~400
instructions per value of Z (bench/README.md). ``products="tf32"`` takes one TF32 product
instead (the hardware truncates the operands to TF32: z's RMS error 4e-4, below bf16's rounding of
z that follows it, 9e-4; :func:`relaxedconv.fused_kernel_net.products_for`; the TF32x3 split and
its extra layout changes are ~45% of the backward's loop). fp64 (gradcheck) multiplies and sums
on the FMA units (:func:`common.mma`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .common import mma

# Backward rows of J per program: the smallest tl.dot side. Each thread then holds 4 values of every
# [BLOCK_J, H] operand at H = 32 and four warps compile to 110-150 registers (TF32 / TF32x3); 32
# rows take 253 and 64 rows spill even at eight warps (sm_90a, Triton 3.9: a TF32x3 product's
# operands are split in two, and the products' layouts change through shared memory). Fixed: it
# sets the partial sums.
BLOCK_J = 16
# Backward programs: about four waves of the three or four that fit an SM at once (132 SMs on an
# H100/H200), so the last, partial wave is a small part of the time (one wave of 600 programs for
# 528 places left a tail of 72 at T2); the positions are cut into that many chunks per window
# tile, each of at least MIN_POSITIONS_PER_PROGRAM positions (the per-program set-up and partial
# sums are paid once per chunk).
PROGRAMS_TARGET = 16 * 132
MIN_POSITIONS_PER_PROGRAM = 4
# Beyond this width W2 and its gradient no longer fit a program's registers.
MAX_HIDDEN = 64
# The fp32 products' tl.dot input_precision: TF32 x 3 (near fp32's accuracy, ~1e-6; the default),
# or one TF32 pass where the caller's result is rounded to bf16 anyway (relaxedconv.fused_kernel_net
# decides).
PRODUCTS = ("tf32x3", "tf32")


# Cody-Waite split of 2*pi: the high part has 8 significant bits, so k * TWO_PI_HI is exact in
# fp32 for |k| < 2^16 (|x| < 4e5) and the reduction's error is that of k * TWO_PI_LO, ~1e-7 * |k|.
TWO_PI_HI = tl.constexpr(6.28125)
TWO_PI_LO = tl.constexpr(0.0019353071795864769)
INV_TWO_PI = tl.constexpr(0.15915494309189535)


@triton.jit
def _reduced_angle(x):
    """x - 2*pi*round(x / (2*pi)): the same angle in [-pi, pi], where sin.approx is accurate."""
    k = tl.floor(x * INV_TWO_PI + 0.5)
    return tl.fma(k, -TWO_PI_LO, tl.fma(k, -TWO_PI_HI, x))


@triton.jit
def _sfu(x, INSTRUCTION: tl.constexpr):
    """The SFU's ``INSTRUCTION`` (sin.approx or cos.approx) of x, after the reduction to [-pi, pi]."""
    return tl.inline_asm_elementwise(INSTRUCTION + " $0, $1;", "=r,r", [_reduced_angle(x)],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _sin(x, FAST_TRIG: tl.constexpr):
    """sin(x). FAST_TRIG (fp32 on a GPU): the SFU's, absolute error <= 2^-21.41 on [-pi, pi]
    (CUDA C Programming Guide, __sinf), ~4e-7 on values of Z up to 1 in magnitude; ~6 instructions
    where libdevice's sinf takes ~30 plus a slow path for huge arguments. Else libdevice's (fp64,
    and the interpreter, which cannot run inline assembly)."""
    if FAST_TRIG:
        return _sfu(x, "sin.approx.f32")
    else:
        return tl.sin(x)


@triton.jit
def _cos(x, FAST_TRIG: tl.constexpr):
    """cos(x), as :func:`_sin` (the SFU's: absolute error <= 2^-21.19 on [-pi, pi], __cosf)."""
    if FAST_TRIG:
        return _sfu(x, "cos.approx.f32")
    else:
        return tl.cos(x)


@triton.jit
def _preactivation(r, q_ptr, p, hh, h_ok, HIDDEN: tl.constexpr, HAS_Q: tl.constexpr, ACC: tl.constexpr):
    """pre = R + Q[p] (R alone when the layer is translation-stationary)."""
    if HAS_Q:
        q = tl.load(q_ptr + p * HIDDEN + hh, mask=h_ok, other=0.0).to(ACC)
        return r + q[None, :]
    else:
        return r


@triton.jit
def _second_preactivation(h1, w2t, b2, ROWS: tl.constexpr, HP: tl.constexpr, ACC: tl.constexpr,
                          PRECISION: tl.constexpr, FP64: tl.constexpr):
    """t = h1 W2^T + b2, the bias added after the product as nn.Linear does."""
    return mma(h1, w2t, tl.zeros((ROWS, HP), dtype=ACC), PRECISION, FP64) + b2[None, :]


@triton.jit
def _hidden_weights(w2_ptr, b2_ptr, hh, h_ok, HIDDEN: tl.constexpr, HP: tl.constexpr, DEEP: tl.constexpr,
                    ACC: tl.constexpr):
    """W2^T, W2 and b2, zero-padded to HP (W2 is [out, in]: W2^T multiplies h1 from the right, W2
    itself dt); zeros at depth 2, where nothing reads them."""
    if DEEP:
        hh_ok = h_ok[:, None] & h_ok[None, :]
        w2t = tl.load(w2_ptr + hh[None, :] * HIDDEN + hh[:, None], mask=hh_ok, other=0.0).to(ACC)
        w2 = tl.load(w2_ptr + hh[:, None] * HIDDEN + hh[None, :], mask=hh_ok, other=0.0).to(ACC)
        b2 = tl.load(b2_ptr + hh, mask=h_ok, other=0.0).to(ACC)
        return w2t, w2, b2
    else:
        zero = tl.zeros((HP, HP), dtype=ACC)
        return zero, zero, tl.zeros((HP,), dtype=ACC)


@triton.jit
def _window_mask(m_ptr, jj, j_ok, HAS_MASK: tl.constexpr, ACC: tl.constexpr):
    if HAS_MASK:
        return tl.load(m_ptr + jj, mask=j_ok, other=0.0).to(ACC)
    else:
        return tl.where(j_ok, 1.0, 0.0).to(ACC)


@triton.jit
def _knet_forward_kernel(
    r_ptr, q_ptr, w2_ptr, b2_ptr, m_ptr, z_ptr,
    J, P,
    HIDDEN: tl.constexpr, HP: tl.constexpr, DEEP: tl.constexpr, HAS_Q: tl.constexpr, HAS_MASK: tl.constexpr,
    ACC: tl.constexpr, FP64: tl.constexpr, PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """z[n, p, j] = [sin(sin(R[n, j] + Q[p]) W2^T + b2) | 1] * m[j]; program (n, s) writes the row
    tiles s, s + S, ... of rotation n (S = the grid's second side), rows in z's order p * J + j."""
    n = tl.program_id(0)
    hh = tl.arange(0, HP)
    h_ok = hh < HIDDEN
    w2t, w2, b2 = _hidden_weights(w2_ptr, b2_ptr, hh, h_ok, HIDDEN, HP, DEEP, ACC)
    out_ty = z_ptr.dtype.element_ty
    rows_total = P * J
    for tile in range(tl.program_id(1), tl.cdiv(rows_total, BLOCK_M), tl.num_programs(1)):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        ok = rows < rows_total
        jj = rows % J
        tile_ok = ok[:, None] & h_ok[None, :]
        z = tl.load(r_ptr + (n * J + jj)[:, None] * HIDDEN + hh[None, :], mask=tile_ok, other=0.0).to(ACC)
        if HAS_Q:
            pp = rows // J
            z += tl.load(q_ptr + pp[:, None] * HIDDEN + hh[None, :], mask=tile_ok, other=0.0).to(ACC)
        z = _sin(z, FAST_TRIG)
        if DEEP:
            z = _sin(_second_preactivation(z, w2t, b2, BLOCK_M, HP, ACC, PRECISION, FP64), FAST_TRIG)
        m = _window_mask(m_ptr, jj, ok, HAS_MASK, ACC)
        out = (n * rows_total + rows) * (HIDDEN + 1)
        tl.store(z_ptr + out[:, None] + hh[None, :], (z * m[:, None]).to(out_ty), mask=tile_ok)
        tl.store(z_ptr + out + HIDDEN, m.to(out_ty), mask=ok)  # the ones column, masked


@triton.jit
def _knet_backward_kernel(
    r_ptr, q_ptr, w2_ptr, b2_ptr, m_ptr, dz_ptr, dr_ptr, dq_ptr, dw2_ptr, db2_ptr,
    N, J, P, CHUNKS,
    HIDDEN: tl.constexpr, HP: tl.constexpr, DEEP: tl.constexpr, HAS_Q: tl.constexpr, HAS_MASK: tl.constexpr,
    ACC: tl.constexpr, FP64: tl.constexpr, PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Partial gradients of the program (n, window tile jt, position chunk c), recomputing the
    forward per position: dR over its positions into dr[c, n, tile], dQ over its rows into
    dq[(n, jt), p], dW2 and db2 over both into dw2[(n, jt, c)], db2[(n, jt, c)]."""
    n = tl.program_id(0)
    jt = tl.program_id(1)
    c = tl.program_id(2)
    jj = jt * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = jj < J
    hh = tl.arange(0, HP)
    h_ok = hh < HIDDEN
    tile_ok = j_ok[:, None] & h_ok[None, :]
    r = tl.load(r_ptr + (n * J + jj)[:, None] * HIDDEN + hh[None, :], mask=tile_ok, other=0.0).to(ACC)
    w2t, w2, b2 = _hidden_weights(w2_ptr, b2_ptr, hh, h_ok, HIDDEN, HP, DEEP, ACC)
    m = _window_mask(m_ptr, jj, j_ok, HAS_MASK, ACC)
    dr = tl.zeros((BLOCK_J, HP), dtype=ACC)
    dw2 = tl.zeros((HP, HP), dtype=ACC)
    db2 = tl.zeros((HP,), dtype=ACC)
    tile = n * tl.num_programs(1) + jt
    for p in range(c, P, CHUNKS):
        pre = _preactivation(r, q_ptr, p, hh, h_ok, HIDDEN, HAS_Q, ACC)
        row = ((n * P + p) * J + jj) * (HIDDEN + 1)
        # Rows past J and columns past H load 0, so every term they would add is 0.
        g = tl.load(dz_ptr + row[:, None] + hh[None, :], mask=tile_ok, other=0.0).to(ACC) * m[:, None]
        if DEEP:
            h1 = _sin(pre, FAST_TRIG)
            dt = g * _cos(_second_preactivation(h1, w2t, b2, BLOCK_J, HP, ACC, PRECISION, FP64), FAST_TRIG)
            db2 += tl.sum(dt, axis=0)
            dw2 = mma(tl.trans(dt), h1, dw2, PRECISION, FP64)
            g = mma(dt, w2, tl.zeros((BLOCK_J, HP), dtype=ACC), PRECISION, FP64)
        dpre = g * _cos(pre, FAST_TRIG)
        dr += dpre
        if HAS_Q:
            tl.store(dq_ptr + (tile * P + p) * HIDDEN + hh, tl.sum(dpre, axis=0), mask=h_ok)
    tl.store(dr_ptr + ((c * N + n) * J + jj)[:, None] * HIDDEN + hh[None, :], dr, mask=tile_ok)
    if DEEP:
        part = tile * CHUNKS + c
        tl.store(dw2_ptr + part * HIDDEN * HIDDEN + hh[:, None] * HIDDEN + hh[None, :], dw2, mask=h_ok[:, None] & h_ok[None, :])
        tl.store(db2_ptr + part * HIDDEN + hh, db2, mask=h_ok)


# Forward: rows per tile and warps are tuned (each row is computed alone: no sum across rows or
# programs depends on the choice). Backward: one config, so that no timing can change how its
# partial sums are formed.
_FORWARD_CONFIGS = [triton.Config({"BLOCK_M": m}, num_warps=w) for m in (64, 128) for w in (4, 8)]
_knet_forward_autotuned = triton.autotune(configs=_FORWARD_CONFIGS, key=["J", "P"])(_knet_forward_kernel)

FIXED_FORWARD = {"BLOCK_M": 64, "num_warps": 4}
# No register cap: capped at 128, TF32x3 at H = 32 spilled 8 bytes and H = 64 or fp64 hundreds
# (review, 2026-11-27); one TF32 pass needs no more than 122 anyway.
FIXED_BACKWARD = {"num_warps": 4}
# Forward programs: a multiple of the 2 or 4 that fit an SM; each loops over its rotation's row tiles.
FORWARD_PROGRAMS_TARGET = 8 * 132


def position_chunks(n_rot: int, j_tiles: int, positions: int, device: torch.device) -> int:
    """How many chunks the positions are cut into (programs per (n, window tile)).

    A function of the shape alone (never of timing), so the backward's partial sums are added in
    the same order on every run. On a GPU about PROGRAMS_TARGET programs in all, at least
    MIN_POSITIONS_PER_PROGRAM positions each; off-GPU two, so the interpreter tests exercise the
    partial sums too."""
    if common.compiled_on_gpu(device):
        most = triton.cdiv(positions, MIN_POSITIONS_PER_PROGRAM)
        return max(1, min(most, triton.cdiv(PROGRAMS_TARGET, n_rot * j_tiles)))
    return max(1, min(positions, 2))


def padded_hidden(hidden: int) -> int:
    """H padded to a power of two >= 16 (tl.dot's smallest side); the kernels mask the rest."""
    return max(16, triton.next_power_of_2(hidden))


def fast_trig(r: torch.Tensor) -> bool:
    """Whether the kernels take sin/cos from the SFU (:func:`_sin`): fp32 on a GPU. Not fp64 (a
    checking mode), not under the interpreter (no inline assembly there)."""
    return r.dtype == torch.float32 and common.compiled_on_gpu(r.device)


def _consts(r, q, w2, mask, products):
    if products not in PRODUCTS:
        raise ValueError(f"products must be one of {PRODUCTS}, got {products!r}")
    hidden = r.shape[-1]
    fp64 = r.dtype == torch.float64
    return dict(HIDDEN=hidden, HP=padded_hidden(hidden), DEEP=w2 is not None, HAS_Q=q is not None,
                HAS_MASK=mask is not None, ACC=common.acc_dtype(r.dtype), FP64=fp64,
                PRECISION="ieee" if fp64 else products, FAST_TRIG=fast_trig(r))


def _check_pinned() -> None:
    # The host sizes the backward's grid and partial buffers by BLOCK_J: a pin may set the warps only.
    pinned = common.pinned_config("knet_bwd")
    if pinned is not None and pinned[0]:
        raise ValueError(f"RELAXEDCONV_KERNEL_CONFIG: knet_bwd runs with BLOCK_J={BLOCK_J} only (it sets the "
                         f"partial sums), so {sorted(pinned[0])} cannot be pinned; pin num_warps alone, e.g. "
                         "'knet_bwd:num_warps=8'")


def _backward_grid(r, positions):
    n_rot, window = r.shape[0], r.shape[1]
    j_tiles = triton.cdiv(window, BLOCK_J)
    return n_rot, j_tiles, position_chunks(n_rot, j_tiles, positions, r.device)


def _forward_programs(n_rot: int, rows: int, block_m: int, device: torch.device) -> int:
    """Programs per rotation of the forward: at most one per row tile."""
    tiles = triton.cdiv(rows, block_m)
    if common.compiled_on_gpu(device):
        return max(1, min(tiles, triton.cdiv(FORWARD_PROGRAMS_TARGET, n_rot)))
    return max(1, min(tiles, 2))  # the interpreter: two programs, so the tile loop runs too


def kernel_net_forward(r, q, w2, b2, mask, products: str = "tf32x3") -> torch.Tensor:
    """z ``[N, P, J, H+1]`` (``[N, J, H+1]`` when ``q`` is None) in ``r``'s dtype from R
    ``[N, J, H]``, Q ``[P, H]`` or None, W2 ``[H, H]`` and b2 ``[H]`` (None for depth 2) and the
    window mask ``[J]`` or None; every tensor contiguous, in ``r``'s dtype and on its device
    (:mod:`relaxedconv.fused_kernel_net` checks and prepares them). ``products``: the fp32 products'
    precision, "tf32x3" or "tf32" (fp64 ignores it)."""
    n_rot, window, hidden = r.shape
    positions = 1 if q is None else q.shape[0]
    shape = (n_rot, window, hidden + 1) if q is None else (n_rot, positions, window, hidden + 1)
    z = common.empty_output(shape, device=r.device, dtype=r.dtype)
    common.check_int32_indexing(r, z)
    dummy = r  # stands in for an absent operand; the kernel never reads it
    args = (r, dummy if q is None else q, dummy if w2 is None else w2, dummy if b2 is None else b2,
            dummy if mask is None else mask, z, window, positions)
    rows = positions * window
    common.launch("knet_fwd", _knet_forward_kernel, _knet_forward_autotuned,
                  lambda meta: (n_rot, _forward_programs(n_rot, rows, meta["BLOCK_M"], r.device)),
                  args, _consts(r, q, w2, mask, products), FIXED_FORWARD, device=r.device, dtype=r.dtype)
    return z


def kernel_net_backward(r, q, w2, b2, mask, dz, products: str = "tf32x3"):
    """(dR, dQ, dW2, db2) of :func:`kernel_net_forward` for the upstream gradient ``dz`` (z's
    shape, contiguous, ``r``'s dtype); dQ is None without ``q``, dW2 and db2 without ``w2``.
    Only dz's first H columns reach the parameters (the last is the constant column)."""
    n_rot, window, hidden = r.shape
    positions = 1 if q is None else q.shape[0]
    _check_pinned()
    grid = _backward_grid(r, positions)
    _, j_tiles, chunks = grid
    acc = torch.float64 if r.dtype == torch.float64 else torch.float32
    programs = n_rot * j_tiles * chunks
    dr = common.empty_output((chunks, n_rot, window, hidden), device=r.device, dtype=acc)
    dq = None if q is None else common.empty_output((n_rot * j_tiles, positions, hidden), device=r.device, dtype=acc)
    dw2 = None if w2 is None else common.empty_output((programs, hidden, hidden), device=r.device, dtype=acc)
    db2 = None if w2 is None else common.empty_output((programs, hidden), device=r.device, dtype=acc)
    common.check_int32_indexing(dz, dr, *(t for t in (dq, dw2) if t is not None))
    dummy = dr
    args = (r, r if q is None else q, r if w2 is None else w2, r if b2 is None else b2, r if mask is None else mask, dz,
            dr, dummy if dq is None else dq, dummy if dw2 is None else dw2, dummy if db2 is None else db2,
            n_rot, window, positions, chunks)
    common.launch("knet_bwd", _knet_backward_kernel, None, lambda meta: grid,
                  args, {**_consts(r, q, w2, mask, products), "BLOCK_J": BLOCK_J}, FIXED_BACKWARD,
                  device=r.device, dtype=r.dtype)
    # The partials are added in a fixed order (torch's reductions over a leading axis are
    # deterministic), then rounded once to the parameters' dtype.
    out = [dr.sum(0) if chunks > 1 else dr[0], None if dq is None else dq.sum(0),
           None if dw2 is None else dw2.sum(0), None if db2 is None else db2.sum(0)]
    return tuple(None if t is None else t.to(r.dtype) for t in out)
