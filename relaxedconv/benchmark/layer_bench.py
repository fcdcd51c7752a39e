"""One row of the layer benchmark: a (case, dtype, backend) measured forward, backward, fwd+bwd.

- ``fwd``: ``layer(x, backend=...)`` with autograd recording (the forward of a training step, kernel
  net included), ``x`` and the layer's parameters requiring grad.
- ``fwdbwd``: the same forward, then ``y.backward(dy)`` with a fixed random ``dy``.
- ``bwd = fwdbwd - fwd`` (the difference of the two medians; no retain_graph timing).
- ``peak_mib``: CUDA peak memory of one fwd+bwd above what was allocated before it (input,
  parameters and ``dy`` excluded); None on CPU.
- ``conv2d``: a plain ``F.conv2d`` with a random weight of the expanded shape
  ``[C_out*N, C_in*N_in, K, K]``: the cuDNN (oneDNN on CPU) ceiling without the kernel net's cost.
  For translation non-stationary cases it is the stationary ceiling only: conv2d cannot compute them.

Status of a row: ``ok``; ``n/a`` (the backend table, :data:`relaxedconv.dispatch.BACKEND_TABLE`,
says the backend cannot compute this layer, e.g. expand_conv on a translation non-stationary
layer, or a kernel refused the shape); ``not timed`` (a CUDA-only backend without a GPU);
``oom``; ``skipped`` (the time budget ran out); ``error`` (anything else, with the message).

``compile`` (``--layer-compile``): every row's callable (the layer's forward, or conv2d) wrapped in
``torch.compile`` with that mode, so the kernel net's elementwise passes are fused by Inductor and,
with ``reduce-overhead``, the host's per-operator cost goes into CUDA graphs; the row records the
mode. The first calls (compilation) are not timed.

``auto`` rows record what auto ran (``auto_choice``: the layer's backend after the first call,
measured or static per ``auto_policy``). :func:`interleaved_ratio` times auto against the best
concrete backend in alternation, so a drift of the machine hits both (issue 12, item 10).
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import time

import torch
import torch.nn.functional as F

from .. import dispatch
from . import cases as cases_mod
from .flops import case_macs, tflops
from .timing import TimingConfig, peak_memory_mib, time_fn, timed_call

# The backend table's backends (the fused one first), auto, and "conv2d": the plain F.conv2d of
# the same expanded shape.
CONCRETE_BACKENDS = tuple(sorted(dispatch.BACKEND_TABLE, key=lambda b: (b != "triton", dispatch.BACKEND_TABLE[b].slow_reference)))
LAYER_BACKENDS = (*CONCRETE_BACKENDS, "auto")
BENCH_BACKENDS = (*LAYER_BACKENDS, "conv2d")

# name -> (torch dtype, allow TF32 in cuBLAS/cuDNN)
DTYPES = {
    "fp32": (torch.float32, False),
    "tf32": (torch.float32, True),
    "bf16": (torch.bfloat16, True),
    "fp16": (torch.float16, True),
}
NO_GPU = "fused kernel not timed: no GPU"
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
# Inductor for measurements; the tests swap in "aot_eager" (Dynamo and AOTAutograd without code
# generation: a 2-core CPU would spend minutes compiling C++).
COMPILE_BACKEND = "inductor"


def compiled(fn, mode: str):
    """``fn`` under ``torch.compile(mode=...)``, or ``fn`` itself for ``off``. CUDA-graph modes
    start a new graph step per call, so a timed loop may drop the previous call's outputs."""
    if mode == "off":
        return fn
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; expected one of {', '.join(COMPILE_MODES)}")
    torch._dynamo.reset()  # one callable per row: without it the rows would share one cache and its size limit
    run = torch.compile(fn, mode=None if mode == "default" else mode, backend=COMPILE_BACKEND)
    if mode == "default":
        return run

    def step(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return run(*args)

    return step


def resolve_dtypes(names, device: torch.device) -> tuple[list[str], list[str]]:
    """Requested dtype names -> those that run on ``device`` (tf32 is fp32 off CUDA), and notes."""
    out, notes = [], []
    for name in names:
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; expected some of {', '.join(DTYPES)}")
        if name == "tf32" and device.type != "cuda":
            notes.append("tf32 requested without CUDA: measured as fp32")
            name = "fp32"
        if name not in out:
            out.append(name)
    return out, notes


@contextlib.contextmanager
def precision(dtype_name: str):
    """TF32 on or off for cuBLAS and cuDNN while measuring; restored afterwards."""
    _, tf32 = DTYPES[dtype_name]
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def oom_errors():
    types = [torch.cuda.OutOfMemoryError]
    if hasattr(torch, "OutOfMemoryError"):
        types.append(torch.OutOfMemoryError)
    return tuple(types)


def record_failure(row: dict, exc: BaseException, not_applicable) -> dict:
    """Fill ``row`` for a measurement that raised: ``n/a`` for a ValueError that
    ``not_applicable(message)`` accepts (the backend cannot express this layer), ``oom``, else
    ``error`` with the exception's first line. A benchmark records failures and goes on."""
    msg = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, ValueError) and not_applicable(msg[:300]):
        row.update(status="n/a", reason=msg[:300])
    elif isinstance(exc, oom_errors()):
        row.update(status="oom", reason=msg[:200])
    else:
        row.update(status="error", reason=f"{type(exc).__name__}: {msg[:300]}")
    return row


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def base_row(case, dtype_name: str, backend: str, compile_mode: str = "off") -> dict:
    return {
        "case": case.name,
        "dtype": dtype_name,
        "backend": backend,
        "compile": compile_mode,
        "status": None,
        "reason": None,
        "auto_choice": None,
        "auto_vs_best": None,
        "fwd_ms": None,
        "bwd_ms": None,
        "fwdbwd_ms": None,
        "fwd_p20_p80_ms": None,
        "fwdbwd_p20_p80_ms": None,
        "peak_mib": None,
        "tflops": None,
        "timing_method": None,
    }


