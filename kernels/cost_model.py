"""FLOP/byte model of the fused path, step by step, and the time it predicts on a given card.

Every step of ``relaxed_conv_fwd``/``relaxed_conv_bwd`` gets: multiply-adds as executed (tile
padding included, for a representative config), bytes to/from DRAM (compulsory traffic of the
tensors it reads and writes once), bytes from L2 into the SMs (the gathered operands, re-read
by every program that needs them), and a predicted time

    t = max(2 * MACs / (efficiency * peak), DRAM bytes / DRAM bandwidth, L2 bytes / L2 bandwidth) + launch

A bound, not a simulation: it says which resource a step must saturate and how long that takes
if it does. Run ``python -m relaxedconv.kernels.cost_model`` for the benchmark cases; bench/README.md
keeps its output beside the measured times. The card parameters are stated in :data:`CARDS` with
where each comes from; the Triton GEMM efficiency is an assumption until a GPU run measures it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Card:
    name: str
    matmul_tflops: float  # dense bf16 matmul ceiling (measured where stated)
    dram_tbps: float
    l2_tbps: float
    triton_efficiency: float  # fraction of matmul_tflops a gather-GEMM reaches (assumption)
    cublas_efficiency: float  # fraction cuBLAS reaches on these skinny GEMMs (assumption)
    launch_us: float = 4.0
    source: str = ""
    # Instruction issue, for kernels bound by neither FLOPs nor bytes (the fused kernel net): SMs,
    # a sustained clock (boost is 1.98 GHz on both cards; an assumption) and the fraction of the
    # issue rate (4 warp-instructions per SM per clock) such a kernel sustains, calibrated on the
    # first fused kernel net: 0.26 forward, 0.20 backward on the H200 (KERNEL_NET_INSTRUCTIONS).
    sms: int = 132
    clock_ghz: float = 1.75
    simt_efficiency: float = 0.22


CARDS = {
    "H100": Card(
        "H100 SXM 80GB", 767.0, 3.0, 7.0, 0.40, 0.60,
        source="matmul 767 TFLOP/s measured (design.md §5, 2026-11-26); HBM3 3.35 TB/s spec -> 3.0 "
        "achievable; L2 ~7 TB/s and the two efficiencies are assumptions",
    ),
    "H200": Card(
        "H200 141GB", 790.0, 4.3, 7.0, 0.40, 0.60,
        source="matmul ~790 TFLOP/s measured (issue 9, 2026-11-27); HBM3e 4.8 TB/s spec -> 4.3 "
        "achievable; L2 and efficiencies as for H100",
    ),
}


@dataclass(frozen=True)
class Shape:
    """One layer call: batch, channels per rotation, rotations, kernel, hidden width, image."""

    batch: int
    in_channels: int
    out_channels: int
    in_rotations: int
    out_rotations: int
    kernel_size: int
    hidden: int
    size: int  # input H = W, 'same' padding
    per_position: bool
    elem: int = 2  # bytes per element of the compute dtype (bf16)

    @property
    def positions(self) -> int:
        return self.size * self.size

    @property
    def window(self) -> int:
        return self.in_rotations * self.kernel_size**2


@dataclass(frozen=True)
class Step:
    name: str
    macs: float
    dram_bytes: float
    l2_bytes: float
    engine: str  # "triton", "cublas", "copy" or "simt" (issue-bound: ``instructions``)
    instructions: float = 0.0  # warp-instructions executed (engine "simt")


def _ceil(a: int, b: int) -> int:
    return -(-a // b) * b


def _split(s: Shape) -> tuple[int, bool]:
    """(main hidden columns per rotation, tail) as :func:`common.hidden_split` decides."""
    h = s.hidden
    return (h, True) if h >= 16 and h & (h - 1) == 0 else (h + 1, False)


def _columns(s: Shape, bn: int) -> tuple[int, int]:
    """(column tiles, executed columns per row incl. padding and the 16-wide tail dots)."""
    main, tail = _split(s)
    tiles = -(-(s.out_rotations * main) // bn)
    return tiles, tiles * (bn + (16 if tail else 0))


def _u_step(s: Shape, bm: int, bn: int, bk: int) -> Step:
    e, p, j = s.elem, s.positions, s.window
    rows = s.batch * s.in_channels
    tiles, cols = _columns(s, bn)
    rows_exec = _ceil(rows, bm)
    return Step(
        f"u: U = X_col Z (gather-GEMM) [{bm}x{bn}x{bk}]",
        p * rows_exec * _ceil(j, bk) * cols,
        e * (_el(s)["xp"] + _el(s)["z"] + _el(s)["u"]),
        e * p * (tiles * rows_exec * j + (rows_exec // bm) * j * cols),
        "triton",
    )


def _dz_step(s: Shape, bm: int, bn: int, bk: int) -> Step:
    e, p, j = s.elem, s.positions, s.window
    rows = s.batch * s.in_channels
    tiles, cols = _columns(s, bn)
    j_exec = _ceil(j, bm)
    return Step(
        f"dz: dZ = X_col^T dU (gather-GEMM) [{bm}x{bn}x{bk}]",
        p * j_exec * _ceil(rows, bk) * cols,
        e * (_el(s)["xp"] + _el(s)["u"]) + 4 * _el(s)["z"],
        e * p * (tiles * j * rows + (j_exec // bm) * rows * cols),
        "triton",
    )


def _v_step(s: Shape, bm: int, bn: int, bk: int) -> Step:
    e, p, j, n = s.elem, s.positions, s.window, s.out_rotations
    rows = s.batch * s.in_channels
    main, tail = _split(s)
    k_exec = _ceil(n * main, bk) + (_ceil(n, 16) if tail else 0)
    rows_exec = _ceil(rows, bm)
    hp = s.hidden + 1
    return Step(
        f"v: V = dU Z^T (GEMM into im2col columns) [{bm}x{bn}x{bk}]",
        p * rows_exec * _ceil(j, bn) * k_exec,
        e * (_el(s)["u"] + _el(s)["z"] + _el(s)["v"]),
        e * p * (-(-j // bn) * rows * n * hp + (rows_exec // bm) * j * n * hp),
        "triton",
    )


def _halo_shapes(s: Shape, qh: int, qw: int) -> list[tuple[int, int]]:
    """(rows, columns) of output positions whose window reaches each qh x qw pixel block ('same'
    padding), the blocks in the direct dX kernel's order (``input_grad_direct._halo``)."""
    k, pad, n = s.kernel_size, s.kernel_size // 2, s.size

    def span(q0: int, q: int) -> int:
        return max(0, min(q0 + q + pad, n) - max(q0 + pad - k + 1, 0))

    return [(span(y, qh), span(x, qw)) for y in range(0, n, qh) for x in range(0, n, qw)]


