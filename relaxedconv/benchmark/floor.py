"""The plain-convolution floor of the end-to-end benchmark (issue 13).

The same network with every relaxed layer replaced by an ``nn.Conv2d`` whose weight has the
layer's expanded shape ``[C_out*N, C_in*N_in, K, K]`` (same padding, a bias when the layer has
one): no kernel net, no coordinates, no kernel generation. Norms, pools, the head and the
optimiser are unchanged, so ``step time / floor step time`` is what the relaxed layers' extra work
costs.
"""
from __future__ import annotations

import copy

from torch import nn

from ..layers import _RelaxedGroupConv


def plain_conv(layer: _RelaxedGroupConv) -> nn.Conv2d:
    g = layer.geometry
    conv = nn.Conv2d(g.in_channels * g.in_rotations, g.out_channels * g.out_rotations, g.kernel_size,
                     padding=g.padding, bias=layer.bias is not None)
    p = next(layer.parameters())
    return conv.to(device=p.device, dtype=p.dtype)


def plain_conv_floor(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every relaxed layer replaced by :func:`plain_conv`."""
    floor = copy.deepcopy(model)
    for name, module in list(floor.named_modules()):
        if isinstance(module, _RelaxedGroupConv):
            parent_name, _, child = name.rpartition(".")
            parent = floor.get_submodule(parent_name) if parent_name else floor
            setattr(parent, child, plain_conv(module))
    return floor
