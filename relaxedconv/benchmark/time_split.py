"""Where a layer's fwd+bwd time goes: host overhead vs device work, kernel net vs convolution.

    python -m relaxedconv.benchmark.time_split --cases T1,T2 --backends triton [--json out.json]

For each case and backend, three things are timed (wall clock per call, synchronised) and
profiled (the sum of the device kernels' time, the number of aten operators per call):

- the whole layer (kernel net + convolution, forward and backward);
- the kernel net alone (Z and [W_L | b_L] and their backward);
- the convolution alone from fixed factors (``functional.relaxed_conv``).

A wall time well above the device time means the host is the bound (launches and Python, about
10 us per small operator on the H200 machine measured 2026-11-27): fewer operators, CUDA graphs or
torch.compile help; a device time near the wall time means the kernels are. Also prints the host
cost of one small operator on this machine, and the profiler's top operators of the whole layer.
Without a GPU it runs scaled-down cases on the CPU (host and device are then the same thing).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from .. import dispatch, functional
from . import cases as cases_mod
from . import report
from .timing import synchronize as _sync


def small_op_host_us(device, n: int = 2000) -> float:
    """Host time of one tiny in-place add, back to back: the floor under every operator."""
    a = torch.zeros(16, device=device)
    for _ in range(50):
        a.add_(1)
    _sync(device)
    t = time.perf_counter()
    for _ in range(n):
        a.add_(1)
    _sync(device)
    return (time.perf_counter() - t) / n * 1e6


def device_time_us(events) -> float:
    """Device time of a profile's averaged events, each kernel counted once.

    Kineto lists every kernel twice: as a device event, and inside the ``self_device_time_total``
    of the CPU operator that launched it. Summing over all events (as this tool did until
    2026-11-27) doubled the device time; the profiler's own table total counts the device events
    alone, as here."""
    return sum(e.self_device_time_total for e in events
               if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False))


def measure(fn, device, reps: int = 20, profiled: int = 5):
    """(wall ms per call, device-kernel ms per call, aten operators per call, profiler averages)."""
    for _ in range(3):
        fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    wall = (time.perf_counter() - t) / reps * 1e3
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(profiled):
            fn()
        _sync(device)
    ev = prof.key_averages()
    device_ms = device_time_us(ev) / profiled / 1e3
    ops = sum(e.count for e in ev if e.key.startswith("aten::")) / profiled
    return wall, device_ms, ops, ev


def split_case(case, backend: str, device, dtype) -> dict:
    torch.manual_seed(0)
    layer = cases_mod.build_layer(case, device)
    x = cases_mod.make_input(case, device, dtype)
    out_hw = (case.out_size, case.out_size)
    dy = torch.randn_like(layer(x, backend=backend))
    z0, w0 = (t.detach().requires_grad_() for t in layer.factored_kernel(out_hw))

    def whole():
        layer(x, backend=backend).backward(dy)

    def kernel_net():
        z, w = layer.factored_kernel(out_hw)
        (z.sum() + w.sum()).backward()

    def conv():
        functional.relaxed_conv(x, z0, w0, layer.bias, layer.geometry, backend=backend).backward(dy)

    row = {"case": case.name, "backend": backend, "dtype": str(dtype).replace("torch.", "")}
    for name, fn in (("whole", whole), ("kernel_net", kernel_net), ("conv", conv)):
        wall, dev_ms, ops, ev = measure(fn, device)
        row[name] = {"wall_ms": wall, "device_ms": dev_ms if device.type == "cuda" else None, "aten_ops": ops}
        if name == "whole":
            sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
            row["top"] = ev.table(sort_by=sort, row_limit=12, max_name_column_width=50)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m relaxedconv.benchmark.time_split", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="T1,T2", help="benchmark case names (relaxedconv bench --list)")
    ap.add_argument("--backends", default="triton", help="comma-separated, of " + ", ".join(dispatch.BACKENDS))
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in cases_mod.CASES]
    if unknown or not names:
        ap.error(f"unknown case(s) {unknown or '(none given)'}; known: {', '.join(cases_mod.CASES)}")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in dispatch.BACKENDS]
    if unknown or not backends:
        ap.error(f"unknown backend(s) {unknown or '(none given)'}; known: {', '.join(dispatch.BACKENDS)}")
    host_us = small_op_host_us(device)
    print(f"{device.type}: host cost of one small operator {host_us:.1f} us")
    rows = []

    save = report.json_saver(args.json, lambda: {  # after every row (device_check.sh's timeout)
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "small_op_host_us": host_us,
        "rows": [{k: v for k, v in r.items() if k != "top"} for r in rows]}, ap.error)
    for name in names:
        case = cases_mod.CASES[name]
        if device.type != "cuda":
            case = cases_mod.cpu_scaled(case)
        for backend in backends:
            try:
                row = split_case(case, backend, device, dtype)
            except ValueError as e:  # the backend cannot run here (e.g. triton without a GPU): say so, go on
                print(f"\n{name} {backend}: not run: {e}")
                continue
            rows.append(row)
            save()
            print(f"\n{name} {backend} {row['dtype']} fwd+bwd     wall ms  device ms  aten ops")
            for part in ("whole", "kernel_net", "conv"):
                r = row[part]
                dev = "-" if r["device_ms"] is None else f"{r['device_ms']:.3f}"
                print(f"  {part:12s} {r['wall_ms']:10.3f} {dev:>10s} {r['aten_ops']:9.0f}")
            print(row["top"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
