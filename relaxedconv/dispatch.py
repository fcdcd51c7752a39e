"""The backend table, the static rule for ``backend="auto"``, and how ``auto`` is resolved.

Every backend computes the same relaxed group convolution from the same tensors, the factors
``(z, w_ext)`` of design.md §2 (:mod:`relaxedconv.reference` has the layouts). One table,
:data:`BACKEND_TABLE`, says for each backend what it can run (translation non-stationarity, device
types, dtypes) and holds its two functions:

- ``prepare(z, w_ext, bias, geometry, dtype) -> operands``: what the backend builds from the
  factors (materialize: the full kernel; expand_conv: the conv2d weight bank; factored_torch: the
  factors in the compute dtype; triton: the factors as they are, cast by its kernels' packing
  copy). Independent of the batch: a layer in inference mode caches it.
- ``apply(x, operands, geometry) -> y``.

``auto``, the CLI's ``--backend`` choices, the benchmark's ``n/a`` rows and the error messages all
read this table (:func:`unsupported`, :func:`runnable`).

``backend="auto"`` is resolved by one of two policies (:func:`auto_policy`):

- ``measure`` (the default on CUDA): time every runnable backend on the first call for a shape and
  keep the fastest, like ``torch.backends.cudnn.benchmark`` (:mod:`relaxedconv.auto_backend`).
- ``static`` (the default elsewhere, and the fallback): the rule below, a pure function of the
  layer's geometry, device type and dtype. Select it with ``auto_policy="static"``,
  :func:`set_auto_policy` or ``RELAXEDCONV_AUTO=static`` for runs that must not depend on timings.

The static rule (README.md):

1. Translation non-stationary: ``triton`` on CUDA when Triton imports (cuDNN has no such
   convolution, and ``materialize`` needs the per-position kernel: P times the memory), else
   ``factored_torch`` (never builds the per-position kernel).
2. Translation-stationary: compare multiply-adds of the factored form with the direct convolution
   on the expanded bank (design.md §2): ``factored/direct = H'/C_out + H'/(N_in*K*K)``. Below
   :data:`FACTORED_FLOP_RATIO` ``factored_torch`` (a per-channel convolution with Z as weight and
   one batched GEMM: cuDNN/oneDNN and cuBLAS, on any device), else ``expand_conv``. On a CPU
   G4's layer at 8x8, batch 2 (ratio 0.34) ran 134 ms fwd+bwd factored against 1003 ms expanded
   (README.md); on CUDA the measured policy decides by timing.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import reference
from .amp import autocast_dtype
from .reference import ConvGeometry

FACTORED_FLOP_RATIO = 0.5
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
AUTO_POLICIES = ("measure", "static")
AUTO_ENV = "RELAXEDCONV_AUTO"


# ---- the backends' functions ------------------------------------------------------------------------
def _prepare_kernel(z, w_ext, bias, g, dtype):
    return reference.kernel_from_factors(z, w_ext).to(dtype), bias


def _apply_materialize(x, operands, g):
    kernel, bias = operands
    return reference.conv_materialize(x, kernel, bias, g)


def _prepare_bank(z, w_ext, bias, g, dtype):
    bank = reference.bank_from_factors(z, w_ext, g).to(dtype)
    return bank, None if bias is None else bias.to(dtype).repeat_interleave(g.out_rotations)


def _apply_bank(x, operands, g):
    bank, bias_per_channel = operands
    return torch.nn.functional.conv2d(x, bank, bias_per_channel, padding=g.padding)


def _prepare_factors(z, w_ext, bias, g, dtype):
    return z.to(dtype), w_ext.to(dtype), bias


def _prepare_triton(z, w_ext, bias, g, dtype):
    # The factors stay in their own dtype: the kernels' Z packing copy casts them (one pass instead
    # of a cast and a pad), and dZ comes back in the factors' dtype without a round trip via bf16.
    return z, w_ext, bias


def _apply_factored(x, operands, g):
    z, w_ext, bias = operands
    return reference.conv_factored(x, z, w_ext, bias, g)


def _apply_triton(x, operands, g):
    from .triton_conv import relaxed_conv_triton

    z, w_ext, bias = operands
    return relaxed_conv_triton(x, z, w_ext, bias, g)


@dataclass(frozen=True)
class Backend:
    """One row of the backend table."""

    name: str
    summary: str
    translation_nonstationary: bool  # can run a kernel that differs per output position
    devices: tuple  # device types it runs on
    dtypes: tuple  # input dtypes it runs
    prepare: Callable
    apply: Callable
    needs_triton: bool = False
    interpreter_on_cpu: bool = False  # also on CPU tensors under TRITON_INTERPRET=1 (testing only)
    auto_candidate: bool = True
    slow_reference: bool = False  # named last when an error message suggests alternatives


BACKEND_TABLE: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("materialize", "full kernel at every coordinate, unfold + einsum (R1, the ground truth)",
                True, ("cpu", "cuda"), FLOAT_DTYPES, _prepare_kernel, _apply_materialize, slow_reference=True),
        Backend("expand_conv", "kernel bank [C_out*N, C_in*N_in, K, K] + conv2d (R2, cuDNN/oneDNN)",
                False, ("cpu", "cuda"), FLOAT_DTYPES, _prepare_bank, _apply_bank),
        Backend("factored_torch", "the factorisation of design.md §2 in plain PyTorch (R3)",
                True, ("cpu", "cuda"), FLOAT_DTYPES, _prepare_factors, _apply_factored),
        Backend("triton", "fused Triton kernels, forward and backward",
                True, ("cuda",), FLOAT_DTYPES, _prepare_triton, _apply_triton,
                needs_triton=True, interpreter_on_cpu=True),
    )
}
BACKENDS = ("auto", *BACKEND_TABLE)


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


_TRITON_IMPORTS: bool | None = None
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether Triton imports (tried once; inside a torch.compile trace, where nothing is imported,
    whether it is installed)."""
    global _TRITON_IMPORTS
    if _TRITON_IMPORTS is None:
        if torch.compiler.is_compiling():
            return _TRITON_INSTALLED
        try:
            import triton  # noqa: F401

            _TRITON_IMPORTS = True
        except Exception:
            _TRITON_IMPORTS = False
    return _TRITON_IMPORTS


