"""Degree of equivariance: the omegas of each layer, a prior toward equivariance, and measured errors.

Transformations used by the diagnostics (exact on the pixel grid):
- rotation by q quarter turns: ``torch.rot90`` of the spatial axes and, on a group feature map
  with N rotations, a cyclic shift of the rotation axis by q*N/4 (so N must make q*N/4 an
  integer: quarter turns need 4 | N, half turns 2 | N). Maps without a rotation axis (images,
  T(2) features, pooled vectors) have N = 1 and are only rotated spatially.
- translation by an integer shift: ``torch.roll``, compared away from the border where the
  wrap-around and the zero padding cannot reach.
"""
from __future__ import annotations

import math
import numbers

import torch


def _relaxed_layers(model):
    from .layers import _RelaxedGroupConv

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module (a relaxed layer or a model holding them), got {type(model).__name__}")
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _RelaxedGroupConv)]


def omegas(model) -> dict[str, dict[str, float]]:
    """Every relaxed layer's frequencies: ``{layer name: {'rel': .., 'rot': .., 'pos': ..}}``."""
    return {name or type(m).__name__: m.omegas() for name, m in _relaxed_layers(model)}


def effective_omegas(model) -> dict[str, dict[str, float]]:
    """Every non-stationary layer's effective non-stationarity: ``{layer: {'rot': .., 'pos': ..}}``.

    The scale of the absolute-coordinate modulation, ``|omega| * rms_h |u_h|`` (see
    :meth:`SirenKernelNet.effective_omegas`): with the kernel net's fixed unit directions it is
    ``|omega|``, the largest rate (radians of each hidden unit's pre-activation per radian of
    rotation, or per unit of normalised position) at which the kernel may vary with the absolute
    coordinate. No other parameter rescales it. Strict layers are left out.
    """
    out = {}
    for name, m in _relaxed_layers(model):
        eff = m.kernel_net.effective_omegas()
        if eff:
            out[name or type(m).__name__] = {k: float(v.detach()) for k, v in eff.items()}
    return out


def equivariance_penalty(model, strength: float = 1.0, p: int = 2) -> torch.Tensor:
    """``strength * sum_layers (eff_rot^p + eff_pos^p)``, eff = the effective omegas
    (:func:`effective_omegas`, here ``|omega_rot|`` and ``|omega_pos|``): a prior pulling toward
    strict equivariance, on a quantity that no other parameter can rescale (omega_rel, the
    smoothness of the stationary part, is not penalised). ``relaxedconv train`` uses p = 2 and
    ``strength = --omega-penalty`` (default 1e-3), i.e. a Gaussian prior on each omega.

    Add it to the training loss; it is differentiable in the learnable omegas.
    """
    # A negative strength would reward non-equivariance; p <= 0 is no prior toward omega = 0.
    # (A tensor strength, e.g. a schedule on the device, is taken as it is: checking it would sync.)
    if not isinstance(strength, torch.Tensor) and (
        isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength) or strength < 0
    ):
        raise ValueError(f"equivariance_penalty: strength must be a finite number >= 0, got {strength!r}")
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not p > 0:
        raise ValueError(f"equivariance_penalty: p must be a number > 0 (2: a Gaussian prior on each omega), got {p!r}")
    terms = []
    for _, m in _relaxed_layers(model):
        for w in m.kernel_net.effective_omegas().values():
            terms.append(w.pow(p))
    if not terms:
        dev = next((q.device for q in model.parameters()), torch.device("cpu"))
        return torch.zeros((), device=dev)
    return strength * torch.stack(terms).sum()


def omega_parameters(model) -> list[torch.nn.Parameter]:
    """The learnable frequencies of every relaxed layer (each once)."""
    seen, out = set(), []
    for _, m in _relaxed_layers(model):
        for w in m.kernel_net.omegas().values():
            if w.requires_grad and id(w) not in seen:
                seen.add(id(w))
                out.append(w)
    return out


