"""The continuous kernel: a SIREN whose inputs are scaled by per-group learnable frequencies.

    c = [w_rel*rel_pos, w_rel*rel_rot, w_rot*abs_rot, w_pos*abs_pos]
    z = sin(W_{L-1} ... sin(W_1 c + b_1) ... + b_{L-1})      hidden features, width H
    k(c) = W_L z + b_L                                        C_out*C_in values

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


class SirenKernelNet(nn.Module):
    """SIREN mapping group coordinates to a ``C_out x C_in`` kernel matrix.

    Args:
        coordinate_groups: the groups present, in :data:`GROUP_ORDER` (each 2-dimensional).
        out_channels, in_channels: the kernel matrix produced at each coordinate.
        hidden_channels: H, the width of the hidden layers.
        depth: number of linear layers (>= 2): ``depth - 1`` sine layers, then the linear output.
        omega_rel, omega_rot, omega_pos: initial frequencies.
        learn_omega_rel, learn_omega_rot, learn_omega_pos: whether each frequency is trained.
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
        d = 2 * len(groups)
        self.first = nn.Linear(d, hidden_channels)
        self.hidden_layers = nn.ModuleList(nn.Linear(hidden_channels, hidden_channels) for _ in range(depth - 2))
        self.out = nn.Linear(hidden_channels, out_channels * in_channels)
        self._siren_init(d)

    def _siren_init(self, d: int) -> None:
        # SIREN (Sitzmann et al. 2020): first layer U(-1/d, 1/d) since the frequencies scale its
        # input; later layers U(-sqrt(6/H), sqrt(6/H)) keep sin's argument ~ U(-pi/2, pi/2)-ish.
        with torch.no_grad():
            self.first.weight.uniform_(-1.0 / d, 1.0 / d)
            self.first.bias.uniform_(-1.0, 1.0)
            bound = math.sqrt(6.0 / self.hidden_channels)
            for layer in self.hidden_layers:
                layer.weight.uniform_(-bound, bound)
                layer.bias.uniform_(-1.0 / math.sqrt(self.hidden_channels), 1.0 / math.sqrt(self.hidden_channels))
            self.out.bias.zero_()

    def omegas(self) -> dict[str, torch.Tensor]:
        """The frequency parameters present in this net, keyed 'rel', 'rot', 'pos'."""
        return {n: getattr(self, f"omega_{n}") for n in ("rel", "rot", "pos") if hasattr(self, f"omega_{n}")}

    def hidden(self, coords: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hidden features z at the broadcast of the coordinate groups; shape [..., H]."""
        w = self.first.weight
        pre = self.first.bias
        for k, g in enumerate(self.groups):
            omega = getattr(self, f"omega_{FREQUENCY_OF_GROUP[g]}")
            c = coords[g].to(w.dtype)
            # The first layer of a sum of groups is the sum of per-group products (broadcast).
            pre = pre + omega * (c @ w[:, 2 * k : 2 * k + 2].t())
        z = torch.sin(pre)
        for layer in self.hidden_layers:
            z = torch.sin(layer(z))
        return z

    def forward(self, coords: dict[str, torch.Tensor]) -> torch.Tensor:
        """Full kernel values, shape [..., C_out, C_in]."""
        k = self.out(self.hidden(coords))
        return k.unflatten(-1, (self.out_channels, self.in_channels))

    def extended_output_weight(self) -> torch.Tensor:
        """[W_L | b_L] as ``[C_out, C_in, H + 1]``: the bias pairs with a constant feature z_H = 1."""
        w = self.out.weight.unflatten(0, (self.out_channels, self.in_channels))
        b = self.out.bias.unflatten(0, (self.out_channels, self.in_channels))
        return torch.cat([w, b[..., None]], dim=-1)