def interpreting() -> bool:
    """Whether Triton runs its interpreter (``TRITON_INTERPRET=1``: kernels on CPU tensors), read
    as Triton reads it: 1/true/on/yes in any case; anything else (``off``, ``false``, ``2``) is
    off, where a looser reading let the kernels launch on CPU tensors without it (a driver error)."""
    v = os.environ.get("TRITON_INTERPRET")
    if v is None or v == "0":  # (the common values first: the kernels ask at every launch)
        return False
    return v == "1" or v.strip().lower() in ("1", "true", "on", "yes")


def _alternatives(pred) -> str:
    """"'backend='auto', 'a', 'b' or 'c'": auto and the backends that satisfy ``pred``, the slow
    reference last."""
    names = [repr(b.name) for b in sorted(BACKEND_TABLE.values(), key=lambda b: b.slow_reference) if pred(b)]
    names = ["backend='auto'", *names]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _runs_on(device_type: str, per_position: bool):
    """What an error suggests instead: the backends that run this layer on this device."""
    return lambda c: device_type in c.devices and (c.translation_nonstationary or not per_position)


def unsupported(name: str, *, device_type: str, dtype: torch.dtype, per_position: bool):
    """Why ``name`` cannot run this call, as ``(exception type, message)``, or None when it can.

    The one place that decides what a backend supports; the messages say what to use instead.
    """
    b = BACKEND_TABLE[check_backend_name(name)] if name != "auto" else None
    if b is None:
        return None
    if per_position and not b.translation_nonstationary:
        return ValueError, (
            f"backend={name!r} cannot run a translation non-stationary layer (its kernel differs at "
            f"every output position, which conv2d cannot express). Use {_alternatives(lambda c: c.translation_nonstationary)}."
        )
    if b.needs_triton and not triton_available():
        return ValueError, (f"backend={name!r} needs Triton, which cannot be imported here; use "
                            f"{_alternatives(lambda c: not c.needs_triton)}")
    # (bf16 in Triton's interpreter is refused at the kernels' launch, not here: the host-time
    # measurements stub the launches out and run bf16 through this table.)
    if device_type not in b.devices and not (b.interpreter_on_cpu and device_type == "cpu" and interpreting()):
        hint = " (or set TRITON_INTERPRET=1 to run the kernels in Triton's slow interpreter for testing)" \
            if b.interpreter_on_cpu else ""
        return ValueError, (
            f"backend={name!r} runs on {'/'.join(d.upper() for d in b.devices)} tensors (got a tensor on "
            f"{device_type}); on {device_type.upper()} use {_alternatives(_runs_on(device_type, per_position))}{hint}"
        )
    if dtype not in b.dtypes:
        names = "/".join(str(d).replace("torch.", "") for d in b.dtypes)
        return TypeError, f"backend={name!r} supports {names} inputs, got {dtype}"
    return None


