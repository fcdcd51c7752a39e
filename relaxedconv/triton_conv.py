"""The fused Triton path as PyTorch operators with their own autograd (kernels in ``kernels/``).

Two ``torch.library`` custom operators wrap the host functions of the kernels:

- ``relaxedconv::triton_conv_fwd(x, z, w_ext, bias, geometry) -> (y, U, x_cl, z_al)``
- ``relaxedconv::triton_conv_bwd(dy, x, z, w_ext, U, x_cl, z_al, geometry, needs) -> [dx, dz, dw_ext]``
  (a gradient that is not needed comes back as an empty tensor)

U = X_col Z (``[B, N, P, H+1, C_in]``) is what the forward computes before its cuBLAS GEMM; the
autograd formula keeps it for dW_ext, so the backward does not recompute it. That costs U's memory
between forward and backward (≈ 33x the output at C_in = C_out = 32, H = 32). The forward's
channels-last padded input ``x_cl`` and 16-aligned Z ``z_al`` (about the input's and Z's sizes) are
kept too, so the backward does not repack them. ``RELAXEDCONV_TRITON_RECOMPUTE_U=1`` keeps none of
the three and rebuilds them in the backward instead. A translation-stationary layer's backward
runs through its conv2d bank (``kernels/relaxed_conv_bwd.bank_backward``) and needs none of them.

Each operator has a fake (meta) implementation that gives the output shapes without running a
kernel, and the forward has a registered autograd formula, so ``torch.compile`` sees one opaque
operator per direction: no graph break, and the compiler neither traces into nor reorders the
kernels. ``geometry`` travels as the six integers of :class:`relaxedconv.reference.ConvGeometry`.

In eager mode the same host functions run behind a plain ``torch.autograd.Function``
(:class:`_EagerTritonConv`) instead: a custom operator's dispatch costs about 200 µs of host time
per forward + backward (2-core CPU, kernels stubbed: 381 µs against 178 µs), and small layers on
a GPU are bound by host time (T1 on an H200: 4.85 ms of wall time for 1.80 ms of device work).
"""

import dataclasses
import os
from typing import List, Optional, Tuple

import torch

from .amp import autocast_dtype
from .reference import ConvGeometry, conv_factored


def _geometry(values) -> ConvGeometry:
    return ConvGeometry(*(int(v) for v in values))


def recompute_u() -> bool:
    """Whether the backward recomputes U instead of keeping it from the forward."""
    return os.environ.get("RELAXEDCONV_TRITON_RECOMPUTE_U", "0") not in ("", "0")


