"""Relaxed group convolution layers (design.md §1): lifting, group, pointwise, invariant pooling.

Feature maps on G = R^2 x| C_N are ``[B, C*N, H, W]`` with channel index ``c*N + n``.
``in_channels``/``out_channels`` count channels *per rotation* (C, not C*N).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import dispatch, functional, fused_kernel_net
from .amp import autocast_dtype
from .groups import coordinate_groups, disk_mask
from .kernel_net import SirenKernelNet
from .reference import ConvGeometry
from .validation import (
    LATTICE_FIELDS,
    LATTICE_STATE_VERSION,
    check_feature_map,
    check_kernel_size,
    check_lattice_state,
    check_omegas,
    check_positive_int,
    resolve_padding,
)

# A translation non-stationary layer recomputes its kernel net in backward (activation
# checkpointing) when one [N, P, J, H] activation reaches this size: T2-b64-32px (411 MB in fp32)
# does, T1 (6 MB) and T2 (103 MB) keep their activations and skip the recomputation's operators.
CHECKPOINT_BYTES = 256 * 2**20

# Under autocast the PyTorch kernel net runs in its parameters' dtype (fp32) below this many
# [N, P, J, H] hidden values, in autocast's mix of 16-bit products and activations from it on.
# Below, fp32's extra bytes cost less than autocast's casts (of each weight, the coordinates and
# each layer's input, forward and back: ~8-11 launches per layer step, ~10 µs of host time each on
# the H200's host, for a layer whose step is host time): every stationary layer (SE(2)-8 at K = 7:
# 0.1 M values) and T1 (1.6 M). From it on the passes dominate: T2 (26 M), where fp32 would double
# ~10 passes' bytes.
AUTOCAST_KERNEL_NET_MIN_VALUES = 1 << 23


class _OnesColumn(torch.autograd.Function):
    """``[z * m | m]``: the hidden features with the window mask folded in and the constant feature
    that carries b_L appended (``m`` = 1 without a mask), written once into the [..., H+1] result.

    As ``F.pad`` then a multiply it took two passes over the [N, (P,) J, H+1] tensor forward (T2:
    26.5 M values) and two backward (the multiply's, then the pad's slice copy); here one forward,
    and backward one (the mask) or none (a view of the incoming gradient)."""

    @staticmethod
    def forward(ctx, z, mask):
        out = z.new_empty((*z.shape[:-1], z.shape[-1] + 1))
        if mask is None:
            out[..., :-1].copy_(z)
            out[..., -1].fill_(1.0)
        else:
            torch.mul(z, mask[:, None], out=out[..., :-1])
            out[..., -1].copy_(mask)
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        dz = grad[..., :-1]
        return (dz if mask is None else dz * mask[:, None]), None


# From this many elements of z on, the saved passes outweigh the Function's extra dispatched
# operators (an allocation, views, a column write: ~4 more per call, ~10 µs of host time each on
# the H200's host): T2's 26.5 M values, not T1's 1.7 M (host-bound) nor a stationary layer's 0.1 M.
ONES_COLUMN_FUSED_MIN = 1 << 22


def ones_column(z: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[z * mask | mask]`` over the last axis (``mask`` over the window axis, -2; 1 when None)."""
    if torch.compiler.is_compiling() or z.numel() < ONES_COLUMN_FUSED_MIN:
        # Fewer operators for a small z; under compile Inductor fuses these into one kernel itself.
        z = F.pad(z, (0, 1), value=1.0)
        return z if mask is None else z * mask[:, None]
    return _OnesColumn.apply(z, mask)


# nn.Conv2d's options a layer swapped in for one may still pass: accepted at the value that is the
# only one the relaxed layers compute, refused otherwise with what to do instead (device= and
# dtype= are honoured).
_CONV2D_OPTIONS = {
    "stride": (1, "the relaxed layers have no stride; follow the layer with a pooling layer (nn.MaxPool2d(2)), as the models do"),
    "dilation": (1, "the relaxed layers have no dilation; use a larger kernel_size (the kernel is continuous, so it costs no parameters)"),
    "groups": (1, "grouped convolution is not supported"),
    "padding_mode": ("zeros", "only zero padding is supported"),
}


