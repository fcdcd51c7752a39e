"""Memory traffic of the PyTorch kernel net, forward + backward, as the operators dispatch it: the
direct form against the angle-addition split of its first layer (kernel_net.SirenKernelNet
._second_layer_split), on CPU, with a per-card time estimate.

    python bench/knet_traffic.py [T2 T2-b64-32px T1 ...] [--card H200] [--time]

For each operator that is not a view or an allocation: the bytes of every tensor it reads and
writes (out= and in-place targets counted as written; a tensor read twice counted twice), and the
multiply-adds of matrix products. The estimate charges bytes at the card's DRAM rate, products at
its fp32 FMA rate (the kernel net runs in fp32 without TF32 by default) and each launch its fixed
cost; it is a floor (no L2 reuse, no launch overlap), for comparing the two forms, not a timing.
The batch does not enter the kernel net, so the counts are the layer's at any batch. "kept":
what the forward saves for backward (distinct storages). ``--time``: the CPU's own fwd+bwd time
(best of 3, this process's threads), which the byte counts do not predict, and the host time of
each form on a tiny layer, where nothing else counts.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from relaxedconv.benchmark.opcount import NO_LAUNCH_OPS

PRODUCTS = {"mm", "addmm", "bmm", "baddbmm"}
# fp32 FMA throughput (TFLOP/s, dense, no tensor cores) and DRAM (TB/s, achievable), per card, and
# a launch's fixed device cost (µs): the spec fp32 rates (H100 SXM 67, H200 67) and the DRAM rates
# of kernels/cost_model.CARDS.
CARDS = {"H100": (67.0, 3.0, 4.0), "H200": (67.0, 4.3, 4.0)}


class Traffic(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.macs = 0
        self.launches = 0
        self.dispatched = 0
        self.large = collections.Counter()
        self.large_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.dispatched += 1
        name = func.overloadpacket.__name__
        if name in NO_LAUNCH_OPS:
            return out
        self.launches += 1
        outs = out if isinstance(out, (tuple, list)) else (out,)
        given = [*args, *(v for k, v in kwargs.items() if k != "out")]
        given = [t for a in given for t in (a if isinstance(a, (list, tuple)) else (a,))]  # cat's list
        read = [t for t in given if isinstance(t, torch.Tensor)]
        tensors = [*read, *(t for t in outs if isinstance(t, torch.Tensor))]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        self.bytes += nbytes
        if self.large_numel and max((t.numel() for t in tensors), default=0) >= self.large_numel // 2:
            self.large[name] += 1
        if name in PRODUCTS:
            a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
            self.macs += a.numel() * b.shape[-1]
        return out


def _layer(case_name: str):
    from relaxedconv.benchmark import cases as C

    case = dataclasses.replace(C.CASES[case_name], batch=1)
    return C.build_layer(case, torch.device("cpu")), (case.out_size,) * 2


def splits_by_default(case_name: str) -> bool:
    layer, hw = _layer(case_name)
    return layer.kernel_net.splits_position(layer._lattice(hw, torch.device("cpu"), torch.float32))


def _kept_bytes(fn) -> int:
    """Bytes of the distinct storages that autograd saves while ``fn`` runs."""
    seen = {}

    def pack(t):
        if t.device.type != "meta" and t.untyped_storage().nbytes():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@contextlib.contextmanager
def forced_form(split: bool):
    """Every kernel net takes the split (``split``) or the direct form, whatever its size."""
    from relaxedconv import kernel_net

    saved = kernel_net.SPLIT_MIN_VALUES, kernel_net.SPLIT_MIN_ROWS_PER_HIDDEN
    kernel_net.SPLIT_MIN_VALUES = kernel_net.SPLIT_MIN_ROWS_PER_HIDDEN = 0 if split else 1 << 62
    try:
        yield
    finally:
        kernel_net.SPLIT_MIN_VALUES, kernel_net.SPLIT_MIN_ROWS_PER_HIDDEN = saved


def _kernel_net_step(layer, hw):
    """The kernel net's forward + backward as the layer runs it (Z and [W_L | b_L])."""
    def step():
        z, w = layer.factored_kernel(hw)
        (z.sum() + w.sum()).backward()
        layer.zero_grad(set_to_none=True)
    return step


def measure(case_name: str, split: bool, timed: bool = False) -> tuple[Traffic, int, float]:
    layer, hw = _layer(case_name)
    with forced_form(split):
        knet = _kernel_net_step(layer, hw)
        knet()  # the layer's caches (lattice, mask)
        t = Traffic()
        with torch.no_grad():
            t.large_numel = layer._hidden_features(hw).numel()
        with t:
            knet()
        kept = _kept_bytes(lambda: layer.factored_kernel(hw))
        seconds = float("nan")
        if timed:
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                knet()
                runs.append(time.perf_counter() - start)
            seconds = min(runs)
    return t, kept, seconds


def tiny_layer_host_us(split: bool, calls: int = 300) -> float:
    """µs per kernel-net fwd+bwd of a layer so small that the time is the host's (operator
    dispatch, autograd, Python): what each form costs a host-bound layer."""
    import relaxedconv as rc

    torch.manual_seed(0)
    layer = rc.GroupConv(2, 2, 3, 4, hidden_channels=8, translation_nonstationary=True, omega_pos=1.0)
    with forced_form(split):
        knet = _kernel_net_step(layer, (4, 4))
        for _ in range(20):
            knet()
        start = time.perf_counter()
        for _ in range(calls):
            knet()
        return (time.perf_counter() - start) / calls * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="*", default=["T2", "T1"])
    ap.add_argument("--card", choices=sorted(CARDS), default="H200")
    ap.add_argument("--time", action="store_true", help="also time fwd+bwd on this CPU")
    args = ap.parse_args(argv)
    from relaxedconv.benchmark.cases import CASES

    unknown = [n for n in args.cases if n not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; expected some of {', '.join(CASES)}")
    tflops, tbps, launch_us = CARDS[args.card]
    print(f"| case | form | dispatched | launches | over Z-sized tensors | GB moved | GFLOP (products) | kept MiB | "
          f"{args.card} estimate µs (bytes + products + launches) | CPU ms ({torch.get_num_threads()} threads) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.cases:
        for split in (False, True):
            t, kept, seconds = measure(name, split, args.time)
            est = t.bytes / (tbps * 1e12) * 1e6, 2 * t.macs / (tflops * 1e12) * 1e6, t.launches * launch_us
            form = "split" if split else "direct"
            print(f"| {name} | {form} | {t.dispatched} | {t.launches} | {sum(t.large.values())} | {t.bytes / 1e9:.2f} | "
                  f"{2 * t.macs / 1e9:.2f} | {kept / 2**20:.0f} | {sum(est):.0f} ({est[0]:.0f} + {est[1]:.0f} + {est[2]:.0f}) | "
                  f"{'-' if seconds != seconds else format(seconds * 1e3, '.0f')} |")  # NaN: not timed (no --time)
        print(f"| {name} | the layer's default: {'split' if splits_by_default(name) else 'direct'} | | | | | | | | |")
    if args.time:
        direct, split = (min(tiny_layer_host_us(f) for _ in range(3)) for f in (False, True))
        print(f"\nhost time per kernel-net fwd+bwd of a tiny layer (GroupConv(2, 2, 3, 4), H 8, 4x4): "
              f"direct {direct:.0f} µs, split {split:.0f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