def _halos(s: Shape, qh: int, qw: int) -> list[int]:
    """Output positions whose window reaches each pixel block."""
    return [hy * hx for hy, hx in _halo_shapes(s, qh, qw)]


def _nin_block(s: Shape) -> int:
    """The direct dX kernel's NIN_BLOCK: N_in padded to a power of two."""
    return 1 << (s.in_rotations - 1).bit_length()


def _direct_step(s: Shape, bm: int, qh: int, qw: int, bk: int) -> Step:
    """dX without im2col columns (``input_grad_direct``): per block of pixels a GEMM whose
    reduction runs over every (position, rotation, hidden) of the block's halo; B is Z, banded."""
    e, n = s.elem, s.out_rotations
    rows = s.batch * s.in_channels
    main, tail = _split(s)
    rows_exec = _ceil(rows, bm)
    cols = _nin_block(s) * qh * qw
    shapes = _halo_shapes(s, qh, qw)
    k_per_position = _ceil(n * main, bk)
    # the tail: one step per (rotation, halo row) over QW + K - 1 positions padded to a power of two
    row_width = max(16, 1 << (qw + s.kernel_size - 2).bit_length())
    macs = sum(rows_exec * cols * (hy * hx * k_per_position + (n * hy * row_width if tail else 0)) for hy, hx in shapes)
    hp = s.hidden + 1
    # A: each program reads its rows' dU at every halo position; B: each element of a position's Z
    # feeds one pixel, read once per row tile (masked lanes are not fetched) — P positions' worth
    # for stationary Z too, which every position reads again
    l2 = e * (sum(hy * hx for hy, hx in shapes) * rows_exec * n * hp + (rows_exec // bm) * n * s.positions * s.window * hp)
    return Step(f"dx direct: dX = banded GEMM, no columns [{bm}, {qh}x{qw} px, K{bk}]", macs,
                e * (_el(s)["u"] + _el(s)["z"] + _el(s)["x"]), l2, "triton")


def _el(s: Shape) -> dict[str, int]:
    """Elements of every tensor the steps move."""
    b, c, n, p = s.batch, s.in_channels, s.out_rotations, s.positions
    pad = s.kernel_size // 2
    hp = s.hidden + 1
    return {
        "x": b * c * s.in_rotations * s.size * s.size,
        "xp": b * c * s.in_rotations * (s.size + 2 * pad) ** 2,
        "z": n * (p if s.per_position else 1) * s.window * hp,
        "u": b * n * p * hp * c,
        "v": b * p * s.kernel_size**2 * c * s.in_rotations,
        "y": b * s.out_channels * n * p,
    }


def _kept(tuner, s: Shape, **consts) -> list:
    """The configs ``tuner``'s pruning keeps for shape ``s`` (16-bit data unless ``s.elem`` is 4)."""
    import torch

    args = {"data": torch.empty(1, dtype={2: torch.bfloat16, 4: torch.float32}[s.elem]),
            "ROWS": s.batch * s.in_channels, "J": s.window, "N_ROT": s.out_rotations, "P": s.positions}
    return tuner.early_config_prune(tuner.configs, args, HMAIN=_split(s)[0], PRECISION=None, FP64=False, **consts)


def _best(s: Shape, kernel: str, card: Card) -> Step:
    """The step at the shipped config the model predicts fastest among those the kernel's own
    autotuner keeps for this shape (what autotuning should find)."""
    from . import relaxed_conv_bwd, relaxed_conv_fwd

    tuner = {"u": relaxed_conv_fwd._hidden_projection_autotuned, "dz": relaxed_conv_bwd._hidden_weight_grad_autotuned,
             "v": relaxed_conv_bwd._window_columns_autotuned}[kernel]
    make = {"u": _u_step, "dz": _dz_step, "v": _v_step}[kernel]
    cands = [make(s, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in _kept(tuner, s)]
    return min(cands, key=lambda st: step_time(st, card))


def _best_direct(s: Shape, card: Card) -> Step:
    """The direct dX step at the config the model predicts fastest among those its autotuner keeps."""
    from . import input_grad_direct

    kept = _kept(input_grad_direct._input_grad_direct_autotuned, s, NIN_BLOCK=_nin_block(s))
    cands = [_direct_step(s, c.kwargs["BLOCK_M"], c.kwargs["QH"], c.kwargs["QW"], c.kwargs["BLOCK_K"]) for c in kept]
    return min(cands, key=lambda st: step_time(st, card))


def input_grad_steps(s: Shape, card: Card) -> dict[str, list[Step]]:
    """dX's two routes (``relaxed_conv_bwd.input_grad_route``): im2col columns then col2im, or direct."""
    e, el = s.elem, _el(s)
    fold = Step("fold: dX = col2im(V)", 0, e * (el["v"] + el["x"]), 0, "copy")
    return {"columns": [_best(s, "v", card), fold], "direct": [_best_direct(s, card)]}


def route_time(route_steps: list[Step], card: Card) -> float:
    """Predicted seconds of a route's steps."""
    return sum(step_time(x, card) for x in route_steps)


def faster_input_grad(routes: dict[str, list[Step]], card: Card) -> str:
    """The dX route (of :func:`input_grad_steps`) the model predicts faster: what the backward's
    timing should choose."""
    return min(routes, key=lambda r: route_time(routes[r], card))


def _bank_backward_steps(s: Shape) -> list[Step]:
    """A stationary layer's backward through its conv2d bank (``relaxed_conv_bwd.bank_backward``):
    the bank K = W Z, cuDNN's data and weight gradients at the direct convolution's FLOPs, and the
    two GEMMs that turn dK into dZ and dW."""
    e, el, hp = s.elem, _el(s), s.hidden + 1
    bank = s.out_channels * s.out_rotations * s.in_channels * s.window
    direct = s.batch * s.positions * bank
    small = s.out_channels * s.in_channels * s.out_rotations * s.window * hp
    return [
        Step("bank K = W Z (cuBLAS)", small, e * (bank + el["z"]), 0, "cublas"),
        Step("dX = conv2d data gradient (cuDNN)", direct, e * (el["y"] + bank + el["x"]), 0, "cublas"),
        Step("dK = conv2d weight gradient (cuDNN)", direct, e * (el["y"] + el["xp"] + bank), 0, "cublas"),
        Step("dZ, dW from dK (cuBLAS)", 2 * small, e * (2 * bank + el["z"]), 0, "cublas"),
    ]


def steps(s: Shape, card: Card, stationary_backward: str = "bank", input_grad: str = "auto") -> dict[str, list[Step]]:
    """The steps of the forward and of the backward pass with their counts; a stationary layer's
    backward takes ``stationary_backward``'s route ("bank", the default, or "fused"), dX
    ``input_grad``'s ("columns", "direct", or "auto": the one the model predicts faster)."""
    e = s.elem
    el = _el(s)
    gemm_macs = s.batch * s.out_rotations * s.positions * (s.hidden + 1) * s.in_channels * s.out_channels
    pack = Step("pack x (channels-last, padded)", 0, e * (el["x"] + el["xp"]), 0, "copy")
    # Z arrives in the layer's fp32 and is read once, written in the compute dtype 16-aligned.
    z_align = Step("cast and align Z (one copy)", 0, (4 + e) * el["z"], 0, "copy")
    y = Step("Y = W U^T (cuBLAS)", gemm_macs, e * (el["u"] + el["y"]), 0, "cublas")
    fwd = [pack, z_align, _best(s, "u", card), y]
    if not s.per_position and stationary_backward == "bank":
        return {"fwd": fwd, "bwd": _bank_backward_steps(s)}
    dy_t = Step("dY transposed for dW", 0, e * 2 * el["y"], 0, "copy")
    dw = Step("dW = dY U (cuBLAS)", gemm_macs, e * (el["u"] + el["y"]), 0, "cublas")
    du = Step("dU = dY^T W (cuBLAS)", gemm_macs, e * (el["u"] + el["y"]), 0, "cublas")
    routes = input_grad_steps(s, card)
    route = faster_input_grad(routes, card) if input_grad == "auto" else input_grad
    # The packed input and aligned Z come from the forward (kept by the autograd formula).
    return {"fwd": fwd, "bwd": [dy_t, dw, du, _best(s, "dz", card), *routes[route]]}


def _times(st: Step, card: Card) -> dict[str, float]:
    eff = {"triton": card.triton_efficiency, "cublas": card.cublas_efficiency, "copy": 1.0, "simt": 1.0}[st.engine]
    issue_rate = card.sms * 4 * card.clock_ghz * 1e9 * card.simt_efficiency
    return {
        "FLOPs": 2 * st.macs / (eff * card.matmul_tflops * 1e12) if st.macs else 0.0,
        "DRAM": st.dram_bytes / (card.dram_tbps * 1e12),
        "L2": st.l2_bytes / (card.l2_tbps * 1e12),
        "issue": st.instructions / issue_rate,
    }


def step_time(st: Step, card: Card) -> float:
    """Predicted seconds for one step on ``card``."""
    return max(_times(st, card).values()) + card.launch_us * 1e-6


def bound(st: Step, card: Card) -> str:
    times = _times(st, card)
    return max(times, key=times.get)


# SASS instructions per value of Z (N*P*J*H values), per thread, of the fused kernel net's loops at
# H = 32 (sm_90a, Triton 3.9, T2's launch: the kernel report's `loop` column over the values a
# thread holds per iteration; forward at its fixed config, 64 rows and 4 warps, 16 values; backward
# 16 rows, 4 warps, 4 values). "first": exact-fp32 FMA products and libdevice sin/cos (its loops
# without the sines, plus ~28 per sine for libdevice's fast path); then the tensor-core kernels with
# TF32x3 products (fp32's accuracy) and with one TF32 pass (a bf16 convolution), SFU sin/cos.
KERNEL_NET_INSTRUCTIONS = {"first": (117.0, 258.0), "tf32x3": (715 / 16, 411 / 4), "tf32": (580 / 16, 227 / 4)}


def kernel_net_steps(s: Shape, version: str | None = None) -> dict[str, list[Step]]:
    """The fused kernel net's forward and backward (kernels/kernel_net_fused.py) at the layer's
    shape: issue-bound per value of Z; DRAM: z written (fp32, H+1 wide) and dZ read back.
    ``version``: a key of :data:`KERNEL_NET_INSTRUCTIONS`; None: what the layer runs, one TF32
    pass for a bf16 shape (``elem`` 2), TF32x3 otherwise."""
    version = version or ("tf32" if s.elem == 2 else "tf32x3")
    fwd_i, bwd_i = KERNEL_NET_INSTRUCTIONS[version]
    values = s.out_rotations * (s.positions if s.per_position else 1) * s.window * s.hidden
    z_bytes = 4 * _el(s)["z"]
    name = "first" if version == "first" else f"{version} products"
    return {"fwd": [Step(f"kernel net forward (fused, {name})", 0, z_bytes, 0, "simt", values * fwd_i / 32)],
            "bwd": [Step(f"kernel net backward (fused, {name})", 0, z_bytes, 0, "simt", values * bwd_i / 32)]}


def predict(s: Shape, card: Card, stationary_backward: str = "bank", input_grad: str = "auto") -> dict[str, float]:
    """Predicted fwd, bwd and fwd+bwd milliseconds, and the peak of what the op allocates (MiB)."""
    st = steps(s, card, stationary_backward, input_grad)
    # V exists only where the backward runs the columns route (its col2im step)
    columns_route = any(x.name.startswith("fold:") for x in st["bwd"])
    fwd = sum(step_time(x, card) for x in st["fwd"]) * 1e3
    bwd = sum(step_time(x, card) for x in st["bwd"]) * 1e3
    e = s.elem
    b, c, n, p = s.batch, s.in_channels, s.out_rotations, s.positions
    u_bytes = e * b * n * p * (s.hidden + 1) * c
    v_bytes = min(e * b * p * s.kernel_size**2 * c * s.in_rotations, 256 * 2**20) if columns_route else 0
    dz_bytes = 4 * n * (p if s.per_position else 1) * s.window * (s.hidden + 1)
    # backward: U (saved), dU, one V chunk, dZ (fp32), dX, the packed input
    peak = u_bytes * 2 + v_bytes + dz_bytes + 2 * e * b * c * s.in_rotations * (s.size + s.kernel_size) ** 2
    if not s.per_position and stationary_backward == "bank":
        # U exists during the forward only; the backward holds the bank, dK and dX
        bank = e * s.out_channels * n * c * s.window
        peak = max(u_bytes, 2 * bank + e * _el(s)["x"] + e * _el(s)["y"])
    return {"fwd_ms": fwd, "bwd_ms": bwd, "fwdbwd_ms": fwd + bwd, "peak_mib": peak / 2**20}


def table(shapes: dict[str, Shape], card: Card) -> str:
    """Markdown: per case and step, GFLOP executed, DRAM and L2 MB, bound and predicted µs."""
    lines = [
        f"Card model: {card.name} — {card.source}.",
        "",
        "| case | pass | step | GFLOP (executed) | DRAM MB | L2→SM MB | bound | predicted µs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in shapes.items():
        for pas, sts in steps(s, card).items():
            for st in sts:
                lines.append(
                    f"| {name} | {pas} | {st.name} | {2 * st.macs / 1e9:.2f} | {st.dram_bytes / 1e6:.0f} | "
                    f"{st.l2_bytes / 1e6:.0f} | {bound(st, card)} | {step_time(st, card) * 1e6:.0f} |"
                )
        if s.per_position:
            routes = input_grad_steps(s, card)
            chosen = faster_input_grad(routes, card)
            for route, sts in routes.items():
                for st in sts if route != chosen else ():
                    lines.append(f"| {name} | bwd | {st.name} (the other dX route, not in the total) | {2 * st.macs / 1e9:.2f} | "
                                 f"{st.dram_bytes / 1e6:.0f} | {st.l2_bytes / 1e6:.0f} | {bound(st, card)} | "
                                 f"{step_time(st, card) * 1e6:.0f} |")
        for pas, sts in kernel_net_steps(s).items():
            for st in sts:
                lines.append(f"| {name} | {pas} | {st.name} (not in the total) | - | {st.dram_bytes / 1e6:.0f} | - | "
                             f"{bound(st, card)} | {step_time(st, card) * 1e6:.0f} |")
        pr = predict(s, card)
        lines.append(
            f"| {name} | **total** | fwd {pr['fwd_ms']:.3f} ms, bwd {pr['bwd_ms']:.3f} ms (bwd/fwd "
            f"{pr['bwd_ms'] / pr['fwd_ms']:.2f}), f+b {pr['fwdbwd_ms']:.3f} ms; peak ≈ {pr['peak_mib']:.0f} MiB | | | | | |"
        )
    return "\n".join(lines)


def shape_of_case(case) -> Shape:
    """A :class:`Shape` from a benchmark case (``relaxedconv.benchmark.cases.Case``)."""
    return Shape(
        batch=case.batch, in_channels=case.in_channels, out_channels=case.out_channels,
        in_rotations=case.in_rotations, out_rotations=case.group_order, kernel_size=case.kernel_size,
        hidden=case.hidden, size=case.size, per_position=case.translation_nonstationary,
    )


def case_names(ap, text: str) -> list[str]:
    """The benchmark case names of a ``--cases`` value (this tool's and step_bench's); none, or an
    unknown one, is ``ap``'s usage error."""
    from relaxedconv.benchmark.cases import CASES

    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown or not names:
        ap.error(f"unknown case(s) {unknown or '(none given)'}; choose from {sorted(CASES)}")
    return names


def main(argv=None) -> int:
    import argparse

    from relaxedconv.benchmark.cases import CASES

    ap = argparse.ArgumentParser(prog="python -m relaxedconv.kernels.cost_model", description=__doc__.split("\n\n")[0])
    ap.add_argument("--card", choices=sorted(CARDS), default="H100")
    ap.add_argument("--cases", default="T1,T2,T2-b64-32px,G1,G2,G3,G4", help="comma-separated benchmark case names")
    ap.add_argument("--summary", action="store_true", help="one line per case instead of every step")
    args = ap.parse_args(argv)
    card = CARDS[args.card]
    names = case_names(ap, args.cases)
    shapes = {c: shape_of_case(CASES[c]) for c in names}
    if args.summary:
        print(f"{card.name}: predicted ms (bf16) — {card.source}")
        for name, s in shapes.items():
            pr = predict(s, card)
            kn = {p: sum(step_time(x, card) for x in v) * 1e3 for p, v in kernel_net_steps(s).items()}
            print(f"{name:12s} fwd {pr['fwd_ms']:7.3f}  bwd {pr['bwd_ms']:7.3f}  f+b {pr['fwdbwd_ms']:7.3f}  "
                  f"bwd/fwd {pr['bwd_ms'] / pr['fwd_ms']:.2f}  peak {pr['peak_mib']:.0f} MiB  "
                  f"(+ fused kernel net fwd {kn['fwd']:.3f} bwd {kn['bwd']:.3f})")
    else:
        print(table(shapes, card))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
