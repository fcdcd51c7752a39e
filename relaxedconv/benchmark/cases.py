"""The benchmark cases of design.md §5 (and the batch / image-size variants of issue 6).

A case is one relaxed convolution layer and its input shape. ``group_order=1`` with a group conv is
the translation group T(2) (an ordinary CNN layer). Cases run at the sizes below on a GPU; without
one, :func:`cpu_scaled` shrinks them so a CPU run finishes (the result says it was scaled down).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..layers import GroupConv, LiftingConv


@dataclass(frozen=True)
class Case:
    name: str
    group_order: int  # N (1 = T(2))
    in_channels: int  # per rotation
    out_channels: int
    size: int  # input H = W
    batch: int
    kernel_size: int = 7
    hidden: int = 32  # H, the kernel net's hidden width
    lifting: bool = False  # LiftingConv (N_in = 1) instead of GroupConv (N_in = N)
    rotation_nonstationary: bool = False
    translation_nonstationary: bool = False
    priority: int = 0  # 0: the design.md §5 anchors (run first under a time budget), 1: variants
    note: str = ""

    @property
    def in_rotations(self) -> int:
        return 1 if self.lifting else self.group_order

    @property
    def padding(self) -> int:
        return self.kernel_size // 2  # "same"

    @property
    def out_size(self) -> int:
        return self.size + 2 * self.padding - self.kernel_size + 1

    @property
    def positions(self) -> int:
        return self.out_size**2

    def describe(self) -> str:
        grp = "T(2)" if self.group_order == 1 else f"SE(2)-{self.group_order}"
        ns = []
        if self.rotation_nonstationary:
            ns.append("rot-ns")
        if self.translation_nonstationary:
            ns.append("trans-ns")
        kind = "lift" if self.lifting else "gconv"
        extra = f" {'+'.join(ns)}" if ns else ""
        return (
            f"{grp} {kind}{extra} C {self.in_channels}->{self.out_channels} {self.size}x{self.size} "
            f"B {self.batch} K {self.kernel_size} H {self.hidden}"
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["description"] = self.describe()
        return d


def _c(name, n, c, size, batch, *, trans=False, priority=0, note="", **kw) -> Case:
    return Case(name, n, c, c, size, batch, translation_nonstationary=trans, priority=priority, note=note, **kw)


# design.md §5: batch 64, K = 7, H = 32 unless stated.
CASES: dict[str, Case] = {
    c.name: c
    for c in [
        _c("G1", 8, 32, 32, 64),
        _c("G2", 8, 64, 16, 64),
        _c("G3", 16, 32, 32, 64),
        _c("G4", 8, 128, 16, 64),
        _c("T1", 1, 32, 32, 64, trans=True),
        _c("T2", 8, 32, 16, 16, trans=True),
        _c("T2-b64-32px", 8, 32, 32, 64, trans=True, priority=1,
           note="memory case: materialize needs ~16x T2's memory"),
        _c("G1-b1", 8, 32, 32, 1, priority=1),
        _c("G1-b256", 8, 32, 32, 256, priority=1),
        _c("G1-64px", 8, 32, 64, 64, priority=1),
        _c("T1-b1", 1, 32, 32, 1, trans=True, priority=1),
        _c("T1-b256", 1, 32, 32, 256, trans=True, priority=1),
        _c("T1-64px", 1, 32, 64, 64, trans=True, priority=1),
    ]
}

# What --quick runs: one strict group conv at C = 32 (cuDNN's ground), one where the factored form
# needs fewer FLOPs (C_out >> H), and the two translation non-stationary cases.
QUICK = ("G1", "G4", "T1", "T2")


def cpu_scaled(case: Case) -> Case:
    """The same layer, shrunk for a CPU run: batch / 32 (1..8), half the image, a quarter of the
    channels (at least 8). Group order, kernel size and hidden width are kept: they set the method's
    FLOP ratios (design.md §2)."""
    return dataclasses.replace(
        case,
        batch=max(1, min(8, case.batch // 32)),
        size=max(case.kernel_size, case.size // 2),
        in_channels=max(8, case.in_channels // 4),
        out_channels=max(8, case.out_channels // 4),
        note=(case.note + "; " if case.note else "") + "scaled down for CPU",
    )


def select(names, *, scale: str) -> list[Case]:
    """Cases by name (in priority order), at "full" (GPU) or "cpu" scale."""
    out = []
    for name in names:
        if name not in CASES:
            raise ValueError(f"unknown case {name!r}; expected some of {', '.join(CASES)}")
        case = CASES[name]
        out.append(cpu_scaled(case) if scale == "cpu" else case)
    return sorted(out, key=lambda c: c.priority)  # stable: keeps the given order within a priority


def build_layer(case: Case, device) -> torch.nn.Module:
    """The case's layer in fp32 (bf16 inputs run it as under autocast: README "Mixed dtypes")."""
    cls = LiftingConv if case.lifting else GroupConv
    layer = cls(
        case.in_channels,
        case.out_channels,
        case.kernel_size,
        case.group_order,
        padding="same",
        hidden_channels=case.hidden,
        rotation_nonstationary=case.rotation_nonstationary,
        translation_nonstationary=case.translation_nonstationary,
        omega_rot=1.0 if case.rotation_nonstationary else 0.0,
        omega_pos=1.0 if case.translation_nonstationary else 0.0,
    )
    return layer.to(device)


def make_input(case: Case, device, dtype, *, requires_grad: bool = True) -> torch.Tensor:
    x = torch.randn(case.batch, case.in_channels * case.in_rotations, case.size, case.size, device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


def expanded_weight_shape(case: Case) -> tuple[int, int, int, int]:
    """The conv2d weight of the same expanded shape: ``[C_out*N, C_in*N_in, K, K]``."""
    k = case.kernel_size
    return (case.out_channels * case.group_order, case.in_channels * case.in_rotations, k, k)
