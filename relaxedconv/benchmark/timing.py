"""Median wall time of a callable, and its peak memory.

CUDA: ``triton.testing.do_bench`` (L2 flushed before each call, CUDA events, warm-up excluded,
median of the repetitions), or CUDA events when that function's signature is not the one we know.
CPU: ``time.perf_counter`` around each call, after a few untimed calls; the median.

Every callable here has already been run once by the caller (compilation, Triton autotuning and
cuDNN's algorithm search happen there and are never timed).
"""
from __future__ import annotations

import gc
import inspect
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float | None
    p80_ms: float | None
    reps: int | None
    method: str


@dataclass(frozen=True)
class TimingConfig:
    """How long to measure. GPU: do_bench's warm-up and repetition time in ms. CPU: at least
    ``cpu_min_reps`` and at most ``cpu_max_reps`` timed calls, stopping once ``cpu_target_s`` passed."""

    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cpu_min_reps: int = 3
    cpu_max_reps: int = 20
    cpu_target_s: float = 1.0
    cpu_warmup_reps: int = 3  # untimed calls first (allocator and oneDNN caches settle)


QUICK = TimingConfig(warmup_ms=10.0, rep_ms=30.0, cpu_min_reps=3, cpu_max_reps=5, cpu_target_s=0.3, cpu_warmup_reps=2)
FULL = TimingConfig()


def _do_bench():
    """triton.testing.do_bench if its signature takes what we pass (triton 3.x: warmup, rep,
    grad_to_none, quantiles), else None."""
    try:
        from triton.testing import do_bench
    except Exception:
        return None
    params = inspect.signature(do_bench).parameters
    if all(p in params for p in ("warmup", "rep", "grad_to_none", "quantiles")):
        return do_bench
    return None


def _clear_grads(tensors) -> None:
    for t in tensors or ():
        t.grad = None


def time_cuda(fn, cfg: TimingConfig, grad_to_none=None) -> Timing:
    do_bench = _do_bench()
    if do_bench is not None:
        q = do_bench(fn, warmup=cfg.warmup_ms, rep=cfg.rep_ms, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
        q = list(q) if isinstance(q, (list, tuple)) else [float(q), None, None]
        return Timing(float(q[0]), q[1], q[2], None, "triton.testing.do_bench (median; L2 flushed)")
    return _time_cuda_events(fn, cfg, grad_to_none)


def _time_cuda_events(fn, cfg: TimingConfig, grad_to_none=None) -> Timing:
    # Estimate one call, then warm up and repeat for the configured times (what do_bench does).
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(3):
        _clear_grads(grad_to_none)
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(max(1, int(cfg.warmup_ms / est))):
        _clear_grads(grad_to_none)
        fn()
    n = max(3, int(cfg.rep_ms / est))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        _clear_grads(grad_to_none)
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return Timing(statistics.median(times), times[int(0.2 * (n - 1))], times[int(0.8 * (n - 1))], n, "CUDA events (median)")


def time_cpu(fn, cfg: TimingConfig, grad_to_none=None) -> Timing:
    for _ in range(cfg.cpu_warmup_reps):
        _clear_grads(grad_to_none)
        fn()
    times = []
    t_end = time.perf_counter() + cfg.cpu_target_s
    while len(times) < cfg.cpu_max_reps and (len(times) < cfg.cpu_min_reps or time.perf_counter() < t_end):
        _clear_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    n = len(times)
    return Timing(statistics.median(times), times[int(0.2 * (n - 1))], times[int(0.8 * (n - 1))], n, "time.perf_counter (median)")


def time_fn(fn, device: torch.device, cfg: TimingConfig, grad_to_none=None) -> Timing:
    if device.type == "cuda":
        return time_cuda(fn, cfg, grad_to_none)
    return time_cpu(fn, cfg, grad_to_none)


def peak_memory_mib(fn, device: torch.device, grad_to_none=None) -> float | None:
    """Peak CUDA memory allocated during one call of ``fn``, above what was allocated before (the
    inputs and parameters are not counted; gradients and saved activations are). None off CUDA:
    the CPU allocator has no such counter (tracemalloc does not see torch's allocations)."""
    if device.type != "cuda":
        return None
    _clear_grads(grad_to_none)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    _clear_grads(grad_to_none)
    return peak / 2**20


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_call(fn, device: torch.device) -> float:
    """Seconds of one call of ``fn``, the device synchronised before and after (work queued
    earlier is not counted, the call's own work is)."""
    return host_and_total(fn, device)[1]


def host_and_total(fn, device: torch.device) -> tuple[float, float]:
    """(host, total) seconds of one call of ``fn`` on an idle device: until ``fn`` returns (the
    host's time to issue its work) and until the device finished it. host close to total: the call
    is bound by the host's per-operator cost, and a GPU only waits; well under it: by the device.
    (A host that blocks, on a full launch queue or a synchronising operator, shows as host time.)"""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    synchronize(device)
    return t1 - t0, time.perf_counter() - t0
