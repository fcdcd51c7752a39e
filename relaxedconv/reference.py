"""The plain-PyTorch paths of design.md §3 that every fast path is checked against.

All three compute the same relaxed group convolution
    y[b, o*N + n, p] = sum_{i, n', Delta} k(n, n', Delta, p)[o, i] x[b, i*N_in + n', p + Delta] + bias[o]
and differ only in how:

- :func:`conv_materialize` (R1): the full kernel at every coordinate (every output position when
  translation non-stationary), ``unfold`` + einsum. The ground truth; the slow baseline.
- :func:`conv_expand` (R2): the kernel bank ``[C_out*N, C_in*N_in, K, K]`` and ``F.conv2d``.
  Translation-stationary only.
- :func:`conv_factored` (R3): the factorisation of §2, ``y = W_L . (Z^T X)``, in plain PyTorch
  (translation-stationary: a per-channel convolution with Z as weight, then one batched GEMM;
  per position: unfold and einsums, one output rotation at a time).

Every path can start from the same two tensors, the factors (Z, [W_L | b_L]) of §2:
:func:`kernel_from_factors` gives R1's kernel and :func:`bank_from_factors` R2's conv2d weight
(the mask and the ones column are folded into Z, so ``sum_h Z W_ext`` is the masked kernel with
its b_L term). :mod:`relaxedconv.functional` runs each backend from them.

Layouts shared by every path (J = N_in * K * K, ordered (n', kh, kw) as ``F.unfold`` orders a
channel's window):
    x       [B, C_in*N_in, H, W]
    kernel  [N, J, C_out, C_in]        or [N, P, J, C_out, C_in] per output position (masked)
    z       [N, J, H+1]                or [N, P, J, H+1]  hidden features, ones column, masked
    w_ext   [C_out, C_in, H+1]         [W_L | b_L]
    bias    [C_out] or None            shared over rotations (keeps equivariance)
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .amp import autocast_dtype


@dataclass(frozen=True)
class ConvGeometry:
    """Shape of one relaxed group convolution; everything but batch and image size."""

    in_channels: int
    out_channels: int
    in_rotations: int
    out_rotations: int
    kernel_size: int
    padding: int

    def __post_init__(self):
        # Built by users of the functional API too: a zero or negative size failed deep in a
        # reshape or unfold, if at all (in_channels=0 gave an empty output).
        for name in ("in_channels", "out_channels", "in_rotations", "out_rotations", "kernel_size", "padding"):
            v = getattr(self, name)
            low = 0 if name == "padding" else 1
            try:
                n = operator.index(v)  # Python and NumPy integers; not floats
            except TypeError:
                n = None
            if isinstance(v, bool) or n is None or n < low:
                raise ValueError(f"ConvGeometry.{name} must be an integer >= {low}, got {v!r}")
            if type(v) is not int:
                object.__setattr__(self, name, n)  # frozen: kept as a plain int (kernels specialise on it)

    @property
    def window(self) -> int:
        """J = N_in * K * K, the length of one input channel's im2col column."""
        return self.in_rotations * self.kernel_size**2

    def out_size(self, height: int, width: int) -> tuple[int, int]:
        k, p = self.kernel_size, self.padding
        return height + 2 * p - k + 1, width + 2 * p - k + 1


def _columns(x: torch.Tensor, g: ConvGeometry) -> torch.Tensor:
    """im2col: [B, C_in, J, P]."""
    cols = F.unfold(x, g.kernel_size, padding=g.padding)
    return cols.unflatten(1, (g.in_channels, g.window))


def _finish(y: torch.Tensor, bias, g: ConvGeometry, out_hw) -> torch.Tensor:
    """[B, C_out, N, P] -> [B, C_out*N, H_out, W_out] plus bias."""
    if bias is not None:
        y = y + bias.to(y.dtype)[None, :, None, None]
    return y.reshape(y.shape[0], g.out_channels * g.out_rotations, *out_hw)


def conv_materialize(x, kernel, bias, g: ConvGeometry) -> torch.Tensor:
    out_hw = g.out_size(x.shape[-2], x.shape[-1])
    cols = _columns(x, g)
    if kernel.dim() == 4:
        y = torch.einsum("bijp,njoi->bonp", cols, kernel)
    else:
        y = torch.einsum("bijp,npjoi->bonp", cols, kernel)
    return _finish(y, bias, g, out_hw)


def expand_kernel_bank(kernel: torch.Tensor, g: ConvGeometry) -> torch.Tensor:
    """[N, J, C_out, C_in] -> the conv2d weight ``[C_out*N, C_in*N_in, K, K]``."""
    if kernel.dim() != 4:
        raise ValueError(
            "expand_conv needs a translation-stationary kernel [N, J, C_out, C_in]; a kernel per "
            "output position (translation non-stationary) has no conv2d form. "
            "Use backend='materialize', 'factored_torch' or 'triton'."
        )
    k = g.kernel_size
    bank = kernel.permute(2, 0, 3, 1)  # [C_out, N, C_in, J]
    return bank.reshape(g.out_channels * g.out_rotations, g.in_channels * g.in_rotations, k, k)


def conv_expand(x, kernel, bias, g: ConvGeometry) -> torch.Tensor:
    return conv_bank(x, expand_kernel_bank(kernel, g), bias, g)


def conv_bank(x, bank, bias, g: ConvGeometry) -> torch.Tensor:
    """R2 from the conv2d weight itself; ``bias`` is the per-channel [C_out] (shared over rotations)."""
    b = None if bias is None else bias.to(x.dtype).repeat_interleave(g.out_rotations)
    return F.conv2d(x, bank, b, padding=g.padding)


