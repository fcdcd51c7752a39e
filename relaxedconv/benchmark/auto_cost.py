"""The one-off cost of ``backend="auto"`` measuring: the first fwd+bwd of a layer with the measure
policy (the choosing included) against the steady call, per case.

    python -m relaxedconv.benchmark.auto_cost                 # CPU-scaled G1, G4, T1 without a GPU
    python -m relaxedconv.benchmark.auto_cost --cases G1,T2   # full size on a GPU
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from .. import auto_backend, dispatch
from . import cases as cases_mod


def first_call_cost(case, device) -> dict:
    timed = []

    def timer(run, *, backend, device):
        timed.append(backend)
        return auto_backend.default_timer(run, backend=backend, device=device)

    auto_backend.set_timer(timer)
    auto_backend.clear()
    try:
        torch.manual_seed(0)
        layer = cases_mod.build_layer(case, device)
        x = cases_mod.make_input(case, device, torch.float32)

        def step():
            layer(x, backend="auto").sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()

        t0 = time.perf_counter()
        step()
        first = time.perf_counter() - t0
        steady = []
        for _ in range(5):
            t0 = time.perf_counter()
            step()
            steady.append(time.perf_counter() - t0)
        choice = next(iter(auto_backend.choices().values()))
    finally:
        auto_backend.set_timer(None)
    return {"case": case.name, "layer": case.describe(), "first_s": first, "steady_s": statistics.median(steady),
            "choosing_s": first - statistics.median(steady), "backends_timed": timed, "chosen": choice.backend,
            "median_ms": choice.times_ms, "skipped": choice.skipped,
            "calls_per_backend": 1 + auto_backend.WARMUP_CALLS + auto_backend.TIMED_CALLS}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m relaxedconv.benchmark.auto_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="G1,G4,T1", help="comma-separated benchmark cases (relaxedconv bench --list)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error("--threads must be at least 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    try:
        cases = cases_mod.select(names, scale="full" if device.type == "cuda" else "cpu")
    except ValueError as e:
        ap.error(str(e))
    if not cases:
        ap.error("--cases is empty")
    torch.set_num_threads(args.threads)
    dispatch.set_auto_policy("measure")
    for case in cases:
        r = first_call_cost(case, device)
        print(f"{r['case']} ({r['layer']}): choosing {r['choosing_s']:.2f} s (first fwd+bwd {r['first_s']:.2f} s, "
              f"steady {r['steady_s'] * 1e3:.1f} ms); {r['calls_per_backend']} calls of each of "
              f"{', '.join(r['backends_timed'])} -> {r['chosen']}; median ms "
              + ", ".join(f"{k} {v:.1f}" for k, v in r["median_ms"].items())
              + (f"; skipped {r['skipped']}" if r["skipped"] else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
