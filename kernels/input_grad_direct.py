"""dX of the relaxed group convolution without im2col columns (design.md §2, §4).

    dX[b, (i, n'), q] = sum over positions p, rotations n, hidden h of
                        dU[b, n, p, h, i] * Z[n, p, (n', q + PAD - p), h]

where the window offset ``q + PAD - p`` must lie in the K x K window. The columns route
(``relaxed_conv_bwd._input_grad``) computes this as a GEMM per position into im2col columns V and
a col2im gather: V has the input's im2col size (T1: 206 MB in bf16, written once and read once).
This kernel never builds V. One program owns a block of (image, channel) rows and a small
rectangle of input pixels with every input rotation n'; its reduction runs over the positions p
whose window reaches the rectangle (the halo) and, per position, over (n, h):

    A[(b, i), (p, n, h)] = dU[b, n, p, h, i]           (rows contiguous along i, as dU is laid out)
    B[(p, n, h), (n', q)] = Z[n, p, (n', q + PAD - p), h] inside the window, else 0

A tensor-core GEMM with a banded B: a rectangle of QH x QW pixels has a halo of
(QH + K - 1)(QW + K - 1) positions, of which each pixel uses K^2, so the multiply-adds executed are
(QH + K - 1)(QW + K - 1) / K^2 times the useful ones (K = 7: 2.9x at 4 x 8, 1.6x at 2 x 4) in
exchange for no V traffic. kernels/cost_model.py weighs the two routes; on a GPU the backward times
both once per shape (``relaxed_conv_bwd.input_grad_route``).

Per position the reduction is one or more BLOCK_K steps over the flattened (n, h < H) columns,
with the position a scalar of the step: Z's rows are then read as runs of H contiguous elements
(16-byte vectors), and the masks (inside the window, inside the image) are constant along them.
The "tail" hidden column h = H (hidden_split) has its own steps, one per (rotation, halo row),
whose reduction runs over the row's positions (QW + K - 1, padded to a power of two), so it costs
about 1/H of the main loop, not a 16-wide dot per position.

Every element of dX is written by exactly one program in a fixed order: reruns give the same bits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .common import channel_rows, mma


@triton.jit
def _halo(pid_q, H_IN, W_IN, H_OUT, W_OUT, PAD, KSIZE: tl.constexpr, QH: tl.constexpr, QW: tl.constexpr):
    """The pixel rectangle of program ``pid_q`` and the output positions whose window reaches it:
    (first pixel row, first pixel column, first halo row, first halo column, halo width, halo size)."""
    tiles_x = tl.cdiv(W_IN, QW)
    qy0 = (pid_q // tiles_x) * QH
    qx0 = (pid_q % tiles_x) * QW
    # position p reaches padded pixel q + PAD when 0 <= q + PAD - p < K
    py_lo = tl.maximum(qy0 + PAD - KSIZE + 1, 0)
    px_lo = tl.maximum(qx0 + PAD - KSIZE + 1, 0)
    hy = tl.maximum(tl.minimum(qy0 + QH + PAD, H_OUT) - py_lo, 0)
    hx = tl.maximum(tl.minimum(qx0 + QW + PAD, W_OUT) - px_lo, 0)
    return qy0, qx0, py_lo, px_lo, hx, hy * hx


@triton.jit
def _input_grad_direct_kernel(
    du_ptr, z_ptr, dx_ptr,
    ROWS, H_IN, W_IN, H_OUT, W_OUT, PAD, ROWS_KEY,
    sub, sun, sup, suh, szn, szp, szj, sxb, sxc, sxh, sxw,
    N_ROT: tl.constexpr, C_IN: tl.constexpr, N_IN: tl.constexpr, NIN_BLOCK: tl.constexpr, HMAIN: tl.constexpr,
    KSIZE: tl.constexpr, TAIL: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, QH: tl.constexpr, QW: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dX[b, i*N_in + n', q] for BLOCK_M rows (b, i) and a QH x QW rectangle of pixels q with every
    n'; program: (pixel rectangle, row tile). BLOCK_K tiles the flattened (n, h) of one position."""
    K2: tl.constexpr = KSIZE * KSIZE
    PIX: tl.constexpr = QH * QW
    # a halo row's positions (QW + K - 1), padded to a power of two that tl.dot takes (>= 16):
    # the next power of two by smearing the highest bit (constexpr arithmetic, no calls)
    T0: tl.constexpr = QW + KSIZE - 2
    T1: tl.constexpr = T0 | (T0 >> 1)
    T2: tl.constexpr = T1 | (T1 >> 2)
    T3: tl.constexpr = T2 | (T2 >> 4)
    TAIL_POSITIONS: tl.constexpr = (T3 | (T3 >> 8) | 15) + 1
    BLOCK_N: tl.constexpr = NIN_BLOCK * PIX
    pid_q = tl.program_id(0)
    pid_m = tl.program_id(1)
    b, i, row_ok = channel_rows(pid_m * BLOCK_M, ROWS, C_IN, BLOCK_M)
    du_row = b * sub + i
    qy0, qx0, py_lo, px_lo, hx, n_pos = _halo(pid_q, H_IN, W_IN, H_OUT, W_OUT, PAD, KSIZE, QH, QW)
    # columns (n', pixel row, pixel column), the column fastest: dX's rows of pixels are contiguous
    col = tl.arange(0, BLOCK_N)
    nprime = col // PIX
    # (col // QW) % QH, not (col % PIX) // QW: Triton's alignment analysis then keeps the runs of QW
    # contiguous pixels and stores dX as vectors (the other form stored 2-byte scalars at N_in = 8)
    qy = qy0 + (col // QW) % QH
    qx = qx0 + col % QW
    col_ok = (nprime < N_IN) & (qy < H_IN) & (qx < W_IN)
    z_col = nprime * K2 * szj
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)

    K_STEPS: tl.constexpr = (N_ROT * HMAIN + BLOCK_K - 1) // BLOCK_K
    # The position (py, px) and the step within it are carried from one iteration to the next
    # rather than divided out of the iteration count (a division by the halo width, a runtime
    # value, was ~20 of the loop's ~120 SASS instructions).
    py = py_lo
    px = px_lo
    px_end = px_lo + hx
    step = py_lo * 0
    for _ in range(0, n_pos * K_STEPS):
        c = step * BLOCK_K + tl.arange(0, BLOCK_K)
        c_ok = c < N_ROT * HMAIN
        n = c // HMAIN
        h = c % HMAIN
        a = tl.load(du_ptr + du_row[:, None] + ((py * W_OUT + px) * sup + n * sun + h * suh)[None, :],
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        dy = qy + PAD - py
        dxw = qx + PAD - px
        inside = col_ok & (dy >= 0) & (dy < KSIZE) & (dxw >= 0) & (dxw < KSIZE)
        zb = tl.load(z_ptr + (py * W_OUT + px) * szp + (n * szn + h)[:, None] + (z_col + (dy * KSIZE + dxw) * szj)[None, :],
                     mask=c_ok[:, None] & inside[None, :], other=0.0)
        acc = mma(a, zb, acc, PRECISION, FP64)
        step += 1
        next_position = step == K_STEPS
        step = tl.where(next_position, 0, step)
        px = tl.where(next_position, px + 1, px)
        next_row = px == px_end
        px = tl.where(next_row, px_lo, px)
        py = tl.where(next_row, py + 1, py)

    if TAIL:
        # The tail column h = HMAIN of each rotation: one step per (rotation, halo row), its
        # reduction over the row's positions (at most QW + K - 1 of them: no division by the halo
        # width, which is a runtime value).
        tx = px_lo + tl.arange(0, TAIL_POSITIONS)
        t_ok = tl.arange(0, TAIL_POSITIONS) < hx
        dxw = qx[None, :] + PAD - tx[:, None]
        across = t_ok[:, None] & col_ok[None, :] & (dxw >= 0) & (dxw < KSIZE)
        hy = n_pos // tl.maximum(hx, 1)
        tn = py_lo * 0
        ty = py_lo
        for _ in range(0, N_ROT * hy):
            p = ty * W_OUT + tx
            a = tl.load(du_ptr + du_row[:, None] + (p * sup + tn * sun + HMAIN * suh)[None, :],
                        mask=row_ok[:, None] & t_ok[None, :], other=0.0)
            dy = qy + PAD - ty
            inside = across & ((dy >= 0) & (dy < KSIZE))[None, :]
            zb = tl.load(z_ptr + tn * szn + HMAIN + (p * szp)[:, None] + (z_col + dy * KSIZE * szj)[None, :] + dxw * szj,
                         mask=inside, other=0.0)
            acc = mma(a, zb, acc, PRECISION, FP64)
            ty += 1
            next_rotation = ty == py_lo + hy
            ty = tl.where(next_rotation, py_lo, ty)
            tn = tl.where(next_rotation, tn + 1, tn)

    dx_row = b * sxb + i * N_IN * sxc
    dx_col = nprime * sxc + qy * sxh + qx * sxw
    tl.store(dx_ptr + dx_row[:, None] + dx_col[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _configs():
    # (BLOCK_M, QH, QW, BLOCK_K, warps, stages). BLOCK_K = 32 is one rotation's H = 32 (T(2):
    # one step per position); the rectangles trade wasted multiply-adds (the halo) against the
    # N width of the dot: NIN_BLOCK * QH * QW columns.
    shapes = [
        (128, 4, 8, 32, 4, 3), (128, 4, 4, 32, 4, 3), (64, 4, 8, 32, 4, 4), (128, 8, 8, 32, 8, 3),
        (64, 2, 4, 64, 4, 3), (128, 2, 4, 64, 8, 3), (64, 2, 2, 64, 4, 4), (128, 2, 2, 64, 4, 3),
        (64, 4, 4, 64, 4, 3), (64, 4, 8, 16, 4, 4),  # the last for narrow reductions (N * H = 16)
    ]
    return [triton.Config({"BLOCK_M": m, "QH": qh, "QW": qw, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, qh, qw, k, w, s in shapes]


def _block_n(cfg, args):
    return args["NIN_BLOCK"] * cfg.kwargs["QH"] * cfg.kwargs["QW"]


# fp32 accumulator values per thread a config may hold: at 128 (T2's 128 x 128 tiles at 4 warps)
# the sm_90a compile sits at 255 registers and spills with the 256-wide ones (kernel report,
# 2026-11-27); at 64 it needs 96-192.
MAX_ACC_PER_THREAD = 64
_prune_by_size = common.prune_by_size({"BLOCK_M": "ROWS", "BLOCK_K": lambda a: a["N_ROT"] * a["HMAIN"]},
                                      block_n=_block_n)


def _prune(configs, named_args, **kwargs):
    args = {**kwargs, **named_args}
    def per_thread(c):
        return c.kwargs["BLOCK_M"] * _block_n(c, args) / (32 * c.num_warps)

    configs = [c for c in configs if per_thread(c) <= MAX_ACC_PER_THREAD] or [min(configs, key=per_thread)]
    return _prune_by_size(configs, named_args, **kwargs)


_input_grad_direct_autotuned = triton.autotune(
    configs=_configs(),
    key=["ROWS_KEY", "H_IN", "W_IN", "N_ROT", "N_IN", "PAD", "KSIZE", "HMAIN", "TAIL"],
    prune_configs_by={"early_config_prune": _prune},
)(_input_grad_direct_kernel)

FIXED_TILE = {"BLOCK_M": 16, "QH": 2, "QW": 4, "BLOCK_K": 16}


def direct_input_grad(du, z_al, hid, geometry, x_shape, out_hw, dtype):
    """dX ``[B, C_in*N_in, H, W]`` from dU ``[B, N, P, H+1, C_in]`` and Z from
    :func:`common.aligned_hidden` (per position ``[N, P, J, *]`` or stationary ``[N, J, *]``)."""
    g = geometry
    bsz, cn, height, width = x_shape
    hmain, tail = common.hidden_split(hid)
    dx = common.empty_output(x_shape, device=du.device, dtype=dtype)
    common.check_int32_indexing(du, z_al, dx)
    rows = bsz * g.in_channels
    per_position = z_al.dim() == 4
    args = (
        du, z_al, dx,
        rows, height, width, out_hw[0], out_hw[1], g.padding, common.bucket(rows),
        du.stride(0), du.stride(1), du.stride(2), du.stride(3),
        z_al.stride(0), z_al.stride(1) if per_position else 0, z_al.stride(-2),
        dx.stride(0), dx.stride(1), dx.stride(2), dx.stride(3),
    )
    consts = dict(N_ROT=g.out_rotations, C_IN=g.in_channels, N_IN=g.in_rotations, NIN_BLOCK=triton.next_power_of_2(g.in_rotations),
                  HMAIN=hmain, KSIZE=g.kernel_size, TAIL=tail, PRECISION=common.dot_precision(dtype),
                  ACC=common.acc_dtype(dtype), FP64=dtype == torch.float64)

    def grid(meta):
        return (triton.cdiv(height, meta["QH"]) * triton.cdiv(width, meta["QW"]), triton.cdiv(rows, meta["BLOCK_M"]))

    common.launch("dx_direct", _input_grad_direct_kernel, _input_grad_direct_autotuned, grid, args, consts, FIXED_TILE,
                  device=du.device, dtype=dtype)
    return dx
