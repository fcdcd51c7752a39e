"""Backend names, the ``backend="auto"`` rule, and the call into each path.

The rule for ``auto`` (documented in README.md):

1. CPU (or any non-CUDA device): ``expand_conv`` when translation-stationary (one oneDNN
   convolution), else ``factored_torch`` (never builds the per-position kernel). Never ``triton``.
2. CUDA, translation non-stationary: ``triton`` (cuDNN has no such convolution, and
   ``materialize`` needs the per-position kernel: P times the memory).
3. CUDA, translation-stationary: compare multiply-adds of the factored form with the direct
   convolution on the expanded bank (design.md §2):
   ``factored/direct = H'/C_out + H'/(N_in*K*K)``. cuDNN sustains roughly twice the fraction
   of peak that the fused kernel does, so ``triton`` is picked only when that ratio is below
   :data:`TRITON_FLOP_RATIO` and the kernels get tensor cores (bf16/fp16, or fp32 with
   ``torch.backends.cuda.matmul.allow_tf32``; exact fp32 and fp64 run on the FMA units while
   cuDNN uses tf32 by default); otherwise ``expand_conv``. Under autocast the autocast dtype counts.
4. ``triton`` is never picked when Triton cannot be imported.
"""
from __future__ import annotations

import functools

import torch

from . import reference

BACKENDS = ("auto", "materialize", "expand_conv", "factored_torch", "triton")
TRITON_FLOP_RATIO = 0.5


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def factored_to_direct_ratio(layer) -> float:
    h = layer.kernel_net.hidden_channels + 1
    return h / layer.out_channels + h / (layer.in_rotations * layer.kernel_size**2)


def choose_backend(layer, x: torch.Tensor) -> str:
    """The backend ``auto`` runs ``layer`` with on input ``x``."""
    dtype = x.dtype
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    return backend_rule(layer, x.device.type, triton_available(), dtype)


def _tensor_cores(dtype: torch.dtype) -> bool:
    if dtype in (torch.bfloat16, torch.float16):
        return True
    return dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32


def backend_rule(layer, device_type: str, have_triton: bool, dtype: torch.dtype = torch.bfloat16) -> str:
    """The documented rule itself, as a pure function of the layer, device type and dtype."""
    if device_type != "cuda" or not have_triton:
        return "factored_torch" if layer.translation_nonstationary else "expand_conv"
    if layer.translation_nonstationary:
        return "triton"
    if factored_to_direct_ratio(layer) < TRITON_FLOP_RATIO and _tensor_cores(dtype):
        return "triton"
    return "expand_conv"


def run(name: str, layer, x: torch.Tensor, out_hw) -> torch.Tensor:
    g, bias = layer.geometry, layer.bias
    if name == "expand_conv" and layer.translation_nonstationary:
        raise ValueError(
            f"{type(layer).__name__}: backend='expand_conv' cannot run a translation non-stationary "
            "layer (its kernel differs at every output position, which conv2d cannot express). "
            "Use backend='auto', 'factored_torch', 'triton' or 'materialize'."
        )
    if name in ("materialize", "expand_conv"):
        kernel = layer.full_kernel(out_hw, dtype=x.dtype)
        fn = reference.conv_materialize if name == "materialize" else reference.conv_expand
        return fn(x, kernel, bias, g)
    z, w_ext = layer.factored_kernel(out_hw, dtype=x.dtype)
    if name == "factored_torch":
        return reference.conv_factored(x, z, w_ext, bias, g)
    if name == "triton":
        from .triton_conv import relaxed_conv_triton

        return relaxed_conv_triton(x, z, w_ext, bias, g)
    raise ValueError(f"unknown backend {name!r}")
