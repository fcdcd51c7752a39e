"""The relaxed group convolution as a function of plain tensors; every backend runs from them.

    y = relaxed_conv(x, z, w_ext, bias, geometry, backend="auto")

- ``x``      ``[B, C_in*N_in, H, W]``
- ``z``      ``[N, J, H+1]`` (translation-stationary) or ``[N, P, J, H+1]`` (one per output position,
  P = H_out*W_out): the kernel net's hidden features on the layer's lattice, a ones column appended
  (it carries b_L) and the disk mask folded in; J = N_in*K*K ordered (n', kh, kw).
- ``w_ext``  ``[C_out, C_in, H+1]``: the kernel net's last layer ``[W_L | b_L]``.
- ``bias``   ``[C_out]`` or None, shared over the N output rotations.
- ``geometry`` a :class:`relaxedconv.reference.ConvGeometry`.

The kernel at a coordinate is ``sum_h z[..., h] * w_ext[:, :, h]`` (design.md §2), so these tensors
define the layer completely: ``materialize`` and ``expand_conv`` build their kernel from them,
``factored_torch`` and ``triton`` use them as they are. A layer is coordinates -> kernel net -> this
op (:mod:`relaxedconv.layers`). Gradients flow to every tensor that requires one.

``backend`` is a name of :data:`relaxedconv.dispatch.BACKENDS`; ``auto`` is resolved as
:mod:`relaxedconv.dispatch` describes (``auto_policy``: "measure" or "static"; None follows
:func:`relaxedconv.dispatch.set_auto_policy` / ``RELAXEDCONV_AUTO``).
"""
from __future__ import annotations

import torch

from . import dispatch
from .amp import autocast_dtype
from .reference import ConvGeometry


def check_factors(x, z, w_ext, bias, geometry) -> None:
    """Clear errors for tensors that do not fit together (shapes only: no host synchronisation)."""
    if not isinstance(geometry, ConvGeometry):
        raise TypeError(f"geometry must be a relaxedconv.ConvGeometry, got {type(geometry).__name__}")
    g = geometry
    for name, t in (("x", x), ("z", z), ("w_ext", w_ext)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"relaxed_conv: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"relaxed_conv: {name} must be floating point, got {t.dtype}")
    if x.dim() != 4 or x.shape[1] != g.in_channels * g.in_rotations:
        raise ValueError(f"relaxed_conv: x must be [B, C_in*N_in = {g.in_channels * g.in_rotations}, H, W], "
                         f"got {tuple(x.shape)}")
    h_out, w_out = g.out_size(x.shape[-2], x.shape[-1])
    if h_out < 1 or w_out < 1:
        raise ValueError(f"relaxed_conv: the input {tuple(x.shape[-2:])} is smaller than the kernel "
                         f"({g.kernel_size}) allows with padding {g.padding}")
    hp = w_ext.shape[-1] if w_ext.dim() == 3 else None
    if w_ext.dim() != 3 or tuple(w_ext.shape[:2]) != (g.out_channels, g.in_channels):
        raise ValueError(f"relaxed_conv: w_ext must be [C_out = {g.out_channels}, C_in = {g.in_channels}, H+1], "
                         f"got {tuple(w_ext.shape)}")
    stationary = (g.out_rotations, g.window, hp)
    per_position = (g.out_rotations, h_out * w_out, g.window, hp)
    if tuple(z.shape) not in (stationary, per_position):
        raise ValueError(
            f"relaxed_conv: z must be [N, J, H+1] = {list(stationary)} or, translation non-stationary, "
            f"[N, P, J, H+1] = {list(per_position)} for this input; got {list(z.shape)}"
        )
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (g.out_channels,)):
        raise ValueError(f"relaxed_conv: bias must be None or [C_out = {g.out_channels}], got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    if bias is not None and not bias.is_floating_point():
        raise TypeError(f"relaxed_conv: bias must be floating point, got {bias.dtype}")
    if z.dtype != w_ext.dtype and autocast_dtype(x.device.type) is None:
        # (x and bias may differ: the backends cast them. Under autocast the products cast z too.)
        raise TypeError(f"relaxed_conv: z and w_ext must have one dtype, got {z.dtype} and {w_ext.dtype}; "
                        f"cast one, e.g. w_ext.to(z.dtype)")
    devices = {t.device for t in (x, z, w_ext, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"relaxed_conv: tensors on different devices {sorted(map(str, devices))}; move them to one")


def prepare_backend(name: str, z, w_ext, bias, geometry: ConvGeometry, dtype: torch.dtype):
    """What backend ``name`` builds from the factors (independent of the batch)."""
    return dispatch.BACKEND_TABLE[name].prepare(z, w_ext, bias, geometry, dtype)


def apply_backend(name: str, x, operands, geometry: ConvGeometry) -> torch.Tensor:
    return dispatch.BACKEND_TABLE[name].apply(x, operands, geometry)


def relaxed_conv(x, z, w_ext, bias, geometry: ConvGeometry, backend: str = "auto", *,
                 auto_policy: str | None = None) -> torch.Tensor:
    """The relaxed group convolution (module docstring) with one backend of the table."""
    dispatch.check_backend_name(backend)
    if auto_policy is not None and auto_policy not in dispatch.AUTO_POLICIES:
        raise ValueError(f"relaxed_conv: auto_policy must be one of {dispatch.AUTO_POLICIES} or None, got {auto_policy!r}")
    check_factors(x, z, w_ext, bias, geometry)
    # prepared=False: this call builds the backend's operands every time, so auto times that too
    name = dispatch.resolve(backend, x, z, w_ext, bias, geometry, policy=auto_policy, prepared=False)
    operands = prepare_backend(name, z, w_ext, bias, geometry, dispatch.compute_dtype(x))
    return apply_backend(name, x, operands, geometry)
