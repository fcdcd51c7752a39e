"""What the kernel report compiles: every Triton kernel, its shipped configs, its specialisations.

The report (``python -m relaxedconv.kernels.report``) compiles each (kernel, config,
specialisation) ahead of time for sm_90a and reads registers, spills, shared memory and the
tensor-core instructions off the result. This file is the one list it works from; keep it in step
with the kernels (a kernel missing here is reported as unregistered, and the CI test fails).

Adding a kernel is one :class:`Kernel` entry. Everything that can be read off the ``@triton.jit``
function is: argument names, which are ``tl.constexpr``, which are pointers (names ending in
``_ptr``, as every kernel here names them) and which are integers. An entry supplies only what the
signature cannot say:

- ``fn`` / ``autotuner``: ``"module:attribute"`` references, resolved when the report runs, so this
  file stays importable when a kernel is renamed (the report then names the stale reference);
- ``fixed``: the non-autotuned launch (fp64, the interpreter, ``RELAXEDCONV_AUTOTUNE=0``), as the
  host function launches it;
- ``axes``: the constexpr variants to compile, crossed with each other and with the dtypes;
- ``constexprs``: constexpr values that stay the same in every row (a representative ``KSIZE``);
- ``pointers``: dtype of pointers that do not hold the data dtype (fp32 partial sums);
- ``ints``: what a representative launch passes to the integer arguments (``"*"``: always; a
  variant label: in rows of that variant). Triton specialises integers at launch time, a value of
  1 into a constant and a multiple of 16 into a divisibility hint, which changes vector widths,
  cp.async eligibility and registers; the report applies the same rule, so only whether a value
  is 1, a multiple of 16 or neither matters. An integer argument not listed is compiled as a plain
  i32 (no hint). The entries below use the G1 layer of the benchmarks (SE(2)-8, C 32 -> 32,
  32x32, batch 64, K 7, hidden 32, padding 3).

Dtype-dependent constexprs (``PRECISION``, ``ACC``, ``FP64``) come from :data:`DTYPES`, applied to
whichever of them a kernel declares.
"""
from __future__ import annotations

import importlib
import itertools
from dataclasses import dataclass, field
from typing import Callable, Union


@dataclass(frozen=True)
class Dtype:
    """One data dtype as the host functions launch it (``kernels/common.py``: ``dot_precision``,
    ``acc_dtype``, ``use_autotune``)."""

    name: str
    pointer: str  # Triton's pointer element type: "bf16", "fp32", ...
    precision: str | None  # tl.dot input_precision
    acc: str  # accumulator: "fp32" or "fp64"
    autotuned: bool  # whether the autotune configs are shipped for it (fp64 runs the fixed config)
    tensor_cores: bool  # whether its dots must run on tensor cores on sm_90


DTYPES = {
    d.name: d
    for d in (
        Dtype("bf16", "bf16", None, "fp32", True, True),
        Dtype("fp16", "fp16", None, "fp32", True, True),
        Dtype("fp32-tf32", "fp32", "tf32", "fp32", True, True),
        Dtype("fp32-ieee", "fp32", "ieee", "fp32", True, False),
        Dtype("fp64", "fp64", "ieee", "fp64", False, False),
    )
}
DEFAULT_DTYPES = ("bf16", "fp32-tf32", "fp32-ieee", "fp64")

# Pointer dtype tokens an entry may use besides a Triton type name: the data dtype, or the
# accumulator dtype (partial sums are fp32, fp64 for fp64 data).
DATA, ACC = "data", "acc"

PointerDtype = Union[str, Callable[[dict], str]]


@dataclass(frozen=True)
class Axis:
    """One kind of specialisation: labelled alternatives, each a dict of constexpr values."""

    name: str
    variants: tuple[tuple[str, dict], ...]


@dataclass(frozen=True)
class Kernel:
    name: str
    fn: str  # "module:attribute" of the @triton.jit function, module relative to relaxedconv.kernels
    fixed: dict  # the non-autotuned launch: constexpr tile sizes, plus num_warps/num_stages if not Triton's defaults
    autotuner: str | None = None  # "module:attribute" of its triton.autotune wrapper
    axes: tuple[Axis, ...] = ()
    constexprs: dict = field(default_factory=dict)
    pointers: dict[str, PointerDtype] = field(default_factory=dict)
    ints: dict[str, dict[str, int]] = field(default_factory=dict)


