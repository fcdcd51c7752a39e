"""Fused backward of the relaxed group convolution (design.md §4).

U = X Z is never stored: each kernel recomputes what it needs (FlashAttention style).

- ``dX`` is a gather (a transposed convolution), every element written by exactly one program:
  no scatter, no atomics. Translation-stationary: an implicit GEMM of dY with the expanded bank
  ``E = W_ext . Z`` (as small as one conv2d weight), which needs fewer multiply-adds than
  recomputing dU at every shift. Per position (the bank would be per position, P times larger):
  ``dX_i[(b, q), n'] = sum_{n, Delta} dU_i[(b, q - Delta), :] @ Z_{n, q - Delta}[n', Delta, :]^T``
  with ``dU_i = dY_n @ W_ext[:, i, :]`` recomputed at the shifted rows.
- ``dZ = sum_{rows, i} X_i^T dU_i``: translation-stationary Z is reduced over all rows in a fixed
  number of splits whose partials the host sums in a fixed order; per-position Z has one program
  per (position, rotation, J tile) reducing over the batch, so no partials.
- ``dW_ext[o, i, :] = sum_{n, rows} dY_n[rows, o]^T U_i[rows, :]`` in fixed-order split partials.

Bias gradients are a plain sum over dY on the host. Reruns give the same bits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .common import factored_du, factored_u, mma, acc_dtype, dot_precision, hidden_block, num_row_tiles, row_tile, small_block, tile_count, use_autotune
from .relaxed_conv_fwd import pad_input


@triton.jit
def _relaxed_conv_bwd_dx_kernel(
    dy_ptr, z_ptr, w_ptr, dx_ptr,
    B, N_IN, W_IN, Q, H_OUT, W_OUT, HMAIN, C_OUT, N_OUT, PAD,
    sdb, sdc, sdh, sdw,
    szn, szp, szj, szh,
    swo, swi, swh,
    sxb, sxc, sxh, sxw,
    KSIZE: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, FP64: tl.constexpr,
    TAIL: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_NI: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """Per-position dX (translation-stationary layers use the bank kernel below): a tile holds
    one input position q and a block of the batch, so each shift Delta reads one Z_{q - Delta}."""
    t = tl.program_id(0)
    i = tl.program_id(1)
    b, q, row_ok, q_tile = row_tile(t, B, Q, BLOCK_M, True)
    qh = q // W_IN
    qw = q % W_IN
    offs_h = tl.arange(0, BLOCK_H)
    offs_ni = tl.arange(0, BLOCK_NI)
    h_ok = offs_h < HMAIN
    ni_ok = offs_ni < N_IN
    K2: tl.constexpr = KSIZE * KSIZE
    acc = tl.zeros((BLOCK_M, BLOCK_NI), dtype=ACC)
    for n in range(N_OUT):
        for kk in range(K2):
            kh = kk // KSIZE
            kw = kk % KSIZE
            ph = qh + PAD - kh
            pw = qw + PAD - kw
            p_ok = row_ok & (ph >= 0) & (ph < H_OUT) & (pw >= 0) & (pw < W_OUT)
            dy_row = b * sdb + n * sdc + ph * sdh + pw * sdw
            du, du_tail = factored_du(
                dy_ptr, dy_row, p_ok, w_ptr, i, C_OUT, N_OUT, HMAIN, sdc, swo, swi, swh,
                TAIL, PRECISION, FP64, ACC, BLOCK_M, BLOCK_O, BLOCK_H,
            )
            sh = q_tile // W_IN + PAD - kh
            sw = q_tile % W_IN + PAD - kw
            inside = (sh >= 0) & (sh < H_OUT) & (sw >= 0) & (sw < W_OUT)
            z_base = z_ptr + n * szn + tl.where(inside, sh * W_OUT + sw, 0) * szp
            zt = tl.load(z_base + (offs_ni * K2 + kk)[None, :] * szj + offs_h[:, None] * szh, mask=h_ok[:, None] & ni_ok[None, :], other=0.0)
            acc = mma(du.to(zt.dtype), zt, acc, PRECISION, FP64)
            if TAIL:
                z_tail = tl.load(z_base + (offs_ni * K2 + kk) * szj + HMAIN * szh, mask=ni_ok, other=0.0)
                acc += du_tail[:, None] * z_tail.to(ACC)[None, :]
    dx_off = b[:, None] * sxb + (i * N_IN + offs_ni)[None, :] * sxc + (qh * sxh + qw * sxw)[:, None]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & ni_ok[None, :])


@triton.jit
def _relaxed_conv_bwd_dx_bank_kernel(
    dy_ptr, e_ptr, dx_ptr,
    B, CN_IN, W_IN, Q, H_OUT, W_OUT, C_OUT, N_OUT, PAD,
    sdb, sdc, sdh, sdw,
    sen, sek, seo, sec,
    sxb, sxc, sxh, sxw,
    KSIZE: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Translation-stationary dX as an implicit GEMM with the expanded bank E = W_ext . Z:
    dX[(b, q), c] = sum_{n, Delta, o} dY[b, o*N + n, q + pad - Delta] E[n, Delta, o, c].
    Per row this is N*K^2*C_out*C_in*N_in multiply-adds, against N*K^2*C_in*H*(C_out + N_in)
    for recomputing dU at every shift, i.e. always fewer; E is as small as one conv2d weight."""
    t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b, q, row_ok, _ = row_tile(t, B, Q, BLOCK_M, False)
    qh = q // W_IN
    qw = q % W_IN
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < CN_IN
    K2: tl.constexpr = KSIZE * KSIZE
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for n in range(N_OUT):
        for kk in range(K2):
            ph = qh + PAD - kk // KSIZE
            pw = qw + PAD - kk % KSIZE
            p_ok = row_ok & (ph >= 0) & (ph < H_OUT) & (pw >= 0) & (pw < W_OUT)
            dy_row = b * sdb + n * sdc + ph * sdh + pw * sdw
            for o0 in range(0, C_OUT, BLOCK_O):
                offs_o = o0 + tl.arange(0, BLOCK_O)
                o_ok = offs_o < C_OUT
                dyt = tl.load(dy_ptr + dy_row[:, None] + (offs_o * N_OUT)[None, :] * sdc, mask=p_ok[:, None] & o_ok[None, :], other=0.0)
                et = tl.load(e_ptr + n * sen + kk * sek + offs_o[:, None] * seo + offs_c[None, :] * sec, mask=o_ok[:, None] & c_ok[None, :], other=0.0)
                acc = mma(dyt, et, acc, PRECISION, FP64)
    dx_off = b[:, None] * sxb + offs_c[None, :] * sxc + (qh * sxh + qw * sxw)[:, None]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & c_ok[None, :])


