"""The paper's models (design.md §7): a continuous-kernel ResNet on R^2 x| C_N built from our layers.

Two residual architectures (``architecture=``, :data:`ARCHITECTURES`):

``"authors"`` (the default; the block of the authors' code, CKResBlock)::

    lifting conv C_in -> w0 (K x K) -> BN -> ReLU
    for each width w in ``widths``: residual block
        y = ReLU(LN(group conv K x K (x)));  y = ReLU(LN(group conv K x K (y)))
        y = y + shortcut(x);   out = ReLU(maxpool 2x2 (BN(y)))
        LN: each sample and channel normalised over (N, H, W), no affine (their
            ``layer_norm(out, out.shape[-3:])``); BN: one statistic per channel over (B, N, H, W).
        shortcut: identity when the width does not change, else a pointwise group conv whose
            kernel net has half the hidden width and sees the relative rotation only (always
            stationary, whatever the other layers are).
    group conv K x K "valid" -> BN -> ReLU -> global max over (rotation, H, W) -> linear

``"simple"`` (this package's first model, kept for comparison with the runs made with it; it does not rebuild them: the kernel net changed in issue 11)::

    residual block: group conv -> LN -> ReLU -> group conv -> LN, + pointwise-group-conv shortcut
    (always; non-stationary in rotation like the other layers), ReLU, 2x2 max-pool; LN over
    (C, N, H, W) per sample with a per-channel affine shared over rotations.

Remaining differences from the authors' model (also in README.md): angles enter the kernel net as
(cos, sin) rather than the raw angle, and the absolute coordinates through fixed unit directions
(kernel_net.py) rather than unit weights on the raw angle; no dropout layer (their block has one
after the first ReLU); a 2x2 max-pool in every block (theirs: in the blocks their config lists);
the rotation grid is deterministic unless ``mc_rotation=True`` (one random offset of the whole
grid per training forward, shared by every layer, as their Monte-Carlo runs sample it; the
deterministic grid in eval); their options ``last_conv_T2`` and a learnable final pooling are not
implemented; the partial variant is the discrete form (below).

Every normalisation is equivariant: BN and LN keep their statistics per channel shared over
rotations and space. The 2x2 max-pool acts on ``[B, C*N, H, W]`` channel-wise. (A 2x2 pool on an
even grid is exactly equivariant only to rotations that map the pooling grid to itself; the same
holds for the authors' model.)

Variants (:data:`VARIANTS`):

========================  =================================================================
``t2``                    N = 1: an ordinary CNN on T(2) with continuous kernels
``se2``                   strict SE(2)-N group CNN (omega_rot = omega_pos = 0, no absolute inputs)
``se2_rot``               non-stationary in rotation (kernel sees abs_rot), fixed omega_rot
``se2_trans``             non-stationary in translation (kernel sees abs_pos), fixed omega_pos
``se2_rot_trans``         both, fixed omegas
``se2_learned``           non-stationary in rotation, omega_rot learned (train with the penalty)
``se2_learned_rot_trans`` both, both omegas learned
``partial``               Partial G-CNN (Romero & Lohit 2022), discrete form: each group layer
                          keeps a learned subset of the N output rotations
========================  =================================================================

``learn_omega=True`` makes the omegas of any non-stationary variant learnable. The penalty toward
equivariance (:func:`relaxedconv.equivariance_penalty`) is part of the training loss, not the model.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .layers import GroupConv, InvariantPool, LiftingConv, PointwiseGroupConv, _RelaxedGroupConv
from .validation import check_positive_int

# variant -> (group order forced or None, rotation non-stationary, translation non-stationary, learn omega)
_SPECS = {
    "t2": dict(group_order=1, rot=False, trans=False, learn=False, partial=False),
    "se2": dict(group_order=None, rot=False, trans=False, learn=False, partial=False),
    "se2_rot": dict(group_order=None, rot=True, trans=False, learn=False, partial=False),
    "se2_trans": dict(group_order=None, rot=False, trans=True, learn=False, partial=False),
    "se2_rot_trans": dict(group_order=None, rot=True, trans=True, learn=False, partial=False),
    "se2_learned": dict(group_order=None, rot=True, trans=False, learn=True, partial=False),
    "se2_learned_rot_trans": dict(group_order=None, rot=True, trans=True, learn=True, partial=False),
    "partial": dict(group_order=None, rot=False, trans=False, learn=False, partial=True),
}
VARIANTS = tuple(_SPECS)
ARCHITECTURES = ("authors", "simple")
DEFAULT_ARCHITECTURE = "authors"

# omega_rot is the largest rate, in radians of each kernel-net hidden unit's pre-activation per
# radian of rotation, at which the kernel may change with the absolute rotation (kernel_net.py).
# The authors' omega multiplies the raw angle with a unit weight: the same rate, so their
# omega_rot = 2 (non-stationary SE(2)-16 on CIFAR-10 in their logs) is like for like with 2 here
# per step of the rotation grid (2*sin(pi/N) ~ 2*pi/N at most here, 2*pi/N there). Over a full turn
# their pre-activation sweeps 2*pi*omega (with a jump back at 2*pi), ours 2*omega (peak to peak).
DEFAULT_OMEGA_ROT = 2.0
# omega_pos: radians per unit of normalised position (half the map's width) along a fixed direction.
DEFAULT_OMEGA_POS = 1.0
_STATIONARY_DROP = ("rotation_nonstationary", "translation_nonstationary", "omega_rot", "omega_pos",
                    "learn_omega_rot", "learn_omega_pos")


class GroupBatchNorm(nn.Module):
    """Batch norm on ``[B, C*N, H, W]``: one mean/variance/affine per channel c, shared over the N
    rotations and space (so it commutes with rotating the input)."""

    def __init__(self, channels: int, group_order: int, **kw):
        super().__init__()
        self.channels, self.group_order = channels, group_order
        self.bn = nn.BatchNorm2d(channels, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        y = self.bn(x.reshape(b, self.channels, self.group_order * h, w))
        return y.reshape(b, self.channels * self.group_order, h, w)

    def extra_repr(self) -> str:
        return f"{self.channels}, group_order={self.group_order}"


class GroupLayerNorm(nn.Module):
    """Layer norm on ``[B, C*N, H, W]``: each sample normalised over (C, N, H, W); per-channel affine
    shared across rotations."""

    def __init__(self, channels: int, group_order: int, eps: float = 1e-5):
        super().__init__()
        self.channels, self.group_order, self.eps = channels, group_order, eps
        self.weight = nn.Parameter(torch.empty(channels))
        self.bias = nn.Parameter(torch.empty(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Affine weight 1, bias 0 (the constructor's, and again after ``to_empty`` of a model built
        on the meta device)."""
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, x.shape[1:], eps=self.eps)
        w = self.weight.repeat_interleave(self.group_order)[None, :, None, None]
        b = self.bias.repeat_interleave(self.group_order)[None, :, None, None]
        return y * w.to(y.dtype) + b.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.channels}, group_order={self.group_order}, eps={self.eps}"