@torch.library.custom_op("relaxedconv::triton_conv_fwd", mutates_args=())
def triton_conv_fwd(x: torch.Tensor, z: torch.Tensor, w_ext: torch.Tensor, bias: Optional[torch.Tensor],
                    geometry: List[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, u, x_cl, z_al = _forward(x, z, w_ext, bias, geometry)
    # An output may not alias an input: aligned_hidden returns Z itself when it is already aligned
    # (the input's repack always writes a new buffer).
    return y.contiguous(), u, x_cl, _not_aliasing(z_al, z)


def _forward(x, z, w_ext, bias, geometry):
    """(y, U, channels-last input, aligned Z): the kernels' forward, shared by both operator forms."""
    from .kernels.relaxed_conv_fwd import relaxed_conv_fwd

    return relaxed_conv_fwd(x, z, w_ext, bias, _geometry(geometry), return_u=True, return_packed=True)


def _backward_grads(dy, x, z, w_ext, u, x_cl, z_al, geometry, needs):
    """(dx, dz, dw_ext): the kernels' backward, shared by both operator forms."""
    from .kernels.relaxed_conv_bwd import relaxed_conv_bwd

    return relaxed_conv_bwd(dy, x, z, w_ext, _geometry(geometry), needs=tuple(bool(n) for n in needs), u=u,
                            x_cl=x_cl, z_al=z_al)


def _not_aliasing(out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    return out.clone() if out.untyped_storage().data_ptr() == inp.untyped_storage().data_ptr() else out


@triton_conv_fwd.register_fake
def _triton_conv_fwd_fake(x, z, w_ext, bias, geometry):
    g = _geometry(geometry)
    h, w = g.out_size(x.shape[-2], x.shape[-1])
    y = x.new_empty((x.shape[0], g.out_channels * g.out_rotations, h, w))
    u = x.new_empty((x.shape[0], g.out_rotations, h * w, z.shape[-1], g.in_channels))
    p = g.padding
    x_cl = x.new_empty((x.shape[0], x.shape[2] + 2 * p, x.shape[3] + 2 * p, x.shape[1]))
    from .kernels.common import aligned_width

    z_al = x.new_empty((*z.shape[:-1], aligned_width(z.shape[-1])))  # in x's (the compute) dtype
    return y, u, x_cl, z_al


@torch.library.custom_op("relaxedconv::triton_conv_bwd", mutates_args=())
def triton_conv_bwd(dy: torch.Tensor, x: torch.Tensor, z: torch.Tensor, w_ext: torch.Tensor, u: Optional[torch.Tensor],
                    x_cl: Optional[torch.Tensor], z_al: Optional[torch.Tensor],
                    geometry: List[int], needs: List[bool]) -> List[torch.Tensor]:
    grads = _backward_grads(dy, x, z, w_ext, u, x_cl, z_al, geometry, needs)
    # Contiguous, as the fake implementation promises the compiler (dw_ext comes back permuted).
    return [g.contiguous() if g is not None else like.new_empty(0) for g, like in zip(grads, (x, z, w_ext))]


@triton_conv_bwd.register_fake
def _triton_conv_bwd_fake(dy, x, z, w_ext, u, x_cl, z_al, geometry, needs):
    return [like.new_empty(like.shape if need else (0,)) for like, need in zip((x, z, w_ext), needs)]


def _save(ctx, x, z, w_ext, bias, geometry, u, x_cl, z_al, eager: bool = False) -> None:
    """What the backward keeps (both forms of the operator)."""
    from .kernels.relaxed_conv_bwd import uses_bank_backward

    keep = not recompute_u() and not uses_bank_backward(z)
    # U serves dW_ext only: keep it when that gradient is wanted and memory is not to be saved.
    keep_u = ctx.needs_input_grad[2] and keep
    if eager and keep and z.dim() == 4:
        # With the aligned copy kept, the backward of a per-position Z reads only its shape, dtype
        # and device: a one-element stand-in instead of the layer's fp32 Z (T2: 106 MB;
        # T2-b64-32px: 424 MB). A stationary Z is small, and stays whole: its backward route is
        # read again when the backward runs.
        z = z.new_empty(()).expand(z.shape)
    ctx.save_for_backward(x, z, w_ext, u if keep_u else None, x_cl if keep else None, z_al if keep else None)
    ctx.geometry = list(geometry)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _gradients(ctx, dy, backward):
    """(dx, dz, dw_ext, dbias, None) from ``backward(dy, x, z, w_ext, u, x_cl, z_al, geometry, needs)``."""
    x, z, w_ext, u, x_cl, z_al = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dx, dz, dw = backward(dy, x, z, w_ext, u, x_cl, z_al, ctx.geometry, [bool(n) for n in needs[:3]])
    dbias = None
    if ctx.bias_dtype is not None and needs[3]:
        g = _geometry(ctx.geometry)
        acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
        dbias = dy.unflatten(1, (g.out_channels, g.out_rotations)).sum((0, 2, 3, 4), dtype=acc).to(ctx.bias_dtype)
    return (dx if needs[0] else None, dz if needs[1] else None, dw if needs[2] else None, dbias, None)


def _setup_context(ctx, inputs, output):
    _save(ctx, *inputs, *output[1:])


def _backward(ctx, dy, _du, _dx_cl, _dz_al):
    return _gradients(ctx, dy, triton_conv_bwd)


triton_conv_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerTritonConv(torch.autograd.Function):
    """The operator pair above without the custom-operator dispatch, for eager mode."""

    @staticmethod
    def forward(ctx, x, z, w_ext, bias, geometry):
        y, u, x_cl, z_al = _forward(x, z, w_ext, bias, geometry)
        _save(ctx, x, z, w_ext, bias, geometry, u, x_cl, z_al, eager=True)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _gradients(ctx, dy.contiguous(), _backward_grads)


def check_triton_inputs(x: torch.Tensor, z: torch.Tensor | None = None) -> None:
    """The backend table's refusal for ``triton`` on this input (device, dtype), as an error."""
    from . import dispatch

    dispatch.check_supported("triton", device_type=x.device.type, dtype=x.dtype,
                             per_position=z is not None and z.dim() == 4)


def relaxed_conv_triton(x, z, w_ext, bias, geometry: ConvGeometry) -> torch.Tensor:
    """Functional entry point; same layouts as :mod:`relaxedconv.reference`."""
    check_triton_inputs(x, z)
    dtype = autocast_dtype(x.device.type)
    if dtype is not None:
        # A custom operator is not autocast-aware: run it in the autocast dtype, as conv2d would.
        # Only x is cast here: the kernels read Z and W_ext in x's dtype through their own packing
        # copy, and return dZ, dW_ext in the factors' dtype (no rounding of dZ to bf16 and back).
        x = x.to(dtype)
    if x.shape[0] == 0:
        # An empty batch (a last partial batch of a sharded loader can be one): nothing for the
        # kernels to do, and a grid of zero programs is not a launch. The reference gives the empty
        # output and zero gradients to the factors.
        return conv_factored(x, z, w_ext, bias, geometry)
    geom = list(dataclasses.astuple(geometry))
    if torch.compiler.is_compiling():
        return triton_conv_fwd(x, z, w_ext, bias, geom)[0]
    return _EagerTritonConv.apply(x, z, w_ext, bias, geom)
