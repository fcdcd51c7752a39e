"""relaxedconv: fast, learnable relaxed equivariance for PyTorch.

Layers whose continuous kernels see relative *and* absolute group coordinates, scaled by
learnable frequencies, so each layer learns how equivariant to be (van der Ouderaa, Romero,
van der Wilk, NeurIPS 2022).
"""
from .dispatch import BACKEND_TABLE, BACKENDS, choose_backend, set_auto_policy
from .equivariance import (
    effective_omegas,
    equivariance_error,
    equivariance_penalty,
    kernel_nonstationarity,
    layer_equivariance_errors,
    omegas,
    parameter_groups,
)
from . import export  # a callable module: relaxedconv.export(model, size) and relaxedconv.export.plan/save
from .export import export_layer
from .kernel_net import SirenKernelNet
from .functional import relaxed_conv
from .layers import GroupConv, InvariantPool, LiftingConv, PointwiseGroupConv, backends_used
from .reference import ConvGeometry, conv_expand, conv_factored, conv_materialize

__all__ = [
    "BACKEND_TABLE",
    "BACKENDS",
    "ConvGeometry",
    "GroupConv",
    "InvariantPool",
    "LiftingConv",
    "PointwiseGroupConv",
    "SirenKernelNet",
    "backends_used",
    "choose_backend",
    "conv_expand",
    "conv_factored",
    "conv_materialize",
    "effective_omegas",
    "equivariance_error",
    "equivariance_penalty",
    "export",
    "export_layer",
    "kernel_nonstationarity",
    "layer_equivariance_errors",
    "omegas",
    "parameter_groups",
    "relaxed_conv",
    "set_auto_policy",
]
__version__ = "0.1.0"
