"""Pieces shared by the forward and backward kernels: row tiling, dtypes, launch settings."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors through numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_autotune(device: torch.device) -> bool:
    """Autotune on CUDA; one fixed config under the interpreter (it would time every config on
    the CPU) and when ``RELAXEDCONV_AUTOTUNE=0`` (test suites: one compile per specialisation
    instead of one per config, and a fixed reduction order across processes)."""
    if os.environ.get("RELAXEDCONV_AUTOTUNE", "1") == "0":
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
