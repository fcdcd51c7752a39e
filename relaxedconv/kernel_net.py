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
import torch.nn.functional as F
from torch import nn

from .amp import autocast_dtype

# Which frequency scales which coordinate group. rel_rot shares omega_rel with rel_pos.
FREQUENCY_OF_GROUP = {"rel_pos": "rel", "rel_rot": "rel", "abs_rot": "rot", "abs_pos": "pos"}
GROUP_ORDER = ("rel_pos", "rel_rot", "abs_rot", "abs_pos")
RELATIVE_GROUPS = ("rel_pos", "rel_rot")
ABSOLUTE_GROUPS = ("abs_rot", "abs_pos")
GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))
# abs_pos directions start half a golden angle further on, so a unit's rotation and position
# directions differ.
_DIRECTION_OFFSET = {"abs_rot": 0.0, "abs_pos": 0.5 * GOLDEN_ANGLE}
# Hidden values [N, P, J, H] from which the angle-addition split of the first layer pays
# (SirenKernelNet.splits_position): it saves about 7 passes over them (T2, CPU operator count) and
# dispatches ~13 more small operators (~10 µs of host time each on the H200's host;
# bench/knet_traffic.py). At ~8 bytes per value and pass and 3 TB/s, the passes weigh more from
# ~10 M values on: T2's 26 M, not T1's 1.6 M.
SPLIT_MIN_VALUES = 1 << 23
# ... and rows of (n, n', offset) per hidden unit: the split's [2H, P*H] operand is then at most
# 1/4 of the [A, P, H] values.
SPLIT_MIN_ROWS_PER_HIDDEN = 8