class ChannelLayerNorm(nn.Module):
    """The authors' norm inside residual blocks: each sample and channel of ``[B, C*N, H, W]``
    normalised over (N, H, W), no affine (``F.layer_norm(x, x.shape[-3:])`` on ``[B, C, N, H, W]``)."""

    def __init__(self, channels: int, group_order: int, eps: float = 1e-5):
        super().__init__()
        self.channels, self.group_order, self.eps = channels, group_order, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.unflatten(1, (self.channels, self.group_order))
        return F.layer_norm(g, g.shape[-3:], eps=self.eps).flatten(1, 2)

    def extra_repr(self) -> str:
        return f"{self.channels}, group_order={self.group_order}, eps={self.eps}"


class RotationSubset(nn.Module):
    """Partial G-CNN for a discrete rotation group (Romero & Lohit 2022, their discrete-group form):
    a learned probability per output rotation; the feature map is kept only on a sampled subset.

    Training: a Bernoulli mask per rotation from a relaxed (Gumbel-sigmoid, straight-through) sample,
    shared over the batch; evaluation: the deterministic subset ``p > 0.5``. The identity rotation is
    always kept, so the subset is never empty. The next group conv then sums over the kept rotations
    only (the others are zero), which is the partial group convolution on that subset.
    Not implemented from the paper: the constraint that subsets shrink monotonically with depth, and
    the continuous-group (uniform over [-theta, theta]) parameterisation.
    """

    def __init__(self, channels: int, group_order: int, init_logit: float = 3.0, temperature: float = 0.5):
        super().__init__()
        self.channels, self.group_order, self.temperature = channels, group_order, temperature
        self.init_logit = float(init_logit)
        self.logits = nn.Parameter(torch.empty(group_order))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every logit ``init_logit`` (the constructor's, and again after ``to_empty`` of a model
        built on the meta device)."""
        with torch.no_grad():
            self.logits.fill_(self.init_logit)

    def probabilities(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    def mask(self) -> torch.Tensor:
        p = self.probabilities()
        if self.training:
            u = torch.rand_like(p).clamp(1e-6, 1 - 1e-6)
            soft = torch.sigmoid((self.logits + torch.log(u) - torch.log1p(-u)) / self.temperature)
            hard = (soft > 0.5).to(soft.dtype)
            m = hard + soft - soft.detach()
        else:
            m = (p > 0.5).to(p.dtype)
        return torch.cat([torch.ones_like(m[:1]), m[1:]])  # the identity rotation is always kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask().to(x.dtype).repeat(self.channels)
        return x * m[None, :, None, None]

    def extra_repr(self) -> str:
        return f"{self.channels}, group_order={self.group_order}"


class ResidualBlock(nn.Module):
    """The ``"simple"`` architecture's block (module docstring)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, group_order: int, conv_kw: dict, partial: bool):
        super().__init__()
        n = group_order
        self.conv1 = GroupConv(cin, cout, kernel_size, n, padding="same", **conv_kw)
        self.norm1 = GroupLayerNorm(cout, n)
        self.conv2 = GroupConv(cout, cout, kernel_size, n, padding="same", **conv_kw)
        self.norm2 = GroupLayerNorm(cout, n)
        # The shortcut is always a (stationary in space) pointwise group conv, as in the authors' model.
        sc_kw = {k: v for k, v in conv_kw.items() if k not in ("translation_nonstationary", "omega_pos", "learn_omega_pos")}
        self.shortcut = PointwiseGroupConv(cin, cout, n, **sc_kw)
        self.subset1 = RotationSubset(cout, n) if partial else nn.Identity()
        self.subset2 = RotationSubset(cout, n) if partial else nn.Identity()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.subset1(F.relu(self.norm1(self.conv1(x))))
        y = self.norm2(self.conv2(y))
        y = self.subset2(F.relu(y + self.shortcut(x)))
        return self.pool(y)


