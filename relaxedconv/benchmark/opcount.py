"""Operators per training step and per layer: the CPU-side evidence of issue 13.

Every ATen operator that reaches the dispatcher (forward, backward and optimiser) is counted with
a ``TorchDispatchMode``; ``_local_scalar_dense`` is the operator behind ``.item()``/``float(t)``,
i.e. a host synchronisation on a GPU. Views count (each is a launch-free dispatcher call, but a
call), so the figures are an upper bound on kernel launches.

    python -m relaxedconv.benchmark.opcount                 # the §7 model, batch 2, widths 8,16
    python -m relaxedconv.benchmark.opcount --json ops.json
    python -m relaxedconv.benchmark.opcount --autocast bf16 # as the GPU benchmark's step runs

"not views": the operators that do not alias their input (``OpOverload.is_view``), i.e. those that
can launch work on a GPU. Under ``--autocast bf16`` (CPU autocast) the forward runs as the GPU e2e
benchmark's does, autocast's casts included.

Only public entry points are used (``build_model``, ``GroupConv``), so the same file measures an
older checkout: ``PYTHONPATH=<old tree> python relaxedconv/benchmark/opcount.py``.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = ("_local_scalar_dense",)
# Operators that launch no work on a GPU: views (aliases of their input, and reshapes that become
# one) and allocations. By name, so that a count means the same under every torch version.
NO_LAUNCH_OPS = frozenset({
    "view", "slice", "as_strided", "t", "transpose", "unsqueeze", "permute", "_unsafe_view", "expand", "detach",
    "alias", "select", "squeeze", "unflatten", "reshape", "empty", "new_empty", "empty_strided", "new_empty_strided",
})


class OpCounter(TorchDispatchMode):
    """Counts ATen overload packets (``aten.mm``, ``aten.sin``, ...) that run while active."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket.__name__)] += 1
        self.views += func.is_view
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def not_views(self) -> int:
        return self.total - self.views

    @property
    def syncs(self) -> int:
        return sum(self.counts[name] for name in SYNC_OPS)