@triton.jit
def _relaxed_conv_bwd_dz_kernel(
    x_ptr, dy_ptr, w_ptr, out_ptr,
    B, C_IN, N_IN, P, W_OUT, J, HMAIN, C_OUT, N_OUT, SPLITS,
    sxb, sxc, sxh, sxw,
    sdb, sdc, sdh, sdw,
    swo, swi, swh,
    sos, son, soj, soh,
    KSIZE: tl.constexpr, PER_POSITION: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, FP64: tl.constexpr,
    TAIL: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_O: tl.constexpr,
):
    s = tl.program_id(0)  # split index, or the output position when Z is per position
    pid_j = tl.program_id(1)
    n = tl.program_id(2)
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = j < J
    K2: tl.constexpr = KSIZE * KSIZE
    nprime = j // K2
    kk = j % K2
    col = nprime * sxc + (kk // KSIZE) * sxh + (kk % KSIZE) * sxw
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < HMAIN
    if PER_POSITION:
        nbt = tl.cdiv(B, BLOCK_M)
        t_start = s * nbt
        t_end = t_start + nbt
        t_step = 1
    else:
        t_start = s
        t_end = tile_count(B, P, BLOCK_M, PER_POSITION)
        t_step = SPLITS
    acc = tl.zeros((BLOCK_J, BLOCK_H), dtype=ACC)
    acc_tail = tl.zeros((BLOCK_J,), dtype=ACC)
    for t in range(t_start, t_end, t_step):
        b, p, row_ok, p_tile = row_tile(t, B, P, BLOCK_M, PER_POSITION)
        oh = p // W_OUT
        ow = p % W_OUT
        row_base = b * sxb + oh * sxh + ow * sxw
        dy_row = b * sdb + n * sdc + oh * sdh + ow * sdw
        for i in range(C_IN):
            du, du_tail = factored_du(
                dy_ptr, dy_row, row_ok, w_ptr, i, C_OUT, N_OUT, HMAIN, sdc, swo, swi, swh,
                TAIL, PRECISION, FP64, ACC, BLOCK_M, BLOCK_O, BLOCK_H,
            )
            xt = tl.load(x_ptr + row_base[:, None] + (i * N_IN * sxc + col)[None, :], mask=row_ok[:, None] & j_ok[None, :], other=0.0)
            acc = mma(tl.trans(xt), du.to(xt.dtype), acc, PRECISION, FP64)
            if TAIL:
                acc_tail += tl.sum(xt.to(ACC) * du_tail[:, None], axis=0)
    out_off = s * sos + n * son + j[:, None] * soj + offs_h[None, :] * soh
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=j_ok[:, None] & h_ok[None, :])
    if TAIL:
        tl.store(out_ptr + s * sos + n * son + j * soj + HMAIN * soh, acc_tail.to(out_ptr.dtype.element_ty), mask=j_ok)