def kernel_from_factors(z: torch.Tensor, w_ext: torch.Tensor) -> torch.Tensor:
    """R1's kernel from the factors: ``[N, (P,) J, H+1] x [C_out, C_in, H+1] -> [N, (P,) J, C_out, C_in]``
    (one matrix product; its output is already in that layout)."""
    c_out, c_in, hp = w_ext.shape
    k = z.reshape(-1, hp) @ w_ext.reshape(c_out * c_in, hp).t()
    return k.view(*z.shape[:-1], c_out, c_in)


def bank_from_factors(z: torch.Tensor, w_ext: torch.Tensor, g: ConvGeometry) -> torch.Tensor:
    """R2's conv2d weight ``[C_out*N, C_in*N_in, K, K]`` from the factors."""
    if z.dim() != 3:
        raise ValueError(
            "expand_conv needs translation-stationary hidden features z [N, J, H+1]; features per "
            "output position (translation non-stationary) have no conv2d form. "
            "Use backend='materialize', 'factored_torch' or 'triton'."
        )
    k, hp = g.kernel_size, z.shape[-1]
    # One matrix product [C_out*C_in, N*J] and one copy into the bank's (o, n, i, j) order: fewer
    # operators (forward and backward) than an einsum, which permutes both operands first.
    bank = (w_ext.reshape(-1, hp) @ z.reshape(-1, hp).t()).view(g.out_channels, g.in_channels, g.out_rotations, -1)
    return bank.transpose(1, 2).reshape(g.out_channels * g.out_rotations, g.in_channels * g.in_rotations, k, k)


def conv_factored(x, z, w_ext, bias, g: ConvGeometry) -> torch.Tensor:
    out_hw = g.out_size(x.shape[-2], x.shape[-1])
    if z.dim() == 3:
        return _conv_factored_stationary(x, z, w_ext, bias, g, out_hw)
    return _finish(_factored_per_position(x, z, w_ext, g), bias, g, out_hw)


def _factored_per_position(x, z, w_ext, g: ConvGeometry) -> torch.Tensor:
    """§2 per output position, ``[B, C_out, N, P]``: for each output rotation n, ``U_p = X_p Z_{n,p}``
    (a batched product over positions, rows (b, i), ``[P, B*C_in, H+1]``) then one product with
    W_ext over (i, h). One rotation at a time keeps U at ``1/N`` of all rotations' size.

    The im2col rows are laid out ``[P, B*C_in, J]`` once for every rotation, and z is split with
    ``unbind`` (its backward stacks the rotations' gradients once; indexing ``z[n]`` made N
    zero-filled z-sized gradients): an einsum per rotation instead permuted and copied the columns
    each time, and on a CPU its batched products copied their operands matrix by matrix
    (2026-11-28, profiler: 58 k copies and 3 s of zero fills in one training step of the
    translation-relaxed SE(2)-8 model)."""
    b = x.shape[0]
    cols = _columns(x, g)  # [B, C_in, J, P]
    positions, hp = cols.shape[-1], z.shape[-1]
    # contiguous: as a strided view every batched product would copy it matrix by matrix
    rows = cols.permute(3, 0, 1, 2).contiguous().view(positions, b * g.in_channels, g.window)
    w = w_ext.reshape(g.out_channels, g.in_channels * hp).t()  # [(i, h), o]
    # under autocast, cast once to what autocast would cast them to (fp64 it leaves alone), not in
    # every rotation's products
    dtype = autocast_dtype(x.device.type)
    if dtype is not None and rows.dtype in (torch.float32, torch.float16, torch.bfloat16):
        rows, w = rows.to(dtype), w.to(dtype)
    ys = [torch.bmm(rows, zn).view(positions * b, g.in_channels * hp) @ w for zn in z.unbind(0)]
    y = torch.stack(ys, dim=-1).view(positions, b, g.out_channels, g.out_rotations)
    return y.permute(1, 2, 3, 0)


def _conv_factored_stationary(x, z, w_ext, bias, g: ConvGeometry, out_hw) -> torch.Tensor:
    """§2 with stationary Z as two library calls: U is a convolution of every input channel on its
    own (x as ``[B*C_in, N_in, H, W]``) with Z as the weight ``[(H+1)*N, N_in, K, K]``, then
    ``Y_b = W_ext[o, (i, h)] @ U_b[(i, h), (n, p)]`` — a batched GEMM whose result is already the
    output layout. cuDNN/oneDNN and cuBLAS do both at full speed; U is ``B*C_in*(H+1)*N*P`` values
    (no im2col of the input, no per-rotation loop)."""
    b, _, height, width = x.shape
    k, hp = g.kernel_size, z.shape[-1]
    weight = z.permute(2, 0, 1).reshape(hp * g.out_rotations, g.in_rotations, k, k)
    u = F.conv2d(x.reshape(b * g.in_channels, g.in_rotations, height, width), weight, padding=g.padding)
    u = u.view(b, g.in_channels * hp, g.out_rotations * out_hw[0] * out_hw[1])
    y = torch.matmul(w_ext.reshape(g.out_channels, g.in_channels * hp), u)
    if bias is not None:
        # sizes spelled out: with an empty batch a -1 is ambiguous
        y = y.view(b, g.out_channels, g.out_rotations * out_hw[0] * out_hw[1]) + bias.to(y.dtype)[None, :, None]
    return y.reshape(b, g.out_channels * g.out_rotations, *out_hw)
