"""Rotation groups C_N and the coordinate lattices the kernel net is evaluated on (design.md §1).

Spatial coordinates use the chart (x, y) = (column offset, -row offset) / r, i.e. x to the right
and y up as an image is displayed. In this chart ``torch.rot90(img, 1, dims=(-2, -1))`` is the
rotation R(+pi/2), which is what makes the layers exactly equivariant to ``rot90`` for N = 4.

Every coordinate group is returned with shape broadcastable to ``[N, P, N_in, K*K, 2]``
(output rotation, output position, input rotation, kernel offset, (cos/x, sin/y)), so the first
layer of the kernel net can be evaluated group by group and summed by broadcasting instead of
building the full coordinate tensor.
"""
from __future__ import annotations

import math

import torch


def rotation_angles(order: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Angles theta_n = 2*pi*n/N of the cyclic group C_N, shape [N]."""
    if order < 1:
        raise ValueError(f"group order must be >= 1, got {order}")
    return torch.arange(order, device=device, dtype=dtype) * (2 * math.pi / order)


def kernel_offsets(kernel_size: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Offsets Delta/r of a K x K window in the (x, y) chart, shape [K*K, 2], row-major (kh, kw).

    For K = 1 the single offset is 0 (there is no radius to normalise by).
    """
    r = kernel_size // 2
    idx = torch.arange(kernel_size, device=device, dtype=dtype) - r
    scale = 1.0 / r if r > 0 else 0.0
    dy_rows, dx_cols = torch.meshgrid(idx, idx, indexing="ij")
    return torch.stack([dx_cols * scale, -dy_rows * scale], dim=-1).reshape(-1, 2)


def disk_mask(kernel_size: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """1 where |Delta/r| <= 1, else 0; shape [K*K]. Rotation-invariant, so it keeps equivariance."""
    off = kernel_offsets(kernel_size, device=device, dtype=torch.float64)
    inside = off.pow(2).sum(-1) <= 1.0 + 1e-9
    return inside.to(dtype=dtype, device=device)


def output_positions(height: int, width: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Output pixel positions normalised to [-1, 1]^2 in the (x, y) chart, shape [H*W, 2]."""
    def lin(n):
        if n == 1:
            return torch.zeros(1, device=device, dtype=dtype)
        return torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype)

    rows, cols = torch.meshgrid(lin(height), lin(width), indexing="ij")
    return torch.stack([cols, -rows], dim=-1).reshape(-1, 2)


def _cos_sin(angle: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)


def coordinate_groups(
    *,
    out_rotations: int,
    in_rotations: int | None,
    kernel_size: int,
    out_size: tuple[int, int] | None,
    rotation_nonstationary: bool,
    angle_offset: float = 0.0,
    device=None,
    dtype=torch.float32,
) -> dict[str, torch.Tensor]:
    """The coordinates of §1 for one layer, keyed by frequency group.

    Returns ``{"rel_pos": ..., "rel_rot": ..., "abs_rot": ..., "abs_pos": ...}`` (only the groups
    that are present), each broadcastable to ``[N, P, N_in, K*K, 2]``:

    - ``rel_pos = R(-theta) Delta/r``               shape [N, 1, 1, K*K, 2]
    - ``rel_rot = (cos, sin)(theta' - theta)``      shape [N, 1, N_in, 1, 2]  (group conv only:
      ``in_rotations`` not None)
    - ``abs_rot = (cos, sin)(theta)``               shape [N, 1, 1, 1, 2]  (rotation non-stationary)
    - ``abs_pos = p`` normalised to [-1, 1]^2        shape [1, P, 1, 1, 2]  (``out_size`` given)

    ``angle_offset`` shifts both angle grids (theta_n + offset): the Monte-Carlo rotation grid of
    the authors' runs, one offset shared by every layer of a network per forward, so rel_rot is
    unchanged and rel_pos/abs_rot turn with the grid.
    """
    theta = rotation_angles(out_rotations, device=device, dtype=torch.float64) + float(angle_offset)
    off = kernel_offsets(kernel_size, device=device, dtype=torch.float64)  # [K2, 2]
    c, s = torch.cos(theta), torch.sin(theta)
    # R(-theta) = [[c, s], [-s, c]]
    rx = c[:, None] * off[None, :, 0] + s[:, None] * off[None, :, 1]
    ry = -s[:, None] * off[None, :, 0] + c[:, None] * off[None, :, 1]
    groups = {"rel_pos": torch.stack([rx, ry], dim=-1)[:, None, None]}
    if in_rotations is not None:
        theta_in = rotation_angles(in_rotations, device=device, dtype=torch.float64) + float(angle_offset)
        groups["rel_rot"] = _cos_sin(theta_in[None, :] - theta[:, None])[:, None, :, None]
    if rotation_nonstationary:
        groups["abs_rot"] = _cos_sin(theta)[:, None, None, None]
    if out_size is not None:
        pos = output_positions(*out_size, device=device, dtype=torch.float64)
        groups["abs_pos"] = pos[None, :, None, None]
    return {k: v.to(dtype) for k, v in groups.items()}