def skipped_row(case, dtype_name: str, backend: str, reason: str, compile_mode: str = "off") -> dict:
    row = base_row(case, dtype_name, backend, compile_mode)
    row.update(status="skipped", reason=reason)
    return row


def _closures(case, layer, backend: str, x: torch.Tensor, dy: torch.Tensor, compile_mode: str = "off"):
    """(fwd, fwdbwd, tensors whose .grad is cleared between calls)."""
    if backend == "conv2d":
        g = torch.Generator(device="cpu").manual_seed(1)
        fan_in = case.in_channels * case.in_rotations * case.kernel_size**2
        w = torch.randn(cases_mod.expanded_weight_shape(case), generator=g) / fan_in**0.5
        w = w.to(device=x.device, dtype=x.dtype).requires_grad_(True)
        pad = case.padding
        conv = compiled(lambda t, weight: F.conv2d(t, weight, padding=pad), compile_mode)

        def fwd():
            return conv(x, w)

        leaves = [x, w]
    else:
        run = compiled(lambda t: layer(t, backend=backend), compile_mode)

        def fwd():
            return run(x)

        leaves = [x, *layer.parameters()]

    def fwdbwd():
        fwd().backward(dy)

    return fwd, fwdbwd, leaves


def table_refusal(case, dtype_name: str, backend: str, device: torch.device):
    """``(status, reason)`` when the backend table says this row cannot run here, else None."""
    if backend not in dispatch.BACKEND_TABLE:
        return None
    entry = dispatch.BACKEND_TABLE[backend]
    if device.type not in entry.devices:  # e.g. triton on a CPU (its interpreter is a testing aid)
        return "not timed", NO_GPU if entry.devices == ("cuda",) else f"{backend} does not run on {device.type}"
    with precision(dtype_name):
        refusal = dispatch.unsupported(backend, device_type=device.type, dtype=DTYPES[dtype_name][0],
                                       per_position=case.translation_nonstationary)
    if refusal is not None:
        return ("n/a" if refusal[0] is ValueError or refusal[0] is TypeError else "error"), refusal[1][:300]
    return None