@triton.jit
def _relaxed_conv_bwd_dw_kernel(
    x_ptr, z_ptr, dy_ptr, out_ptr,
    B, N_IN, P, W_OUT, J, HMAIN, C_OUT, N_OUT, SPLITS,
    sxb, sxc, sxh, sxw,
    szn, szp, szj, szh,
    sdb, sdc, sdh, sdw,
    sos, soi, soo, soh,
    KSIZE: tl.constexpr, PER_POSITION: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, FP64: tl.constexpr,
    TAIL: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_O: tl.constexpr,
):
    i = tl.program_id(0)
    pid_o = tl.program_id(1)
    s = tl.program_id(2)
    offs_h = tl.arange(0, BLOCK_H)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    h_ok = offs_h < HMAIN
    o_ok = offs_o < C_OUT
    acc = tl.zeros((BLOCK_H, BLOCK_O), dtype=ACC)
    acc_tail = tl.zeros((BLOCK_O,), dtype=ACC)
    tiles = tile_count(B, P, BLOCK_M, PER_POSITION)
    for n in range(N_OUT):
        for t in range(s, tiles, SPLITS):
            b, p, row_ok, p_tile = row_tile(t, B, P, BLOCK_M, PER_POSITION)
            oh = p // W_OUT
            ow = p % W_OUT
            row_base = b * sxb + oh * sxh + ow * sxw
            z_base = z_ptr + n * szn + p_tile * szp
            u, u_tail = factored_u(
                x_ptr, row_base, row_ok, z_base, i, N_IN, J, HMAIN, sxc, sxh, sxw, szj, szh,
                KSIZE, TAIL, PRECISION, FP64, ACC, BLOCK_M, BLOCK_J, BLOCK_H,
            )
            dy_off = b[:, None] * sdb + (offs_o * N_OUT + n)[None, :] * sdc + (oh * sdh + ow * sdw)[:, None]
            dyt = tl.load(dy_ptr + dy_off, mask=row_ok[:, None] & o_ok[None, :], other=0.0)
            acc = mma(tl.trans(u.to(dyt.dtype)), dyt, acc, PRECISION, FP64)
            if TAIL:
                acc_tail += tl.sum(u_tail[:, None] * dyt.to(ACC), axis=0)
    out_off = s * sos + i * soi + offs_o[None, :] * soo + offs_h[:, None] * soh
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=h_ok[:, None] & o_ok[None, :])
    if TAIL:
        tl.store(out_ptr + s * sos + i * soi + offs_o * soo + HMAIN * soh, acc_tail.to(out_ptr.dtype.element_ty), mask=o_ok)


def _configs(with_j: bool, with_o: bool = True):
    out = []
    for bm, bj, bo, w, s in [(64, 32, 32, 4, 2), (64, 64, 64, 4, 3), (128, 32, 32, 8, 2), (32, 64, 32, 4, 3), (16, 64, 64, 4, 2)]:
        meta = {"BLOCK_M": bm, "BLOCK_O": bo}
        if with_j:
            meta["BLOCK_J"] = bj
        out.append(triton.Config(meta, num_warps=w, num_stages=s))
    return out