class AuthorsResidualBlock(nn.Module):
    """The authors' CKResBlock (module docstring): conv-LN-ReLU-conv-LN-ReLU, + shortcut, BN,
    2x2 max-pool, ReLU; the shortcut is the identity, or a stationary half-width pointwise group
    conv when the width changes."""

    def __init__(self, cin: int, cout: int, kernel_size: int, group_order: int, conv_kw: dict, partial: bool):
        super().__init__()
        n = group_order
        self.conv1 = GroupConv(cin, cout, kernel_size, n, padding="same", **conv_kw)
        self.norm1 = ChannelLayerNorm(cout, n)
        self.conv2 = GroupConv(cout, cout, kernel_size, n, padding="same", **conv_kw)
        self.norm2 = ChannelLayerNorm(cout, n)
        if cin != cout:
            sc_kw = {k: v for k, v in conv_kw.items() if k not in _STATIONARY_DROP}
            sc_kw["hidden_channels"] = max(1, int(conv_kw.get("hidden_channels", 32)) // 2)
            self.shortcut = PointwiseGroupConv(cin, cout, n, **sc_kw)
        else:
            self.shortcut = nn.Identity()
        self.norm_out = GroupBatchNorm(cout, n)
        self.subset1 = RotationSubset(cout, n) if partial else nn.Identity()
        self.subset2 = RotationSubset(cout, n) if partial else nn.Identity()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.subset1(F.relu(self.norm1(self.conv1(x))))
        y = F.relu(self.norm2(self.conv2(y)))
        y = self.norm_out(y + self.shortcut(x))
        return self.subset2(F.relu(self.pool(y)))


@contextmanager
def rotation_grid_offset(model: nn.Module, offset: float):
    """Every relaxed layer of ``model`` evaluates its kernel on the rotation grid turned by
    ``offset`` radians inside the block (the Monte-Carlo grid); restored afterwards."""
    layers = [m for m in model.modules() if isinstance(m, _RelaxedGroupConv)]
    for m in layers:
        m.angle_offset = float(offset)
    try:
        yield
    finally:
        for m in layers:
            m.angle_offset = 0.0


class CKResNet(nn.Module):
    """The continuous-kernel group ResNet of design.md §7 (see the module docstring)."""

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        group_order: int = 8,
        widths=(32, 64),
        kernel_size: int = 7,
        rotation_nonstationary: bool = False,
        translation_nonstationary: bool = False,
        partial: bool = False,
        conv_kw: dict | None = None,
        architecture: str = DEFAULT_ARCHITECTURE,
        mc_rotation: bool = False,
    ):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths:
            raise ValueError("widths must name at least one block width")
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {architecture!r}; expected one of {ARCHITECTURES}")
        self.architecture = architecture
        self.mc_rotation = bool(mc_rotation)
        block_type = AuthorsResidualBlock if architecture == "authors" else ResidualBlock
        n = group_order
        kw = dict(conv_kw or {})
        kw.update(rotation_nonstationary=rotation_nonstationary, translation_nonstationary=translation_nonstationary)
        self.group_order = n
        self.lift = LiftingConv(in_channels, widths[0], kernel_size, n, padding="same", **kw)
        self.lift_norm = GroupBatchNorm(widths[0], n)
        self.lift_subset = RotationSubset(widths[0], n) if partial else nn.Identity()
        blocks, c = [], widths[0]
        for w in widths:
            blocks.append(block_type(c, w, kernel_size, n, kw, partial))
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.head = GroupConv(c, c, kernel_size, n, padding=0, **kw)
        self.head_norm = GroupBatchNorm(c, n)
        self.pool = InvariantPool(n, over="all", reduce="max")
        self.fc = nn.Linear(c, num_classes)

    def min_input_size(self) -> int | None:
        """The smallest H (and W) the model takes: each block halves the map (2x2 max-pool) and the
        head's "valid" K x K conv needs at least K x K, so K * 2^blocks. None when the head is not
        a relaxed layer (replaced by the caller), whose needs the model cannot know."""
        head = self.head
        if not isinstance(head, _RelaxedGroupConv):
            return None
        pooling = sum(isinstance(b, (ResidualBlock, AuthorsResidualBlock)) for b in self.blocks)
        return max(1, head.kernel_size - 2 * head.padding) * 2**pooling

    def _check_input_size(self, x) -> None:
        # Said here, in the model's terms: the head's own check would name a layer deep inside
        # and a map size the user never passed.
        need = self.min_input_size()
        if need is None or not isinstance(x, torch.Tensor) or x.dim() != 4:
            return  # the lifting layer says what it expects
        h, w = x.shape[-2:]
        if h < need or w < need:
            k = self.head.kernel_size
            raise ValueError(
                f"{type(self).__name__}: input {h}x{w} is too small; each of the {len(self.blocks)} block(s) halves "
                f"the map and the head's {k}x{k} 'valid' conv needs at least {k}x{k}, so inputs must be at "
                f"least {need}x{need} (or build the model with fewer widths or a smaller kernel_size)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_size(x)
        if self.mc_rotation and self.training and self.group_order > 1:
            # One offset in [0, 2*pi/N) for the whole network: rel_rot between layers stays exact.
            offset = float(torch.rand(())) * 2 * math.pi / self.group_order
            with rotation_grid_offset(self, offset):
                return self._forward(x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lift_subset(F.relu(self.lift_norm(self.lift(x))))
        y = self.blocks(y)
        y = F.relu(self.head_norm(self.head(y)))
        # The pooled features go to the head in its own dtype: fp32 for an fp32 model fed bf16/fp16
        # inputs (as under autocast), fp64/bf16 for a model converted with .double()/.bfloat16().
        return self.fc(self.pool(y).to(self.fc.weight.dtype))


def build_model(
    variant: str,
    *,
    num_classes: int = 10,
    group_order: int = 8,
    widths=(32, 64),
    kernel_size: int = 7,
    hidden_channels: int = 32,
    omega_rel: float = 10.0,
    omega_rot: float | None = None,
    omega_pos: float | None = None,
    learn_omega: bool = False,
    backend: str = "auto",
    in_channels: int = 3,
    architecture: str = DEFAULT_ARCHITECTURE,
    mc_rotation: bool = False,
) -> nn.Module:
    """One of :data:`VARIANTS` as a :class:`CKResNet`.

    ``group_order`` is ignored by ``t2`` (always 1). ``omega_rot``/``omega_pos`` are the initial (or,
    unless learned, fixed) frequencies of the non-stationary variants; ``None`` gives
    :data:`DEFAULT_OMEGA_ROT` / :data:`DEFAULT_OMEGA_POS`. Variants without that non-stationarity
    ignore them. ``learn_omega`` makes them trainable for any non-stationary variant (the
    ``*_learned*`` variants always learn them). ``architecture`` picks the residual block
    (:data:`ARCHITECTURES`; the authors' by default); ``mc_rotation`` samples a random offset of the
    rotation grid per training forward. ``model.config`` records the resolved arguments.
    """
    if variant not in _SPECS:
        raise ValueError(f"unknown model variant {variant!r}; expected one of {VARIANTS}")
    spec = _SPECS[variant]
    # A float group order was truncated (2.5 -> C_2) and num_classes=0 built a model with no outputs.
    n = spec["group_order"] or check_positive_int("group_order", group_order)
    check_positive_int("num_classes", num_classes)
    if spec["partial"] and n < 2:
        raise ValueError("the partial variant needs group_order >= 2")
    learn = bool(learn_omega or spec["learn"])
    w_rot = DEFAULT_OMEGA_ROT if omega_rot is None else float(omega_rot)
    w_pos = DEFAULT_OMEGA_POS if omega_pos is None else float(omega_pos)
    conv_kw = dict(
        omega_rel=float(omega_rel),
        omega_rot=w_rot if spec["rot"] else 0.0,
        omega_pos=w_pos if spec["trans"] else 0.0,
        learn_omega_rel=False,
        learn_omega_rot=learn,
        learn_omega_pos=learn,
        hidden_channels=int(hidden_channels),
        backend=backend,
    )
    model = CKResNet(
        num_classes=num_classes,
        in_channels=in_channels,
        group_order=n,
        widths=widths,
        kernel_size=kernel_size,
        rotation_nonstationary=spec["rot"],
        translation_nonstationary=spec["trans"],
        partial=spec["partial"],
        conv_kw=conv_kw,
        architecture=architecture,
        mc_rotation=mc_rotation,
    )
    model.config = dict(
        variant=variant,
        num_classes=num_classes,
        group_order=n,
        widths=list(widths),
        kernel_size=kernel_size,
        hidden_channels=hidden_channels,
        omega_rel=float(omega_rel),
        omega_rot=conv_kw["omega_rot"],
        omega_pos=conv_kw["omega_pos"],
        learn_omega=learn if (spec["rot"] or spec["trans"]) else False,
        backend=backend,
        in_channels=in_channels,
        architecture=architecture,
        mc_rotation=bool(mc_rotation),
    )
    return model


def partial_subsets(model: nn.Module) -> dict[str, list[float]]:
    """The Partial G-CNN layers' keep-probabilities per rotation (empty for other variants)."""
    return {
        name: [float(p) for p in m.probabilities().detach().cpu()]
        for name, m in model.named_modules()
        if isinstance(m, RotationSubset)
    }