def check_supported(name: str, *, device_type: str, dtype: torch.dtype, per_position: bool, where: str = "") -> None:
    """Raise :func:`unsupported`'s error (prefixed with ``where``, e.g. the layer's class name)."""
    refusal = unsupported(name, device_type=device_type, dtype=dtype, per_position=per_position)
    if refusal is not None:
        exc, msg = refusal
        raise exc(f"{where}: {msg}" if where else msg)


def runnable(*, device_type: str, dtype: torch.dtype, per_position: bool, for_auto: bool = False) -> list[str]:
    """Backends that can run this call (with ``for_auto``: those ``auto`` may time: not Triton's
    CPU interpreter, a testing aid thousands of times slower than the real paths)."""
    out = []
    for name, b in BACKEND_TABLE.items():
        if unsupported(name, device_type=device_type, dtype=dtype, per_position=per_position) is not None:
            continue
        if for_auto and (not b.auto_candidate or device_type not in b.devices):
            continue
        out.append(name)
    return out


# ---- dtype and the static rule ----------------------------------------------------------------------
@torch.compiler.assume_constant_result
def tf32_matmuls_allowed() -> bool:
    """Whether torch lets its own fp32 CUDA matmuls use TF32: ``allow_tf32 = True`` or the newer
    ``fp32_precision = "tf32"`` (of ``torch.backends.cuda.matmul`` or ``torch.backends``). Read
    from ``fp32_precision`` where it exists, which reflects both: once the newer setting is used,
    reading ``allow_tf32`` raises. Dynamo cannot trace that getter: a compiled graph takes the
    value it had when it was traced."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the convolution runs in: the autocast dtype under autocast, else the input's."""
    dt = x.dtype
    if dt in (torch.float32, torch.float16, torch.bfloat16):
        return autocast_dtype(x.device.type) or dt
    return dt


def flop_ratio(geometry: ConvGeometry, hidden_plus_one: int) -> float:
    """design.md §2: multiply-adds of the factored form over those of the direct convolution."""
    h = hidden_plus_one
    return h / geometry.out_channels + h / geometry.window


def factored_to_direct_ratio(layer) -> float:
    return flop_ratio(layer.geometry, layer.kernel_net.hidden_channels + 1)


def static_choice(geometry: ConvGeometry, hidden_plus_one: int, per_position: bool, device_type: str,
                  dtype: torch.dtype, have_triton: bool) -> str:
    """The documented static rule (module docstring) as a pure function (``dtype`` is kept for
    callers: no choice depends on it since both stationary paths run on cuDNN/cuBLAS)."""
    if per_position:
        return "triton" if device_type == "cuda" and have_triton else "factored_torch"
    if flop_ratio(geometry, hidden_plus_one) < FACTORED_FLOP_RATIO:
        return "factored_torch"
    return "expand_conv"


