"""Which of two equivalent routes a step takes, timed once per shape on a GPU.

Some steps have two implementations that compute the same thing with different costs, and which
is faster depends on the shape and the card more than any rule we could write down without
measuring (dX with or without im2col columns: ``relaxed_conv_bwd.input_grad_route``). Like
Triton's autotuner and ``torch.backends.cudnn.benchmark``, the first call of a shape times every
route (after one untimed call, which compiles and autotunes it) and later calls reuse the
fastest. Where nothing may be timed — off a GPU, in the interpreter, with
``RELAXEDCONV_AUTOTUNE=0`` (a fixed choice across processes), under
``torch.use_deterministic_algorithms`` (``relaxedconv train --deterministic``: the routes round
differently, and a run and its resumption must agree: there the default runs even for a shape
chosen earlier in the process), or while a CUDA graph is being captured (a shape chosen before
keeps its route) — the default route runs and nothing is recorded, so a later eager call still
tunes. A route that failed is not retried for that shape in this process.

A route that fails (a compile error on an unfamiliar card, out of memory) is skipped with a
warning, not raised: the other route computes the same result.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch

from . import common

# do_bench's warm-up and repetition time per route, ms: a choice costs ~2 x (5 + 20) ms per shape.
WARMUP_MS = 5.0
REP_MS = 20.0


@dataclasses.dataclass(frozen=True)
class RouteChoice:
    route: str
    times_ms: dict  # route -> median ms of the routes that ran
    skipped: dict  # route -> why it did not run


_CHOICES: dict[tuple, RouteChoice] = {}
_timer = None


def set_timer(timer) -> None:
    """Tests: ``timer(fn, route) -> ms`` instead of timing on the GPU (None: the default)."""
    global _timer
    _timer = timer


def clear() -> None:
    _CHOICES.clear()


def choices() -> dict[tuple, RouteChoice]:
    """Every choice made in this process, by (step, shape key)."""
    return dict(_CHOICES)


def _default_timer(fn, route: str) -> float:
    from relaxedconv.benchmark.timing import TimingConfig, time_cuda

    return time_cuda(fn, TimingConfig(warmup_ms=WARMUP_MS, rep_ms=REP_MS)).median_ms


def may_time(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a route may be chosen by timing now (see the module docstring)."""
    if _timer is not None:
        return True
    if not common.use_autotune(device, dtype) or torch.are_deterministic_algorithms_enabled():
        return False
    return not torch.cuda.is_current_stream_capturing()


def choose(step: str, key: tuple, routes: dict, *, default: str, device: torch.device, dtype: torch.dtype) -> str:
    """The route of ``step`` for shape ``key``: ``routes`` maps each name to a zero-argument call."""
    if _timer is None and torch.are_deterministic_algorithms_enabled():
        return default  # even where a choice was recorded before the switch (see the module docstring)
    full_key = (step, *key)
    known = _CHOICES.get(full_key)
    if known is not None:
        return known.route  # also while a CUDA graph is captured: the recorded route is replayed
    if not may_time(device, dtype):
        return default
    timer = _timer or _default_timer
    times, skipped = {}, {}
    for name, fn in routes.items():
        try:
            fn()  # untimed: compilation and the kernels' own autotuning happen here
            times[name] = float(timer(fn, name))
        except Exception as e:  # noqa: BLE001 - a route that cannot run is not a candidate
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            warnings.warn(f"relaxedconv: {step} route {name!r} failed and is skipped for this shape "
                          f"({skipped[name]})", RuntimeWarning, stacklevel=3)
    route = min(times, key=times.get) if times else default
    _CHOICES[full_key] = RouteChoice(route, times, skipped)
    return route
