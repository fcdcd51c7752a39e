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

import torch


def _relaxed_layers(model):
    from .layers import _RelaxedGroupConv

    return [(n, m) for n, m in model.named_modules() if isinstance(m, _RelaxedGroupConv)]


def omegas(model) -> dict[str, dict[str, float]]:
    """Every relaxed layer's frequencies: ``{layer name: {'rel': .., 'rot': .., 'pos': ..}}``."""
    return {name or type(m).__name__: m.omegas() for name, m in _relaxed_layers(model)}


def equivariance_penalty(model, strength: float = 1.0, p: int = 2) -> torch.Tensor:
    """``strength * sum |omega_rot|^p + |omega_pos|^p`` over all layers: a prior pulling toward
    strict equivariance (omega_rel, the smoothness of the stationary part, is not penalised).

    Add it to the training loss; it is differentiable in the learnable omegas.
    """
    terms = []
    for _, m in _relaxed_layers(model):
        for key, w in m.kernel_net.omegas().items():
            if key in ("rot", "pos"):
                terms.append(w.abs().pow(p))
    if not terms:
        dev = next((q.device for q in model.parameters()), torch.device("cpu"))
        return torch.zeros((), device=dev)
    return strength * torch.stack(terms).sum()


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
