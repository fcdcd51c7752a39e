"""Time every step of the fused path on the GPU beside the FLOP/byte model's prediction.

    python -m relaxedconv.kernels.step_bench --cases T1,T2,G4 [--card auto|H100|H200] [--json steps.json]

For each benchmark case (bf16, random tensors of the case's shapes) it times, with
``triton.testing.do_bench`` (median, L2 flushed, compile and autotuning excluded), the whole
forward and backward of ``relaxed_conv_fwd``/``relaxed_conv_bwd`` and each step on its own — the
input repack, the Z alignment, the ``u`` gather-GEMM, the W GEMMs, ``dz``, dX by both of its routes
(``v`` + ``fold`` through im2col columns, and ``dx direct`` without them; the whole backward
runs the one its first call measured faster, printed after the table) — and
prints measured µs, predicted µs (:mod:`relaxedconv.kernels.cost_model`) and their ratio, so a
redesign is checked step by step against the argument that motivated it. The layer's kernel net
is timed beside them (fp32, the parameters' dtype): the fused Triton forward and backward
(kernels/kernel_net_fused.py) and the same SIREN in PyTorch operators, forward + backward (directly,
and for translation non-stationary shapes by the angle-addition split that the layers use). Off-GPU it runs under
``TRITON_INTERPRET=1`` on a tiny shape with ``--cpu-smoke`` (the timings then mean nothing; it
checks that every step runs).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from . import common, cost_model, route_tuning
from .input_grad_direct import direct_input_grad
from .relaxed_conv_bwd import _hidden_grad, _input_grad, relaxed_conv_bwd
from .kernel_net_fused import kernel_net_backward, kernel_net_forward
from .relaxed_conv_fwd import hidden_projection, output_weight_matrix, relaxed_conv_fwd


def _timer(device):
    if device.type == "cuda":
        import triton.testing

        def bench(fn):
            return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")) * 1e3

        return bench

    def bench(fn):  # off-GPU only proves the step runs: one call, its wall time
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6

    return bench


def _geometry(s: cost_model.Shape):
    from relaxedconv.reference import ConvGeometry

    return ConvGeometry(s.in_channels, s.out_channels, s.in_rotations, s.out_rotations, s.kernel_size, s.kernel_size // 2)


def measure(s: cost_model.Shape, device, dtype=torch.bfloat16) -> dict[str, float]:
    """Median µs of the whole passes and of each step, at the shape ``s``."""
    g = _geometry(s)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dt)

    p = s.positions
    hp = s.hidden + 1
    x = rnd(s.batch, s.in_channels * s.in_rotations, s.size, s.size)
    # the factors as a layer passes them: in its fp32 (the kernels' packing copy casts Z)
    z = rnd(*((s.out_rotations, p, s.window, hp) if s.per_position else (s.out_rotations, s.window, hp)), dt=torch.float32)
    w = rnd(s.out_channels, s.in_channels, hp, dt=torch.float32) * 0.1
    bench = _timer(device)
    y, u = relaxed_conv_fwd(x, z, w, None, g, return_u=True)
    dy = torch.randn_like(y)
    x_cl = common.channels_last_padded(x, g.padding)
    z_al = common.aligned_hidden(z, dtype)
    out_hw = (s.size, s.size)
    rows = s.out_rotations * p
    dy3 = dy.view(s.batch, s.out_channels, rows)
    w_mat = output_weight_matrix(w, dtype)
    du = torch.matmul(dy3.transpose(1, 2), w_mat).view(s.batch, s.out_rotations, p, hp, s.in_channels)
    res = {
        "forward (whole)": bench(lambda: relaxed_conv_fwd(x, z, w, None, g, return_u=True)),
        "backward (whole, U given)": bench(lambda: relaxed_conv_bwd(dy, x, z, w, g, u=u, x_cl=x_cl, z_al=z_al)),
        "pack x (channels-last, padded)": bench(lambda: common.channels_last_padded(x, g.padding)),
        "cast and align Z (one copy)": bench(lambda: common.aligned_hidden(z, dtype)),
        "u": bench(lambda: hidden_projection(x_cl, z_al, hp, g, out_hw, s.batch)),
        "Y = W U^T (cuBLAS)": bench(lambda: torch.matmul(w_mat, u.view(s.batch, rows, -1).transpose(1, 2))),
        "dY transposed for dW": bench(lambda: dy3.transpose(0, 1).reshape(s.out_channels, -1)),
        "dW = dY U (cuBLAS)": bench(lambda: dy3.transpose(0, 1).reshape(s.out_channels, -1) @ u.view(s.batch * rows, -1)),
        "dU = dY^T W (cuBLAS)": bench(lambda: torch.matmul(dy3.transpose(1, 2), w_mat)),
        "dz": bench(lambda: _hidden_grad(x_cl, du, z, g, out_hw, s.batch)),
        "v + fold": bench(lambda: _input_grad(du, z_al, hp, g, x.shape, out_hw, dtype)),
        "dx direct": bench(lambda: direct_input_grad(du, z_al, hp, g, x.shape, out_hw, dtype)),
    }
    res.update(measure_kernel_net(s, device, bench))
    return res


def measure_kernel_net(s: cost_model.Shape, device, bench) -> dict[str, float]:
    """The depth-3 kernel net's z = [sin(sin(R + Q) W2^T + b2) | 1] * m at the layer's shape, in
    fp32: the fused kernels' forward and backward, and the PyTorch operators' forward + backward."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    n, j, h, p = s.out_rotations, s.window, s.hidden, s.positions if s.per_position else None

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    r, w2, b2 = rnd(n, j, h, scale=3.0), rnd(h, h, scale=(6.0 / h) ** 0.5 / 3 ** 0.5), rnd(h, scale=0.1)
    q = None if p is None else rnd(p, h)
    mask = (torch.rand(j, generator=gen) > 0.1).float().to(device)
    z = kernel_net_forward(r, q, w2, b2, mask)
    dz = torch.randn(z.shape, generator=gen).to(device)
    leaves = [t.detach().requires_grad_() for t in (r, w2, b2) + (() if q is None else (q,))]

    def torch_fwd_bwd():
        rr, ww, bb = leaves[:3]
        pre = rr if q is None else rr[:, None] + leaves[3][None, :, None]
        zh = torch.sin(torch.nn.functional.linear(torch.sin(pre), ww, bb))
        zz = torch.cat([zh, torch.ones_like(zh[..., :1])], -1) * mask[:, None]
        torch.autograd.grad(zz, leaves, dz)

    def torch_split_fwd_bwd():  # the PyTorch path's default from 8 M values (kernel_net._second_layer_split)
        from relaxedconv.kernel_net import _SecondSineLayer

        rr, ww, bb, qq = leaves
        zh = _SecondSineLayer.apply(rr.reshape(n * j, h), qq, ww, bb,
                                    lambda t: t.view(n, j, p, h).permute(0, 2, 1, 3), True)
        zz = torch.cat([zh, torch.ones_like(zh[..., :1])], -1) * mask[:, None]
        torch.autograd.grad(zz, leaves, dz)

    out = {}
    for products in ("tf32", "tf32x3"):  # a bf16 convolution's, and fp32's accuracy
        out[f"kernel net forward (fused, {products} products)"] = bench(
            lambda: kernel_net_forward(r, q, w2, b2, mask, products))
        out[f"kernel net backward (fused, {products} products)"] = bench(
            lambda: kernel_net_backward(r, q, w2, b2, mask, dz, products))
    out["kernel net fwd+bwd (PyTorch operators)"] = bench(torch_fwd_bwd)
    if q is not None:
        out["kernel net fwd+bwd (PyTorch operators, angle-addition split)"] = bench(torch_split_fwd_bwd)
    return out