def parameter_groups(model, *, lr: float, weight_decay: float = 0.0, omega_lr: float | None = None) -> list[dict]:
    """Optimiser groups: every trainable parameter at ``lr``/``weight_decay``, except the omegas,
    which get their own group at ``omega_lr`` (default ``lr``) and no weight decay (their prior
    is :func:`equivariance_penalty`). Empty groups are left out; each group has a ``name``.
    """
    om = {id(w) for w in omega_parameters(model)}
    rest = [q for q in model.parameters() if q.requires_grad and id(q) not in om]
    groups = []
    if rest:
        groups.append({"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "weights"})
    if om:
        groups.append({"params": omega_parameters(model), "lr": lr if omega_lr is None else omega_lr,
                       "weight_decay": 0.0, "name": "omegas"})
    return groups


@torch.no_grad()
def kernel_nonstationarity(model, out_hw=(9, 9)) -> dict[str, dict[str, float]]:
    """Per non-stationary layer, the fraction of its kernel's energy that changes with the absolute
    coordinate: ``{layer: {'rot': .., 'pos': ..}}``, each in [0, 1], 0 for a stationary kernel.

    The kernel net is evaluated on the relative lattice of output rotation 0 (offsets Delta/r,
    input rotations theta') at every absolute rotation theta_n of the layer's grid (and at the
    positions of an ``out_hw`` map); 'rot' is ``sum |k - mean_n k|^2 / sum |k|^2`` over the disk
    mask, the mean taken over theta_n ('pos': over positions). Unlike omega, this is a property
    of the function the layer computes (W_L included): a measured, not a parameterised, degree.
    Computed from the hidden features z and G = [W_L|b_L]^T [W_L|b_L] (``|k|^2 = z^T G z``), so the
    per-position kernel is never built.
    """
    from .groups import coordinate_groups, output_positions, rotation_angles

    out = {}
    for name, m in _relaxed_layers(model):
        net = m.kernel_net
        eff = net.effective_omegas()
        if not eff:
            continue
        w = net.first.weight
        coords = coordinate_groups(
            out_rotations=1, in_rotations=None if m._is_lifting else m.in_rotations, kernel_size=m.kernel_size,
            out_size=None, rotation_nonstationary=False, device=w.device, dtype=w.dtype,
        )
        if "abs_rot" in net.absolute_groups:
            theta = rotation_angles(m.group_order, device=w.device, dtype=w.dtype)
            coords["abs_rot"] = torch.stack([torch.cos(theta), torch.sin(theta)], -1)[:, None, None, None]
        if "abs_pos" in net.absolute_groups:
            coords["abs_pos"] = output_positions(*out_hw, device=w.device, dtype=w.dtype)[None, :, None, None]
        z = net.hidden(coords)  # [N or 1, P or 1, N_in or 1, K*K, H]
        z = torch.cat([z, torch.ones_like(z[..., :1])], -1)
        z = z * m._mask_over_window(z.dtype)[: m.kernel_size**2, None]  # the mask multiplies k = W_ext z
        w_ext = net.extended_output_weight().flatten(0, 1).to(z.dtype)  # [C_out*C_in, H+1]
        gram = w_ext.t() @ w_ext
        energy = lambda t: float(((t @ gram) * t).sum())  # noqa: E731  sum over coordinates of |W_ext t|^2
        shape = torch.broadcast_shapes(*(c.shape[:-1] for c in coords.values())) + z.shape[-1:]
        z = z.expand(shape)
        total = max(energy(z), 1e-30)
        res = {}
        for axis, key in ((0, "rot"), (1, "pos")):
            if key in eff:
                res[key] = energy(z - z.mean(axis, keepdim=True)) / total if z.shape[axis] > 1 else 0.0
        out[name or type(m).__name__] = res
    return out


def rotate_feature_map(t: torch.Tensor, quarter_turns: int, rotations: int) -> torch.Tensor:
    """Rotate ``[B, C*R, H, W]`` (or a pooled ``[B, C*R]``) by ``quarter_turns`` * 90 degrees."""
    steps = quarter_turns * rotations
    if rotations > 1 and steps % 4:
        raise ValueError(f"{quarter_turns} quarter turn(s) is not an element of C_{rotations}")
    if t.dim() == 4:
        t = torch.rot90(t, quarter_turns, dims=(-2, -1))
    if rotations > 1:
        g = t.unflatten(1, (t.shape[1] // rotations, rotations))
        t = torch.roll(g, steps // 4, dims=2).flatten(1, 2)
    return t


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / (b.norm() + 1e-30))


@torch.no_grad()
def equivariance_error(
    fn,
    x: torch.Tensor,
    *,
    in_rotations: int = 1,
    out_rotations: int = 1,
    shifts=((1, 0), (0, 1), (-1, -1)),
    margin: int = 0,
) -> dict[str, float]:
    """Relative equivariance errors ``||f(Tx) - T'f(x)|| / ||T'f(x)||`` of ``fn`` at ``x``.

    Keys: ``rotation_90``, ``rotation_180``, ``rotation_270`` (those that are group elements for
    both the input's and the output's rotation counts) and ``translation`` (largest over
    ``shifts``; only when the output is a spatial map, compared ``margin + |shift|`` pixels away
    from the border: pass as ``margin`` how far zero padding reaches into the output, i.e. the
    sum of the paddings of ``fn``'s layers).
    """
    y = fn(x)
    errors: dict[str, float] = {}
    for q in (1, 2, 3):
        if (in_rotations > 1 and (q * in_rotations) % 4) or (out_rotations > 1 and (q * out_rotations) % 4):
            continue
        errors[f"rotation_{90 * q}"] = _rel_err(
            fn(rotate_feature_map(x, q, in_rotations)), rotate_feature_map(y, q, out_rotations)
        )
    if y.dim() == 4 and shifts:
        worst = 0.0
        for dy, dx in shifts:
            a = fn(torch.roll(x, (dy, dx), dims=(-2, -1)))
            b = torch.roll(y, (dy, dx), dims=(-2, -1))
            m = margin + max(abs(dy), abs(dx))
            if 2 * m >= min(y.shape[-2:]):
                raise ValueError(
                    f"the output {tuple(y.shape[-2:])} is too small to compare a shift of {(dy, dx)} "
                    f"{margin} pixels away from the border; use a larger input"
                )
            crop = (..., slice(m, y.shape[-2] - m), slice(m, y.shape[-1] - m))
            worst = max(worst, _rel_err(a[crop], b[crop]))
        errors["translation"] = worst
    return errors


@torch.no_grad()
def layer_equivariance_errors(model, x: torch.Tensor, **kwargs) -> dict[str, dict[str, float]]:
    """Each relaxed layer's own equivariance error, on the input it receives when ``model(x)`` runs.

    A layer whose output is too small to compare shifts away from the border (deep layers after
    pooling) gets ``translation: None``.
    """
    inputs = {}

    def capture(name):
        def hook(module, args, output):
            inputs.setdefault(name, args[0])  # returns None: a hook's return would replace the output

        return hook

    hooks = [m.register_forward_hook(capture(name)) for name, m in _relaxed_layers(model)]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        model(x)
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes:  # each submodule's own mode (a frozen BatchNorm stays frozen)
            m.train(mode)
    out = {}
    shifts = kwargs.pop("shifts", ((1, 0), (0, 1), (-1, -1)))
    for name, m in _relaxed_layers(model):
        if name not in inputs:
            continue
        x_in = inputs[name]
        # Zero padding reaches `padding` pixels into the output (K//2 for 'same').
        margin = m.padding
        reach = margin + max((max(abs(a), abs(b)) for a, b in shifts), default=0)
        fits = 2 * reach < min(m.geometry.out_size(x_in.shape[-2], x_in.shape[-1]))
        errors = equivariance_error(
            m,
            x_in,
            in_rotations=m.in_rotations,
            out_rotations=m.group_order,
            margin=margin,
            shifts=shifts if fits else (),
            **kwargs,
        )
        if shifts and not fits:
            errors["translation"] = None  # the map is too small to compare away from the border
        out[name or type(m).__name__] = errors
    return out