def broadcast_shape(*shapes) -> tuple:
    """``torch.broadcast_shapes`` without its symbolic-shape machinery: 1.3 µs a call where it took
    17 µs on this project's CPU (three calls per kernel-net evaluation)."""
    rank = max(len(s) for s in shapes)
    out = [1] * rank
    for shape in shapes:
        for i, d in enumerate(shape, rank - len(shape)):
            if d != 1:
                if out[i] != 1 and out[i] != d:
                    raise ValueError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
                out[i] = d
    return tuple(out)


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
        for name, v in (("out_channels", out_channels), ("in_channels", in_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:  # 0 built an empty kernel
                raise ValueError(f"SirenKernelNet {name} must be an integer >= 1, got {v!r}")
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

    def hidden(self, coords: dict[str, torch.Tensor], *, keep_product: bool = True) -> torch.Tensor:
        """Hidden features z at the broadcast of the coordinate groups; shape [..., H].
        ``keep_product=False``: where the second layer is split by angle addition, its product is
        recomputed in backward instead of kept (one matrix product for [N, P, J, H] of memory)."""
        layers = iter(self.hidden_layers)
        if self.splits_position(coords) and (z := self._second_layer_split(coords, keep_product)) is not None:
            next(layers)
        else:
            z = torch.sin(self.first_preactivation(coords))
        for layer in layers:
            z = torch.sin(layer(z))
        return z

    def splits_position(self, coords) -> bool:
        """Whether :meth:`hidden` takes the second layer by angle addition
        (:meth:`_second_layer_split`): translation non-stationary, with a second layer to take the
        product, and large enough to pay for it. The split's operand ``[2H, P*H]`` must be small
        beside the ``[A, P, H]`` values (A ≥ 8H rows: T2's 3,136, not T1's 49, where it is larger
        than they are), and they must be many (:data:`SPLIT_MIN_VALUES`): it dispatches ~13 more
        small operators, host time that a host-bound layer (T1) cannot spare."""
        if "abs_pos" not in self.absolute_groups or "abs_pos" not in coords or not self.hidden_layers:
            return False
        shape = broadcast_shape(*(c.shape[:-1] for c in coords.values()))
        positions = coords["abs_pos"][..., 0].numel()
        rows = math.prod(shape) // max(positions, 1)
        return (rows >= SPLIT_MIN_ROWS_PER_HIDDEN * self.hidden_channels
                and rows * positions * self.hidden_channels >= SPLIT_MIN_VALUES)

    def _second_layer_split(self, coords: dict[str, torch.Tensor], keep_product: bool = True) -> torch.Tensor | None:
        """``sin(W2 sin(a + b) + b2)``, the second sine layer, without the first layer's output.

        The first pre-activation is ``a + b``: ``a`` (every group but abs_pos) varies over
        (n, n', offset), ``b`` (abs_pos) over the positions p alone. By angle addition, exactly,

            W2 sin(a + b) + b2 = [sin a | cos a | 1] @ [[cos b | sin b]^T * [W2 | W2]^T ; b2]

        one matrix product ``[A, 2H+1] @ [2H+1, P*H]`` whose operands are the size of ``a`` and
        ``b`` (T2: 3,136 and 256 rows of H). The direct form adds, takes the sine of and keeps for
        backward two [N, P, J, H] tensors (T2: 26 M values each) before its own product, and its
        backward takes two more passes for the cosine and two reductions over them; the split's
        product costs twice the direct one's multiply-adds. Returns None when ``a`` and ``b`` vary
        along a common axis (no split; not the case for the lattices of ``groups.coordinate_groups``)."""
        a = self.first_preactivation(coords, skip=("abs_pos",))
        b = self.group_term("abs_pos", coords["abs_pos"])
        h = self.hidden_channels
        lead = broadcast_shape(a.shape[:-1], b.shape[:-1])
        a = a.reshape((1,) * (len(lead) + 1 - a.dim()) + tuple(a.shape))
        b = b.reshape((1,) * (len(lead) + 1 - b.dim()) + tuple(b.shape))
        a_axes = [d for d, n in enumerate(a.shape[:-1]) if n > 1]
        b_axes = [d for d, n in enumerate(b.shape[:-1]) if n > 1]
        if set(a_axes) & set(b_axes):
            return None
        a, b = a.reshape(-1, h), b.reshape(-1, h)
        # The product's rows follow a's varying axes and its columns b's; ``arrange`` views it in
        # the broadcast order of the coordinates.
        order = a_axes + b_axes
        perm = sorted(range(len(order)), key=lambda i: order[i]) + [len(order)]
        inner = [lead[d] for d in a_axes] + [lead[d] for d in b_axes] + [h]

        def arrange(t):
            return t.reshape(inner).permute(perm).reshape(lead + (h,))

        layer = self.hidden_layers[0]
        if torch.compiler.is_compiling():  # Inductor fuses the elementwise parts itself
            s, _, _, m = _split_operands(a, b, layer.weight, layer.bias)
            return torch.sin(arrange(s @ m)).contiguous()
        return _SecondSineLayer.apply(a, b, layer.weight, layer.bias, arrange, keep_product)

    def first_preactivation(self, coords: dict[str, torch.Tensor], *, skip=()) -> torch.Tensor:
        """The first sine layer's argument at the broadcast of the coordinate groups; [..., H].
        ``skip``: groups whose terms are left out (the fused kernel net adds abs_pos itself).

        Every group but abs_pos varies over (n, n', offset) only, so their coordinates broadcast
        together are a small matrix (N*J rows of 2 per group): one product with the weight columns
        times the frequencies, where a product, a scaling and an add per group dispatched ~3x the
        operators forward and backward (issue 13). abs_pos alone spans the positions and stays a
        broadcast add."""
        groups = [g for g in self.relative_groups + self.absolute_groups if g not in skip]
        merged = [g for g in groups if g != "abs_pos"]
        pre = self.first.bias
        if merged:
            c, scaled = self._first_layer_operands(coords, merged)
            if autocast_dtype(c.device.type) is not None:
                # the product in the autocast dtype, the sum with b_1 (and abs_pos) in fp32, as the
                # per-group form did: sin's argument reaches ~10, where bf16 steps by 0.06
                pre = F.linear(c, scaled) + pre
            else:
                pre = F.linear(c, scaled, pre)
        if "abs_pos" in groups:
            pre = pre + self.group_term("abs_pos", coords["abs_pos"])
        return pre

    def _first_layer_operands(self, coords, merged) -> tuple[torch.Tensor, torch.Tensor]:
        """(c, w): ``c @ w^T = sum_g omega_g c_g W_g^T`` over the ``merged`` groups.

        A fixed frequency (omega_rel in every model; omega_rot/omega_pos unless learned) is folded
        into its group's coordinates, which are constant: they are built once per lattice and
        frequency value (:meth:`_merged_coordinates`) and the weight columns are used as they are.
        A learned one scales its columns here, so that it gets its gradient."""
        fixed = {g: not self._frequency(g).requires_grad for g in merged}
        c = self._merged_coordinates(coords, merged, fixed)
        w = self.first.weight
        if self.relative_groups and all(g in merged for g in self.relative_groups):  # w is exactly their columns
            columns = [w if fixed[self.relative_groups[0]] else self.omega_rel * w]
            merged_abs = [g for g in merged if g in ABSOLUTE_GROUPS]
        else:
            columns, merged_abs = [], merged
        columns += [self._raw_columns(g) if fixed[g] else self._group_columns(g) for g in merged_abs]
        return c, torch.cat(columns, dim=1) if len(columns) > 1 else columns[0]

    def _frequency(self, group: str) -> torch.Tensor:
        return getattr(self, f"omega_{FREQUENCY_OF_GROUP[group]}")

    def _merged_coordinates(self, coords, merged, fixed) -> torch.Tensor:
        """The coordinates of the ``merged`` groups broadcast together and concatenated, each
        ``fixed`` one times its frequency: [..., 2 * len(merged)], in the first weight's dtype.

        Constant while the coordinate tensors and the fixed frequencies are unchanged, so it is
        kept (one entry per group set, dtype and inference mode) and a layer's forward dispatches
        no broadcast, concatenation or scaling for it (issue 13). A change is seen by identity,
        version counter and storage, as the layers' inference cache sees one (in place, replaced,
        loaded), never by value, which would synchronise with a GPU: a write through ``.data``,
        which bypasses the version counter, is not seen."""
        dtype = self.first.weight.dtype
        if torch.compiler.is_compiling():  # a compiled graph folds constants itself
            return self._build_merged_coordinates(coords, merged, fixed, dtype)
        sources = tuple(coords[g] for g in merged) + tuple(self._frequency(g) for g in merged if fixed[g])
        if any(_uncacheable(t) for t in sources):
            return self._build_merged_coordinates(coords, merged, fixed, dtype)
        versions = tuple((t._version, t.data_ptr()) for t in sources)
        key = (tuple(merged), dtype, torch.is_inference_mode_enabled())
        cache = self.__dict__.setdefault("_coordinate_cache", {})
        hit = cache.get(key)
        if hit is not None and len(hit[0]) == len(sources) and all(a is b for a, b in zip(hit[0], sources)) \
                and hit[1] == versions:
            return hit[2]
        c = self._build_merged_coordinates(coords, merged, fixed, dtype)
        cache[key] = (sources, versions, c)
        return c

    def _build_merged_coordinates(self, coords, merged, fixed, dtype) -> torch.Tensor:
        shape = broadcast_shape(*(coords[g].shape[:-1] for g in merged))
        parts = []
        for g in merged:
            t = coords[g].to(dtype)
            parts.append((t * self._frequency(g).to(dtype) if fixed[g] else t).expand(*shape, t.shape[-1]))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0].contiguous()

    def _raw_columns(self, group: str) -> torch.Tensor:
        """W_g, [H, 2]: the columns of the learned ``first.weight`` for a relative group, the fixed
        directions for an absolute one."""
        if group in self.relative_groups:
            k = self.relative_groups.index(group)
            return self.first.weight[:, 2 * k : 2 * k + 2]
        return getattr(self, f"{group}_direction").to(self.first.weight.dtype)

    def _group_columns(self, group: str) -> torch.Tensor:
        """W_g scaled by its frequency, [H, 2]: the columns that multiply ``group``'s coordinates."""
        return self._frequency(group) * self._raw_columns(group)

    def group_term(self, group: str, coords: torch.Tensor) -> torch.Tensor:
        """One group's term of the first pre-activation: c @ (omega W_g)^T, [..., H]; W_g is a
        slice of the learned ``first.weight`` for a relative group, the fixed directions else."""
        return coords.to(self.first.weight.dtype) @ self._group_columns(group).t()

    def forward(self, coords: dict[str, torch.Tensor]) -> torch.Tensor:
        """Full kernel values, shape [..., C_out, C_in]."""
        k = self.out(self.hidden(coords))
        return k.unflatten(-1, (self.out_channels, self.in_channels))

    def extended_output_weight(self) -> torch.Tensor:
        """[W_L | b_L] as ``[C_out, C_in, H + 1]``: the bias pairs with a constant feature z_H = 1."""
        w = self.out.weight.unflatten(0, (self.out_channels, self.in_channels))
        b = self.out.bias.unflatten(0, (self.out_channels, self.in_channels))
        return torch.cat([w, b[..., None]], dim=-1)


def _uncacheable(t: torch.Tensor) -> bool:
    """A tensor whose derived value must not be kept: one that takes a gradient (coordinates passed
    by a user of the public net), an inference tensor (no version counter to watch), or one inside
    a torch.func transform (vmap's batched frequencies: a kept value would escape the transform)."""
    return t.requires_grad or t.is_inference() or torch._C._functorch.is_functorch_wrapped_tensor(t)


def _split_operands(a, b, weight, bias):
    """``s = [sin a | cos a | 1]`` ``[A, 2H+1]``, ``c = [cos b | sin b]`` ``[P, 2H]`` and
    ``m = [c^T * [W2 | W2]^T ; b2]`` ``[2H+1, P*H]`` of :meth:`SirenKernelNet._second_layer_split`
    (``m[(t, h), (p, k)] = c[p, (t, h)] * W2[k, h]``, its last row b2 at every p)."""
    h, positions = a.shape[1], b.shape[0]
    s = torch.cat([torch.sin(a), torch.cos(a), a.new_ones(a.shape[0], 1)], dim=1)
    c = torch.cat([torch.cos(b), torch.sin(b)], dim=1)
    w2 = torch.cat([weight, weight], dim=1).t()  # [2H, H_out]
    m = (c.t()[:, :, None] * w2[:, None, :]).view(2 * h, positions * h)
    return s, c, w2, torch.cat([m, bias.repeat(positions)[None]])


class _SecondSineLayer(torch.autograd.Function):
    """``sin(arrange(s @ m))`` from ``a``, ``b``, W2 and b2 (:meth:`SirenKernelNet._second_layer_split`),
    written contiguous, with a hand-written backward.

    Why not autograd's own operators: they copy twice for the axis order (the contiguous result,
    and backward the incoming gradient back to the product's layout) and dispatch more small
    operators per step, host time that a layer near the host-bound regime pays. Here the sine
    writes the result in the new order in its one pass; backward multiplies the gradient into
    cos(product) through the same view, then two matrix products and a few operators the size of
    ``m`` give every input's gradient. ``keep_product=False`` keeps only the small operands and
    recomputes the product in backward. Under autocast the product runs in the autocast dtype, as
    ``nn.Linear`` would; the rest in the inputs' dtype. Its backward products then round to that
    dtype too, and a's gradient combines two rounded halves (``ds_sin cos a - ds_cos sin a``): in
    bf16 its error reaches ~2e-3 of the largest parameter gradient, where the direct form's, which
    multiplies one rounded product by cos in fp32, stays near 2e-4 (CPU, H = 8; bf16 resolves
    2^-8 = 3.9e-3). Once differentiable: a second derivative through it (``create_graph=True``)
    raises instead of returning a wrong value."""

    @staticmethod
    def forward(ctx, a, b, weight, bias, arrange, keep_product):
        s, c, w2, m = _split_operands(a, b, weight, bias)
        pre = s @ m  # autocast applies here
        view = arrange(pre)
        out = torch.empty(view.shape, dtype=pre.dtype, device=pre.device)
        torch.sin(view, out=out)
        ctx.save_for_backward(s, c, w2, m, pre if keep_product else None)
        ctx.arrange, ctx.product_dtype = arrange, pre.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        s, c, w2, m, pre = ctx.saved_tensors
        h, positions = w2.shape[1], c.shape[0]
        if pre is None:  # recomputed (in the forward's dtype: backward runs outside autocast), then
            d = (s.to(ctx.product_dtype) @ m.to(ctx.product_dtype)).cos_()  # one full-size tensor
        else:
            d = torch.cos(pre)
        ctx.arrange(d).mul_(grad)  # d/d(product), in the product's layout
        da = db = dw = dbias = None
        if ctx.needs_input_grad[0]:
            ds = (d @ m.to(d.dtype).t()).to(s.dtype)  # [A, 2H+1]; d/da [sin a | cos a] = [cos a | -sin a]
            da = torch.addcmul(ds[:, :h] * s[:, h : 2 * h], ds[:, h : 2 * h], s[:, :h], value=-1.0)
        if any(ctx.needs_input_grad[1:4]):
            dm = (s.to(d.dtype).t() @ d).to(m.dtype)  # [2H+1, P*H]
            dmw = dm[: 2 * h].view(2 * h, positions, h)  # [(t, h_in), p, h_out]
            if ctx.needs_input_grad[3]:
                dbias = dm[2 * h].view(positions, h).sum(0)
            cw = c.to(dm.dtype)  # under autocast c (from b) may be 16-bit, the weights are not
            if ctx.needs_input_grad[2]:
                # dW2[k, h] = sum_{t, p} dm[(t, h), p, k] c[p, (t, h)]
                dw = torch.bmm(cw.t()[:, None, :], dmw).view(2, h, h).sum(0).t()
            if ctx.needs_input_grad[1]:
                # dc[p, (t, h)] = sum_k dm[(t, h), p, k] W2[k, h]; d/db (cos b, sin b) = (-sin b, cos b)
                dc = torch.bmm(dmw, w2.to(dm.dtype)[:, :, None]).view(2 * h, positions).t()
                db = torch.addcmul(dc[:, h:] * cw[:, :h], dc[:, :h], cw[:, h:], value=-1.0).to(c.dtype)
        return da, db, dw, dbias, None, None