LAYOUT = Axis("layout", (("stationary", {"PER_POSITION": False}), ("per-position", {"PER_POSITION": True})))
# kernels/common.py hidden_block: H = 32 gives a 32-wide dot plus a rank-1 tail column (the
# default kernel net); H = 8 pads H + 1 = 9 to one 16-wide tile with no tail.
HIDDEN = Axis("hidden", (("H32+tail", {"BLOCK_H": 32, "TAIL": True}), ("H8", {"BLOCK_H": 16, "TAIL": False})))
KSIZE = 7  # the benchmark layers' kernel size (design.md §5)


def _strides(names: str, *shape: int) -> dict[str, int]:
    """Contiguous strides of ``shape`` named by the space-separated ``names``."""
    out, step = {}, 1
    for name, size in zip(reversed(names.split()), reversed(shape)):
        out[name] = step
        step *= size
    return out


# The G1 layer as the host functions launch it on a GPU (kernels/relaxed_conv_*.py): x padded to
# 38x38, Z [N, J, H+1] (stationary) or [N, P, J, H+1] (per position), W_ext [C_out, C_in, H+1],
# 128 reduction splits; H8 rows change the H+1 = 33 columns to 9.
_B, _C, _N, _S, _J, _H1 = 64, 32, 8, 32, 8 * KSIZE * KSIZE, 33
_SHAPE = {"B": _B, "C_IN": _C, "N_IN": _N, "P": _S * _S, "W_OUT": _S, "J": _J, "HMAIN": 32, "C_OUT": _C, "N_OUT": _N}
_X_PADDED = _strides("sxb sxc sxh sxw", _B, _C * _N, _S + 6, _S + 6)
_W = _strides("swo swi swh", _C, _C, _H1)
_W_H8 = _strides("swo swi swh", _C, _C, 9)
_Z = {"stationary": {**_strides("szn szj szh", _N, _J, _H1), "szp": 0},
      "per-position": _strides("szn szp szj szh", _N, _S * _S, _J, _H1)}
_Z_H8 = {"szj": 9, "HMAIN": 9}  # per-layout szn/szp keep their class (multiple of 16 or not) at H+1 = 9
_DY = _strides("sdb sdc sdh sdw", _B, _C * _N, _S, _S)
_DX = _strides("sxb sxc sxh sxw", _B, _C * _N, _S, _S)
_SPLITS = 128  # reduction_splits(B * P) on CUDA


def _dz_out(consts: dict) -> str:
    # Stationary dZ is reduced in fp32 split partials; per-position dZ is written in Z's dtype.
    return DATA if consts.get("PER_POSITION") else ACC


