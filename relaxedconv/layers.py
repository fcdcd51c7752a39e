"""Relaxed group convolution layers (design.md §1): lifting, group, pointwise, invariant pooling.

Feature maps on G = R^2 x| C_N are ``[B, C*N, H, W]`` with channel index ``c*N + n``.
``in_channels``/``out_channels`` count channels *per rotation* (C, not C*N).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import dispatch
from .groups import coordinate_groups, disk_mask
from .kernel_net import SirenKernelNet
from .reference import ConvGeometry
from .validation import check_feature_map, check_kernel_size, check_positive_int, resolve_padding


class _RelaxedGroupConv(nn.Module):
    """Shared machinery: coordinates -> kernel net -> one of the backends of design.md §3."""

    _is_lifting = False
    # Offset of the rotation grid (radians) for the next forward; set per step by a model that
    # samples the Monte-Carlo grid (models.CKResNet(mc_rotation=True)), 0 otherwise.
    angle_offset = 0.0

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        group_order: int,
        *,
        padding="same",
        bias: bool = True,
        rotation_nonstationary: bool = False,
        translation_nonstationary: bool = False,
        omega_rel: float = 10.0,
        omega_rot: float = 0.0,
        omega_pos: float = 0.0,
        learn_omega_rel: bool = False,
        learn_omega_rot: bool = True,
        learn_omega_pos: bool = True,
        hidden_channels: int = 32,
        kernel_depth: int = 3,
        mask: bool | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = check_positive_int("out_channels", out_channels)
        self.group_order = check_positive_int("group_order", group_order)
        self.kernel_size = check_kernel_size(kernel_size)
        self.padding = resolve_padding(padding, self.kernel_size)
        self.in_rotations = 1 if self._is_lifting else self.group_order
        self.rotation_nonstationary = bool(rotation_nonstationary)
        self.translation_nonstationary = bool(translation_nonstationary)
        self.mask = (self.group_order > 1) if mask is None else bool(mask)
        self.backend = dispatch.check_backend_name(backend)
        self.geometry = ConvGeometry(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            in_rotations=self.in_rotations,
            out_rotations=self.group_order,
            kernel_size=self.kernel_size,
            padding=self.padding,
        )
        groups = ["rel_pos"]
        if not self._is_lifting:
            groups.append("rel_rot")
        if self.rotation_nonstationary:
            groups.append("abs_rot")
        if self.translation_nonstationary:
            groups.append("abs_pos")
        self.kernel_net = SirenKernelNet(
            groups,
            self.out_channels,
            self.in_channels,
            hidden_channels=hidden_channels,
            depth=kernel_depth,
            omega_rel=omega_rel,
            omega_rot=omega_rot,
            omega_pos=omega_pos,
            learn_omega_rel=learn_omega_rel,
            learn_omega_rot=learn_omega_rot,
            learn_omega_pos=learn_omega_pos,
        )
        fan_in = self.in_channels * self.in_rotations * self.kernel_size**2
        self.bias = nn.Parameter(torch.empty(self.out_channels)) if bias else None
        self._init_to_conv2d_scale(fan_in)

    # ---- initialisation -------------------------------------------------------------------
    def _init_to_conv2d_scale(self, fan_in: int) -> None:
        """Give the generated kernel nn.Conv2d's default variance 1/(3*fan_in).

        k = W_L z with W_L ~ U(-a, a) has E[k^2] = (a^2/3) * H * E[z^2]; E[z^2] is measured on this
        layer's own lattice (it depends on the omegas), so a^2 = 1/(fan_in * H * E[z^2]).
        """
        with torch.no_grad():
            # A representative output size for abs_pos; the statistics hardly depend on it.
            z = self._hidden_features(out_hw=(9, 9))
            m = self._mask_over_window(z.dtype)
            weights = m.expand(z.shape[:-1])
            mean_sq = ((z.pow(2).mean(-1)) * weights).sum() / weights.sum()
            h = self.kernel_net.hidden_channels
            a = 1.0 / math.sqrt(fan_in * h * max(float(mean_sq), 1e-6))
            self.kernel_net.out.weight.uniform_(-a, a)
            self.kernel_net.out.bias.zero_()
            if self.bias is not None:
                b = 1.0 / math.sqrt(fan_in)
                self.bias.uniform_(-b, b)

    # ---- the kernel --------------------------------------------------------------------------
    def _mask_over_window(self, dtype) -> torch.Tensor:
        """[J] mask over the im2col window (n', kh, kw)."""
        device = self.kernel_net.first.weight.device
        k2 = self.kernel_size**2
        if not self.mask:
            return torch.ones(self.in_rotations * k2, device=device, dtype=dtype)
        return disk_mask(self.kernel_size, device=device, dtype=dtype).repeat(self.in_rotations)

    def _hidden_features(self, out_hw) -> torch.Tensor:
        """Hidden features z on the lattice: [N, J, H], or [N, P, J, H] when translation non-stationary."""
        w = self.kernel_net.first.weight
        coords = coordinate_groups(
            out_rotations=self.group_order,
            in_rotations=None if self._is_lifting else self.in_rotations,
            kernel_size=self.kernel_size,
            out_size=out_hw if self.translation_nonstationary else None,
            rotation_nonstationary=self.rotation_nonstationary,
            angle_offset=self.angle_offset,
            device=w.device,
            dtype=w.dtype,
        )
        if self.translation_nonstationary and torch.is_grad_enabled():
            # Per-position features are N*P*J*H values; keeping only them (not every SIREN layer's
            # activations) and recomputing the SIREN in backward costs ~2% of the layer's FLOPs.
            z = checkpoint(self.kernel_net.hidden, coords, use_reentrant=False)
        else:
            z = self.kernel_net.hidden(coords)
        n, k2, h = self.group_order, self.kernel_size**2, z.shape[-1]
        p = out_hw[0] * out_hw[1] if self.translation_nonstationary else 1
        z = z.expand(n, p, self.in_rotations, k2, h).reshape(n, p, self.in_rotations * k2, h)
        return z if self.translation_nonstationary else z[:, 0]

    def full_kernel(self, out_hw, dtype=None) -> torch.Tensor:
        """The full masked kernel, [N, J, C_out, C_in] (or [N, P, J, C_out, C_in]): method R1's view."""
        z = self._hidden_features(out_hw)
        k = self.kernel_net.out(z).unflatten(-1, (self.out_channels, self.in_channels))
        k = k * self._mask_over_window(k.dtype)[:, None, None]
        return k if dtype is None else k.to(dtype)

    def factored_kernel(self, out_hw, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Z, [W_L | b_L]) of design.md §2: Z has a ones column appended and the mask folded in."""
        z = self._hidden_features(out_hw)
        z = torch.cat([z, torch.ones_like(z[..., :1])], dim=-1)
        z = z * self._mask_over_window(z.dtype)[:, None]
        w_ext = self.kernel_net.extended_output_weight()
        if dtype is not None:
            z, w_ext = z.to(dtype), w_ext.to(dtype)
        return z, w_ext

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        k = self.kernel_size
        check_feature_map(
            x,
            layer=type(self).__name__,
            channels=self.in_channels * self.in_rotations,
            in_channels=self.in_channels,
            in_rotations=self.in_rotations,
            min_size=max(1, k - 2 * self.padding),
            param=self.kernel_net.first.weight,
        )
        name = dispatch.check_backend_name(backend) if backend is not None else self.backend
        out_hw = self.geometry.out_size(x.shape[-2], x.shape[-1])
        if name == "auto":
            name = dispatch.choose_backend(self, x)
        return dispatch.run(name, self, x, out_hw)

    def omegas(self) -> dict[str, float]:
        """This layer's frequencies as floats: {'rel': .., 'rot': .., 'pos': ..} (those present)."""
        return {k: float(v.detach()) for k, v in self.kernel_net.omegas().items()}

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"group_order={self.group_order}, padding={self.padding}, bias={self.bias is not None}"
        )
        if self.rotation_nonstationary:
            s += ", rotation_nonstationary=True"
        if self.translation_nonstationary:
            s += ", translation_nonstationary=True"
        return s + f", backend={self.backend!r}"


