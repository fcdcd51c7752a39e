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
  i32 (no hint).

The entries below are not written by hand: :func:`captured_launches` runs the host functions
(``relaxed_conv_fwd``/``relaxed_conv_bwd``) on meta tensors of three benchmark layers with the
launch intercepted, and each kernel's variants ("case" axis: T1 = T(2) translation-relaxed, T2 =
SE(2)-8 translation-relaxed, G1 = SE(2)-8 stationary; all K 7, hidden 32) are exactly the
constexprs and integers the host passes — so the registry cannot drift from the launches.

Dtype-dependent constexprs (``PRECISION``, ``ACC``, ``FP64``) come from :data:`DTYPES`, applied to
whichever of them a kernel declares.
"""
from __future__ import annotations

import importlib
import inspect
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
        # fp32 products as three TF32 ones (fp32's accuracy on tensor cores): the fused kernel net.
        Dtype("fp32-tf32x3", "fp32", "tf32x3", "fp32", True, True),
        Dtype("fp64", "fp64", "ieee", "fp64", False, False),
    )
}
DEFAULT_DTYPES = ("bf16", "fp32-tf32", "fp32-ieee", "fp32-tf32x3", "fp64")

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
    dtypes: tuple[str, ...] | None = None  # the DTYPES it is launched in; None: every data dtype


LAYOUT = Axis("layout", (("stationary", {"PER_POSITION": False}), ("per-position", {"PER_POSITION": True})))
KSIZE = 7  # the benchmark layers' kernel size (design.md §5)

# (label, in/out channels, rotations, image size, batch, translation non-stationary): benchmark layers.
CASES = (("T1", 32, 1, 32, 64, True), ("T2", 32, 8, 16, 16, True), ("G1", 32, 8, 32, 64, False))
# Constexprs that depend on the dtype come from DTYPES; tile sizes from the configs.
# (The fused kernel net's backward gets BLOCK_J from its host function, so there it is a variant.)
_NOT_VARIANT = {"PRECISION", "ACC", "FP64", "FAST_TRIG", "BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_Q", "BLOCK_C", "QH", "QW", "POSITIONS"}
# The fused kernel net runs in the parameters' dtype (fp32 with TF32x3 or TF32 products; or fp64), whatever
# the data dtype of the convolution; the convolution kernels in every data dtype but that.
KERNEL_NET_DTYPES = ("fp32-tf32x3", "fp32-tf32", "fp64")
CONV_DTYPES = ("bf16", "fp16", "fp32-tf32", "fp32-ieee", "fp64")


def captured_launches() -> dict[str, dict[str, tuple[dict, dict]]]:
    """{kernel launch name: {case label: (constexprs, integer arguments)}} as the host functions
    launch them (bf16), from runs on meta tensors with ``common.launch`` intercepted."""
    import torch

    from . import common, input_grad_direct, kernel_net_fused, relaxed_conv_bwd, relaxed_conv_fwd
    from relaxedconv.reference import ConvGeometry

    seen: dict[str, dict[str, tuple[dict, dict]]] = {}
    label = None

    def record(name, kernel, autotuned, grid, args, consts, fixed, **kw):
        # The host passes the non-constexpr arguments positionally, in the signature's order.
        params = [n for n in inspect.signature(kernel.fn).parameters if n not in consts and n not in fixed]
        ints = {n: a for n, a in zip(params, args) if not isinstance(a, torch.Tensor)}
        variant = {k: v for k, v in consts.items() if k not in _NOT_VARIANT}
        seen.setdefault(name, {}).setdefault(label, (variant, ints))

    real = common.launch
    common.launch = record
    try:
        for label, c, n, size, batch, per_position in CASES:
            g = ConvGeometry(c, c, n, n, KSIZE, KSIZE // 2)
            dt = torch.bfloat16
            x = torch.empty(batch, c * n, size, size, dtype=dt, device="meta")
            p = size * size
            z = torch.empty((n, p, g.window, 33) if per_position else (n, g.window, 33), dtype=dt, device="meta")
            w = torch.empty(c, c, 33, dtype=dt, device="meta")
            y, u = relaxed_conv_fwd.relaxed_conv_fwd(x, z, w, None, g, return_u=True)
            relaxed_conv_bwd.relaxed_conv_bwd(torch.empty_like(y), x, z, w, g, u=u)
            if per_position:  # dX's other route (the backward above, where nothing is timed, runs the columns route)
                input_grad_direct.direct_input_grad(torch.empty_like(u), common.aligned_hidden(z), 33, g, x.shape,
                                                    g.out_size(size, size), dt)
            # The same layer's kernel net (depth 3, H 32; the disk mask where N > 1), in fp32.
            f32 = dict(dtype=torch.float32, device="meta")
            r, q = torch.empty(n, g.window, 32, **f32), torch.empty(p, 32, **f32) if per_position else None
            w2, b2, m = torch.empty(32, 32, **f32), torch.empty(32, **f32), torch.empty(g.window, **f32) if n > 1 else None
            zk = kernel_net_fused.kernel_net_forward(r, q, w2, b2, m)
            kernel_net_fused.kernel_net_backward(r, q, w2, b2, m, torch.empty_like(zk))
    finally:
        common.launch = real
    return seen


def _entry(name: str, launch: str, fn: str, autotuner: str, fixed: dict, captured, **kw) -> Kernel:
    cases = captured[launch]
    axis = Axis("case", tuple((label, variant) for label, (variant, _) in cases.items()))
    return Kernel(name, fn, fixed=fixed, autotuner=autotuner, axes=(axis,),
                  ints={label: ints for label, (_, ints) in cases.items()}, **kw)


def _kernels() -> tuple[Kernel, ...]:
    from .kernel_net_fused import FIXED_BACKWARD, FIXED_FORWARD
    from .common import PACK_TILE
    from .input_grad_direct import FIXED_TILE as FIXED_DIRECT
    from .relaxed_conv_bwd import FIXED_FOLD, FIXED_TILE
    from .relaxed_conv_fwd import FIXED_TILE as FIXED_U

    cap = captured_launches()
    return (
        _entry("u", "u", "relaxed_conv_fwd:_hidden_projection_kernel", "relaxed_conv_fwd:_hidden_projection_autotuned",
               FIXED_U, cap, dtypes=CONV_DTYPES),
        _entry("dz", "dz", "relaxed_conv_bwd:_hidden_weight_grad_kernel", "relaxed_conv_bwd:_hidden_weight_grad_autotuned",
               FIXED_TILE, cap, dtypes=CONV_DTYPES, pointers={"out_ptr": ACC}),  # fp32 (fp64) partials/dZ, cast on the host
        _entry("v", "v", "relaxed_conv_bwd:_window_columns_kernel", "relaxed_conv_bwd:_window_columns_autotuned",
               FIXED_TILE, cap, dtypes=CONV_DTYPES),
        _entry("fold", "fold", "relaxed_conv_bwd:_fold_kernel", "relaxed_conv_bwd:_fold_autotuned", FIXED_FOLD, cap,
               dtypes=CONV_DTYPES),
        _entry("dx_direct", "dx_direct", "input_grad_direct:_input_grad_direct_kernel",
               "input_grad_direct:_input_grad_direct_autotuned", FIXED_DIRECT, cap, dtypes=CONV_DTYPES),
        _entry("pack", "pack", "common:_channels_last_padded_kernel", None, PACK_TILE, cap,  # a copy: one tile
               dtypes=CONV_DTYPES),
        _entry("knet_fwd", "knet_fwd", "kernel_net_fused:_knet_forward_kernel", "kernel_net_fused:_knet_forward_autotuned",
               FIXED_FORWARD, cap, dtypes=KERNEL_NET_DTYPES),
        # One config (no autotuner): its partial sums must not depend on timing.
        _entry("knet_bwd", "knet_bwd", "kernel_net_fused:_knet_backward_kernel", None,
               FIXED_BACKWARD, cap, dtypes=KERNEL_NET_DTYPES,  # fp32 (fp64) partial sums, added on the host
               pointers={"dr_ptr": ACC, "dq_ptr": ACC, "dw2_ptr": ACC, "db2_ptr": ACC}),
    )


_KERNELS: tuple[Kernel, ...] | None = None


def __getattr__(name: str):
    # KERNELS is built on first use: it runs the host functions once (on meta tensors, with the
    # launch intercepted), which importing this module should not do.
    global _KERNELS
    if name == "KERNELS":
        if _KERNELS is None:
            _KERNELS = _kernels()
        return _KERNELS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    maxnreg = fixed.pop("maxnreg", None)
    out = []
    if dtype.autotuned and kernel.autotuner:
        tuner = resolve(kernel.autotuner)
        configs = getattr(tuner, "configs", None)
        if configs is None:
            raise RegistryError(f"{kernel.autotuner!r} is not a triton.autotune wrapper (no .configs)")
        for c in configs:
            out.append(LaunchConfig(_config_label(c.kwargs, c.num_warps, c.num_stages), dict(c.kwargs),
                                    c.num_warps, c.num_stages, getattr(c, "maxnreg", None)))
    label = _config_label(fixed, warps, stages) + (f"-r{maxnreg}" if maxnreg else "")
    if not any(c.label == label for c in out):
        out.append(LaunchConfig("fixed:" + label, fixed, warps, stages, maxnreg, fixed=True))
    return out


def autotuner_keeps(kernel: Kernel, dtype: Dtype, config: LaunchConfig, spec_label: str, spec: dict) -> bool | None:
    """Whether the kernel's autotuner would consider ``config`` for this dtype and case (its
    ``early_config_prune`` on the case's own arguments): False for a shipped config it drops, such
    as a tile too large for exact fp32 or for shared memory; None when not applicable (the fixed
    launch, or no autotuner)."""
    if config.fixed or not kernel.autotuner:
        return None
    import torch

    tuner = resolve(kernel.autotuner)
    prune = getattr(tuner, "early_config_prune", None)
    if prune is None:
        return True
    ints: dict = {}
    for label in ["*", *spec_label.split()]:
        ints.update(kernel.ints.get(label, {}))
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}[dtype.pointer]
    named = {"data_ptr": torch.empty(1, dtype=torch_dtype), **ints}
    kept = prune(tuner.configs, named, **{**kernel.constexprs, **spec, **dtype_constexprs(dtype)})
    return any(c.kwargs == config.meta and c.num_warps == config.num_warps and c.num_stages == config.num_stages
               for c in kept)


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

    # FAST_TRIG: the fused kernel net's SFU sine/cosine, which fp32 data runs on a GPU
    # (kernel_net_fused.fast_trig; the meta-tensor capture cannot see a GPU).
    return {"PRECISION": dtype.precision, "ACC": getattr(tl, {"fp32": "float32", "fp64": "float64"}[dtype.acc]),
            "FP64": dtype.acc == "fp64", "FAST_TRIG": dtype.pointer == "fp32"}


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
