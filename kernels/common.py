"""Pieces shared by the forward and backward kernels: row tiling, dtypes, launch settings."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors through numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_autotune(device: torch.device, dtype: torch.dtype) -> bool:
    """Autotune on CUDA; one fixed config under the interpreter (it would time every config on
    the CPU), for fp64 (a checking mode whose FMA multiply-sum spills heavily at the large tiles
    of the autotune configs) and when ``RELAXEDCONV_AUTOTUNE=0`` (test suites: one compile per
    specialisation instead of one per config, and a fixed reduction order across processes)."""
    if os.environ.get("RELAXEDCONV_AUTOTUNE", "1") == "0" or dtype == torch.float64:
        return False
    return device.type == "cuda" and not interpreting()


def check_int32_indexing(*tensors: torch.Tensor) -> None:
    """The kernels index with 32-bit offsets; refuse tensors they would overflow."""
    for t in tensors:
        if t.numel() >= 2**31:
            raise ValueError(
                f"a tensor of {t.numel():,} elements ({tuple(t.shape)}) is beyond the fused kernels' "
                "32-bit indexing; split the batch into smaller chunks"
            )


def empty_output(shape, *, device, dtype) -> torch.Tensor:
    """Every buffer a kernel must fill completely; tests replace it to poison buffers with NaN."""
    return torch.empty(shape, device=device, dtype=dtype)


def dot_precision(dtype: torch.dtype):
    """``tl.dot``'s input_precision: tf32 only where torch would use it, exact otherwise.

    Half-precision operands take the default (the argument only concerns fp32 operands).
    """
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 and not interpreting() else "ieee"
    if dtype == torch.float64:
        return "ieee"
    return None


def acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def hidden_block(hidden_plus_one: int) -> tuple[int, bool]:
    """(tile width over the hidden features, whether the last feature is a separate tail).

    Z has H+1 columns: H hidden features and the constant one that carries b_L. With the usual
    power-of-two H (32), H+1 = 33 would pad the tl.dot tiles to 64 and double the tensor-core
    work; instead the dots cover the first H columns and the last column is a rank-1 "tail"
    (a row reduction and an outer product on the FMA units). Otherwise: the next power of two,
    at least tl.dot's minimum of 16.
    """
    main = hidden_plus_one - 1
    if main >= 16 and main & (main - 1) == 0:
        return main, True
    return max(16, triton.next_power_of_2(hidden_plus_one)), False


def small_block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, FP64: tl.constexpr):
    """acc + a @ b. tl.dot has no fp64 form on GPUs, so fp64 (a checking mode: gradcheck, tight
    references) multiplies and sums on the FMA units instead; every other dtype uses tl.dot."""
    if FP64:
        return acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        return tl.dot(a, b, acc=acc, input_precision=PRECISION)


@triton.jit
def row_tile(t, B, P, BLOCK_M: tl.constexpr, PER_POSITION: tl.constexpr):
    """Rows of tile ``t``: (batch index, output position, valid) vectors and the tile's position.

    Translation-stationary: rows are the flattened (b, p). Per-position (translation
    non-stationary) Z differs at every p, so a tile holds one p and a block of batch rows, which
    lets all rows of the tile share one Z tile in ``tl.dot``.
    """
    offs = tl.arange(0, BLOCK_M)
    if PER_POSITION:
        nbt = tl.cdiv(B, BLOCK_M)
        p_tile = t // nbt
        b = (t % nbt) * BLOCK_M + offs
        ok = b < B
        p = p_tile + offs * 0
    else:
        m = t * BLOCK_M + offs
        ok = m < B * P
        b = m // P
        p = m % P
        p_tile = 0
    return b, p, ok, p_tile


def num_row_tiles(batch: int, positions: int, block_m: int, per_position: bool) -> int:
    if per_position:
        return positions * triton.cdiv(batch, block_m)
    return triton.cdiv(batch * positions, block_m)


@triton.jit
def tile_count(B, P, BLOCK_M: tl.constexpr, PER_POSITION: tl.constexpr):
    """Number of row tiles, computed in-kernel so it always matches the (autotuned) BLOCK_M."""
    if PER_POSITION:
        return P * tl.cdiv(B, BLOCK_M)
    else:
        return tl.cdiv(B * P, BLOCK_M)


@triton.jit
def factored_u(
    x_ptr, row_base, row_ok, z_base, i, N_IN, J, HMAIN, sxc, sxh, sxw, szj, szh,
    KSIZE: tl.constexpr, TAIL: tl.constexpr, PRECISION: tl.constexpr, FP64: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """U_i = X_i[rows, :] @ Z[:, :HMAIN] with the im2col tile gathered from the padded input, and
    the tail column U_i @ Z[:, HMAIN] as a row reduction (see :func:`hidden_block`)."""
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < HMAIN
    K2: tl.constexpr = KSIZE * KSIZE
    u = tl.zeros((BLOCK_M, BLOCK_H), dtype=ACC)
    u_tail = tl.zeros((BLOCK_M,), dtype=ACC)
    for j0 in range(0, J, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_ok = j < J
        kk = j % K2
        col = (i * N_IN + j // K2) * sxc + (kk // KSIZE) * sxh + (kk % KSIZE) * sxw
        xt = tl.load(x_ptr + row_base[:, None] + col[None, :], mask=row_ok[:, None] & j_ok[None, :], other=0.0)
        zt = tl.load(z_base + j[:, None] * szj + offs_h[None, :] * szh, mask=j_ok[:, None] & h_ok[None, :], other=0.0)
        u = mma(xt, zt, u, PRECISION, FP64)
        if TAIL:
            z_tail = tl.load(z_base + j * szj + HMAIN * szh, mask=j_ok, other=0.0)
            u_tail += tl.sum(xt.to(ACC) * z_tail.to(ACC)[None, :], axis=1)
    return u, u_tail


@triton.jit
def factored_du(
    dy_ptr, dy_row, rows_ok, w_ptr, i, C_OUT, N_OUT, HMAIN, sdc, swo, swi, swh,
    TAIL: tl.constexpr, PRECISION: tl.constexpr, FP64: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dU_i = dY_n[rows, :] @ W_ext[:, i, :HMAIN] (``dy_row`` already points at rotation n), and
    the tail dY_n[rows, :] @ W_ext[:, i, HMAIN] as a row reduction."""
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < HMAIN
    du = tl.zeros((BLOCK_M, BLOCK_H), dtype=ACC)
    du_tail = tl.zeros((BLOCK_M,), dtype=ACC)
    for o0 in range(0, C_OUT, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        o_ok = offs_o < C_OUT
        dyt = tl.load(dy_ptr + dy_row[:, None] + (offs_o * N_OUT)[None, :] * sdc, mask=rows_ok[:, None] & o_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_o[:, None] * swo + i * swi + offs_h[None, :] * swh, mask=o_ok[:, None] & h_ok[None, :], other=0.0)
        du = mma(dyt, wt, du, PRECISION, FP64)
        if TAIL:
            w_tail = tl.load(w_ptr + offs_o * swo + i * swi + HMAIN * swh, mask=o_ok, other=0.0)
            du_tail += tl.sum(dyt.to(ACC) * w_tail.to(ACC)[None, :], axis=1)
    return du, du_tail