KERNELS: tuple[Kernel, ...] = (
    Kernel(
        "fwd", "relaxed_conv_fwd:_relaxed_conv_fwd_kernel",
        autotuner="relaxed_conv_fwd:_relaxed_conv_fwd_autotuned",
        fixed={"BLOCK_M": 16, "BLOCK_J": 16, "BLOCK_O": 16},
        axes=(LAYOUT, HIDDEN),
        constexprs={"KSIZE": KSIZE, "HAS_BIAS": True},
        ints={"*": {**_SHAPE, **_X_PADDED, **_W, **_strides("syb syc syh syw", _B, _C * _N, _S, _S)},
              "stationary": _Z["stationary"], "per-position": _Z["per-position"], "H8": {**_Z_H8, **_W_H8}},
    ),
    Kernel(
        "bwd-dz", "relaxed_conv_bwd:_relaxed_conv_bwd_dz_kernel",
        autotuner="relaxed_conv_bwd:_dz_autotuned",
        fixed={"BLOCK_M": 16, "BLOCK_J": 16, "BLOCK_O": 16},
        axes=(LAYOUT, HIDDEN),
        constexprs={"KSIZE": KSIZE},
        pointers={"out_ptr": _dz_out},
        ints={"*": {**_SHAPE, "SPLITS": _SPLITS, **_X_PADDED, **_DY, **_W},
              # out: [splits, N, J, H+1] partials (stationary) or Z's own [N, P, J, H+1] layout
              "stationary": _strides("sos son soj soh", _SPLITS, _N, _J, _H1),
              "per-position": {"sos": _J * _H1, "son": _S * _S * _J * _H1, "soj": _H1, "soh": 1},
              "H8": {"HMAIN": 9, "soj": 9, **_W_H8}},
    ),
    Kernel(
        "bwd-dw", "relaxed_conv_bwd:_relaxed_conv_bwd_dw_kernel",
        autotuner="relaxed_conv_bwd:_dw_autotuned",
        fixed={"BLOCK_M": 16, "BLOCK_J": 16, "BLOCK_O": 16},
        axes=(LAYOUT, HIDDEN),
        constexprs={"KSIZE": KSIZE},
        pointers={"out_ptr": ACC},
        ints={"*": {**{k: v for k, v in _SHAPE.items() if k != "C_IN"}, "SPLITS": _SPLITS, **_X_PADDED, **_DY,
                    **_strides("sos soi soo soh", _SPLITS, _C, _C, _H1)},
              "stationary": _Z["stationary"], "per-position": _Z["per-position"],
              "H8": {**_Z_H8, **_strides("sos soi soo soh", _SPLITS, _C, _C, 9)}},
    ),
    Kernel(  # per-position layers only; stationary dX goes through the bank kernel below
        "bwd-dx", "relaxed_conv_bwd:_relaxed_conv_bwd_dx_kernel",
        autotuner="relaxed_conv_bwd:_dx_autotuned",
        fixed={"BLOCK_M": 16, "BLOCK_O": 16},
        axes=(HIDDEN,),
        constexprs={"KSIZE": KSIZE, "BLOCK_NI": 16},  # small_block(N_in) for N_in <= 16
        ints={"*": {"B": _B, "N_IN": _N, "W_IN": _S, "Q": _S * _S, "H_OUT": _S, "W_OUT": _S, "HMAIN": 32,
                    "C_OUT": _C, "N_OUT": _N, "PAD": 3, **_DY, **_Z["per-position"], **_W, **_DX},
              "H8": {**_Z_H8, **_W_H8}},
    ),
    Kernel(
        "bwd-dx-bank", "relaxed_conv_bwd:_relaxed_conv_bwd_dx_bank_kernel",
        autotuner="relaxed_conv_bwd:_dx_bank_autotuned",
        fixed={"BLOCK_M": 16, "BLOCK_O": 16, "BLOCK_C": 16},
        constexprs={"KSIZE": KSIZE},
        ints={"*": {"B": _B, "CN_IN": _C * _N, "W_IN": _S, "Q": _S * _S, "H_OUT": _S, "W_OUT": _S, "C_OUT": _C,
                    "N_OUT": _N, "PAD": 3, **_DY, **_DX,
                    **_strides("sen sek seo sec", _N, KSIZE * KSIZE, _C, _C * _N)}},
    ),
)


# --- resolving an entry into compile jobs -------------------------------------------------------

class RegistryError(Exception):
    """A registry entry that does not match its kernel (stale reference, unknown constexpr...)."""


PACKAGE = "relaxedconv.kernels"


def resolve(ref: str):
    """``"module:attribute"`` (module relative to relaxedconv.kernels) -> the object."""
    module, _, attr = ref.partition(":")
    try:
        mod = importlib.import_module(f"{PACKAGE}.{module}")
    except ImportError as e:
        raise RegistryError(f"cannot import {PACKAGE}.{module} for {ref!r}: {e}") from e
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise RegistryError(f"{PACKAGE}.{module} has no {attr!r} (renamed? update kernels/registry.py)") from None


@dataclass(frozen=True)
class LaunchConfig:
    """One shipped config: constexpr tile sizes and compile options."""

    label: str
    meta: dict
    num_warps: int
    num_stages: int
    maxnreg: int | None = None
    fixed: bool = False


TRITON_DEFAULT_WARPS, TRITON_DEFAULT_STAGES = 4, 3  # what a launch without options gets on CUDA


def _config_label(meta: dict, warps: int, stages: int) -> str:
    tiles = "-".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in meta.items())
    return f"{tiles}-w{warps}-s{stages}"


def shipped_configs(kernel: Kernel, dtype: Dtype) -> list[LaunchConfig]:
    """The autotune configs (for dtypes that autotune) and the fixed launch, without duplicates."""
    fixed = dict(kernel.fixed)
    warps = fixed.pop("num_warps", TRITON_DEFAULT_WARPS)
    stages = fixed.pop("num_stages", TRITON_DEFAULT_STAGES)
    out = []
    if dtype.autotuned and kernel.autotuner:
        tuner = resolve(kernel.autotuner)
        configs = getattr(tuner, "configs", None)
        if configs is None:
            raise RegistryError(f"{kernel.autotuner!r} is not a triton.autotune wrapper (no .configs)")
        for c in configs:
            out.append(LaunchConfig(_config_label(c.kwargs, c.num_warps, c.num_stages), dict(c.kwargs),
                                    c.num_warps, c.num_stages, getattr(c, "maxnreg", None)))
    label = _config_label(fixed, warps, stages)
    if not any(c.label == label for c in out):
        out.append(LaunchConfig("fixed:" + label, fixed, warps, stages, fixed=True))
    return out


