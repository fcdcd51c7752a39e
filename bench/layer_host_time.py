"""Host time of one relaxed layer's forward + backward, on CPU, at a size where the arithmetic is
negligible: what the Python, autograd and operator dispatch around the kernels cost, the part of
a small layer's eager step that a GPU cannot take over (issue 13).

    python bench/layer_host_time.py                 # every row, best of 5 runs of 200 calls
    PYTHONPATH=<older checkout> python bench/layer_host_time.py   # the same rows on older code

Rows: a translation non-stationary lifting layer (T(2)-like) on the triton backend, its Triton
launches stubbed out (nothing runs; the host function up to each launch does), and on
factored_torch; a strict and a rotation non-stationary SE(2)-4 group layer on expand_conv.
Channels 2 -> 2, K 3, H 8, a 4 x 4 image, batch 2, bf16 input (fp32 parameters), one thread;
``--autocast``: the layer under bf16 autocast, as in the GPU e2e benchmark's step, with an fp32
input (what the model's first layer gets there; the later layers get bf16 from the layer before).
The numbers are this CPU's; a GPU host's differ, their differences less so.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import relaxedconv as rc  # noqa: E402


def _rows():
    kw = dict(hidden_channels=8)
    return [
        ("T(2) lifting, translation non-stationary", "triton",
         lambda: rc.GroupConv(2, 2, 3, 1, translation_nonstationary=True, omega_pos=1.0, **kw)),
        ("T(2) lifting, translation non-stationary", "factored_torch",
         lambda: rc.GroupConv(2, 2, 3, 1, translation_nonstationary=True, omega_pos=1.0, **kw)),
        ("SE(2)-4 group conv, strict", "expand_conv", lambda: rc.GroupConv(2, 2, 3, 4, **kw)),
        ("SE(2)-4 group conv, rotation non-stationary", "expand_conv",
         lambda: rc.GroupConv(2, 2, 3, 4, rotation_nonstationary=True, omega_rot=1.0, **kw)),
    ]


def host_us(make_layer, backend: str, calls: int = 200, runs: int = 5, autocast: bool = False) -> float:
    """Best over ``runs`` of the mean µs per fwd+bwd over ``calls`` calls."""
    torch.manual_seed(0)
    layer = make_layer()
    x = torch.randn(2, 2 * layer.in_rotations, 4, 4, dtype=torch.float32 if autocast else torch.bfloat16,
                    requires_grad=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x, backend=backend)
        y.backward(torch.ones_like(y))
        layer.zero_grad(set_to_none=True)
        x.grad = None

    for _ in range(20):
        step()
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=200, help="calls per timed run (best of 5 runs; default 200)")
    ap.add_argument("--autocast", action="store_true", help="fp32 input under bf16 autocast")
    args = ap.parse_args(argv)
    if args.calls < 1:
        ap.error("--calls must be at least 1")
    torch.set_num_threads(1)
    from relaxedconv.kernels import common

    real = common.launch
    common.launch = lambda *a, **k: None  # the triton row: host functions only
    try:
        print(f"relaxedconv from {rc.__file__}; torch {torch.__version__}")
        print("| layer | backend | host µs per fwd+bwd |")
        print("| --- | --- | --- |")
        for label, backend, make in _rows():
            print(f"| {label} | {backend} | {host_us(make, backend, args.calls, autocast=args.autocast):.0f} |")
    finally:
        common.launch = real
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
