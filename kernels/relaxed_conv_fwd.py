"""Fused forward of the relaxed group convolution in its factored form (design.md §2, §4).

For each output rotation n and tile of rows (b, p), for each input channel i:

    U_i = X_i[(b, p), (n', Delta)] @ Z_n[(n', Delta), h]     im2col tile gathered on the fly
    Y  += U_i @ W_ext[:, i, :]^T                              fp32 (fp64) accumulator

The input is zero-padded once on the host so a gather address is ``row base + column offset``
with no bounds test per element (design.md §5 measured this as the first-order cost). Nothing
larger than the output is written.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import common
from .common import factored_u, mma, acc_dtype, dot_precision, hidden_block, num_row_tiles, row_tile, small_block, use_autotune


@triton.jit
def _relaxed_conv_fwd_kernel(
    x_ptr, z_ptr, w_ptr, bias_ptr, y_ptr,
    B, C_IN, N_IN, P, W_OUT, J, HMAIN, C_OUT, N_OUT,
    sxb, sxc, sxh, sxw,
    szn, szp, szj, szh,
    swo, swi, swh,
    syb, syc, syh, syw,
    KSIZE: tl.constexpr, PER_POSITION: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, FP64: tl.constexpr, TAIL: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_O: tl.constexpr,
):
    t = tl.program_id(0)
    n = tl.program_id(1)
    pid_o = tl.program_id(2)
    b, p, row_ok, p_tile = row_tile(t, B, P, BLOCK_M, PER_POSITION)
    oh = p // W_OUT
    ow = p % W_OUT
    row_base = b * sxb + oh * sxh + ow * sxw
    z_base = z_ptr + n * szn + p_tile * szp
    offs_h = tl.arange(0, BLOCK_H)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    h_ok = offs_h < HMAIN
    o_ok = offs_o < C_OUT

    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=ACC)
    for i in range(C_IN):
        u, u_tail = factored_u(
            x_ptr, row_base, row_ok, z_base, i, N_IN, J, HMAIN, sxc, sxh, sxw, szj, szh,
            KSIZE, TAIL, PRECISION, FP64, ACC, BLOCK_M, BLOCK_J, BLOCK_H,
        )
        wt = tl.load(w_ptr + offs_o[None, :] * swo + i * swi + offs_h[:, None] * swh, mask=h_ok[:, None] & o_ok[None, :], other=0.0)
        acc = mma(u.to(wt.dtype), wt, acc, PRECISION, FP64)
        if TAIL:
            w_tail = tl.load(w_ptr + offs_o * swo + i * swi + HMAIN * swh, mask=o_ok, other=0.0)
            acc += u_tail[:, None] * w_tail.to(ACC)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=o_ok, other=0.0).to(ACC)[None, :]
    y_off = b[:, None] * syb + (offs_o[None, :] * N_OUT + n) * syc + (oh * syh + ow * syw)[:, None]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & o_ok[None, :])


def _configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_J": bj, "BLOCK_O": bo}, num_warps=w, num_stages=s)
        for bm, bj, bo, w, s in [
            (64, 32, 32, 4, 2), (64, 64, 64, 4, 3), (128, 32, 32, 4, 2), (128, 64, 64, 8, 3),
            (128, 32, 128, 8, 2), (64, 32, 128, 4, 2), (32, 64, 32, 4, 3), (16, 64, 64, 4, 2),
        ]
    ]


_relaxed_conv_fwd_autotuned = triton.autotune(
    configs=_configs(), key=["B", "C_IN", "N_IN", "P", "J", "HMAIN", "C_OUT", "N_OUT", "KSIZE", "PER_POSITION", "TAIL", "HAS_BIAS", "PRECISION"]
)(_relaxed_conv_fwd_kernel)


def pad_input(x: torch.Tensor, padding: int) -> torch.Tensor:
    return F.pad(x, (padding,) * 4) if padding else x.contiguous()


def relaxed_conv_fwd(x, z, w_ext, bias, geometry, *, block_m=16, block_j=16, block_o=16) -> torch.Tensor:
    """y = relaxed group conv of x given Z and [W_L | b_L] (layouts in relaxedconv/reference.py).

    ``block_*`` is the fixed tile used off-GPU (the interpreter); on CUDA the kernel is autotuned.
    """
    g = geometry
    per_position = z.dim() == 4
    bsz, _, height, width = x.shape
    h_out, w_out = g.out_size(height, width)
    positions = h_out * w_out
    xp = pad_input(x, g.padding)
    z = z.contiguous()
    w_ext = w_ext.contiguous()
    y = common.empty_output((bsz, g.out_channels * g.out_rotations, h_out, w_out), device=x.device, dtype=x.dtype)
    common.check_int32_indexing(xp, z, y)
    hid = z.shape[-1]
    block_h, tail = hidden_block(hid)
    hmain = hid - int(tail)
    szp = z.stride(1) if per_position else 0
    args = (
        xp, z, w_ext, bias if bias is not None else w_ext, y,
        bsz, g.in_channels, g.in_rotations, positions, w_out, g.window, hmain, g.out_channels, g.out_rotations,
        *xp.stride(), z.stride(0), szp, z.stride(-2), z.stride(-1), *w_ext.stride(), *y.stride(),
    )
    consts = dict(
        KSIZE=g.kernel_size, PER_POSITION=per_position, HAS_BIAS=bias is not None,
        PRECISION=dot_precision(x.dtype), ACC=acc_dtype(x.dtype), FP64=x.dtype == torch.float64, BLOCK_H=block_h, TAIL=tail,
    )

    def grid(meta):
        return (
            num_row_tiles(bsz, positions, meta["BLOCK_M"], per_position),
            g.out_rotations,
            triton.cdiv(g.out_channels, meta["BLOCK_O"]),
        )

    if use_autotune(x.device, x.dtype):
        _relaxed_conv_fwd_autotuned[grid](*args, **consts)
    else:
        meta = dict(BLOCK_M=block_m, BLOCK_J=block_j, BLOCK_O=max(block_o, small_block(min(g.out_channels, 16))))
        _relaxed_conv_fwd_kernel[grid(meta)](*args, **consts, **meta)
    return y