def _check_conv2d_options(layer: str, options: dict) -> None:
    for name, value in options.items():
        if name not in _CONV2D_OPTIONS:
            raise TypeError(f"{layer}() got an unexpected keyword argument {name!r}")
        default, why = _CONV2D_OPTIONS[name]
        same = value == default or (isinstance(value, (tuple, list)) and all(v == default for v in value))
        if not same:
            raise ValueError(f"{layer}: {name}={value!r} is not supported: {why}")


class _RelaxedGroupConv(nn.Module):
    """Shared machinery: coordinates -> kernel net -> one of the backends of design.md §3."""

    _is_lifting = False
    last_backend: str | None = None  # the backend of the latest eager call (what "auto" resolved to)
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
        **conv2d_options,
    ):
        super().__init__()
        factory = {k: v for k in ("device", "dtype") if (v := conv2d_options.pop(k, None)) is not None}
        _check_conv2d_options(type(self).__name__, conv2d_options)
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
        omega_rel, omega_rot, omega_pos = check_omegas(
            type(self).__name__,
            omega_rel=omega_rel,
            omega_rot=omega_rot,
            omega_pos=omega_pos,
            rotation_nonstationary=self.rotation_nonstationary,
            translation_nonstationary=self.translation_nonstationary,
        )
        # kept for reset_parameters(): the frequencies are parameters, re-initialised to these
        self._initial_omegas = {"rel": omega_rel, "rot": omega_rot, "pos": omega_pos}
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
        self.bias = nn.Parameter(torch.empty(self.out_channels)) if bias else None
        self._init_to_conv2d_scale()
        if factory:  # nn.Conv2d's device=/dtype= (initialised as above, then moved)
            self.to(**factory)

    # ---- initialisation -------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Initialise every parameter as the constructor does: the SIREN's layers, the omegas at
        their initial values, the output layer and bias at nn.Conv2d's scale.

        A layer built under ``torch.device("meta")`` has no values; after ``layer.to_empty(device=...)``
        call this (or load a state_dict; ``load_state_dict(sd, assign=True)`` also works on the meta
        layer directly). A loop that resets every submodule must reach this layer after its kernel
        net's ``nn.Linear`` layers, e.g. ``for m in reversed(list(model.modules()))``."""
        kn = self.kernel_net
        with torch.no_grad():
            for name, param in kn.omegas().items():
                param.fill_(self._initial_omegas[name])
            kn._siren_init(kn.first.in_features)
        self._init_to_conv2d_scale()

    def _init_to_conv2d_scale(self) -> None:
        """Give the generated kernel nn.Conv2d's default variance 1/(3*fan_in).

        k = W_L z with W_L ~ U(-a, a) has E[k^2] = (a^2/3) * H * E[z^2]; E[z^2] is measured on this
        layer's own lattice (it depends on the omegas), so a^2 = 1/(fan_in * H * E[z^2]).
        """
        if self.kernel_net.first.weight.is_meta:
            return  # deferred: a meta layer has nothing to measure; reset_parameters() after to_empty()
        fan_in = self.in_channels * self.in_rotations * self.kernel_size**2
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

    # ---- the lattice (constant per layer, device, dtype and output size) -------------------------
    _LATTICE_CACHE_SIZE = 8

    def _cache(self, name: str) -> dict:
        # A plain attribute, not a buffer: it never enters the state_dict (the same in train and
        # eval), follows the module to any device or dtype because entries are keyed by them, and
        # needs no re-initialisation after meta-device construction.
        cache = self.__dict__.get(name)
        if cache is None:
            cache = self.__dict__[name] = {}
        return cache

    def _remember(self, key, value):
        cache = self._cache("_lattice_cache")
        if not torch.compiler.is_compiling():  # a compiled graph keeps its own constants
            if len(cache) >= self._LATTICE_CACHE_SIZE:
                cache.clear()
            cache[key] = value
        return value

    def _lattice(self, out_hw, device, dtype) -> dict:
        """The coordinate groups on ``device`` in ``dtype``: built once per layer, device, dtype and
        (translation non-stationary only) output size, then reused."""
        key = ("coords", device, dtype, tuple(out_hw) if self.translation_nonstationary else None, self.angle_offset)
        hit = self._cache("_lattice_cache").get(key)
        if hit is not None:
            return hit
        # Constants: never inference tensors (a first call under inference_mode must not leave
        # tensors that a later training step cannot save for backward).
        with torch.inference_mode(False):
            lattice = coordinate_groups(
                out_rotations=self.group_order,
                in_rotations=None if self._is_lifting else self.in_rotations,
                kernel_size=self.kernel_size,
                out_size=tuple(out_hw) if self.translation_nonstationary else None,
                rotation_nonstationary=self.rotation_nonstationary,
                angle_offset=self.angle_offset,
                device=device,
                dtype=dtype,
            )
        return self._remember(key, lattice)

    def _window_mask(self, device, dtype):
        """The disk mask over the im2col window (n', kh, kw), [J]; None when the layer has none."""
        if not self.mask:
            return None
        key = ("mask", device, dtype)
        hit = self._cache("_lattice_cache").get(key)
        if hit is not None:
            return hit
        with torch.inference_mode(False):  # a constant, as the lattice (_lattice)
            mask = disk_mask(self.kernel_size, device=device, dtype=dtype).repeat(self.in_rotations)
        return self._remember(key, mask)

    # ---- the kernel --------------------------------------------------------------------------
    def _mask_over_window(self, dtype) -> torch.Tensor:
        """[J] mask over the im2col window (n', kh, kw)."""
        device = self.kernel_net.first.weight.device
        mask = self._window_mask(device, dtype)
        return torch.ones(self.in_rotations * self.kernel_size**2, device=device, dtype=dtype) if mask is None else mask

    def _hidden_values(self, out_hw) -> int:
        """Values of one [N, P, J, H] activation of the kernel net (P = 1 when stationary)."""
        p = out_hw[0] * out_hw[1] if self.translation_nonstationary else 1
        return self.group_order * p * self.in_rotations * self.kernel_size**2 * self.kernel_net.hidden_channels

    def _hidden_bytes(self, out_hw) -> int:
        """Bytes of one [N, P, J, H] activation of the kernel net."""
        return self._hidden_values(out_hw) * self.kernel_net.first.weight.element_size()

    def _hidden_features(self, out_hw) -> torch.Tensor:
        """Hidden features z on the lattice: [N, J, H], or [N, P, J, H] when translation non-stationary."""
        w = self.kernel_net.first.weight
        coords = self._lattice(out_hw, w.device, w.dtype)
        net = self.kernel_net
        large = self.translation_nonstationary and torch.is_grad_enabled() and self._hidden_bytes(out_hw) >= CHECKPOINT_BYTES
        # A split depth-3 net keeps little (eager only: compiled, the split is plain operators and
        # the partitioner would keep its product).
        if large and (torch.compiler.is_compiling() or len(net.hidden_layers) != 1 or not net.splits_position(coords)):
            # Per-position features are N*P*J*H values; keeping only them (not every SIREN layer's
            # activations) and recomputing the SIREN in backward costs ~2% of the layer's FLOPs,
            # but its ~30 more operators cost host time (~10 us each on a GPU host): only worth it
            # where the activations are large.
            z = checkpoint(net.hidden, coords, use_reentrant=False)
        else:
            # A depth-3 net split by angle addition (eager) keeps one such tensor (its product)
            # or, when large, recomputes only that product: no checkpoint's full recomputation.
            z = net.hidden(coords, keep_product=not large)
        n, k2, h = self.group_order, self.kernel_size**2, z.shape[-1]
        p = out_hw[0] * out_hw[1] if self.translation_nonstationary else 1
        full = (n, p, self.in_rotations, k2, h)
        if tuple(z.shape) != full:  # the coordinate groups' broadcast normally covers every axis already
            z = z.expand(full)
        if self.translation_nonstationary:
            return z.reshape(n, p, self.in_rotations * k2, h)
        return z.reshape(n, self.in_rotations * k2, h)

    def full_kernel(self, out_hw, dtype=None) -> torch.Tensor:
        """The full masked kernel, [N, J, C_out, C_in] (or [N, P, J, C_out, C_in]): method R1's view."""
        z = self._hidden_features(out_hw)
        k = self.kernel_net.out(z).unflatten(-1, (self.out_channels, self.in_channels))
        k = k * self._mask_over_window(k.dtype)[:, None, None]
        return k if dtype is None else k.to(dtype)

    def factored_kernel(self, out_hw, dtype=None, compute_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Z, [W_L | b_L]) of design.md §2: Z has a ones column appended and the mask folded in.
        ``compute_dtype``: the dtype the convolution will run in (sets the fused kernel net's
        product precision, ``fused_kernel_net.products_for``)."""
        # Opt-in (RELAXEDCONV_FUSED_KERNEL_NET=1): the whole of z in one Triton kernel; None here
        # means the PyTorch path below (flag unset, or the layer/device unsupported).
        z = fused_kernel_net.layer_factor(self, out_hw, compute_dtype)
        if z is None:
            with self._kernel_net_precision(out_hw):
                z = self._hidden_features(out_hw)
                z = ones_column(z, self._window_mask(z.device, z.dtype))
        w_ext = self.kernel_net.extended_output_weight()
        if dtype is not None:
            z, w_ext = z.to(dtype), w_ext.to(dtype)
        return z, w_ext

    def _kernel_net_precision(self, out_hw):
        """Under autocast, a PyTorch kernel net of fewer than :data:`AUTOCAST_KERNEL_NET_MIN_VALUES`
        hidden values runs in the parameters' dtype: every stationary layer (N*J*H: 100 K at
        SE(2)-8, K = 7) and T1 (1.6 M), where fp32 costs next to no device time while autocast's
        casts of every weight, of the coordinates and of each layer's input were ~9 of a stationary
        layer's ~45 launches forward and backward (issue 13). The factors then go to the backend
        in fp32, which casts them once (its own product or packing copy). A larger net (T2: 26 M)
        stays under autocast, where the 16-bit products and activations halve its bytes."""
        dev = self.kernel_net.first.weight.device.type
        if autocast_dtype(dev) is None:
            return contextlib.nullcontext()
        if self._hidden_values(out_hw) >= AUTOCAST_KERNEL_NET_MIN_VALUES:
            return contextlib.nullcontext()
        return torch.autocast(dev, enabled=False)

    # ---- inference: the generated kernel cached until a parameter changes ----------------------
    def _parameter_state(self) -> tuple | None:
        """Changes whenever a parameter or buffer does (the kernel net's fixed direction buffers
        too): in place (its version counter: optimiser steps, load_state_dict, ``p.add_``),
        replaced, or moved to another device or dtype; and with the rotation-grid offset. None when
        one is an inference tensor (made under ``torch.inference_mode``): it has no version counter,
        so a change could not be seen and nothing is cached; None too inside a torch.func
        transform (functional_call under vmap or grad).

        Read from the modules' parameter and buffer dicts directly (found once, and again when a
        submodule is replaced): a replaced tensor
        is a new entry there, and walking ``self.parameters()`` would cost more than the cached call."""
        found = self.__dict__.get("_parameter_slots")
        # A replaced or added submodule (``layer.kernel_net.out = nn.Linear(...)``, another kernel
        # net, a parametrization registered on a weight) or a newly registered tensor has dicts or
        # names of its own: look the slots up again, and drop what was cached from the old ones.
        # (A tensor dict's entries are seen through the state below; its size shows one added.)
        if found is None or any(tuple(d.values()) != seen for d, seen in found[1]) or any(
            len(d) != n for d, n in found[2]
        ):
            if found is not None:
                self._cache("_inference_cache").clear()
            modules = list(self.modules())
            found = self.__dict__["_parameter_slots"] = (
                [(d, n) for m in modules for d in (m._parameters, m._buffers) for n in d],
                [(m._modules, tuple(m._modules.values())) for m in modules],
                [(d, len(d)) for m in modules for d in (m._parameters, m._buffers)],
            )
        # Inside a torch.func transform the parameters may be its tensors (vmap over stacked
        # ensemble parameters), which have no storage to point at; a kernel kept from them would
        # escape the transform. (One check per call: cheaper than asking each tensor.)
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return None
        tensors = [p for d, n in found[0] if (p := d.get(n)) is not None]
        if any(p.is_inference() for p in tensors):
            return None
        return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in tensors) + (self.angle_offset,)

    def _kernel_needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    def clear_kernel_cache(self) -> None:
        """Drop the cached inference kernel (it is rebuilt on the next no-grad call) and the kernel
        net's scaled coordinates (kept for training calls too): what to call after writing to a
        parameter through ``.data``, which no version counter records."""
        self._cache("_inference_cache").clear()
        self.kernel_net.__dict__.pop("_coordinate_cache", None)

    def _cached_operands(self, name: str, x: torch.Tensor, out_hw):
        """(backend, operands) for a call that needs no gradient to the parameters: the factors and
        what the backend builds from them are kept until a parameter changes. None where a change
        could not be seen (parameters made under inference_mode): the caller computes them afresh."""
        cache = self._cache("_inference_cache")
        parameters = self._parameter_state()
        if parameters is None:
            cache.clear()
            return None
        # Under autocast a large kernel net runs in the autocast dtype and the backends cast their
        # operands to it: what a call inside an autocast region keeps is not what a call outside
        # it computes (nor the dtype its operators accept).
        # A translation-relaxed layer keeps one output size at a time: Z alone is N*P*J*(H+1) values
        # per size (424 MB for T2 at 32x32), and kept per size the cache grew without bound under
        # inputs of varying size.
        size = tuple(out_hw) if self.translation_nonstationary else None
        state = (parameters, torch.is_inference_mode_enabled(), autocast_dtype(x.device.type), size)
        if cache.get("state") != state:
            cache.clear()
            cache["state"] = state
        dtype = dispatch.compute_dtype(x)
        # The fused kernel net's products follow the compute dtype and torch's TF32 setting, so its
        # factors are kept per choice (the same as a grad-enabled or compiled call computes).
        products = fused_kernel_net.products_for(dtype) if fused_kernel_net.enabled() else None
        fkey = ("factors", products)
        if fkey not in cache:
            with torch.no_grad():
                cache[fkey] = self.factored_kernel(out_hw, compute_dtype=dtype)
        z, w_ext = cache[fkey]
        g = self.geometry
        name = dispatch.resolve(name, x, z, w_ext, self.bias, g, where=type(self).__name__)
        okey = ("operands", name, dtype, products)
        if okey not in cache:
            with torch.no_grad():
                cache[okey] = functional.prepare_backend(name, z, w_ext, self.bias, g, dtype)
        return name, cache[okey]

    # ---- forward -----------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor, where: str | None = None) -> None:
        """The error the layer gives an input it cannot take (``where`` names the caller)."""
        check_feature_map(
            x,
            layer=where or type(self).__name__,
            channels=self.in_channels * self.in_rotations,
            in_channels=self.in_channels,
            in_rotations=self.in_rotations,
            min_size=max(1, self.kernel_size - 2 * self.padding),
            param=self.kernel_net.first.weight,
        )

    def forward(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        self._check_input(x)
        name = dispatch.check_backend_name(backend) if backend is not None else self.backend
        g = self.geometry
        out_hw = g.out_size(x.shape[-2], x.shape[-1])
        cached = None
        # A replica made by nn.DataParallel holds its parameters as plain attributes (its
        # parameters() is empty, so the kernel would look gradient-free even in training) and shares
        # the original's cache dicts: it computes its kernel afresh every call and keeps nothing.
        replica = self.__dict__.get("_is_replica", False)
        if not torch.compiler.is_compiling() and not replica and not self._kernel_needs_grad():
            cached = self._cached_operands(name, x, out_hw)
        if cached is not None:
            name, operands = cached
        else:
            if not replica and self.__dict__.get("_inference_cache"):
                self._cache("_inference_cache").clear()  # training again: do not hold a stale kernel
            compute = dispatch.compute_dtype(x)
            z, w_ext = self.factored_kernel(out_hw, compute_dtype=compute)
            name = dispatch.resolve(name, x, z, w_ext, self.bias, g, where=type(self).__name__)
            operands = functional.prepare_backend(name, z, w_ext, self.bias, g, compute)
        self._note_backend(name)
        return functional.apply_backend(name, x, operands, g)

    def _note_backend(self, name: str) -> None:
        """Remember which backend ran (reported by the trainer and the benchmark)."""
        if not torch.compiler.is_compiling():
            self.__dict__["last_backend"] = name  # a plain attribute; skips nn.Module.__setattr__

    # ---- state_dict: the lattice record ------------------------------------------------------
    def get_extra_state(self) -> dict:
        """What defines the lattice the kernel net is evaluated on (plain ints and bools).

        The parameters' shapes do not depend on the kernel size, group order, padding, mask or
        which absolute coordinates the kernel sees beyond the input width, so this record is what
        lets :meth:`load_state_dict` refuse weights saved from another lattice."""
        return {"version": LATTICE_STATE_VERSION, "lattice": {k: getattr(self, k) for k in LATTICE_FIELDS}}

    def set_extra_state(self, state) -> None:
        check_lattice_state(type(self).__name__, state, self.get_extra_state())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state_dict saved before the lattice was recorded (relaxedconv 0.1.0) has no
        # _extra_state: load it as before, unchecked, rather than fail on a missing key.
        state_dict.setdefault(prefix + "_extra_state", self.get_extra_state())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def omegas(self) -> dict[str, float]:
        """This layer's frequencies as floats: {'rel': .., 'rot': .., 'pos': ..} (those present)."""
        return {k: float(v.detach()) for k, v in self.kernel_net.omegas().items()}

    def export(self, input_size=None, form: str = "auto") -> nn.Module:
        """This layer as plain PyTorch (``nn.Conv2d`` when translation-stationary, else a fixed-size
        per-position module for inputs of ``input_size``): :func:`relaxedconv.export_layer`."""
        from .export import export_layer

        return export_layer(self, input_size, form)

    # Rebuilt on demand, never saved: torch.save(model) or copy.deepcopy(model) after one no-grad
    # forward carried every cached kernel along (a small se2_trans model: 0.3 MB -> 295 MB).
    _TRANSIENT = ("_inference_cache", "_lattice_cache", "_parameter_slots")

    def __getstate__(self):
        state = super().__getstate__()  # nn.Module's: a copy of __dict__
        for name in self._TRANSIENT:
            state.pop(name, None)
        return state

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule first; without it, scripting failed deep
        # in type inference of the lattice cache with a dump of its tensors.
        raise TypeError(
            f"torch.jit.script cannot compile {type(self).__name__}: its kernel net, caches and backend "
            "choice are Python. Use torch.compile, torch.jit.trace (fixed input size), or for deployment "
            "relaxedconv.export(model, input_size) (plain PyTorch modules; ONNX from there)"
        )

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


def backends_used(model: nn.Module) -> dict[str, str | None]:
    """``{layer name: backend}`` of every relaxed layer's latest call (None: not called yet)."""
    return {name or type(m).__name__: m.last_backend for name, m in model.named_modules()
            if isinstance(m, _RelaxedGroupConv)}


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
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"InvariantPool: expected a torch.Tensor, got {type(x).__name__}")
        if self.reduce == "mean" and not (x.is_floating_point() or x.is_complex()):
            raise TypeError(f"InvariantPool: reduce='mean' needs a floating-point input, got {x.dtype}; convert it with x.float()")
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

    def export(self) -> nn.Module:
        """This pooling as plain PyTorch (``relaxedconv.deploy.RotationSpacePool``)."""
        from .export import export_layer

        return export_layer(self)

    def extra_repr(self) -> str:
        return f"group_order={self.group_order}, over={self.over!r}, reduce={self.reduce!r}"
