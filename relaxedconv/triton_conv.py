"""The fused Triton path as an autograd Function (forward and backward kernels in ``kernels/``)."""
from __future__ import annotations

import torch

from .kernels.common import interpreting
from .reference import ConvGeometry


class RelaxedConvTritonFunction(torch.autograd.Function):
    """y = conv(x; Z, W_ext) + bias with the Triton kernels; U = X Z is recomputed in backward."""

    @staticmethod
    def forward(ctx, x, z, w_ext, bias, geometry: ConvGeometry):
        from .kernels.relaxed_conv_fwd import relaxed_conv_fwd

        y = relaxed_conv_fwd(x, z, w_ext, bias, geometry)
        ctx.save_for_backward(x, z, w_ext)
        ctx.geometry = geometry
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        from .kernels.relaxed_conv_bwd import relaxed_conv_bwd

        x, z, w_ext = ctx.saved_tensors
        g = ctx.geometry
        needs = ctx.needs_input_grad
        dx, dz, dw = relaxed_conv_bwd(dy, x, z, w_ext, g, needs=needs[:3])
        dbias = None
        if ctx.bias_dtype is not None and needs[3]:
            acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
            dbias = dy.unflatten(1, (g.out_channels, g.out_rotations)).sum((0, 2, 3, 4), dtype=acc)
            dbias = dbias.to(ctx.bias_dtype)
        return dx, dz, dw, dbias, None


def check_triton_inputs(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"backend='triton' runs on CUDA tensors (got a tensor on {x.device}); on CPU use "
            "backend='auto', 'expand_conv' or 'factored_torch' (or set TRITON_INTERPRET=1 to run "
            "the kernels in Triton's slow interpreter for testing)"
        )
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"backend='triton' supports float32/float16/bfloat16/float64 inputs, got {x.dtype}")


def relaxed_conv_triton(x, z, w_ext, bias, geometry: ConvGeometry) -> torch.Tensor:
    """Functional entry point; same layouts as :mod:`relaxedconv.reference`."""
    check_triton_inputs(x)
    if torch.is_autocast_enabled(x.device.type):
        # A custom Function is not autocast-aware: run it in the autocast dtype, as conv2d would.
        dt = torch.get_autocast_dtype(x.device.type)
        x, z, w_ext = x.to(dt), z.to(dt), w_ext.to(dt)
    return RelaxedConvTritonFunction.apply(x, z, w_ext, bias, geometry)
