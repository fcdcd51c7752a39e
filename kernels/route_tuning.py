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

A route that fails (a compile error on an unfamiliar card, out of memory), or whose first result
disagrees with the default route's, is skipped with a warning, not raised: the other route computes
the same result.
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


def _skip(skipped: dict, step: str, name: str, why: str) -> None:
    skipped[name] = why
    warnings.warn(f"relaxedconv: {step} route {name!r} is skipped for this shape ({why})", RuntimeWarning, stacklevel=4)


def choose(step: str, key: tuple, routes: dict, *, default: str, device: torch.device, dtype: torch.dtype,
           disagreement=None) -> str:
    """The route of ``step`` for shape ``key``: ``routes`` maps each name to a zero-argument call.

    ``disagreement(out, ref)``: None when a route's result ``out`` agrees with the default route's
    ``ref``, else why not. Each route's untimed first call is compared with the default's, so a
    route that computes something else on this card (a kernel that never ran on it before) is
    skipped with a warning rather than chosen for being fast."""
    if _timer is None and torch.are_deterministic_algorithms_enabled():
        return default  # even where a choice was recorded before the switch (see the module docstring)
    full_key = (step, *key)
    known = _CHOICES.get(full_key)
    if known is not None:
        return known.route  # also while a CUDA graph is captured: the recorded route is replayed
    if not may_time(device, dtype):
        return default
    timer = _timer or _default_timer
    times, skipped, results = {}, {}, {}
    order = [default] + [name for name in routes if name != default]  # the reference first
    for name in order:
        fn = routes[name]
        try:
            results[name] = fn()  # untimed: compilation and the kernels' own autotuning happen here
            if disagreement is not None and name != default and default in results:
                why = disagreement(results[name], results[default])
                if why is not None:
                    _skip(skipped, step, name, f"its result disagrees with the {default!r} route: {why}")
                    continue
            times[name] = float(timer(fn, name))
        except Exception as e:  # noqa: BLE001 - a route that cannot run is not a candidate
            _skip(skipped, step, name, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
    results.clear()
    route = min(times, key=times.get) if times else default
    _CHOICES[full_key] = RouteChoice(route, times, skipped)
    return route


# Largest difference relative to the largest value of the reference that still counts as rounding,
# per dtype (half precision: any other). Rounding stays far below these; a wrong index, a missed
# tile or garbage does not.
AGREEMENT_LIMITS = {torch.float64: 1e-9, torch.float32: 1e-2}
HALF_AGREEMENT_LIMIT = 5e-2


def relative_disagreement(out: torch.Tensor, ref: torch.Tensor) -> str | None:
    """A ``disagreement`` test for tensors (:data:`AGREEMENT_LIMITS`; non-finite values never agree)."""
    if not torch.isfinite(out).all():
        return "non-finite values"
    limit = AGREEMENT_LIMITS.get(ref.dtype, HALF_AGREEMENT_LIMIT)
    scale = ref.double().abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    err = float((out.double() - ref.double()).abs().max() / scale)
    return None if err <= limit else f"largest difference {err:.2e} of the largest value (limit {limit:g})"


def choice_records() -> list[dict]:
    """:func:`choices` as JSON-ready records (benchmark result files)."""
    return [{"step": key[0], "shape": [str(k) for k in key[1:]], "route": c.route, "times_ms": c.times_ms,
             "skipped": c.skipped} for key, c in _CHOICES.items()]
