"""Find which fused kernel (and which autotune config) faults: one layer's forward and backward
with every launch synchronised and every config the autotuner times printed before it runs.

    CUDA_LAUNCH_BLOCKING=1 python -m relaxedconv.kernels.launch_trace --case T1 --dtype tf32

An asynchronous fault ("an illegal memory access was encountered") surfaces at some later,
unrelated call; here the last ``launch``/``bench`` line before the traceback names the kernel and
config. Exit status 0 when the layer ran, 1 when it raised. Pin a suspect away with
RELAXEDCONV_KERNEL_CONFIG to confirm (2026-11-27: bench/results/h200-2026-11-27-705c378/crash_tf32*.log).
"""
from __future__ import annotations

import argparse
import sys
import traceback

import torch
import triton.runtime.autotuner as autotuner

from . import common

DTYPES = {"bf16": (torch.bfloat16, False), "tf32": (torch.float32, True), "fp32": (torch.float32, False),
          "fp64": (torch.float64, False)}


def trace(case, dtype_name: str, device, log=print) -> bool:
    """Run ``case``'s layer (backend triton) with every launch traced; True when it ran."""
    from relaxedconv.benchmark import cases as cases_mod
    from relaxedconv.benchmark.timing import synchronize as _sync

    dtype, tf32 = DTYPES[dtype_name]
    real_bench, real_launch = autotuner.Autotuner._bench, common.launch

    def bench(self, *args, config=None, **meta):
        log(f"  bench {getattr(self.base_fn, '__name__', '?')} {config}")
        out = real_bench(self, *args, config=config, **meta)
        _sync(device)
        return out

    def launch(name, *args, **kw):
        log(f"launch {name}")
        out = real_launch(name, *args, **kw)
        _sync(device)
        log(f"  ok {name}")
        return out

    old_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    autotuner.Autotuner._bench, common.launch = bench, launch
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        torch.manual_seed(0)
        layer = cases_mod.build_layer(case, device).to(dtype if dtype == torch.float64 else torch.float32)
        x = cases_mod.make_input(case, device, dtype)
        y = layer(x, backend="triton")
        y.backward(torch.randn_like(y))
        _sync(device)
        log(f"PASS {case.name} {dtype_name}")
        return True
    except Exception:  # noqa: BLE001 - the point is to show it
        log(traceback.format_exc(limit=-6))
        log(f"FAIL {case.name} {dtype_name}")
        return False
    finally:
        autotuner.Autotuner._bench, common.launch = real_bench, real_launch
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old_tf32


def main(argv=None) -> int:
    from relaxedconv.benchmark import cases as cases_mod

    ap = argparse.ArgumentParser(prog="python -m relaxedconv.kernels.launch_trace", description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="T1", help="a benchmark case name (relaxedconv bench --list)")
    ap.add_argument("--dtype", default="tf32", choices=sorted(DTYPES))
    args = ap.parse_args(argv)
    if args.case not in cases_mod.CASES:
        ap.error(f"unknown case {args.case!r}; known: {', '.join(cases_mod.CASES)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    case = cases_mod.CASES[args.case]
    if device.type != "cuda":
        if not common.interpreting():
            ap.error("no GPU: set TRITON_INTERPRET=1 to trace the kernels in Triton's interpreter")
        case = cases_mod.cpu_scaled(case)
    return 0 if trace(case, args.dtype, device, log=lambda s: print(s, flush=True)) else 1


if __name__ == "__main__":
    sys.exit(main())