_KEY = ["B", "P", "J", "HMAIN", "C_OUT", "N_OUT", "KSIZE", "PER_POSITION", "TAIL", "PRECISION"]
_dx_autotuned = triton.autotune(configs=_configs(False), key=["B", "Q", "N_IN", "HMAIN", "C_OUT", "N_OUT", "KSIZE", "TAIL", "PRECISION"])(_relaxed_conv_bwd_dx_kernel)
_dx_bank_autotuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_O": bo, "BLOCK_C": bc}, num_warps=w, num_stages=st)
             for bm, bo, bc, w, st in [(64, 32, 64, 4, 3), (128, 32, 64, 4, 3), (128, 64, 128, 8, 3),
                                       (64, 64, 32, 4, 3), (128, 32, 32, 4, 4), (64, 32, 128, 4, 3)]],
    key=["B", "Q", "CN_IN", "C_OUT", "N_OUT", "KSIZE", "PRECISION"],
)(_relaxed_conv_bwd_dx_bank_kernel)
_dz_autotuned = triton.autotune(configs=_configs(True), key=_KEY + ["C_IN", "SPLITS"])(_relaxed_conv_bwd_dz_kernel)
_dw_autotuned = triton.autotune(configs=_configs(True), key=_KEY + ["SPLITS"])(_relaxed_conv_bwd_dw_kernel)


