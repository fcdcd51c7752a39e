"""Backward of the relaxed group convolution (design.md §2, §4).

With U = X_col Z from the forward (``[B, N, P, H+1, C_in]``, recomputed when not given) and W the
``[C_out, (H+1)*C_in]`` matrix of [W_L | b_L]:

- ``dU = dY^T W`` and ``dW = dY U``: dense GEMMs (cuBLAS), dU laid out like U.
- ``dZ[n, p, j, h] = sum_{b, i} X_col[(b, i), p, j] dU[b, n, p, h, i]``: a gather-GEMM per position
  (Triton), the transpose of the forward's; its reduction over (b, i) runs inside one program, and
  translation-stationary Z (summed over p as well) is reduced in a fixed number of position
  splits whose partials the host adds in a fixed order.
- ``dX``: per position, ``V[(b, i), p, j] = sum_{n, h} dU[b, n, p, h, i] Z[n, p, j, h]`` (Triton
  GEMM, written in the channels-last im2col layout ``[B, P, K*K, C_in*N_in]``), then a col2im
  gather ``dX[b, c, q] = sum_Delta V[b, q - Delta, Delta, c]`` (Triton). Every element of dX is
  written by one program: no scatter, no atomics. V is the im2col size of the input, so it is
  built for as many images at a time as fit a fixed budget. The same dX without V, as one banded
  GEMM per block of pixels (``input_grad_direct``), is the other route (:func:`input_grad_route`).

Reruns give the same bits.

Translation-stationary layers take another route by default (:func:`bank_backward`): their
kernel is one conv2d weight, the bank K = W_ext Z, so dX and dK are the convolution's data and
weight gradients (cuDNN on a GPU) and dZ, dW_ext follow from dK by two small GEMMs. On an H200
(bench/results/h200-2026-11-27-705c378/) this backward is what ``expand_conv``'s costs (G4 5.6 ms)
while the gather-GEMM route above took 12.0 ms; the factored forward stays (G4 3.3 ms against
expand_conv's 4.3). ``RELAXEDCONV_TRITON_STATIONARY_BACKWARD=fused`` keeps the Triton route.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import common, route_tuning
from .common import TAIL_WIDTH, channel_rows, hidden_columns, im2col_columns, mma, tail_columns
from .input_grad_direct import direct_input_grad
from .relaxed_conv_fwd import hidden_projection, output_weight_matrix

# Bytes of the per-position column buffer V built at a time (a batch chunk of it).
COLUMN_BUFFER_BYTES = 256 * 2**20


@triton.jit
def _hidden_weight_grad_kernel(
    x_ptr, du_ptr, out_ptr,
    ROWS, CN, WP, W_OUT, J, N_ROT, P, SPLITS, ROWS_KEY,
    sxb, sub, sun, sup, suh, sos, son, soj,
    C_IN: tl.constexpr, N_IN: tl.constexpr, HMAIN: tl.constexpr,
    KSIZE: tl.constexpr, PER_POSITION: tl.constexpr, TAIL: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dZ[n, p, j, (n, h)] = X_col[(b, i), p, j]^T @ dU[(b, i), n, p, h]; program: (position or
    split s, window tile, column tile). BLOCK_M tiles the window j, BLOCK_K the rows (b, i)."""
    s = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_n = tl.program_id(2)
    jj = pid_j * BLOCK_M + tl.arange(0, BLOCK_M)
    x_col, z_row, kk, _ = im2col_columns(jj, N_IN, KSIZE, WP, CN)
    j_ok = kk < KSIZE * KSIZE  # jj < J, constant over runs of N_in: vector loads (see the v kernel)
    n, h, col_ok = hidden_columns(pid_n, N_ROT, HMAIN, BLOCK_N)
    du_col = n * sun + h * suh
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    if TAIL:
        tn, tail_ok = tail_columns(pid_n, N_ROT, HMAIN, BLOCK_N, TAIL_WIDTH)
        dut_col = tn * sun + HMAIN * suh
        acc_t = tl.zeros((BLOCK_M, TAIL_WIDTH), dtype=ACC)
    if PER_POSITION:
        p_start = s
        p_end = s + 1
        p_step = 1
    else:
        p_start = s
        p_end = P
        p_step = SPLITS
    for p in range(p_start, p_end, p_step):
        x_pos = ((p // W_OUT) * WP + p % W_OUT) * CN
        for r0 in range(0, ROWS, BLOCK_K):
            b, i, r_ok = channel_rows(r0, ROWS, C_IN, BLOCK_K)
            a = tl.load(x_ptr + x_pos + x_col[:, None] + (b * sxb + i * N_IN)[None, :], mask=j_ok[:, None] & r_ok[None, :], other=0.0)
            du_row = b * sub + p * sup + i
            dub = tl.load(du_ptr + du_row[:, None] + du_col[None, :], mask=r_ok[:, None] & col_ok[None, :], other=0.0)
            acc = mma(a, dub, acc, PRECISION, FP64)
            if TAIL:
                dut = tl.load(du_ptr + du_row[:, None] + dut_col[None, :], mask=r_ok[:, None] & tail_ok[None, :], other=0.0)
                acc_t = mma(a, dut, acc_t, PRECISION, FP64)
    out_row = s * sos + z_row * soj
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + out_row[:, None] + (n * son + h)[None, :], acc.to(out_ty), mask=j_ok[:, None] & col_ok[None, :])
    if TAIL:
        tl.store(out_ptr + out_row[:, None] + (tn * son + HMAIN)[None, :], acc_t.to(out_ty), mask=j_ok[:, None] & tail_ok[None, :])


@triton.jit
def _window_columns_kernel(
    du_ptr, z_ptr, v_ptr,
    ROWS, CN, J, N_ROT, P, ROWS_KEY,
    sub, sun, sup, suh, szn, szp, szj,
    C_IN: tl.constexpr, N_IN: tl.constexpr, HMAIN: tl.constexpr,
    KSIZE: tl.constexpr, TAIL: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """V[b, p, kk, i*N_in + n'] = dU[(b, i), n, p, h] @ Z[n, p, (n', kk), h]^T summed over (n, h);
    program: (p, row tile over (b, i), window tile). BLOCK_K tiles the flattened (n, h)."""
    K2: tl.constexpr = KSIZE * KSIZE
    p = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_j = tl.program_id(2)
    b, i, row_ok = channel_rows(pid_m * BLOCK_M, ROWS, C_IN, BLOCK_M)
    du_row = b * sub + p * sup + i
    jj = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    _, z_row, kk, nprime = im2col_columns(jj, N_IN, KSIZE, 1, 1)
    # jj < J (J = N_in * K^2) as a test of kk: constant over each run of N_in columns, which lets
    # Triton store those runs of V as vectors (with jj < J it stored every element alone:
    # J = 392 at T2 carries no divisibility it can see)
    j_ok = kk < K2
    z_base = z_ptr + p * szp + z_row * szj
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for c0 in range(0, N_ROT * HMAIN, BLOCK_K):
        c = c0 + tl.arange(0, BLOCK_K)
        c_ok = c < N_ROT * HMAIN
        n = c // HMAIN
        h = c % HMAIN
        a = tl.load(du_ptr + du_row[:, None] + (n * sun + h * suh)[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        zb = tl.load(z_base[None, :] + (n * szn + h)[:, None], mask=c_ok[:, None] & j_ok[None, :], other=0.0)
        acc = mma(a, zb, acc, PRECISION, FP64)
    if TAIL:
        for t0 in range(0, N_ROT, TAIL_WIDTH):
            tn = t0 + tl.arange(0, TAIL_WIDTH)
            t_ok = tn < N_ROT
            a = tl.load(du_ptr + du_row[:, None] + (tn * sun + HMAIN * suh)[None, :], mask=row_ok[:, None] & t_ok[None, :], other=0.0)
            zb = tl.load(z_base[None, :] + (tn * szn + HMAIN)[:, None], mask=t_ok[:, None] & j_ok[None, :], other=0.0)
            acc = mma(a, zb, acc, PRECISION, FP64)
    v_row = (b * P + p) * K2 * CN + i * N_IN
    v_col = kk * CN + nprime
    tl.store(v_ptr + v_row[:, None] + v_col[None, :], acc.to(v_ptr.dtype.element_ty), mask=row_ok[:, None] & j_ok[None, :])


@triton.jit
def _fold_kernel(
    v_ptr, dx_ptr,
    CN, Q, W_IN, H_OUT, W_OUT, PAD, P,
    sxb, sxc,
    KSIZE: tl.constexpr, ACC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """col2im: dX[b, c, q] = sum_{kh, kw} V[b, q + PAD - (kh, kw), kh*K + kw, c] over the
    positions that exist; program: (input-position tile, channel tile, image)."""
    K2: tl.constexpr = KSIZE * KSIZE
    pid_q = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2)
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = q < Q
    qy = q // W_IN
    qx = q % W_IN
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < CN
    acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=ACC)
    for kk in range(K2):
        py = qy + PAD - kk // KSIZE
        px = qx + PAD - kk % KSIZE
        p_ok = q_ok & (py >= 0) & (py < H_OUT) & (px >= 0) & (px < W_OUT)
        v_row = ((b * P + py * W_OUT + px) * K2 + kk) * CN
        v = tl.load(v_ptr + v_row[:, None] + c[None, :], mask=p_ok[:, None] & c_ok[None, :], other=0.0)
        acc += v.to(ACC)
    tl.store(dx_ptr + b * sxb + c[None, :] * sxc + q[:, None], acc.to(dx_ptr.dtype.element_ty), mask=q_ok[:, None] & c_ok[None, :])


def _gemm_configs():
    # dz: BLOCK_M tiles the window J, BLOCK_N the (rotation, hidden) columns, BLOCK_K the rows
    # (b, i). v: BLOCK_M the rows, BLOCK_N the window, BLOCK_K the (rotation, hidden) reduction,
    # which is only 32 for T(2) (N = 1, H = 32): the BLOCK_K = 32 shapes are for it.
    shapes = [
        (128, 32, 64, 4, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 3),
        (64, 128, 32, 4, 4), (256, 64, 64, 8, 3), (64, 32, 64, 4, 4), (128, 64, 32, 4, 3),
        (64, 64, 32, 4, 4),
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, n, k, w, s in shapes]


_hidden_weight_grad_autotuned = triton.autotune(
    configs=_gemm_configs(),
    key=["ROWS_KEY", "J", "N_ROT", "CN", "SPLITS"],
    prune_configs_by={"early_config_prune": common.prune_by_size({"BLOCK_M": "J", "BLOCK_K": "ROWS"})},
)(_hidden_weight_grad_kernel)
# fp32 (tf32) ``v`` on sm_90 with Triton 3.6: the first autotuned config of T1 (BLOCK 128x64x32,
# 4 warps, 3 stages) raised "an illegal memory access" on an H200 (2026-11-27,
# bench/results/h200-2026-11-27-705c378/crash_tf32.log, every launch synchronised), while this
# config ran the same layer cleanly (crash_tf32_pinned.log); bf16 runs every config. fp32 is the
# checking precision, not the fast path, so its autotuner keeps this one config only.
FP32_WINDOW_COLUMNS_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2)
_window_columns_autotuned = triton.autotune(
    configs=_gemm_configs() + [FP32_WINDOW_COLUMNS_CONFIG],
    key=["ROWS_KEY", "J", "N_ROT", "CN"],
    prune_configs_by={"early_config_prune": common.prune_by_size(
        {"BLOCK_M": "ROWS", "BLOCK_N": "J", "BLOCK_K": lambda a: a["N_ROT"] * a["HMAIN"]},
        fp32_only=[FP32_WINDOW_COLUMNS_CONFIG])},
)(_window_columns_kernel)
_fold_autotuned = triton.autotune(
    configs=[triton.Config({"BLOCK_Q": q, "BLOCK_C": c}, num_warps=w) for q, c, w in
             [(64, 32, 4), (32, 64, 4), (128, 32, 4), (16, 128, 4), (64, 64, 8)]],
    key=["CN", "Q", "W_IN", "KSIZE"],
    prune_configs_by={"early_config_prune": common.prune_by_size({"BLOCK_C": "CN", "BLOCK_Q": "Q"})},
)(_fold_kernel)

FIXED_TILE = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}
FIXED_FOLD = {"BLOCK_Q": 16, "BLOCK_C": 16}


def reduction_splits(positions: int, device: torch.device) -> int:
    """How many fixed-order partials the position reduction of stationary dZ is cut into.

    A function of the shape alone (never of the tile size or of timing), so a rerun reduces in
    the same order. On a GPU enough to fill the SMs with the window and column tiles; off-GPU
    few, but more than one for any non-trivial shape so the partial sums are exercised by the
    interpreter tests too.
    """
    if device.type == "cuda":
        return max(1, min(64, positions // 4))
    return max(1, min(3, positions // 4))


def _hidden_grad(x_cl, du, z, geometry, out_hw, batch):
    """dZ in Z's shape and dtype from dU ``[B, N, P, H+1, C_in]``."""
    g = geometry
    per_position = z.dim() == 4
    positions = out_hw[0] * out_hw[1]
    hid = z.shape[-1]
    hmain, tail = common.hidden_split(hid)
    acc_dtype = torch.float64 if x_cl.dtype == torch.float64 else torch.float32
    splits = positions if per_position else reduction_splits(positions, x_cl.device)
    out = common.empty_output((g.out_rotations, positions, g.window, hid) if per_position
                              else (splits, g.out_rotations, g.window, hid), device=x_cl.device, dtype=acc_dtype)
    sos, son = (out.stride(1), out.stride(0)) if per_position else (out.stride(0), out.stride(1))
    rows = batch * g.in_channels
    args = (
        x_cl, du, out,
        rows, x_cl.shape[-1], x_cl.shape[2], out_hw[1], g.window, g.out_rotations, positions, splits, common.bucket(rows),
        x_cl.stride(0), du.stride(0), du.stride(1), du.stride(2), du.stride(3), sos, son, out.stride(2),
    )
    consts = dict(C_IN=g.in_channels, N_IN=g.in_rotations, HMAIN=hmain, KSIZE=g.kernel_size, PER_POSITION=per_position, TAIL=tail, PRECISION=common.dot_precision(x_cl.dtype),
                  ACC=common.acc_dtype(x_cl.dtype), FP64=x_cl.dtype == torch.float64)

    def grid(meta):
        return (splits, triton.cdiv(g.window, meta["BLOCK_M"]), triton.cdiv(g.out_rotations * hmain, meta["BLOCK_N"]))

    common.launch("dz", _hidden_weight_grad_kernel, _hidden_weight_grad_autotuned, grid, args, consts, FIXED_TILE,
                  device=x_cl.device, dtype=x_cl.dtype)
    dz = out if per_position else out.sum(0)
    return dz.to(z.dtype)


def _input_grad(du, z_al, hid, geometry, x_shape, out_hw, dtype):
    """dX from dU ``[B, N, P, H+1, C_in]`` and Z from :func:`common.aligned_hidden`, a batch chunk
    at a time."""
    g = geometry
    bsz, cn, height, width = x_shape
    positions = out_hw[0] * out_hw[1]
    k2 = g.kernel_size**2
    hmain, tail = common.hidden_split(hid)
    z = z_al
    dx = common.empty_output(x_shape, device=du.device, dtype=dtype)
    per_image = positions * k2 * cn * du.element_size()
    chunk = max(1, min(bsz, COLUMN_BUFFER_BYTES // max(1, per_image)))
    consts = dict(C_IN=g.in_channels, N_IN=g.in_rotations, HMAIN=hmain, KSIZE=g.kernel_size, TAIL=tail, PRECISION=common.dot_precision(dtype),
                  ACC=common.acc_dtype(dtype), FP64=dtype == torch.float64)
    # One buffer for every chunk: reused rather than reallocated (a chunk that fits in L2 stays there).
    columns = common.empty_output((chunk, positions, k2, cn), device=du.device, dtype=dtype)
    common.check_int32_indexing(columns)
    for b0 in range(0, bsz, chunk):
        nb = min(chunk, bsz - b0)
        du_c = du[b0 : b0 + nb]
        v = columns[:nb]
        common.check_int32_indexing(du_c)
        rows = nb * g.in_channels
        args = (
            du_c, z, v,
            rows, cn, g.window, g.out_rotations, positions, common.bucket(rows),
            du_c.stride(0), du_c.stride(1), du_c.stride(2), du_c.stride(3),
            z.stride(0), z.stride(1) if z.dim() == 4 else 0, z.stride(-2),
        )

        def grid(meta):
            return (positions, triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(g.window, meta["BLOCK_N"]))

        common.launch("v", _window_columns_kernel, _window_columns_autotuned, grid, args, consts, FIXED_TILE,
                      device=du.device, dtype=dtype)
        dx_c = dx[b0 : b0 + nb]
        q = height * width
        fold_args = (v, dx_c, cn, q, width, out_hw[0], out_hw[1], g.padding, positions, dx_c.stride(0), dx_c.stride(1))

        def fold_grid(meta):
            return (triton.cdiv(q, meta["BLOCK_Q"]), triton.cdiv(cn, meta["BLOCK_C"]), nb)

        common.launch("fold", _fold_kernel, _fold_autotuned, fold_grid, fold_args,
                      dict(KSIZE=g.kernel_size, ACC=common.acc_dtype(dtype)), FIXED_FOLD, device=du.device, dtype=dtype)
    return dx


INPUT_GRAD_ENV = "RELAXEDCONV_TRITON_INPUT_GRAD"
INPUT_GRAD_ROUTES = ("columns", "direct")


def input_grad_route() -> str:
    """How the Triton backward computes dX: ``"columns"`` (V = dU Z^T into im2col columns, then
    col2im), ``"direct"`` (one banded GEMM per pixel block, no V: ``input_grad_direct``) or
    ``"auto"`` (the default: on a GPU the first call of a shape times both and keeps the faster,
    see ``route_tuning``; where nothing may be timed, ``columns``)."""
    mode = os.environ.get(INPUT_GRAD_ENV, "auto").strip() or "auto"
    if mode not in ("auto", *INPUT_GRAD_ROUTES):
        raise ValueError(f"{INPUT_GRAD_ENV} must be 'auto', 'columns' or 'direct', got {mode!r}")
    return mode


def input_grad(du, z_al, hid, geometry, x_shape, out_hw, dtype):
    """dX by the route :func:`input_grad_route` names (or, for ``auto``, the faster one)."""
    args = (du, z_al, hid, geometry, x_shape, out_hw, dtype)
    routes = {"columns": lambda: _input_grad(*args), "direct": lambda: direct_input_grad(*args)}
    mode = input_grad_route()
    if mode == "auto":
        g = geometry
        # everything that changes either route's work: z_al's last dimension is H+1 rounded up to
        # 16, so H+1 itself is in the key; fp32's products are TF32 or exact depending on torch's flag
        key = (str(du.device), str(dtype), common.dot_precision(dtype), common.bucket(x_shape[0]), tuple(x_shape[1:]),
               tuple(z_al.shape), hid, tuple(out_hw), g.kernel_size, g.padding, g.in_rotations, g.out_rotations)
        mode = route_tuning.choose("dx", key, routes, default="columns", device=du.device, dtype=dtype,
                                   disagreement=route_tuning.relative_disagreement)
    return routes[mode]()


STATIONARY_BACKWARD_ENV = "RELAXEDCONV_TRITON_STATIONARY_BACKWARD"


def stationary_backward() -> str:
    """How a translation-stationary layer's backward runs: ``"bank"`` (default: through the conv2d
    bank, :func:`bank_backward`) or ``"fused"`` (the Triton gather-GEMMs, like per-position layers)."""
    mode = os.environ.get(STATIONARY_BACKWARD_ENV, "bank").strip() or "bank"
    if mode not in ("bank", "fused"):
        raise ValueError(f"{STATIONARY_BACKWARD_ENV} must be 'bank' or 'fused', got {mode!r}")
    return mode


def uses_bank_backward(z: torch.Tensor) -> bool:
    """Whether :func:`relaxed_conv_bwd` runs :func:`bank_backward` for hidden features ``z``."""
    return z.dim() == 3 and stationary_backward() == "bank"


def bank_backward(dy, x, z, w_ext, geometry, needs=(True, True, True)):
    """Gradients (dx, dz, dw_ext) of a translation-stationary layer through its conv2d bank.

    K[(o, n), (i, n'), kh, kw] = sum_h W[o, i, h] Z[n, (n', kh, kw), h] (``reference.bank_from_factors``);
    ``aten.convolution_backward`` gives dX and dK (cuDNN's dgrad and wgrad on a GPU), and with
    M = W_r Z_r^T the bank's matrix: dW_r = dM Z_r, dZ_r = dM^T W_r.
    """
    from relaxedconv.reference import bank_from_factors

    g = geometry
    need_dk = bool(needs[1] or needs[2])
    # The factors may be in their own (fp32) dtype beside a half-precision x: the bank is built
    # from them and rounded to x's dtype, and dZ, dW are reduced from dK in the factors' dtype.
    w = w_ext.to(z.dtype)
    bank = bank_from_factors(z, w, g).to(x.dtype)
    dx, dk, _ = torch.ops.aten.convolution_backward(
        dy.contiguous(), x, bank, None, [1, 1], [g.padding, g.padding], [1, 1], False, [0, 0], 1,
        [bool(needs[0]), need_dk, False])
    dz = dw = None
    if need_dk:
        hp = z.shape[-1]
        # dK [C_out*N, C_in*N_in, K, K] -> dM [C_out*C_in, N*J] in the bank's (o, i) x (n, j) order
        dm = dk.view(g.out_channels, g.out_rotations, g.in_channels, -1).transpose(1, 2).reshape(
            g.out_channels * g.in_channels, -1).to(z.dtype)
        if needs[1]:
            # .to: a backward run under autocast would otherwise hand back a bf16 product
            dz = (dm.t() @ w.reshape(-1, hp)).view(z.shape).to(z.dtype)
        if needs[2]:
            dw = (dm @ z.reshape(-1, hp)).view(w_ext.shape).to(w_ext.dtype)
    return (dx if needs[0] else None), dz, dw


def relaxed_conv_bwd(dy, x, z, w_ext, geometry, *, needs=(True, True, True), u=None, x_cl=None, z_al=None):
    """Gradients (dx, dz, dw_ext) of :func:`relaxed_conv_fwd`; entries not in ``needs`` are None.

    ``u``, ``x_cl``, ``z_al``: what the forward returned (``return_u``, ``return_packed``); each is
    rebuilt when None. Translation-stationary ``z`` ([N, J, H+1]) goes through
    :func:`bank_backward` unless ``RELAXEDCONV_TRITON_STATIONARY_BACKWARD=fused``.
    """
    if uses_bank_backward(z):
        return bank_backward(dy, x, z, w_ext, geometry, needs)
    g = geometry
    bsz, _, height, width = x.shape
    out_hw = g.out_size(height, width)
    rows = g.out_rotations * out_hw[0] * out_hw[1]
    hid = z.shape[-1]
    dy3 = dy.contiguous().view(bsz, g.out_channels, rows)
    w_mat = output_weight_matrix(w_ext, dy.dtype)
    if z_al is None and (needs[0] or (needs[2] and u is None)):
        z_al = common.aligned_hidden(z, dy.dtype)
    if needs[2] and u is None:
        if x_cl is None:
            x_cl = common.channels_last_padded(x, g.padding)
        u = hidden_projection(x_cl, z_al, hid, g, out_hw, bsz)
    dx = dz = dw = None
    if needs[2]:
        # dW[o, (h, i)] = sum over (b, n, p) of dY[b, o, (n, p)] U[b, (n, p), (h, i)]: one GEMM with
        # the (b, n, p) reduction inside it (cuBLAS accumulates in fp32 and rounds once).
        dy_rows = dy3.transpose(0, 1).reshape(g.out_channels, bsz * rows)
        dw = (dy_rows @ u.view(bsz * rows, -1)).view(g.out_channels, hid, g.in_channels)
        dw = dw.transpose(1, 2).to(w_ext.dtype)
    if needs[0] or needs[1]:
        # [B, N, P, H+1, C_in]: U's layout
        du = torch.matmul(dy3.transpose(1, 2), w_mat).view(bsz, g.out_rotations, rows // g.out_rotations, hid, g.in_channels)
        if needs[1]:
            if x_cl is None:
                x_cl = common.channels_last_padded(x, g.padding)
            dz = _hidden_grad(x_cl, du, z, g, out_hw, bsz)
        if needs[0]:
            dx = input_grad(du, z_al, hid, g, x.shape, out_hw, x.dtype)
    return dx, dz, dw
