"""Pieces shared by the forward and backward kernels: dtypes, the hidden-column split, the
channels-last input, and how a kernel is launched (fixed tile, autotuned, or pinned)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompileTimeAssertionFailure
from triton.runtime.errors import OutOfResources, PTXASError

from relaxedconv.dispatch import interpreting, tf32_matmuls_allowed

# Width of the tile that carries the "tail" hidden column of every rotation (see hidden_split);
# a constexpr so kernels can read the global.
TAIL_WIDTH = tl.constexpr(16)


def compiled_on_gpu(device: torch.device) -> bool:
    """Whether kernels launched for ``device`` run compiled on a GPU (not in the interpreter)."""
    return device.type == "cuda" and not interpreting()


def use_autotune(device: torch.device, dtype: torch.dtype) -> bool:
    """Autotune on CUDA; one fixed config under the interpreter (it would time every config on
    the CPU), for fp64 (a checking mode whose FMA multiply-sum spills at large tiles) and when
    ``RELAXEDCONV_AUTOTUNE=0`` (test suites: one compile per specialisation instead of one per
    config, and a fixed reduction order across processes)."""
    if os.environ.get("RELAXEDCONV_AUTOTUNE", "1") == "0" or dtype == torch.float64:
        return False
    return compiled_on_gpu(device)


def check_int32_indexing(*tensors: torch.Tensor) -> None:
    """The kernels index with 32-bit offsets; refuse tensors they would overflow."""
    for t in tensors:
        if t.numel() >= 2**31:
            raise ValueError(
                f"a tensor of {t.numel():,} elements ({tuple(t.shape)}) is beyond the fused kernels' "
                "32-bit indexing; split the batch into smaller chunks"
            )


def empty_output(shape, *, device, dtype) -> torch.Tensor:
    """Every buffer a kernel must fill completely; tests replace it to poison buffers with NaN."""
    return torch.empty(shape, device=device, dtype=dtype)


def dot_precision(dtype: torch.dtype):
    """``tl.dot``'s input_precision: tf32 only where torch would use it, exact otherwise.

    Half-precision operands take the default (the argument only concerns fp32 operands).
    """
    if dtype == torch.float32:
        return "tf32" if tf32_matmuls_allowed() and not interpreting() else "ieee"
    if dtype == torch.float64:
        return "ieee"
    return None


def acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def hidden_split(hidden_plus_one: int) -> tuple[int, bool]:
    """(main hidden columns per rotation, whether the last column is a separate tail).

    Z has H+1 columns: H hidden features and the constant one that carries b_L. Flattening the
    columns of all rotations as (n, h) with H+1 = 33 per rotation would waste tensor-core work on
    padding wherever a tile boundary falls; instead the main columns are (n, h < H) — N*H of them,
    a power of two times N — and the N tail columns (n, H) get their own 16-wide dot. With any
    other width every column is a main column and there is no tail.
    """
    main = hidden_plus_one - 1
    if main >= TAIL_WIDTH.value and main & (main - 1) == 0:
        return main, True
    return hidden_plus_one, False


# One tile of the repack: 32 output columns x 32 channels (loads coalesce along W, stores along C).
PACK_TILE = dict(BLOCK_W=32, BLOCK_C=32)


@triton.jit
def _channels_last_padded_kernel(x_ptr, out_ptr, C, H, W, HP, WP, PAD, sxb, sxc, sxh, sxw,
                                 BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[b, hp, wo, c] = x[b, c, hp - PAD, wo - PAD], zero outside x (program: (b, hp), W tile,
    C tile). Every output element is written, the zero border included."""
    row = tl.program_id(0)
    b = row // HP
    h = row % HP - PAD
    wo = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    w = wo - PAD
    hv = h + tl.zeros_like(w)  # the row as a vector: the interpreter's masks are vectors
    inside = (w >= 0) & (w < W) & (hv >= 0) & (hv < H)
    c_ok = c < C
    # Plain offsets (negative on the border, where the mask keeps them from being read): Triton can
    # then prove the run along W and give the loads their own coalesced layout (with a tl.where
    # here, Triton 3.6 loaded in the stores' layout, half of each 32-byte sector unused).
    src = b.to(tl.int64) * sxb + (hv * sxh + w * sxw)[None, :] + (c * sxc)[:, None]
    tile = tl.load(x_ptr + src, mask=c_ok[:, None] & inside[None, :], other=0.0)
    dst = (row.to(tl.int64) * WP + wo)[None, :] * C + c[:, None]
    tl.store(out_ptr + dst, tile, mask=c_ok[:, None] & (wo < WP)[None, :])