def backend_rule(layer, device_type: str, have_triton: bool, dtype: torch.dtype = torch.bfloat16) -> str:
    """The static rule for ``layer`` (kept for callers of the layer-based form)."""
    return static_choice(layer.geometry, layer.kernel_net.hidden_channels + 1, layer.translation_nonstationary,
                         device_type, dtype, have_triton)


# ---- the auto policy ----------------------------------------------------------------------------------
_policy_override: str | None = None


def set_auto_policy(policy: str | None) -> None:
    """Process-wide policy for ``auto``: "measure", "static", or None (``RELAXEDCONV_AUTO``, else the
    default: measure on CUDA, static elsewhere)."""
    global _policy_override
    if policy is not None and policy not in AUTO_POLICIES:
        raise ValueError(f"auto policy must be one of {AUTO_POLICIES} or None, got {policy!r}")
    _policy_override = policy


@contextlib.contextmanager
def using_auto_policy(policy: str | None):
    """:func:`set_auto_policy` for a block, the previous setting restored after it (a training run
    sets its own; a process's other work keeps what it set). None leaves the current setting."""
    previous = _policy_override
    if policy is not None:
        set_auto_policy(policy)
    try:
        yield
    finally:
        set_auto_policy(previous)


def auto_policy(device_type: str, policy: str | None = None) -> str:
    """The policy ``auto`` follows on ``device_type``: the argument, else :func:`set_auto_policy`'s,
    else ``RELAXEDCONV_AUTO``, else measure on CUDA and static elsewhere."""
    p = policy or _policy_override or os.environ.get(AUTO_ENV) or None
    if p is None:
        return "measure" if device_type == "cuda" else "static"
    if p not in AUTO_POLICIES:
        raise ValueError(f"auto policy must be one of {AUTO_POLICIES} (argument or {AUTO_ENV}), got {p!r}")
    return p


def resolve(name: str, x: torch.Tensor, z: torch.Tensor, w_ext: torch.Tensor, bias, geometry: ConvGeometry,
            *, policy: str | None = None, where: str = "", prepared: bool = True) -> str:
    """The concrete backend that runs this call: ``name`` itself (checked against the table), or
    what ``auto`` picks for it (``prepared``: whether the caller keeps the backend's operands
    across calls without gradients, as a layer's inference cache does; the measure policy times
    their building otherwise)."""
    per_position = z.dim() == 4
    dtype = compute_dtype(x)
    if name != "auto":
        check_supported(name, device_type=x.device.type, dtype=dtype, per_position=per_position, where=where)
        return name
    static = static_choice(geometry, z.shape[-1], per_position, x.device.type, dtype, triton_available())
    if auto_policy(x.device.type, policy) == "static":
        return static
    from . import auto_backend

    return auto_backend.measured_choice(x, z, w_ext, bias, geometry, fallback=static, prepared=prepared)


def choose_backend(layer, x: torch.Tensor) -> str:
    """The backend ``auto`` runs ``layer`` with on input ``x`` (under the current policy)."""
    # As the layer checks it: an input it would refuse must not be measured (every backend would
    # fail, and the static choice would be kept for the shape's key, valid inputs included).
    layer._check_input(x, where=f"choose_backend({type(layer).__name__})")
    out_hw = layer.geometry.out_size(x.shape[-2], x.shape[-1])
    with torch.no_grad():
        z, w_ext = layer.factored_kernel(out_hw)
    if layer._kernel_needs_grad():  # as the layer decides: frozen parameters give a forward-only call
        z, w_ext = z.requires_grad_(), w_ext.requires_grad_()
    return resolve("auto", x, z, w_ext, layer.bias, layer.geometry)
