"""Input checks with messages that say what was expected, what came, and what to do."""
from __future__ import annotations

import torch


def check_feature_map(
    x,
    *,
    layer: str,
    channels: int,
    in_channels: int,
    in_rotations: int,
    min_size: int,
    param: torch.Tensor,
) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{layer}: expected a floating-point input (float32, float64, bfloat16 or float16), "
            f"got {x.dtype}; convert it with x.float()"
        )
    layout = (
        f"[B, {in_channels}, H, W] (an image with {in_channels} channels)"
        if in_rotations == 1
        else f"[B, {in_channels}*{in_rotations} = {channels}, H, W] (channel index c*N + n)"
    )
    if x.dim() != 4:
        raise ValueError(f"{layer}: expected a 4-d input {layout}, got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        hint = ""
        if in_rotations > 1 and x.shape[1] % in_rotations == 0:
            hint = f" ({x.shape[1] // in_rotations} channels x {in_rotations} rotations?)"
        elif in_rotations > 1:
            hint = f"; {x.shape[1]} is not a multiple of the group order {in_rotations}: wrong rotation count?"
        raise ValueError(f"{layer}: expected {layout}, got {x.shape[1]} channels{hint}")
    if x.shape[-2] < min_size or x.shape[-1] < min_size:
        raise ValueError(
            f"{layer}: the input {tuple(x.shape[-2:])} is smaller than the {min_size}x{min_size} "
            f"needed for an output with this kernel size and padding"
        )
    if x.device != param.device:
        raise ValueError(
            f"{layer}: input is on {x.device} but the layer's parameters are on {param.device}; "
            f"move one of them (e.g. layer.to(x.device))"
        )


def check_kernel_size(kernel_size) -> int:
    if isinstance(kernel_size, (tuple, list)):
        if len(kernel_size) != 2 or kernel_size[0] != kernel_size[1]:
            raise ValueError(f"kernel_size must be one odd int (square kernels), got {kernel_size}")
        kernel_size = kernel_size[0]
    if not isinstance(kernel_size, int) or isinstance(kernel_size, bool):
        raise TypeError(f"kernel_size must be an int, got {type(kernel_size).__name__}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(
            f"kernel_size must be a positive odd number (the window is centred on the output pixel), got {kernel_size}"
        )
    return kernel_size


def check_positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def resolve_padding(padding, kernel_size: int) -> int:
    if padding == "same":
        return kernel_size // 2
    if padding == "valid":
        return 0
    if isinstance(padding, int) and not isinstance(padding, bool) and padding >= 0:
        return padding
    raise ValueError(f"padding must be 'same', 'valid' or a non-negative int, got {padding!r}")