def channels_last_padded(x: torch.Tensor, padding: int) -> torch.Tensor:
    """``[B, C*N_in, H, W]`` -> zero-padded ``[B, H+2p, W+2p, C*N_in]``, made once per call.

    Rows of the kernels' GEMMs are (batch, input channel) pairs at one position; in this layout
    the channels of a pixel are contiguous, so the im2col gather reads runs of C*N_in elements
    instead of one element per row, and no bounds test is needed per element.

    One Triton kernel pads and transposes in a single pass (its callers run the kernels, on CUDA or
    in the interpreter): as ``F.pad`` then ``permute().contiguous()`` it took 265 µs for G4's 33 MB
    input on an H200, 10x its byte count (bench/results/h200-2026-11-27-705c378/).
    """
    bsz, c, h, w = x.shape
    hp, wp = h + 2 * padding, w + 2 * padding
    out = empty_output((bsz, hp, wp, c), device=x.device, dtype=x.dtype)

    def grid(meta):
        return (bsz * hp, triton.cdiv(wp, meta["BLOCK_W"]), triton.cdiv(c, meta["BLOCK_C"]))

    launch("pack", _channels_last_padded_kernel, None, grid, (x, out, c, h, w, hp, wp, padding, *x.stride()), {},
           PACK_TILE, device=x.device, dtype=x.dtype)
    return out


def aligned_width(hidden_plus_one: int) -> int:
    """The row stride of :func:`aligned_hidden`'s Z: H+1 rounded up to a multiple of 16."""
    return hidden_plus_one + (-hidden_plus_one % 16)


