"""relaxedconv: fast, learnable relaxed equivariance for PyTorch.

Layers whose continuous kernels see relative *and* absolute group coordinates, scaled by
learnable frequencies, so each layer learns how equivariant to be (van der Ouderaa, Romero,
van der Wilk, NeurIPS 2022).
"""
from .dispatch import BACKENDS, choose_backend
from .equivariance import (
    effective_omegas,
    equivariance_error,
    equivariance_penalty,
    kernel_nonstationarity,
    layer_equivariance_errors,
    omegas,
    parameter_groups,
)
from .kernel_net import SirenKernelNet
from .layers import GroupConv, InvariantPool, LiftingConv, PointwiseGroupConv
from .reference import ConvGeometry, conv_expand, conv_factored, conv_materialize

__all__ = [
    "BACKENDS",
    "ConvGeometry",
    "GroupConv",
    "InvariantPool",
    "LiftingConv",
    "PointwiseGroupConv",
    "SirenKernelNet",
    "choose_backend",
    "conv_expand",
    "conv_factored",
    "conv_materialize",
    "effective_omegas",
    "equivariance_error",
    "equivariance_penalty",
    "kernel_nonstationarity",
    "layer_equivariance_errors",
    "omegas",
    "parameter_groups",
]
__version__ = "0.1.0"
