"""End-to-end: images/s of one training step of the design.md §7 model, per variant and backend.

One step = ``zero_grad`` -> forward -> cross-entropy -> backward -> Adam step, on a fixed random
batch. bf16 runs the step under ``torch.autocast`` (the module stays fp32, as in mixed-precision
training); fp32/tf32 run it in fp32 with TF32 off/on. The first ``warmup_steps`` steps (auto's
measurement, Triton autotuning, cuDNN's algorithm search, compilation) are not timed; then each
step is timed on its own (CUDA synchronised) until ``min_time_s`` has passed and at least
``min_steps`` ran. images/s = batch / median step time; host ms = the median time until the step's
Python call returned (the device idle at its start): near the step time, the step is host-bound.
Peak memory: CUDA peak of one step above what was allocated before it (model, optimiser state and
batch excluded).

Inference: the same model in ``eval()`` under ``torch.no_grad()`` on a batch of ``infer_batch``
(timed the same way): relaxed layers reuse their cached kernel (README, "Inference").

Backend ``conv2d`` is the floor (issue 13): the same network with plain ``nn.Conv2d`` weights of
the expanded shapes (:mod:`relaxedconv.benchmark.floor`); every other row reports its step and
inference time as a ratio to it (``x_floor``). ``compile`` (E2EConfig) wraps the model in
``torch.compile(mode=...)``.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .. import dispatch
from ..layers import backends_used
from .deadline import RowTimeout, row_deadline
from .floor import plain_conv_floor
from .layer_bench import CONCRETE_BACKENDS, DTYPES, NO_GPU, free_memory, precision, record_failure
from .timing import host_and_total

E2E_VARIANTS = ("t2", "se2", "se2_rot", "se2_rot_trans")
FLOOR = "conv2d"
E2E_BACKENDS = ("auto", FLOOR, *CONCRETE_BACKENDS)  # the floor early: a time budget cuts from the end
VARIANT_LABELS = {
    "t2": "T(2)",
    "se2": "strict SE(2)-N",
    "se2_rot": "rotation non-stationary SE(2)-N",
    "se2_rot_trans": "rotation + translation non-stationary SE(2)-N",
}


@dataclass
class E2EConfig:
    batch: int = 64
    size: int = 32
    widths: tuple = (32, 64)
    group_order: int = 8
    kernel_size: int = 7
    hidden: int = 32
    dtype: str = "bf16"
    warmup_steps: int = 2
    min_steps: int = 3
    max_steps: int = 20
    min_time_s: float = 1.0
    infer_batch: int = 256
    compile: str = "off"  # or a torch.compile mode: "default", "reduce-overhead", "max-autotune"
    row_time_limit_s: float | None = 60.0  # one row (build, warm-up, timing, inference); None: no limit
    scaled_down: bool = False
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d


def gpu_config(quick: bool) -> E2EConfig:
    return E2EConfig(min_time_s=0.3 if quick else 1.0, max_steps=10 if quick else 20)


def cpu_config(quick: bool) -> E2EConfig:
    # 32x32 stays: the model's "valid" 7x7 head needs at least 28x28 inputs after two 2x2 pools.
    return E2EConfig(
        batch=2, size=32, widths=(8, 16), dtype="fp32", warmup_steps=1, min_steps=2,
        max_steps=3 if quick else 10, min_time_s=0.0 if quick else 2.0, infer_batch=8, scaled_down=True,
        notes=["scaled down for CPU: batch 2 (inference 8), widths (8, 16)"],
    )


# --quick on CPU leaves these out: their per-position kernel-net features (N*P*J*(H+1) values per
# layer, recomputed in backward) make one step take ~20 s on a 2-core CPU even at batch 2.
CPU_QUICK_SKIP = {
    "se2_rot_trans": "translation non-stationary model: ~20 s per step on a 2-core CPU; run without --quick",
    "se2_trans": "translation non-stationary model: ~20 s per step on a 2-core CPU; run without --quick",
}


def base_row(variant: str, backend: str, cfg: E2EConfig) -> dict:
    return {
        "variant": variant,
        "label": VARIANT_LABELS.get(variant, variant).replace("-N", f"-{cfg.group_order}"),
        "backend": backend,
        "dtype": cfg.dtype,
        "batch": cfg.batch,
        "status": None,
        "reason": None,
        "images_per_s": None,
        "step_ms": None,
        # the host's part: until step() returned, from an idle device (timing.host_and_total);
        # close to step_ms = the step waits on the host's per-operator cost, not on the GPU
        "step_host_ms": None,
        "step_p20_p80_ms": None,
        "steps_timed": None,
        "peak_mib": None,
        "x_floor": None,  # step time / the conv2d floor's step time (filled once both ran)
        "infer_batch": cfg.infer_batch,
        "infer_ms": None,
        "infer_images_per_s": None,
        "infer_x_floor": None,
        "compile": cfg.compile,
        "backends": None,  # {layer: backend it ran} after the warm-up steps
    }


def measure_step(variant: str, backend: str, device: torch.device, cfg: E2EConfig) -> dict:
    from ..models import build_model  # written beside this package; imported only when needed

    row = base_row(variant, backend, cfg)
    entry = dispatch.BACKEND_TABLE.get(backend)
    if entry is not None and device.type not in entry.devices:
        row.update(status="not timed", reason=NO_GPU if entry.devices == ("cuda",) else f"{backend}: not on {device.type}")
        return row
    if entry is not None and entry.needs_triton and not dispatch.triton_available():
        row.update(status="not timed", reason="triton is not importable")
        return row
    dtype, _ = DTYPES[cfg.dtype]
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype in (torch.bfloat16, torch.float16) else contextlib.nullcontext()
    )
    model = run_model = opt = x = y = xi = None
    infer_times, host_times = [], []
    try:
        with row_deadline(cfg.row_time_limit_s), precision(cfg.dtype):
            torch.manual_seed(0)
            model = build_model(
                variant, num_classes=10, group_order=cfg.group_order, widths=cfg.widths,
                kernel_size=cfg.kernel_size, hidden_channels=cfg.hidden, backend="auto" if backend == FLOOR else backend,
            ).to(device)
            if backend == FLOOR:
                model = plain_conv_floor(model)
            model.train()
            run_model = model if cfg.compile == "off" else torch.compile(model, mode=None if cfg.compile == "default" else cfg.compile)
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            x = torch.randn(cfg.batch, 3, cfg.size, cfg.size, device=device)
            y = torch.randint(0, 10, (cfg.batch,), device=device)

            def step():
                opt.zero_grad(set_to_none=True)
                with autocast:
                    loss = F.cross_entropy(run_model(x).float(), y)
                loss.backward()
                opt.step()

            for _ in range(cfg.warmup_steps):
                step()
            if backend != FLOOR:
                row["backends"] = backends_used(model)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            times = _timed(step, device, cfg, warmup=0, host=host_times)
            if device.type == "cuda":
                row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            model.eval()
            xi = torch.randn(cfg.infer_batch, 3, cfg.size, cfg.size, device=device)

            def infer():
                with torch.no_grad(), autocast:
                    run_model(xi)

            infer_times = _timed(infer, device, cfg, warmup=cfg.warmup_steps)
    except RowTimeout as e:
        row.update(status="timeout", reason=str(e))
        return row
    except Exception as e:  # noqa: BLE001 - recorded in the row
        return record_failure(row, e, lambda msg: backend == "expand_conv" and "translation non-stationary" in msg)
    finally:
        del model, run_model, opt, x, y, xi
        if device.type == "cuda":
            torch.cuda.synchronize()  # let a row cut short finish what it queued before the next one
        free_memory(device)
    times.sort()
    n = len(times)
    med = statistics.median(times)
    infer_ms = statistics.median(infer_times)
    row.update(
        status="ok",
        step_ms=med,
        step_host_ms=statistics.median(host_times),
        step_p20_p80_ms=[times[int(0.2 * (n - 1))], times[int(0.8 * (n - 1))]],
        steps_timed=n,
        images_per_s=cfg.batch / (med * 1e-3),
        infer_ms=infer_ms,
        infer_images_per_s=cfg.infer_batch / (infer_ms * 1e-3),
    )
    return row


def _timed(fn, device, cfg: E2EConfig, *, warmup: int, host: list | None = None) -> list[float]:
    """Per-call ms of ``fn`` after ``warmup`` untimed calls (the step's own rule: ``min_steps`` to
    ``max_steps`` calls, until ``min_time_s``); ``host`` (a list) receives each call's host ms."""
    for _ in range(warmup):
        fn()
    times = []
    t_end = time.perf_counter() + cfg.min_time_s
    while len(times) < cfg.max_steps and (len(times) < cfg.min_steps or time.perf_counter() < t_end):
        h, t = host_and_total(fn, device)
        times.append(t * 1e3)
        if host is not None:
            host.append(h * 1e3)
    return times


def add_floor_ratios(rows: list[dict]) -> None:
    """Fill ``x_floor`` / ``infer_x_floor`` of every row whose variant has an ok floor row."""
    floors = {r["variant"]: r for r in rows if r["backend"] == FLOOR and r["status"] == "ok"}
    for r in rows:
        f = floors.get(r["variant"])
        if f is None or r["status"] != "ok":
            continue
        r["x_floor"] = r["step_ms"] / f["step_ms"]
        r["infer_x_floor"] = r["infer_ms"] / f["infer_ms"]
