"""A short example: a relaxed SE(2)-4 stack, one batch, each layer's omegas and equivariance error."""
from __future__ import annotations

import argparse

import torch
from torch import nn

from . import GroupConv, InvariantPool, LiftingConv, equivariance_error, layer_equivariance_errors, omegas


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="relaxedconv demo", description=__doc__)
    ap.add_argument("--group-order", type=int, default=4)
    ap.add_argument("--omega-rot", type=float, default=1.0, help="initial rotation frequency of the relaxed layers")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build(args.group_order, args.omega_rot, args.backend).to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    logits = model(x)
    print(f"logits {tuple(logits.shape)} on {device}")
    print("\nlayer  omegas                                   equivariance error (relative)")
    errs = layer_equivariance_errors(model, x)
    for name, om in omegas(model).items():
        om_s = ", ".join(f"{k}={v:.3g}" for k, v in om.items())
        err_s = ", ".join(f"{k}={v:.2e}" for k, v in errs.get(name, {}).items())
        print(f"{name:<6} {om_s:<40} {err_s}")
    whole = equivariance_error(model, x)
    print("\nwhole model (logits):", ", ".join(f"{k}={v:.2e}" for k, v in whole.items()))
    return 0
