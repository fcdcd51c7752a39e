"""Input checks with messages that say what was expected, what came, and what to do."""
from __future__ import annotations

import math
import numbers
import os
import sys
import warnings

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


# What each frequency does at 0, for the messages below.
_OMEGA_AT_ZERO = {
    "omega_rel": "0 makes the kernel constant: an invariant layer",
    "omega_rot": "0 is a rotation-stationary (strictly equivariant) kernel",
    "omega_pos": "0 is a translation-stationary kernel",
}


def check_omega(name: str, value) -> float:
    """A frequency of the kernel net's inputs: a finite number >= 0, returned as a float."""
    is_scalar_tensor = isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_meta
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or is_scalar_tensor):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number >= 0, got {v}; {_OMEGA_AT_ZERO[name]}")
    if v < 0:
        raise ValueError(
            f"{name} must be >= 0, got {v}: a frequency's sign only mirrors the coordinates it scales "
            f"(pass {-v:g}); {_OMEGA_AT_ZERO[name]}"
        )
    return v


def _stacklevel_outside_package() -> int:
    """The ``stacklevel`` of the caller's first frame outside relaxedconv: a warning then points at
    the user's line, however many constructors (subclasses, models) sit in between."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package_dir + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def check_omegas(layer: str, *, omega_rel, omega_rot, omega_pos, rotation_nonstationary: bool,
                 translation_nonstationary: bool) -> tuple[float, float, float]:
    """Validate the three initial frequencies of a layer; warn about one the layer cannot use.

    The kernel net has an input for the absolute rotation only when the layer is rotation
    non-stationary (and for the absolute position only when translation non-stationary), so a
    non-zero omega_rot / omega_pos without that flag would be silently dropped."""
    rel = check_omega("omega_rel", omega_rel)
    rot = check_omega("omega_rot", omega_rot)
    pos = check_omega("omega_pos", omega_pos)
    for value, name, flag in ((rot, "omega_rot", "rotation_nonstationary"), (pos, "omega_pos", "translation_nonstationary")):
        active = rotation_nonstationary if name == "omega_rot" else translation_nonstationary
        if value != 0 and not active:
            warnings.warn(
                f"{layer}: {name}={value:g} has no effect because {flag}=False (the kernel does not see "
                f"that absolute coordinate); pass {flag}=True to use it, or leave {name} at 0",
                UserWarning,
                stacklevel=_stacklevel_outside_package(),
            )
    return rel, rot, pos


# What defines the lattice a layer's kernel net is evaluated on. The parameters' shapes do not
# depend on the kernel size, group order, padding or mask, so a state_dict saved from another
# lattice would load silently and define a different kernel; the layer records these fields in
# its state_dict (``_extra_state``) and refuses a mismatch.
LATTICE_FIELDS = (
    "in_channels", "out_channels", "in_rotations", "kernel_size", "group_order", "padding", "mask",
    "rotation_nonstationary", "translation_nonstationary",
)
LATTICE_STATE_VERSION = 1


def check_lattice_state(layer: str, saved, current: dict) -> None:
    """Raise a ValueError naming every field where the saved lattice differs from this layer's."""
    if not isinstance(saved, dict) or "lattice" not in saved:
        raise ValueError(
            f"{layer}: the state_dict's _extra_state is not a relaxedconv lattice record "
            f"(got {type(saved).__name__}); was it saved from another kind of module?"
        )
    got, want = saved["lattice"], current["lattice"]
    diffs = [f"{k} {got.get(k)!r} (saved) vs {want[k]!r} (this layer)" for k in LATTICE_FIELDS if got.get(k) != want[k]]
    if diffs:
        # in_rotations follows from the layer type and group_order: not a constructor argument
        saved_args = ", ".join(f"{k}={got.get(k)!r}" for k in LATTICE_FIELDS if got.get(k) != want[k] and k != "in_rotations")
        raise ValueError(
            f"{layer}: the state_dict was saved from a layer on another lattice: {'; '.join(diffs)}. "
            f"Its parameters would define a different kernel here; build the layer with "
            f"{saved_args or 'the saved type (LiftingConv: in_rotations 1)'}"
        )