class LiftingConv(_RelaxedGroupConv):
    """Image ``[B, C_in, H, W]`` -> group feature map ``[B, C_out*N, H', W']`` on R^2 x| C_N.

    With ``group_order=1`` this is an ordinary (continuous-kernel) convolution on T(2).
    """

    _is_lifting = True


class GroupConv(_RelaxedGroupConv):
    """Group feature map ``[B, C_in*N, H, W]`` -> ``[B, C_out*N, H', W']`` (same N)."""


class PointwiseGroupConv(GroupConv):
    """1x1 group convolution: mixes channels and rotations at each pixel (residual shortcuts)."""

    def __init__(self, in_channels: int, out_channels: int, group_order: int, **kwargs):
        for banned in ("kernel_size", "padding"):
            if banned in kwargs:
                raise TypeError(f"PointwiseGroupConv has a fixed 1x1 window; do not pass {banned}")
        kwargs.setdefault("mask", False)
        super().__init__(in_channels, out_channels, 1, group_order, padding=0, **kwargs)


class InvariantPool(nn.Module):
    """Pool a group feature map ``[B, C*N, H, W]`` over rotations and/or space.

    over="all" -> ``[B, C]`` (invariant to rotations and translations), "rotation" ->
    ``[B, C, H, W]``, "space" -> ``[B, C*N]``. reduce is "max" or "mean".
    """

    def __init__(self, group_order: int, over: str = "all", reduce: str = "max"):
        super().__init__()
        self.group_order = check_positive_int("group_order", group_order)
        if over not in ("all", "rotation", "space"):
            raise ValueError(f"over must be 'all', 'rotation' or 'space', got {over!r}")
        if reduce not in ("max", "mean"):
            raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
        self.over, self.reduce = over, reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.group_order
        if x.dim() != 4 or x.shape[1] % n != 0:
            raise ValueError(
                f"InvariantPool: expected [B, C*{n}, H, W] (channel index c*N + n), got shape {tuple(x.shape)}"
            )
        red = (lambda t, d: t.amax(d)) if self.reduce == "max" else (lambda t, d: t.mean(d))
        if self.over == "space":
            return red(x, (-2, -1))
        g = x.unflatten(1, (x.shape[1] // n, n))
        if self.over == "rotation":
            return red(g, 2)
        return red(g, (2, 3, 4))

    def extra_repr(self) -> str:
        return f"group_order={self.group_order}, over={self.over!r}, reduce={self.reduce!r}"
