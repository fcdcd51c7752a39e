"""Forward of the relaxed group convolution in its factored form (design.md §2).

    U[b, n, p, h, i] = sum_j X_i[b, p + Delta_j, n'_j] Z[n, p, j, h]      (Triton: gather-GEMM)
    Y[b, o, n, p]    = sum_{h, i} W_ext[o, i, h] U[b, n, p, h, i] + bias  (cuBLAS: one GEMM)

The first product is the one no library has: a GEMM per position p (Z differs at every p when
the layer is translation non-stationary) whose rows are the (batch, input channel) pairs — all
of them share Z_p, so the GEMM is B*C_in rows tall — and whose left operand is the im2col window,
gathered on the fly from the channels-last padded input (nothing P times the input is built).
Its columns are the flattened (rotation, hidden feature) pairs, so one gather feeds every output
rotation. Translation-stationary layers run the same kernel with Z's position stride 0.

The second product contracts over (i, h) — a dimension the first product treats as rows — so it
is a plain dense GEMM over U, which cuBLAS does at full speed; U (B*N*P*(H+1)*C_in values) is
written once and kept for the backward pass, which needs it for dW_ext. U keeps the input
channel fastest so that its rows — and the kernels' tiles of them — are aligned runs of C_in.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .common import TAIL_WIDTH, channel_rows, hidden_columns, im2col_columns, mma, tail_columns


@triton.jit
def _window_products(x_ptr, z_ptr, acc, acc_t, p, k0, P, x_rows, row_ok, z_cols, col_ok, zt_cols, tail_ok,
                     szp, szj, WP, W_OUT, CN, N_IN: tl.constexpr, KSIZE: tl.constexpr, TAIL: tl.constexpr,
                     PRECISION: tl.constexpr, FP64: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc (and the tail's acc_t) + X_col[rows, k0:k0+BLOCK_K] @ Z[p, k0:k0+BLOCK_K, columns]."""
    jj = k0 + tl.arange(0, BLOCK_K)
    x_col, z_row, kk, _ = im2col_columns(jj, N_IN, KSIZE, WP, CN)
    # jj < J (J = N_in * K^2) tested on kk, which is constant over each run of N_in window
    # columns: Triton can then load those runs of the channels-last input as vectors (with
    # jj < J, J = 392 at T2 carries no divisibility it can see: every element alone)
    k_ok = (kk < KSIZE * KSIZE) & ((p + tl.zeros_like(kk)) < P)  # a vector: the interpreter's masks must be
    x_pos = ((p // W_OUT) * WP + p % W_OUT) * CN
    a = tl.load(x_ptr + (x_rows + x_pos)[:, None] + x_col[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    zb = tl.load(z_ptr + p * szp + (z_row * szj)[:, None] + z_cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
    acc = mma(a, zb, acc, PRECISION, FP64)
    if TAIL:
        zt = tl.load(z_ptr + p * szp + (z_row * szj)[:, None] + zt_cols[None, :], mask=k_ok[:, None] & tail_ok[None, :], other=0.0)
        acc_t = mma(a, zt, acc_t, PRECISION, FP64)
    return acc, acc_t


@triton.jit
def _store_u(u_ptr, acc, acc_t, p, u_rows, row_ok, n, h, col_ok, tn, tail_ok, sun, sup, suh, P,
             HMAIN: tl.constexpr, TAIL: tl.constexpr):
    u_row = u_rows + p * sup
    out_ty = u_ptr.dtype.element_ty
    tl.store(u_ptr + u_row[:, None] + (n * sun + h * suh)[None, :], acc.to(out_ty),
             mask=row_ok[:, None] & (col_ok & (p + tl.zeros_like(n) < P))[None, :])
    if TAIL:
        tl.store(u_ptr + u_row[:, None] + (tn * sun + HMAIN * suh)[None, :], acc_t.to(out_ty),
                 mask=row_ok[:, None] & (tail_ok & (p + tl.zeros_like(tn) < P))[None, :])


@triton.jit
def _hidden_projection_kernel(
    x_ptr, z_ptr, u_ptr,
    ROWS, CN, WP, W_OUT, J, N_ROT, P, ROWS_KEY,
    sxb, szn, szp, szj, sub, sun, sup, suh,
    C_IN: tl.constexpr, N_IN: tl.constexpr, HMAIN: tl.constexpr,
    KSIZE: tl.constexpr, TAIL: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, POSITIONS: tl.constexpr,
):
    """U[(b, i), (n, h)] at position p = X_col[(b, i), j] @ Z[n, p, j, h] for POSITIONS consecutive
    positions (program: position block, row tile, column tile).

    With several positions the (position, K step) pairs are one loop, the product stored at each
    position's last step: where the window is one K step (T(2): J = 49), a program per position
    is a load, one dot and a store with nothing to overlap; over several positions the next
    position's gathers are in flight while this one multiplies (Triton pipelines the loop)."""
    p0 = tl.program_id(0) * POSITIONS
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    b, i, row_ok = channel_rows(pid_m * BLOCK_M, ROWS, C_IN, BLOCK_M)
    x_rows = b * sxb + i * N_IN
    u_rows = b * sub + i
    n, h, col_ok = hidden_columns(pid_n, N_ROT, HMAIN, BLOCK_N)
    z_cols = n * szn + h
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    # without a tail these stand in for its column indices and accumulator (never stored)
    tn, tail_ok = tail_columns(pid_n, N_ROT, HMAIN, BLOCK_N, TAIL_WIDTH)
    zt_cols = tn * szn + HMAIN
    acc_t = tl.zeros((BLOCK_M, TAIL_WIDTH), dtype=ACC)
    if POSITIONS == 1:
        # one position: the loop over the window as it always was (a runtime bound, so a
        # one-step window still compiles as a loop, with cp.async)
        for k0 in range(0, J, BLOCK_K):
            acc, acc_t = _window_products(x_ptr, z_ptr, acc, acc_t, p0, k0, P, x_rows, row_ok, z_cols, col_ok,
                                          zt_cols, tail_ok, szp, szj, WP, W_OUT, CN, N_IN, KSIZE, TAIL, PRECISION,
                                          FP64, BLOCK_K)
        _store_u(u_ptr, acc, acc_t, p0, u_rows, row_ok, n, h, col_ok, tn, tail_ok, sun, sup, suh, P, HMAIN, TAIL)
    else:
        K_TILES: tl.constexpr = (N_IN * KSIZE * KSIZE + BLOCK_K - 1) // BLOCK_K
        for s in range(0, POSITIONS * K_TILES):
            ki = s % K_TILES
            p = p0 + s // K_TILES
            acc, acc_t = _window_products(x_ptr, z_ptr, acc, acc_t, p, ki * BLOCK_K, P, x_rows, row_ok, z_cols,
                                          col_ok, zt_cols, tail_ok, szp, szj, WP, W_OUT, CN, N_IN, KSIZE, TAIL,
                                          PRECISION, FP64, BLOCK_K)
            if ki == K_TILES - 1:
                _store_u(u_ptr, acc, acc_t, p, u_rows, row_ok, n, h, col_ok, tn, tail_ok, sun, sup, suh, P, HMAIN, TAIL)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
                acc_t = tl.zeros((BLOCK_M, TAIL_WIDTH), dtype=ACC)


def _configs():
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, positions per program): rows (b, i) are many
    # (B*C_in), columns N*H are 32 (T(2)) to 512 (SE(2)-16), the window J is 49 (K 7, lifting/T(2))
    # to 784 (N_in 16). Several positions per program are for windows of one or two K steps.
    shapes = [
        (128, 32, 64, 4, 3, 1), (128, 64, 64, 4, 3, 1), (128, 128, 64, 8, 3, 1), (128, 128, 32, 8, 4, 1),
        (64, 64, 64, 4, 3, 1), (64, 128, 64, 4, 3, 1), (256, 64, 64, 8, 3, 1), (64, 32, 64, 4, 4, 1),
        (128, 32, 64, 4, 3, 8), (64, 32, 64, 4, 4, 8), (128, 64, 64, 4, 3, 4),
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "POSITIONS": q}, num_warps=w, num_stages=s)
            for m, n, k, w, s, q in shapes]


# Windows up to this many columns (two K steps of 64) also try several positions per program.
SHORT_WINDOW = 128
_prune_by_size = common.prune_by_size({"BLOCK_M": "ROWS", "BLOCK_K": "J"})


def _prune(configs, named_args, **kwargs):
    args = {**kwargs, **named_args}
    # A long window overlaps its own K steps already; exact fp32 (FMA dots) spills with the
    # pipelined position loop (kernel report, 2026-11-27: 324 B at T1) and is the checking path.
    if args["J"] > SHORT_WINDOW or (args.get("PRECISION") == "ieee" and not args.get("FP64")):
        configs = [c for c in configs if c.kwargs.get("POSITIONS", 1) == 1] or configs
    return _prune_by_size(configs, named_args, **kwargs)


_hidden_projection_autotuned = triton.autotune(
    configs=_configs(),
    key=["ROWS_KEY", "J", "N_ROT", "CN", "P"],  # P: with POSITIONS it sets the grid
    prune_configs_by={"early_config_prune": _prune},
)(_hidden_projection_kernel)

FIXED_TILE = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "POSITIONS": 1}


def hidden_projection(x_cl, z_al, hidden: int, geometry, out_hw, batch: int) -> torch.Tensor:
    """U = X_col @ Z as ``[B, N, P, H+1, C_in]`` (the input's dtype) from the channels-last padded
    input ``x_cl`` ``[B, H+2p, W+2p, C_in*N_in]`` and Z from :func:`common.aligned_hidden`
    (``hidden`` = H+1, the width before alignment)."""
    g = geometry
    z = z_al
    per_position = z.dim() == 4
    h_out, w_out = out_hw
    positions = h_out * w_out
    hid = hidden
    hmain, tail = common.hidden_split(hid)
    u = common.empty_output((batch, g.out_rotations, positions, hid, g.in_channels), device=x_cl.device, dtype=x_cl.dtype)
    common.check_int32_indexing(x_cl, z, u)
    rows = batch * g.in_channels
    args = (
        x_cl, z, u,
        rows, x_cl.shape[-1], x_cl.shape[2], w_out, g.window, g.out_rotations, positions, common.bucket(rows),
        x_cl.stride(0), z.stride(0), z.stride(1) if per_position else 0, z.stride(-2),
        u.stride(0), u.stride(1), u.stride(2), u.stride(3),
    )
    # Channel, rotation and hidden counts are compile-time constants so that Triton can prove the
    # gathers contiguous (channels of a pixel, hidden features of a row) and vectorise them.
    consts = dict(C_IN=g.in_channels, N_IN=g.in_rotations, HMAIN=hmain, KSIZE=g.kernel_size, TAIL=tail, PRECISION=common.dot_precision(x_cl.dtype),
                  ACC=common.acc_dtype(x_cl.dtype), FP64=x_cl.dtype == torch.float64)

    def grid(meta):
        return (triton.cdiv(positions, meta.get("POSITIONS", 1)), triton.cdiv(rows, meta["BLOCK_M"]),
                triton.cdiv(g.out_rotations * hmain, meta["BLOCK_N"]))

    common.launch("u", _hidden_projection_kernel, _hidden_projection_autotuned, grid, args, consts, FIXED_TILE,
                  device=x_cl.device, dtype=x_cl.dtype)
    return u


def output_weight_matrix(w_ext: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[W_L | b_L] ``[C_out, C_in, H+1]`` as the ``[C_out, (H+1)*C_in]`` matrix that multiplies U,
    in ``dtype`` (w_ext's by default): one copy does the transpose and the cast (small layers are
    bound by the host's per-operator cost, and a transpose then a cast were two)."""
    c_out, c_in, hp = w_ext.shape
    out = w_ext.new_empty((c_out, hp, c_in), dtype=w_ext.dtype if dtype is None else dtype)
    return out.copy_(w_ext.transpose(1, 2)).view(c_out, -1)


def relaxed_conv_fwd(x, z, w_ext, bias, geometry, *, return_u: bool = False, return_packed: bool = False):
    """y = relaxed group conv of x given Z and [W_L | b_L] (layouts in relaxedconv/reference.py).

    With ``return_u`` also returns U ``[B, N, P, H+1, C_in]``, and with ``return_packed`` also the
    channels-last padded input and the aligned Z the kernels read: :func:`relaxed_conv_bwd` takes
    all three to skip rebuilding them (on an H200 the repack of G4's input alone took 265 µs).
    """
    g = geometry
    bsz, _, height, width = x.shape
    out_hw = g.out_size(height, width)
    positions = out_hw[0] * out_hw[1]
    x_cl = common.channels_last_padded(x, g.padding)
    z_al = common.aligned_hidden(z, x.dtype)  # Z may stay in its own (fp32) dtype: cast here, in the same copy
    u = hidden_projection(x_cl, z_al, z.shape[-1], g, out_hw, bsz)
    # Y_b[o, (n, p)] = W[o, (h, i)] @ U_b[(n, p), (h, i)]^T: a batched GEMM whose result is already
    # the [B, C_out*N, H, W] layout of the output.
    u_mat = u.view(bsz, g.out_rotations * positions, -1)
    y = torch.matmul(output_weight_matrix(w_ext, x.dtype), u_mat.transpose(1, 2))
    if bias is not None:
        y = y.view(bsz, g.out_channels, -1).add_(bias.to(y.dtype)[None, :, None])
    y = y.view(bsz, g.out_channels * g.out_rotations, *out_hw)
    out = (y,) + ((u,) if return_u else ()) + ((x_cl, z_al) if return_packed else ())
    return out if len(out) > 1 else y