def measure(case, layer, dtype_name: str, backend: str, device: torch.device, cfg: TimingConfig,
            compile_mode: str = "off") -> dict:
    """One row (see the module docstring). ``layer`` is the case's fp32 module on ``device``."""
    row = base_row(case, dtype_name, backend, compile_mode)
    refusal = table_refusal(case, dtype_name, backend, device)
    if refusal is not None:
        row.update(status=refusal[0], reason=refusal[1])
        return row
    dtype, _ = DTYPES[dtype_name]
    macs = case_macs(case)
    x = dy = None
    try:
        with precision(dtype_name):
            torch.manual_seed(0)
            x = cases_mod.make_input(case, device, dtype)
            out_hw = (case.out_size, case.out_size)
            dy = torch.randn(case.batch, case.out_channels * case.group_order, *out_hw, device=device, dtype=dtype)
            fwd, fwdbwd, leaves = _closures(case, layer, backend, x, dy, compile_mode)
            # First calls: auto's measured choice, Triton compilation/autotuning, cuDNN's algorithm
            # search, torch.compile (and CUDA-graph recording: its third call); never timed.
            for _ in range(1 if compile_mode == "off" else 3):
                for t in leaves:  # a CUDA-graph replay must not add into gradients a replay overwrote
                    t.grad = None
                fwdbwd()
                fwd()
            if backend == "auto":
                # a compiled layer does not report what it ran (no Python runs per call)
                row["auto_choice"] = layer.last_backend if compile_mode == "off" else None
            row["peak_mib"] = peak_memory_mib(fwdbwd, device, leaves)
            t_fwd = time_fn(fwd, device, cfg, leaves)
            t_fb = time_fn(fwdbwd, device, cfg, leaves)
    except Exception as e:  # noqa: BLE001 - recorded in the row
        # n/a: the backend cannot express this layer (expand_conv + translation non-stationarity),
        # or a kernel refused the shape (32-bit indexing).
        return record_failure(row, e, lambda msg: "32-bit" in msg)
    finally:
        for t in (x, dy):
            if t is not None:
                t.grad = None
        for p in layer.parameters():
            p.grad = None
        del x, dy
        free_memory(device)
    bwd_ms = max(t_fb.median_ms - t_fwd.median_ms, 0.0)
    row.update(
        status="ok",
        fwd_ms=t_fwd.median_ms,
        bwd_ms=bwd_ms,
        fwdbwd_ms=t_fb.median_ms,
        fwd_p20_p80_ms=[t_fwd.p20_ms, t_fwd.p80_ms],
        fwdbwd_p20_p80_ms=[t_fb.p20_ms, t_fb.p80_ms],
        timing_method=t_fwd.method,
        tflops={
            count: {
                "fwd": tflops(macs[count], "fwd", t_fwd.median_ms),
                "bwd": tflops(macs[count], "bwd", bwd_ms),
                "fwdbwd": tflops(macs[count], "fwdbwd", t_fb.median_ms),
            }
            for count in ("direct", "factored")
        },
    )
    return row


def interleaved_ratio(case, layer, dtype_name: str, a: str, b: str, device: torch.device, cfg: TimingConfig,
                      compile_mode: str = "off") -> dict:
    """fwd+bwd of backend ``a`` over backend ``b``, timed in alternation (a b, b a, a b, ...) so that
    a drift of the machine (another process, clocks) hits both; each call synchronised on CUDA.

    Returns ``ratio`` (median time of a / median time of b), ``pair_p20_p80`` (the 20th and 80th
    percentiles of the per-round ratios: the noise) and ``rounds``.
    """
    dtype, _ = DTYPES[dtype_name]
    with precision(dtype_name):
        torch.manual_seed(0)
        x = cases_mod.make_input(case, device, dtype)
        dy = torch.randn(case.batch, case.out_channels * case.group_order, case.out_size, case.out_size,
                         device=device, dtype=dtype)
        calls = {}
        for name in (a, b):
            _, fwdbwd, leaves = _closures(case, layer, name, x, dy, compile_mode)
            calls[name] = (fwdbwd, leaves)

        def timed(name):
            fn, leaves = calls[name]
            for t in leaves:
                t.grad = None
            return timed_call(fn, device)

        for _ in range(1 if compile_mode == "off" else 3):
            for name in (a, b):
                timed(name)  # warm (and compile, and record CUDA graphs)
        ta, tb = [], []
        min_rounds, max_rounds = (5, 50) if device.type == "cuda" else (cfg.cpu_min_reps + 2, 2 * cfg.cpu_max_reps)
        budget_s = 2 * (cfg.rep_ms / 1e3 if device.type == "cuda" else cfg.cpu_target_s)
        t_end = time.perf_counter() + budget_s
        while len(ta) < max_rounds and (len(ta) < min_rounds or time.perf_counter() < t_end):
            first, second = (a, b) if len(ta) % 2 == 0 else (b, a)
            t1, t2 = timed(first), timed(second)
            ta.append(t1 if first == a else t2)
            tb.append(t2 if first == a else t1)
        for name in (a, b):
            for t in calls[name][1]:
                t.grad = None
    pair = sorted(p / q for p, q in zip(ta, tb))
    n = len(pair)
    return {
        "backend": a,
        "against": b,
        "ratio": statistics.median(ta) / statistics.median(tb),
        "pair_p20_p80": [pair[int(0.2 * (n - 1))], pair[int(0.8 * (n - 1))]],
        "rounds": n,
    }
