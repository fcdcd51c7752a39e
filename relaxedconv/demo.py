"""A short example: a relaxed SE(2)-4 stack, one batch, each layer's omegas and equivariance error."""
from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from . import GroupConv, InvariantPool, LiftingConv, equivariance_error, layer_equivariance_errors, omegas
from .dispatch import BACKENDS
from .validation import check_positive_int


def build(group_order: int, omega_rot: float, backend: str) -> nn.Module:
    relaxed = dict(rotation_nonstationary=True, omega_rot=omega_rot, backend=backend)
    return nn.Sequential(
        LiftingConv(3, 8, 5, group_order, **relaxed),
        nn.ReLU(),
        GroupConv(8, 8, 5, group_order, **relaxed),
        nn.ReLU(),
        GroupConv(8, 8, 5, group_order, backend=backend),  # strict: omega_rot does not exist here
        InvariantPool(group_order),
        nn.Linear(8, 10),
    )


def _fmt_errors(errors: dict) -> str:
    # a layer whose map is too small to compare shifts away from the border reports None
    return ", ".join(f"{k}=" + ("n/a (map too small)" if v is None else f"{v:.2e}") for k, v in errors.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="relaxedconv demo", description=__doc__)
    ap.add_argument("--group-order", type=int, default=4, help="N rotations (a multiple of 4 checks every quarter turn)")
    ap.add_argument("--omega-rot", type=float, default=1.0, help="initial rotation frequency of the relaxed layers")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=16, help="image height and width")
    ap.add_argument("--backend", default="auto", choices=BACKENDS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        for flag, value in (("--group-order", args.group_order), ("--batch", args.batch), ("--size", args.size)):
            check_positive_int(flag, value)
        if not (math.isfinite(args.omega_rot) and args.omega_rot >= 0):
            raise ValueError(f"--omega-rot must be a finite number >= 0 (0: strictly equivariant), got {args.omega_rot}")
        model = build(args.group_order, args.omega_rot, args.backend).to(device)
        x = torch.randn(args.batch, 3, args.size, args.size, device=device)
        logits = model(x)
        errs = layer_equivariance_errors(model, x)
        # The model is invariant (up to its relaxation) only to the rotations in C_N.
        whole = {k: v for k, v in equivariance_error(model, x).items()
                 if (int(k.split("_")[1]) // 90 * args.group_order) % 4 == 0}
    except ValueError as e:  # e.g. --batch 0, an image too small for the three 5x5 layers, a backend that cannot run here
        ap.error(str(e))
    print(f"logits {tuple(logits.shape)} on {device}")
    if args.group_order % 4:
        print(f"(N = {args.group_order}: only the quarter turns in C_{args.group_order} are checked)")
    print("\nlayer  omegas                                   equivariance error (relative)")
    for name, om in omegas(model).items():
        om_s = ", ".join(f"{k}={v:.3g}" for k, v in om.items())
        print(f"{name:<6} {om_s:<40} {_fmt_errors(errs.get(name, {}))}")
    print("\nwhole model (logits):", _fmt_errors(whole) or "no quarter turn is in C_N")
    return 0