class OpSizes(TorchDispatchMode):
    """Every ATen operator that runs while active, in order, as (overload packet name, elements of
    the largest tensor it reads or writes): which operators pass over a large tensor."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        sizes = [t.numel() for t in (*args, *outs) if isinstance(t, torch.Tensor)]
        self.ops.append((str(func.overloadpacket.__name__), max(sizes, default=0)))
        return out

    def at_least(self, numel: int) -> list[str]:
        """Names of the operators that touched a tensor of at least ``numel`` elements."""
        return [name for name, n in self.ops if n >= numel]


def count(fn) -> OpCounter:
    with OpCounter() as c:
        fn()
    return c


def _relaxed_layers(model):
    """The relaxed layers (or, in the floor model, the convolutions that replace them)."""
    convs = [(n, m) for n, m in model.named_modules() if hasattr(m, "kernel_net")]
    return convs or [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]


def training_step_counts(variant: str, backend: str, *, batch=2, size=32, widths=(8, 16), group_order=8,
                         kernel_size=7, hidden=32, steps=3, autocast: str | None = None) -> dict:
    """Ops of one training step (forward, loss, backward; Adam apart), the last of ``steps`` (the
    first steps build caches), of each relaxed layer's forward + backward alone, and of one
    forward in eval mode under ``no_grad`` (after one such forward). ``autocast="bf16"``: every
    forward under CPU bf16 autocast (the GPU benchmark's step)."""
    from relaxedconv.models import build_model

    def mixed():
        if autocast is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[autocast])

    torch.manual_seed(0)
    floor = backend == "conv2d"  # the plain-conv floor: the same network, nn.Conv2d weights, no kernel net
    model = build_model(variant, num_classes=10, group_order=group_order, widths=widths, kernel_size=kernel_size,
                        hidden_channels=hidden, backend="auto" if floor else backend)
    if floor:
        from relaxedconv.benchmark.floor import plain_conv_floor

        model = plain_conv_floor(model)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))

    def fwd_bwd():
        opt.zero_grad(set_to_none=True)
        with mixed():
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()

    for _ in range(steps - 1):
        fwd_bwd()
        opt.step()
    c = count(fwd_bwd)
    # Adam's per-parameter step counters are CPU scalars even on a GPU (``.item()`` there is no
    # device sync), so the optimiser is counted apart from the model's forward + backward.
    c_opt = count(opt.step)

    # Each relaxed layer alone: its input captured by a forward hook, then layer(x).backward(dy).
    inputs = {}

    def keep_input(name):
        def hook(mod, args, out):
            inputs.setdefault(name, args[0].detach())  # returns None: the output is unchanged
        return hook

    hooks = [m.register_forward_hook(keep_input(name)) for name, m in _relaxed_layers(model)]
    with torch.no_grad(), mixed():  # each layer's input in the dtype it gets in the step
        model(x)
    for h in hooks:
        h.remove()
    per_layer = {}
    for name, m in _relaxed_layers(model):
        xi = inputs[name].clone().requires_grad_(True)

        def layer_step(m=m, xi=xi):
            m.zero_grad(set_to_none=True)
            xi.grad = None
            with mixed():
                out = m(xi)
            out.backward(torch.ones_like(out))

        layer_step()  # caches
        per_layer[name] = count(layer_step).total
    fwd_only = {}
    with torch.no_grad(), mixed():
        model.eval()
        model(x)
        fwd_only = count(lambda: model(x))
    return {
        "variant": variant,
        "backend": backend,
        "autocast": autocast,
        "fwd_bwd_ops": c.total,
        "fwd_bwd_not_views": c.not_views,
        "fwd_bwd_syncs": c.syncs,
        "fwd_bwd_top": dict(c.counts.most_common(12)),
        "optimizer_ops": c_opt.total,
        "layer_fwd_bwd_ops": per_layer,
        "eval_forward_ops": fwd_only.total,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m relaxedconv.benchmark.opcount", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="t2,se2,se2_rot")
    ap.add_argument("--backends", default="expand_conv,factored_torch,conv2d",
                    help="conv2d: the plain-conv floor (same network, nn.Conv2d weights of the expanded shapes)")
    ap.add_argument("--autocast", choices=("bf16", "fp16"), default=None,
                    help="every forward under CPU autocast in this dtype (the GPU e2e benchmark runs bf16)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from relaxedconv.dispatch import BACKENDS
    from relaxedconv.models import VARIANTS

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        ap.error(f"unknown variant(s) {', '.join(bad) or '(none given)'}; expected some of {', '.join(VARIANTS)}")
    known = (*BACKENDS, "conv2d")
    bad = [b for b in backends if b not in known]
    if bad or not backends:
        ap.error(f"unknown backend(s) {', '.join(bad) or '(none given)'}; expected some of {', '.join(known)}")
    if args.json:  # a path that cannot be written fails before the first count
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write("[]\n")
        except OSError as e:
            ap.error(f"--json {args.json}: cannot write ({e.strerror or e})")
    torch.set_num_threads(1)
    rows = []
    for variant in variants:
        for backend in backends:
            r = training_step_counts(variant, backend, autocast=args.autocast)
            rows.append(r)
            layers = r["layer_fwd_bwd_ops"]
            print(f"{variant:<14} {backend:<15} forward+backward {r['fwd_bwd_ops']:>5} ops "
                  f"({r['fwd_bwd_not_views']} not views, {r['fwd_bwd_syncs']} host syncs), "
                  f"Adam {r['optimizer_ops']} ops, "
                  f"eval forward {r['eval_forward_ops']:>4} ops, per layer fwd+bwd "
                  f"{min(layers.values())}-{max(layers.values())} ops over {len(layers)} layers", flush=True)
            if args.json:  # after every row: a run cut short keeps what it counted
                with open(args.json, "w", encoding="utf-8") as f:
                    json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