def _predicted(s: cost_model.Shape, card) -> dict[str, float]:
    """The model's µs for the same steps (a step that both passes run, such as the repack, once)."""
    out = {}
    for items in cost_model.steps(s, card).values():
        for item in items:
            out.setdefault(item.name.split(":")[0].split(" [")[0], cost_model.step_time(item, card) * 1e6)
    routes = cost_model.input_grad_steps(s, card)
    out["v + fold"], out["dx direct"] = (cost_model.route_time(routes[r], card) * 1e6 for r in ("columns", "direct"))
    for step in ("v", "fold"):
        out.pop(step, None)
    for version in ("tf32", "tf32x3"):
        for items in cost_model.kernel_net_steps(s, version).values():
            out[items[0].name] = cost_model.step_time(items[0], card) * 1e6
    pr = cost_model.predict(s, card)
    out["forward (whole)"] = pr["fwd_ms"] * 1e3
    out["backward (whole, U given)"] = pr["bwd_ms"] * 1e3
    return out


def main(argv=None) -> int:
    from relaxedconv.benchmark.cases import CASES
    from relaxedconv.benchmark.report import json_saver

    ap = argparse.ArgumentParser(prog="python -m relaxedconv.kernels.step_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="T1,T2,G4")
    ap.add_argument("--card", choices=["auto", *sorted(cost_model.CARDS)], default="auto",
                    help="the model's card parameters; auto: the GPU's own (H200 on an H200, else H100)")
    ap.add_argument("--json", default="", help="also write the rows here")
    ap.add_argument("--cpu-smoke", action="store_true", help="no GPU: run every step once on a tiny shape under the interpreter")
    args = ap.parse_args(argv)
    names = cost_model.case_names(ap, args.cases)  # checked first: a CPU run of the same line catches a typo
    if args.cpu_smoke:
        if not common.interpreting():
            ap.error("--cpu-smoke needs TRITON_INTERPRET=1 (the kernels run in Triton's interpreter on the CPU)")
        shapes = {"tiny-trans": cost_model.Shape(2, 3, 4, 2, 2, 3, 16, 4, True)}
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            print("step_bench: no CUDA device; run it on a GPU (or --cpu-smoke with TRITON_INTERPRET=1 to check it runs)",
                  file=sys.stderr)
            return 2
        shapes = {c: cost_model.shape_of_case(CASES[c]) for c in names}
        device, dtype = torch.device("cuda"), torch.bfloat16
    if args.card == "auto":
        gpu = torch.cuda.get_device_name() if device.type == "cuda" else ""
        args.card = "H200" if "H200" in gpu else "H100"
    card = cost_model.CARDS[args.card]
    rows = []
    print(f"step_bench on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU (interpreter: timings meaningless)'}; "
          f"model: {card.name}")
    print(f"{'case':12s} {'step':34s} {'measured µs':>12s} {'predicted µs':>13s} {'ratio':>6s}")

    def current():
        meta = {"card": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
                "model_card": card.name, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "routes": route_tuning.choice_records()}
        return {"meta": meta, "rows": rows}

    save = json_saver(args.json, current, ap.error)  # after every case: a run cut short keeps what it measured
    for name, s in shapes.items():
        got = measure(s, device, dtype)
        pred = _predicted(s, card)
        for step, us in got.items():
            pu = pred.get(step)
            ratio = us / pu if pu else None  # None, not NaN: the JSON stays standard
            rows.append({"case": name, "step": step, "measured_us": us, "predicted_us": pu, "ratio": ratio})
            print(f"{name:12s} {step:34s} {us:12.1f} {'-' if pu is None else format(pu, '.1f'):>13s} "
                  f"{'-' if ratio is None else format(ratio, '.2f'):>6s}")
        save()
    for c in route_tuning.choice_records():
        print(f"route {c['step']} {' '.join(c['shape'])}: {c['route']} (ms: {c['times_ms']}"
              f"{'; skipped: ' + str(c['skipped']) if c['skipped'] else ''})")
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