def aligned_hidden(z: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Z in ``dtype`` (the kernels' compute dtype; Z's own by default) with its rows 16-element
    strided, so the row stride carries Triton's divisible-by-16 specialisation, every row starts
    16-byte aligned and the kernels' Z tiles load as vectors (rows of H+1 = 33 would not).

    One copy does the cast and the alignment (a cast, then a pad, took two passes over Z: on an
    H200 the pad alone took 105 µs of T2's 458 µs forward). The kernels read only the first H+1
    columns, so the padding columns are left unwritten (tests poison them with NaN)."""
    dtype = z.dtype if dtype is None else dtype
    hp = z.shape[-1]
    width = aligned_width(hp)
    if width == hp and dtype == z.dtype:
        return z.contiguous()
    out = empty_output((*z.shape[:-1], width), device=z.device, dtype=dtype)
    out[..., :hp].copy_(z)
    return out


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, FP64: tl.constexpr):
    """acc + a @ b. tl.dot has no fp64 form on GPUs, so fp64 (a checking mode: gradcheck, tight
    references) multiplies and sums on the FMA units instead; every other dtype uses tl.dot."""
    if FP64:
        return acc + tl.sum(a[:, :, None].to(tl.float64) * b[None, :, :].to(tl.float64), axis=1)
    else:
        return tl.dot(a, b, acc=acc, input_precision=PRECISION)


@triton.jit
def channel_rows(start, ROWS, C_IN: tl.constexpr, BLOCK: tl.constexpr):
    """BLOCK rows of the gather-GEMMs from ``start``: row r is (image r // C_in, channel r % C_in),
    the pairs that share one position's Z. (image, channel, valid)."""
    rows = start + tl.arange(0, BLOCK)
    return rows // C_IN, rows % C_IN, rows < ROWS


@triton.jit
def im2col_columns(jj, N_IN, KSIZE: tl.constexpr, WP, CN):
    """Window columns ``jj`` ordered (kh, kw, n') with n' fastest (contiguous in the
    channels-last input) -> (offset into the input relative to the window's corner, the row of
    Z in the reference order (n', kh, kw), the kernel offset kh*K + kw, the input rotation n')."""
    K2: tl.constexpr = KSIZE * KSIZE
    nprime = jj % N_IN
    kk = jj // N_IN
    x_col = ((kk // KSIZE) * WP + kk % KSIZE) * CN + nprime
    z_row = nprime * K2 + kk
    return x_col, z_row, kk, nprime


@triton.jit
def hidden_columns(pid_n, N_ROT, HMAIN, BLOCK_N: tl.constexpr):
    """Main columns of tile ``pid_n`` over the flattened (rotation, hidden) axis: (n, h, valid)."""
    c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return c // HMAIN, c % HMAIN, c < N_ROT * HMAIN


@triton.jit
def tail_columns(pid_n, N_ROT, HMAIN, BLOCK_N: tl.constexpr, TAIL_W: tl.constexpr):
    """Rotations whose tail column tile ``pid_n`` carries: those whose first main column lies in
    the tile, so every rotation's tail is computed by exactly one tile. (n, valid)."""
    c0 = pid_n * BLOCK_N
    n = (c0 + HMAIN - 1) // HMAIN + tl.arange(0, TAIL_W)
    return n, (n * HMAIN < c0 + BLOCK_N) & (n < N_ROT)


# ---- launching ---------------------------------------------------------------------------------

def bucket(n: int) -> int:
    """Autotune key bucket for a size that changes with the batch: the next power of two. A last
    partial batch or an evaluation batch in the same bucket reuses the tuned config."""
    return triton.next_power_of_2(max(1, int(n)))


# Launch options (not constexprs) a config may carry: a pin's or a fixed launch's other keys are tiles.
LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg")


def pinned_config(kernel: str):
    """A config forced by ``RELAXEDCONV_KERNEL_CONFIG``, e.g.
    ``u:BLOCK_M=128,BLOCK_N=64,BLOCK_K=64,num_warps=8,num_stages=3;fold:BLOCK_Q=64`` — for
    reproducing a measurement or working around a bad tuning result (``maxnreg=N`` caps the
    registers). (meta, launch options), None when not pinned."""
    spec = os.environ.get("RELAXEDCONV_KERNEL_CONFIG", "")
    for part in filter(None, (s.strip() for s in spec.split(";"))):
        name, _, body = part.partition(":")
        if name.strip() != kernel:
            continue
        meta, opts = {}, {}
        for item in filter(None, (s.strip() for s in body.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not value.strip().lstrip("-").isdigit():
                raise ValueError(
                    f"RELAXEDCONV_KERNEL_CONFIG: {item!r} in the entry for {kernel!r} is not KEY=INTEGER "
                    f"(example: 'u:BLOCK_M=128,BLOCK_N=64,BLOCK_K=64,num_warps=8,num_stages=3')"
                )
            (opts if key.strip() in LAUNCH_OPTIONS else meta)[key.strip()] = int(value)
        return meta, opts
    return None


def launch(name, kernel, autotuned, grid, args, consts, fixed, *, device, dtype):
    """Run ``kernel`` with the pinned config if there is one, else autotuned on CUDA, else with
    the fixed tile ``fixed`` (interpreter, fp64, RELAXEDCONV_AUTOTUNE=0; and always for a kernel
    without an autotuner, ``autotuned=None``). Under ``torch.use_deterministic_algorithms`` an
    autotuned kernel runs the first of :func:`untimed_configs` that compiles instead of the
    autotuner's timed choice."""
    if dtype == torch.bfloat16 and getattr(device, "type", device) == "cpu":
        # Triton's interpreter computes bf16 dots as garbage (errors of 1e9 against fp32), silently.
        raise TypeError(
            "the triton backend on CPU runs in Triton's interpreter, which has no bfloat16 (its results "
            "would be garbage): run it in float32, float16 or float64 there (not under bf16 autocast), "
            "or use backend='factored_torch' or 'materialize'")
    pinned = pinned_config(name)
    if pinned is not None:
        meta, opts = pinned
        # What the pin leaves out comes from the fixed launch (its warps and stages too).
        meta = {**{k: v for k, v in fixed.items() if k not in LAUNCH_OPTIONS}, **meta}
        opts = {**{k: v for k, v in fixed.items() if k in LAUNCH_OPTIONS}, **opts}
        kernel[grid(meta)](*args, **consts, **meta, **opts)
    elif autotuned is not None and use_autotune(device, dtype):
        if torch.are_deterministic_algorithms_enabled():
            configs = untimed_configs(autotuned, args, consts)
            for i, (meta, opts) in enumerate(configs):
                try:
                    kernel[grid(meta)](*args, **consts, **meta, **opts)
                    break
                except UNUSABLE_CONFIG:  # as the autotuner skips it: the next one, in the same order
                    if i == len(configs) - 1:
                        raise
        else:
            autotuned[grid](*args, **consts)
    else:
        kernel[grid(fixed)](*args, **consts, **fixed)


# What Triton's autotuner skips a config for (a card with less shared memory than the pruning
# assumes, a register file it cannot fit): raised by the launch, before the kernel runs.
UNUSABLE_CONFIG = (OutOfResources, CompileTimeAssertionFailure, PTXASError)


def untimed_configs(autotuned, args, consts) -> list[tuple[dict, dict]]:
    """(meta-parameters, launch options) of the configs that ``autotuned``'s pruning keeps for
    these arguments, in its order: a function of the shapes alone. Under deterministic algorithms
    the first that compiles runs. Timing picks a config by the clock, and configs that tile a
    reduction differently round differently, so two processes (a run and its resumption) could
    differ in the last bits; deterministic algorithms must not. Slower than the timed choice
    where another config is faster."""
    configs = autotuned.configs
    if autotuned.early_config_prune:
        configs = autotuned.early_config_prune(configs, dict(zip(autotuned.arg_names, args)), **consts)
    out = []
    for cfg in configs:
        options = {k: v for k, v in cfg.all_kwargs().items() if k in LAUNCH_OPTIONS and v is not None}
        out.append((dict(cfg.kwargs), options))
    return out


# Shared memory a config may plan for (sm_90 allows 227 KB per block; the epilogue's layout
# conversions need some of it too).
SMEM_BUDGET = 200 * 1024
# Exact fp32 (input_precision "ieee") multiplies on the FMA units, whose tile lives in registers:
# beyond this many multiply-adds per K step the sm_90 compiles spill (kernel report, 2026-11-27:
# up to 12.9 KB at 128x64x64), so larger configs are not offered for it.
EXACT_FP32_TILE = 64 * 64 * 32


def _config_key(cfg) -> tuple:
    return tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages


def prune_by_size(limits, fp32_only=(), block_n=None):
    """An ``early_config_prune`` that drops configs the problem or the card cannot use:

    - ``fp32_only``: configs reserved for fp32 data, which then runs them alone (a kernel whose
      other fp32 configs are known to fault); 16-bit data never runs them;

    - a block larger than the problem: ``limits`` maps a block name to the kernel argument bounding
      it (or to a function of the arguments, constexprs included); the bound is its next power of
      two, at least 16;
    - a GEMM config whose pipelined operand tiles would not fit :data:`SMEM_BUDGET` at the data's
      element size (fp32 doubles bf16's);
    - for exact fp32 (FMA units), a tile above :data:`EXACT_FP32_TILE`.

    ``block_n(config, args)``: the N width of a kernel whose config does not name it as BLOCK_N.
    One config always survives."""

    reserved = {_config_key(c) for c in fp32_only}

    def prune(configs, named_args, **kwargs):
        args = {**kwargs, **named_args}
        elem = next((a.element_size() for a in named_args.values() if isinstance(a, torch.Tensor)), 2)
        exact_fp32 = args.get("PRECISION") == "ieee" and not args.get("FP64")
        if reserved:
            fp32 = elem == 4 and not args.get("FP64")
            configs = [c for c in configs if (_config_key(c) in reserved) == fp32]

        def fits(cfg):
            for block, arg in limits.items():
                size = arg(args) if callable(arg) else args[arg]
                if cfg.kwargs.get(block, 0) > max(16, triton.next_power_of_2(int(size))):
                    return False
            m, n, k = (cfg.kwargs.get(b) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            if block_n is not None:
                n = block_n(cfg, args)
            if m and n and k:
                if cfg.num_stages * (m * k + k * (n + TAIL_WIDTH.value)) * elem > SMEM_BUDGET:
                    return False
                if exact_fp32 and m * n * k > EXACT_FP32_TILE:
                    return False
            return True

        kept = [c for c in configs if fits(c)]
        return kept or [min(configs, key=lambda c: sum(c.kwargs.values()))]

    return prune
