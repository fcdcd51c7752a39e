"""Dispatched ATen operators, and how many of them read or write a tensor as large as Z, in one
layer's forward + backward on the triton backend (kernel net included), on CPU.

    python bench/layer_passes.py [T1 T2 G4 ...] [--dtype bf16]   # benchmark cases, batch 2

The Triton launches are stubbed out (on CPU the interpreter would add copies of its own that a GPU
launch does not make; the outputs are then uninitialised, only the counts mean anything). A "pass"
is an operator with an input or output of at least half of Z's elements ([N, (P,) J, H+1]): on a
GPU each costs a trip through DRAM (T2: 26.5 M values) and one host dispatch (~10 µs on the H200).
"""
import argparse
import collections
import dataclasses
import os

import torch

os.environ.setdefault("TRITON_INTERPRET", "1")


def count_layer(case_name: str, dtype: torch.dtype, batch: int = 2):
    from relaxedconv.benchmark import cases as C
    from relaxedconv.benchmark.opcount import NO_LAUNCH_OPS, OpSizes
    from relaxedconv.kernels import common

    case = dataclasses.replace(C.CASES[case_name], batch=batch)
    layer = C.build_layer(case, torch.device("cpu"))
    x = C.make_input(case, torch.device("cpu"), dtype).requires_grad_()
    real_launch = common.launch
    common.launch = lambda *a, **k: None
    try:
        def step():
            y = layer(x, backend="triton")
            y.backward(torch.ones_like(y))
            layer.zero_grad(set_to_none=True)
            x.grad = None

        step()
        with OpSizes() as seq:
            step()
    finally:
        common.launch = real_launch
    hw = (case.out_size,) * 2
    with torch.no_grad():
        z_numel = layer.factored_kernel(hw)[0].numel()
    ops = [(name, n) for name, n in seq.ops if name not in NO_LAUNCH_OPS]
    passes = [(name, n) for name, n in ops if n >= z_numel // 2]
    return len(seq.ops), len(ops), passes, z_numel


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="*", default=["T1", "T2"])
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    args = ap.parse_args(argv)
    from relaxedconv.benchmark.cases import CASES

    unknown = [n for n in args.cases if n not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; expected some of {', '.join(CASES)}")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    for name in args.cases:
        total, compute, passes, z_numel = count_layer(name, dtype)
        print(f"{name} {args.dtype}: {total} dispatched operators, {compute} not views/allocations; "
              f"{len(passes)} passes over tensors of >= {z_numel // 2} elements (Z: {z_numel}):")
        for op, k in collections.Counter(n for n, _ in passes).most_common():
            print(f"    {k} x {op}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