def _partial_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduction_splits(rows: int, device: torch.device) -> int:
    """How many fixed-order partials a reduction over ``rows`` is cut into.

    A function of the shape alone (never of the tile size or of timing), so a rerun reduces in
    the same order. On a GPU, enough splits to fill the SMs; off-GPU few, but more than one for
    any non-trivial shape so the partial sums are exercised by the interpreter tests too.
    """
    if device.type == "cuda":
        return max(1, min(128, rows // 512))
    return max(1, min(3, rows // 16))


def expanded_bank(z: torch.Tensor, w_ext: torch.Tensor, g) -> torch.Tensor:
    """E[n, Delta, o, i*N_in + n'] = sum_h W_ext[o, i, h] Z[n, n'*K*K + Delta, h] (stationary Z).

    The kernel bank of expand_conv, laid out for the dX implicit GEMM; C_out*N*C_in*N_in*K^2
    values, the size of one conv2d weight."""
    k2 = g.kernel_size**2
    zr = z.unflatten(1, (g.in_rotations, k2))  # [N, N_in, K2, H']
    bank = torch.einsum("oih,nmkh->nkoim", w_ext, zr)
    return bank.reshape(g.out_rotations, k2, g.out_channels, g.in_channels * g.in_rotations).contiguous()


def relaxed_conv_bwd(dy, x, z, w_ext, geometry, *, needs=(True, True, True), block_m=16, block_j=16, block_o=16):
    """Gradients (dx, dz, dw_ext) of :func:`relaxed_conv_fwd`; entries not in ``needs`` are None."""
    g = geometry
    per_position = z.dim() == 4
    bsz, _, height, width = x.shape
    h_out, w_out = g.out_size(height, width)
    positions = h_out * w_out
    dy = dy.contiguous()
    z = z.contiguous()
    w_ext = w_ext.contiguous()
    hid = z.shape[-1]
    block_h, tail = hidden_block(hid)
    hmain = hid - int(tail)
    szp = z.stride(1) if per_position else 0
    shared = dict(KSIZE=g.kernel_size, PER_POSITION=per_position, PRECISION=dot_precision(x.dtype),
                  ACC=acc_dtype(x.dtype), FP64=x.dtype == torch.float64, BLOCK_H=block_h, TAIL=tail)
    tuned = use_autotune(x.device, x.dtype)
    fixed = dict(BLOCK_M=block_m, BLOCK_J=block_j, BLOCK_O=block_o)
    dx = dz = dw = None

    if needs[0]:
        dx = common.empty_output(x.shape, device=x.device, dtype=x.dtype)
        q = height * width
        if per_position:
            args = (
                dy, z, w_ext, dx,
                bsz, g.in_rotations, width, q, h_out, w_out, hmain, g.out_channels, g.out_rotations, g.padding,
                *dy.stride(), z.stride(0), szp, z.stride(-2), z.stride(-1), *w_ext.stride(), *dx.stride(),
            )
            consts = {k: v for k, v in shared.items() if k != "PER_POSITION"}
            consts["BLOCK_NI"] = small_block(g.in_rotations)

            def grid_dx(meta):
                return (num_row_tiles(bsz, q, meta["BLOCK_M"], per_position), g.in_channels)

            if tuned:
                _dx_autotuned[grid_dx](*args, **consts)
            else:
                meta = dict(BLOCK_M=block_m, BLOCK_O=block_o)
                _relaxed_conv_bwd_dx_kernel[grid_dx(meta)](*args, **consts, **meta)
        else:
            bank = expanded_bank(z, w_ext, g)
            cn_in = g.in_channels * g.in_rotations
            args = (
                dy, bank, dx,
                bsz, cn_in, width, q, h_out, w_out, g.out_channels, g.out_rotations, g.padding,
                *dy.stride(), *bank.stride(), *dx.stride(),
            )
            consts = {k: shared[k] for k in ("KSIZE", "PRECISION", "ACC", "FP64")}

            def grid_bank(meta):
                return (num_row_tiles(bsz, q, meta["BLOCK_M"], False), triton.cdiv(cn_in, meta["BLOCK_C"]))

            if tuned:
                _dx_bank_autotuned[grid_bank](*args, **consts)
            else:
                meta = dict(BLOCK_M=block_m, BLOCK_O=block_o, BLOCK_C=small_block(min(cn_in, 16)))
                _relaxed_conv_bwd_dx_bank_kernel[grid_bank(meta)](*args, **consts, **meta)

    if needs[1] or needs[2]:
        xp = pad_input(x, g.padding)
        rows = bsz * positions
        splits = reduction_splits(rows, x.device)

    if needs[1]:
        if per_position:
            out = common.empty_output(z.shape, device=z.device, dtype=z.dtype)
            sos, son = out.stride(1), out.stride(0)
            third = positions
        else:
            out = common.empty_output((splits, *z.shape), device=z.device, dtype=_partial_dtype(x.dtype))
            sos, son = out.stride(0), out.stride(1)
            third = splits
        args_dz = (
            xp, dy, w_ext, out,
            bsz, g.in_channels, g.in_rotations, positions, w_out, g.window, hmain, g.out_channels, g.out_rotations,
            splits,
            *xp.stride(), *dy.stride(), *w_ext.stride(), sos, son, out.stride(-2), out.stride(-1),
        )

        def grid_dz(meta):
            # Positions go on grid axis 0: axes 1 and 2 are limited to 65,535 programs.
            return (third, triton.cdiv(g.window, meta["BLOCK_J"]), g.out_rotations)

        if tuned:
            _dz_autotuned[grid_dz](*args_dz, **shared)
        else:
            _relaxed_conv_bwd_dz_kernel[grid_dz(fixed)](*args_dz, **shared, **fixed)
        dz = out if per_position else out.sum(0).to(z.dtype)

    if needs[2]:
        part = common.empty_output((splits, g.in_channels, g.out_channels, hid), device=x.device, dtype=_partial_dtype(x.dtype))
        args_dw = (
            xp, z, dy, part,
            bsz, g.in_rotations, positions, w_out, g.window, hmain, g.out_channels, g.out_rotations,
            splits,
            *xp.stride(), z.stride(0), szp, z.stride(-2), z.stride(-1), *dy.stride(), *part.stride(),
        )

        def grid_dw(meta):
            return (g.in_channels, triton.cdiv(g.out_channels, meta["BLOCK_O"]), splits)

        if tuned:
            _dw_autotuned[grid_dw](*args_dw, **shared)
        else:
            _relaxed_conv_bwd_dw_kernel[grid_dw(fixed)](*args_dw, **shared, **fixed)
        dw = part.sum(0).permute(1, 0, 2).to(w_ext.dtype)
    return dx, dz, dw
