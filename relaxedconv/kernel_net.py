"""The continuous kernel: a SIREN whose inputs are scaled by per-group frequencies.

    pre = W_rel [w_rel*rel_pos, w_rel*rel_rot] + b_1                 (learned W_rel, b_1)
          + w_rot * (U_rot abs_rot) + w_pos * (U_pos abs_pos)        (fixed unit rows U)
    z   = sin(W_{L-1} ... sin(pre) ... + b_{L-1})                    hidden features, width H
    k   = W_L z + b_L                                                C_out*C_in values

Why the absolute coordinates get *fixed* first-layer weights (issue 11): if the columns that
multiply ``abs_rot``/``abs_pos`` were learned, scaling w_rot by s and those columns by 1/s would
leave every output unchanged, so w_rot would say nothing by itself and a penalty on it would be
no prior at all. Here each hidden unit h sees the absolute coordinates through a fixed unit
vector u_h = (cos phi_h, sin phi_h) (a persistent buffer, so one ``state_dict`` holds it):

    abs_rot:  w_rot * u_h . (cos theta, sin theta) = w_rot * cos(theta - phi_h)
    abs_pos:  w_pos * u_h . p                      (a plane wave along u_h over the map)

so w alone sets how fast every hidden unit's pre-activation may change with the absolute
coordinate: at most w radians per radian of rotation (per unit of normalised position), which is
the rate of the authors' w * theta on the raw angle (their code fixed those weights to 1).
Only the ``rel`` groups keep learned first-layer weights (``first``). The angles phi_h follow
the golden-angle sequence phi_h = h * pi * (3 - sqrt 5) (+ an offset for abs_pos): a function of
H alone, so construction draws no random numbers (a non-stationary layer at w = 0 is the same
function as the strict layer built from the same seed) and the H directions spread evenly over
the circle: the modulation matrix [H, 2] has full rank 2, unlike one shared column (rank 1).
The phase of each unit's modulation is set by its learned bias b_1.

The last layer is linear, which is what the factored fast path exploits (design.md §2): the
layer asks for the hidden features z with :meth:`SirenKernelNet.hidden` and uses ``W_L``/``b_L``
through :meth:`SirenKernelNet.extended_output_weight`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

# Which frequency scales which coordinate group. rel_rot shares omega_rel with rel_pos.
FREQUENCY_OF_GROUP = {"rel_pos": "rel", "rel_rot": "rel", "abs_rot": "rot", "abs_pos": "pos"}
GROUP_ORDER = ("rel_pos", "rel_rot", "abs_rot", "abs_pos")
RELATIVE_GROUPS = ("rel_pos", "rel_rot")
ABSOLUTE_GROUPS = ("abs_rot", "abs_pos")
GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))
# abs_pos directions start half a golden angle further on, so a unit's rotation and position
# directions differ.
_DIRECTION_OFFSET = {"abs_rot": 0.0, "abs_pos": 0.5 * GOLDEN_ANGLE}


def absolute_directions(hidden_channels: int, group: str = "abs_rot", *, dtype=torch.float32, device=None) -> torch.Tensor:
    """The fixed unit vectors u_h (shape [H, 2]) through which hidden unit h sees ``group``."""
    phi = torch.arange(hidden_channels, dtype=torch.float64) * GOLDEN_ANGLE + _DIRECTION_OFFSET[group]
    return torch.stack([torch.cos(phi), torch.sin(phi)], dim=-1).to(dtype=dtype, device=device)


class SirenKernelNet(nn.Module):
    """SIREN mapping group coordinates to a ``C_out x C_in`` kernel matrix.

    Args:
        coordinate_groups: the groups present, in :data:`GROUP_ORDER` (each 2-dimensional).
        out_channels, in_channels: the kernel matrix produced at each coordinate.
        hidden_channels: H, the width of the hidden layers.
        depth: number of linear layers (>= 2): ``depth - 1`` sine layers, then the linear output.
        omega_rel, omega_rot, omega_pos: initial frequencies.
        learn_omega_rel, learn_omega_rot, learn_omega_pos: whether each frequency is trained.

    ``omega_rot``/``omega_pos`` are identifiable (see the module docstring): they are the only
    scale of the absolute-coordinate modulation, which :meth:`effective_omegas` reports.
    """

    def __init__(
        self,
        coordinate_groups,
        out_channels: int,
        in_channels: int,
        *,
        hidden_channels: int = 32,
        depth: int = 3,
        omega_rel: float = 10.0,
        omega_rot: float = 0.0,
        omega_pos: float = 0.0,
        learn_omega_rel: bool = False,
        learn_omega_rot: bool = True,
        learn_omega_pos: bool = True,
    ):
        super().__init__()
        if depth < 2:
            raise ValueError(f"kernel net depth must be >= 2 (one sine layer and the output), got {depth}")
        if hidden_channels < 1:
            raise ValueError(f"hidden_channels must be >= 1, got {hidden_channels}")
        groups = tuple(g for g in GROUP_ORDER if g in set(coordinate_groups))
        unknown = set(coordinate_groups) - set(GROUP_ORDER)
        if unknown:
            raise ValueError(f"unknown coordinate groups {sorted(unknown)}; expected a subset of {GROUP_ORDER}")
        self.groups = groups
        self.relative_groups = tuple(g for g in groups if g in RELATIVE_GROUPS)
        self.absolute_groups = tuple(g for g in groups if g in ABSOLUTE_GROUPS)
        self.out_channels, self.in_channels = out_channels, in_channels
        self.hidden_channels = hidden_channels
        present = {FREQUENCY_OF_GROUP[g] for g in groups}
        init = {"rel": omega_rel, "rot": omega_rot, "pos": omega_pos}
        learn = {"rel": learn_omega_rel, "rot": learn_omega_rot, "pos": learn_omega_pos}
        # Frequencies are Parameters even when fixed, so the state_dict is the same either way.
        for name in ("rel", "rot", "pos"):
            if name in present:
                p = nn.Parameter(torch.tensor(float(init[name])), requires_grad=bool(learn[name]))
                self.register_parameter(f"omega_{name}", p)
        d = 2 * len(self.relative_groups)
        self.first = nn.Linear(d, hidden_channels)  # learned weights of the relative coordinates only
        for g in self.absolute_groups:
            self.register_buffer(f"{g}_direction", absolute_directions(hidden_channels, g))
        self.hidden_layers = nn.ModuleList(nn.Linear(hidden_channels, hidden_channels) for _ in range(depth - 2))
        self.out = nn.Linear(hidden_channels, out_channels * in_channels)
        self._siren_init(d)

    def _siren_init(self, d: int) -> None:
        # SIREN (Sitzmann et al. 2020): first layer U(-1/d, 1/d) since the frequencies scale its
        # input; later layers U(-sqrt(6/H), sqrt(6/H)) keep sin's argument ~ U(-pi/2, pi/2)-ish.
        with torch.no_grad():
            self.first.weight.uniform_(-1.0 / max(d, 1), 1.0 / max(d, 1))
            self.first.bias.uniform_(-1.0, 1.0)
            bound = math.sqrt(6.0 / self.hidden_channels)
            for layer in self.hidden_layers:
                layer.weight.uniform_(-bound, bound)
                layer.bias.uniform_(-1.0 / math.sqrt(self.hidden_channels), 1.0 / math.sqrt(self.hidden_channels))
            self.out.bias.zero_()
            for g in self.absolute_groups:
                buf = getattr(self, f"{g}_direction")
                buf.copy_(absolute_directions(self.hidden_channels, g, dtype=buf.dtype, device=buf.device))

    def omegas(self) -> dict[str, torch.Tensor]:
        """The frequency parameters present in this net, keyed 'rel', 'rot', 'pos'."""
        return {n: getattr(self, f"omega_{n}") for n in ("rel", "rot", "pos") if hasattr(self, f"omega_{n}")}

    def effective_omegas(self) -> dict[str, torch.Tensor]:
        """The scale of each absolute-coordinate modulation, keyed 'rot', 'pos' (those present).

        ``|omega| * rms_h |u_h|``: the root-mean-square over hidden units of the largest rate at
        which the unit's pre-activation changes with the absolute coordinate. The directions are
        unit vectors, so this equals ``|omega|``; it is differentiable (the penalty acts on it).
        """
        out = {}
        for g in self.absolute_groups:
            key = FREQUENCY_OF_GROUP[g]
            u = getattr(self, f"{g}_direction")
            out[key] = getattr(self, f"omega_{key}").abs() * u.pow(2).sum(-1).mean().sqrt().to(u.dtype)
        return out

    def hidden(self, coords: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hidden features z at the broadcast of the coordinate groups; shape [..., H]."""
        z = torch.sin(self.first_preactivation(coords))
        for layer in self.hidden_layers:
            z = torch.sin(layer(z))
        return z

    def first_preactivation(self, coords: dict[str, torch.Tensor], *, skip=()) -> torch.Tensor:
        """The first sine layer's argument at the broadcast of the coordinate groups; [..., H].
        ``skip``: groups whose terms are left out (the fused kernel net adds abs_pos itself)."""
        pre = self.first.bias
        for g in self.relative_groups + self.absolute_groups:
            if g not in skip:
                # The first layer of a sum of groups is the sum of per-group products (broadcast).
                pre = pre + self.group_term(g, coords[g])
        return pre

    def group_term(self, group: str, coords: torch.Tensor) -> torch.Tensor:
        """One group's term of the first pre-activation: omega * (c @ W_g^T), [..., H]; W_g is a
        slice of the learned ``first.weight`` for a relative group, the fixed directions else."""
        w = self.first.weight
        c = coords.to(w.dtype)
        if group in self.relative_groups:
            k = self.relative_groups.index(group)
            return self.omega_rel * (c @ w[:, 2 * k : 2 * k + 2].t())
        omega = getattr(self, f"omega_{FREQUENCY_OF_GROUP[group]}")
        return omega * (c @ getattr(self, f"{group}_direction").to(w.dtype).t())

    def forward(self, coords: dict[str, torch.Tensor]) -> torch.Tensor:
        """Full kernel values, shape [..., C_out, C_in]."""
        k = self.out(self.hidden(coords))
        return k.unflatten(-1, (self.out_channels, self.in_channels))

    def extended_output_weight(self) -> torch.Tensor:
        """[W_L | b_L] as ``[C_out, C_in, H + 1]``: the bias pairs with a constant feature z_H = 1."""
        w = self.out.weight.unflatten(0, (self.out_channels, self.in_channels))
        b = self.out.bias.unflatten(0, (self.out_channels, self.in_channels))
        return torch.cat([w, b[..., None]], dim=-1)