def specialisations(kernel: Kernel) -> list[tuple[str, dict]]:
    """(label, constexpr values) for every combination of the entry's axes."""
    if not kernel.axes:
        return [("-", {})]
    out = []
    for combo in itertools.product(*(a.variants for a in kernel.axes)):
        label = " ".join(lbl for lbl, _ in combo)
        values: dict = {}
        for _, v in combo:
            values.update(v)
        out.append((label, values))
    return out


def _pointer_type(token: str, dtype: Dtype) -> str:
    if token == DATA:
        return dtype.pointer
    if token == ACC:
        return dtype.acc
    return token


def dtype_constexprs(dtype: Dtype) -> dict:
    import triton.language as tl

    return {"PRECISION": dtype.precision, "ACC": getattr(tl, {"fp32": "float32", "fp64": "float64"}[dtype.acc]),
            "FP64": dtype.acc == "fp64"}


def specialise_int(value: int) -> tuple[str, list]:
    """Triton's launch-time rule for an integer argument: (signature type, attributes)."""
    if value == 1:
        return "constexpr", []
    return "i32", ([["tt.divisibility", 16]] if value % 16 == 0 else [])


def compile_signature(fn, kernel: Kernel, dtype: Dtype, config: LaunchConfig, spec_label: str, spec: dict):
    """(signature, constexprs, attrs) for ``triton.compile(ASTSource(fn, ...))``, built from the jit
    function's own parameters the way a real launch specialises them: constexprs by value,
    pointers as ``*<dtype>`` aligned to 16 bytes, integers by the entry's representative values."""
    names = list(fn.arg_names)
    given = {**kernel.constexprs, **spec, **config.meta}
    labels = ["*", *spec_label.split()]
    ints: dict[str, int] = {}
    valid = {"*"} | {lbl for axis in kernel.axes for lbl, _ in axis.variants}
    for key in kernel.ints:
        if key not in valid:
            raise RegistryError(f"{kernel.name}: ints key {key!r} is neither '*' nor one of its variant labels")
    for label in labels:
        ints.update(kernel.ints.get(label, {}))
    from_dtype = dtype_constexprs(dtype)
    for name in [*given, *kernel.pointers, *ints]:
        if name not in names:
            raise RegistryError(f"{kernel.name}: {fn.__name__} has no argument {name!r} (update kernels/registry.py)")
    signature, constexprs, attrs = {}, {}, {}
    for idx, (name, param) in enumerate(zip(names, fn.params)):
        if param.is_constexpr:
            if name in given:
                value = given[name]
            elif name in from_dtype:
                value = from_dtype[name]
            elif param.has_default:
                value = param.default
            else:
                raise RegistryError(f"{kernel.name}: no value for constexpr {name!r} of {fn.__name__} "
                                    "(add it to the entry's constexprs, axes or configs)")
            signature[name] = "constexpr"
            constexprs[name] = value
        elif name.endswith("_ptr") or name in kernel.pointers:
            token = kernel.pointers.get(name, DATA)
            if callable(token):
                token = token({**from_dtype, **given})
            signature[name] = "*" + _pointer_type(token, dtype)
            if not getattr(param, "do_not_specialize_on_alignment", False):
                attrs[(idx,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif name in ints and not param.do_not_specialize:
            signature[name], hint = specialise_int(ints[name])
            if signature[name] == "constexpr":
                constexprs[name] = 1
            elif hint and not getattr(param, "do_not_specialize_on_alignment", False):
                attrs[(idx,)] = hint
        else:
            signature[name] = "i32"
    return signature, constexprs, attrs


def jit_kernels_in_package() -> dict[str, str]:
    """Every ``@triton.jit`` function named ``*_kernel`` in relaxedconv.kernels ("module:name" ->
    qualified name), to find kernels the registry does not list. Helpers are not named ``*_kernel``."""
    import pkgutil

    import triton

    pkg = importlib.import_module(PACKAGE)
    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name in ("registry", "report"):
            continue
        mod = importlib.import_module(f"{PACKAGE}.{info.name}")
        for attr, obj in vars(mod).items():
            is_jit = isinstance(obj, triton.runtime.JITFunction)
            if is_jit and attr.endswith("_kernel") and obj.__module__ == mod.__name__:
                found[f"{info.name}:{attr}"] = obj.__name__
    return found
