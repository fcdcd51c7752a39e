"""The controlled-symmetry experiment (issue 11): does a learned omega find how much symmetry the data have?

One command trains, on the synthetic task of :mod:`relaxedconv.synthetic` at several values of its
knob (the fraction of classes whose label is an orientation), over several seeds:

- ``t2``: a T(2) CNN (N = 1) with the same per-rotation widths;
- ``strict``: the strict SE(2)-4 CNN (omega_rot = 0; also the omega = 0 point of the sweep);
- ``fixed_<w>``: rotation non-stationary with a fixed omega_rot = w (the sweep, the cross-validation
  reference: per seed the w with the best validation accuracy is selected);
- ``learned_from<w0>`` and ``learned_from<w0>_penalty``: omega_rot learned from w0 (0 and a positive
  start), without and with :func:`relaxedconv.equivariance_penalty` at the library's default strength
  (1e-3); ``learned_from<w0>_penalty<s>``: with a stronger penalty s (the protocol's ``extra_penalties``).

All models are :func:`relaxedconv.models.build_model` CK ResNets (the authors' architecture); the
omegas train in their own optimiser group (:func:`relaxedconv.parameter_groups`). The loop is a lean
in-memory one (no augmentation: the generator already draws random angles, scales and shifts).

    relaxedconv symmetry --protocol cpu --out experiments/results/symmetry_cpu     (2 processes)
    relaxedconv symmetry --protocol gpu --out $OUT/symmetry_gpu --device cuda

Writes ``runs/<fraction>/<variant>/seed<k>.json`` (one per run, as it finishes; a rerun skips the
finished ones), ``summary.json``, ``results.md`` (tables, the acceptance checks of issue 11 with
their numbers) and ``symmetry.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .equivariance import effective_omegas, equivariance_error, equivariance_penalty, kernel_nonstationarity, parameter_groups
from .models import build_model
from .training.checkpoint import json_text
from .synthetic import SymmetryTask, make_split

PROTOCOLS = {
    # The committed CPU protocol: 2 processes x 1 thread, under 40 minutes on 2 cores.
    "cpu": dict(
        fractions=(0.0, 0.5, 1.0), seeds=(0, 1, 2), size=20, n_train=512, n_val=256, n_test=1024,
        group_order=4, widths=(6, 12), kernel_size=5, hidden_channels=16, epochs=16, warmup_epochs=1,
        batch_size=64, lr=3e-3, omega_lr=2e-2, penalty=1e-3, fixed_omegas=(0.25, 1.0), learned_starts=(0.0, 1.0),
        extra_penalties=(1e-2, 1e-1),
    ),
    # One H100/H200 device call (<= 9 minutes with --time-budget): more data, a wider model, a
    # finer knob, five seeds, a finer sweep; several processes share the GPU (the models are small).
    "gpu": dict(
        fractions=(0.0, 0.5, 0.75, 1.0), seeds=(0, 1, 2, 3, 4), size=20, n_train=1024, n_val=512, n_test=2048,
        group_order=4, widths=(8, 16), kernel_size=5, hidden_channels=16, epochs=20, warmup_epochs=1,
        batch_size=64, lr=3e-3, omega_lr=2e-2, penalty=1e-3, fixed_omegas=(0.25, 0.5, 1.0, 2.0), learned_starts=(0.0, 1.0),
        extra_penalties=(1e-2,),
    ),
    # Seconds: for tests and a first look.
    "smoke": dict(
        fractions=(0.0, 1.0), seeds=(0, 1), size=12, n_train=64, n_val=32, n_test=32,
        group_order=4, widths=(2,), kernel_size=3, hidden_channels=4, epochs=2, warmup_epochs=0,
        batch_size=32, lr=3e-3, omega_lr=2e-2, penalty=1e-3, fixed_omegas=(1.0,), learned_starts=(0.0,),
    ),
}


def variants(p: dict) -> dict:
    """name -> how to build and train it."""
    v = {"t2": dict(variant="t2"), "strict": dict(variant="se2", fixed_omega=0.0)}
    for w in p["fixed_omegas"]:
        v[f"fixed_{w:g}"] = dict(variant="se2_rot", omega_rot=float(w), fixed_omega=float(w))
    for w0 in p["learned_starts"]:
        v[f"learned_from{w0:g}"] = dict(variant="se2_learned", omega_rot=float(w0), penalty=0.0)
        v[f"learned_from{w0:g}_penalty"] = dict(variant="se2_learned", omega_rot=float(w0), penalty=p["penalty"])
        for s in p.get("extra_penalties", ()):
            v[f"learned_from{w0:g}_penalty{s:g}"] = dict(variant="se2_learned", omega_rot=float(w0), penalty=float(s))
    return v


def task_for(p: dict, fraction: float) -> SymmetryTask:
    extra = dict(p.get("task", {}))
    if "scale" in extra:
        extra["scale"] = tuple(extra["scale"])
    return SymmetryTask(orientation_fraction=fraction, num_classes=4, size=p["size"], **extra)


def make_data(p: dict, fraction: float, seed: int) -> dict:
    """Train/val/test splits of one (fraction, seed), normalised with the training split's statistics."""
    task = task_for(p, fraction)
    base = 1_000_003 * int(seed) + int(round(1000 * fraction))
    x_tr, y_tr = make_split(task, p["n_train"], base * 3 + 0)
    x_va, y_va = make_split(task, p["n_val"], base * 3 + 1)
    x_te, y_te = make_split(task, p["n_test"], base * 3 + 2)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    norm = lambda t: (t - mean) / std  # noqa: E731
    return dict(train=(norm(x_tr), y_tr), val=(norm(x_va), y_va), test=(norm(x_te), y_te), task=task.describe())


def _lr_lambda(warmup_steps: int, total_steps: int):
    from .training.trainer import lr_lambda_factory

    return lr_lambda_factory(warmup_steps, total_steps)


@torch.no_grad()
def _accuracy(model, x, y, device, batch=512) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i : i + batch].to(device)).argmax(1).cpu() == y[i : i + batch]).sum())
    return 100.0 * correct / max(1, len(x))


def _mean_effective(model) -> tuple[float | None, dict]:
    eff = {k: v["rot"] for k, v in effective_omegas(model).items() if "rot" in v}
    return (sum(eff.values()) / len(eff) if eff else None), eff


def run_one(p: dict, fraction: float, seed: int, name: str, data: dict, device="cpu") -> dict:
    """Train one variant on one (fraction, seed); returns its record."""
    spec = variants(p)[name]
    torch.manual_seed(1000 * int(seed) + 17)
    model = build_model(
        spec["variant"], num_classes=4, in_channels=1, group_order=p["group_order"], widths=tuple(p["widths"]),
        kernel_size=p["kernel_size"], hidden_channels=p["hidden_channels"], omega_rot=spec.get("omega_rot"),
        architecture="authors",
    ).to(device)
    opt = torch.optim.Adam(parameter_groups(model, lr=p["lr"], weight_decay=0.0, omega_lr=p["omega_lr"]))
    x_tr, y_tr = data["train"]
    steps_per_epoch = math.ceil(len(x_tr) / p["batch_size"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(steps_per_epoch * p["warmup_epochs"], steps_per_epoch * p["epochs"])
    )
    penalty = float(spec.get("penalty", 0.0))
    shuffle = torch.Generator().manual_seed(int(seed) + 99)
    history, best = [], {"val_acc": -1.0}
    t0, cpu0 = time.time(), time.process_time()
    for epoch in range(1, p["epochs"] + 1):
        model.train()
        perm = torch.randperm(len(x_tr), generator=shuffle)
        loss_sum = 0.0
        for i in range(0, len(perm), p["batch_size"]):
            idx = perm[i : i + p["batch_size"]]
            loss = F.cross_entropy(model(x_tr[idx].to(device)), y_tr[idx].to(device))
            total = loss + equivariance_penalty(model, penalty) if penalty > 0 else loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
        val_acc = _accuracy(model, *data["val"], device)
        mean_eff, eff = _mean_effective(model)
        history.append({"epoch": epoch, "train_loss": loss_sum / len(x_tr), "val_acc": val_acc,
                        "effective_omega_mean": mean_eff, "effective_omegas": eff})
        if val_acc > best["val_acc"]:
            best = {"val_acc": val_acc, "epoch": epoch,
                    "state": {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()},
                    "effective_omega_mean": mean_eff}
    final_mean_eff, final_eff = _mean_effective(model)
    ns = {k: v["rot"] for k, v in kernel_nonstationarity(model).items() if "rot" in v}
    final_val = history[-1]["val_acc"]
    final_test = _accuracy(model, *data["test"], device)
    model.load_state_dict(best["state"])
    test_acc = _accuracy(model, *data["test"], device)
    probe = data["test"][0][:64].to(device)
    rot_err = equivariance_error(model.eval(), probe)["rotation_90"]
    return {
        "fraction": fraction, "seed": seed, "variant": name, "spec": spec,
        "best_epoch": best["epoch"], "best_val_acc": best["val_acc"], "test_acc_at_best_val": test_acc,
        "final_val_acc": final_val, "final_test_acc": final_test,
        "effective_omega_mean": final_mean_eff, "effective_omegas": final_eff,
        "effective_omega_mean_at_best_val": best["effective_omega_mean"],
        "kernel_nonstationarity": ns,
        "logit_rotation_90_error_at_best_val": rot_err,
        "seconds": time.time() - t0, "cpu_seconds": time.process_time() - cpu0, "history": history,
    }


# ---- orchestration ------------------------------------------------------------------------------
_DATA: dict = {}  # (fraction, seed) -> splits; filled before the worker processes fork


def _run_path(out: Path, fraction: float, name: str, seed: int) -> Path:
    return out / "runs" / f"fraction{fraction:g}" / name / f"seed{seed}.json"


def _data(p: dict, fraction: float, seed: int) -> dict:
    # Filled by the parent before forking (CPU); a spawned worker (CUDA) makes and keeps its own.
    if (fraction, seed) not in _DATA:
        _DATA[(fraction, seed)] = make_data(p, fraction, seed)
    return _DATA[(fraction, seed)]


def _worker(args):
    p, fraction, seed, name, out, threads, device, deadline = args
    if deadline is not None and time.time() > deadline:
        return None
    torch.set_num_threads(threads)
    rec = run_one(p, fraction, seed, name, _data(p, fraction, seed), device)
    path = _run_path(Path(out), fraction, name, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json_text(rec))
    os.replace(tmp, path)
    return rec


def _ignore_sigint():
    """Pool workers leave Ctrl-C to the parent, which stops the pool and says how to continue (else
    every worker printed its own KeyboardInterrupt traceback)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _mean_sd(vals):
    # null in a run file (json_text's undefined number, e.g. the error of a diverged model) is no value
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(records: list, p: dict) -> dict:
    """Per fraction x variant: accuracies and learned effective omegas, mean and sd over seeds; the
    cross-validated fixed omega per seed; issue 11's acceptance checks with their numbers."""
    names = list(variants(p))
    fixed = [n for n in names if "fixed_omega" in variants(p)[n]]
    by = {}
    for r in records:
        by.setdefault((r["fraction"], r["variant"]), []).append(r)
    rows = {}
    for f in p["fractions"]:
        for n in names:
            rs = sorted(by.get((f, n), []), key=lambda r: r["seed"])
            if not rs:
                continue
            layers = sorted({k for r in rs for k in r["effective_omegas"]})
            rows[(f, n)] = {
                "fraction": f, "variant": n, "seeds": [r["seed"] for r in rs],
                "test_acc": _mean_sd([r["test_acc_at_best_val"] for r in rs]),
                "val_acc": _mean_sd([r["best_val_acc"] for r in rs]),
                "effective_omega": _mean_sd([r["effective_omega_mean"] for r in rs]),
                "effective_omega_per_layer": {k: _mean_sd([r["effective_omegas"].get(k) for r in rs]) for k in layers},
                "kernel_nonstationarity": _mean_sd(  # of each run's mean over its layers
                    [_mean_sd(r["kernel_nonstationarity"].values())[0] for r in rs]),
                "logit_rotation_90_error": _mean_sd([r["logit_rotation_90_error_at_best_val"] for r in rs]),
                "seconds": _mean_sd([r["seconds"] for r in rs]),
                "cpu_seconds": _mean_sd([r.get("cpu_seconds") for r in rs]),
            }
        # the cross-validation reference: per seed, the fixed omega (0 = strict) with the best val acc
        chosen = []
        for s in p["seeds"]:
            cands = [r for n in fixed for r in by.get((f, n), []) if r["seed"] == s]
            if len(cands) == len(fixed):
                chosen.append(max(cands, key=lambda r: (r["best_val_acc"], -r["spec"]["fixed_omega"])))
        if chosen:
            rows[(f, "cv_fixed")] = {
                "fraction": f, "variant": "cv_fixed", "seeds": [r["seed"] for r in chosen],
                "selected_omega": [r["spec"]["fixed_omega"] for r in chosen],
                "test_acc": _mean_sd([r["test_acc_at_best_val"] for r in chosen]),
                "val_acc": _mean_sd([r["best_val_acc"] for r in chosen]),
            }
    return {"protocol": p, "rows": list(rows.values()), "checks": acceptance(rows, p)}


def acceptance(rows: dict, p: dict) -> list:
    """Issue 11's criteria, each with the numbers it rests on and whether it holds."""
    checks = []
    fr = list(p["fractions"])
    f0, f1 = min(fr), max(fr)
    get = lambda f, n, key="test_acc": rows.get((f, n), {}).get(key, (None, None))  # noqa: E731
    chance = 100.0 / 4
    m, sd = get(f1, "strict")
    if m is not None:
        se = 100.0 * math.sqrt(0.25 * 0.75 / p["n_test"])
        checks.append(dict(
            criterion=f"strict at chance ({chance:.0f}%) where the label is an orientation (fraction {f1:g})",
            numbers=f"strict test acc {m:.1f} ± {sd:.1f} (chance {chance:.0f}; binomial se of one test set {se:.1f})",
            holds=abs(m - chance) <= 3 * se + sd))
    mt, st = get(f0, "t2")
    ms, ss = get(f0, "strict")
    if mt is not None and ms is not None:
        checks.append(dict(
            criterion=f"T(2) below strict where the data are fully rotation-symmetric (fraction {f0:g})",
            numbers=f"T(2) {mt:.1f} ± {st:.1f} vs strict {ms:.1f} ± {ss:.1f}", holds=mt < ms))
    for n in [k for k in variants(p) if k.startswith("learned")]:
        means = [get(f, n, "effective_omega") for f in fr]
        if any(v[0] is None for v in means):
            continue
        inc = all(a[0] < b[0] for a, b in zip(means, means[1:]))
        gap = means[-1][0] - means[0][0]
        sdmax = max(means[0][1], means[-1][1])
        checks.append(dict(
            criterion=f"{n}: learned effective ω increases with the fraction; fractions {f0:g} and {f1:g} more than 3 sd apart",
            numbers=", ".join(f"{f:g}: {a:.3f} ± {b:.3f}" for f, (a, b) in zip(fr, means))
            + f"; gap {gap:.3f} vs 3 sd = {3 * sdmax:.3f}",
            holds=inc and gap > 3 * sdmax))
        for f in fr:
            ml, sl = get(f, n)
            mb, sb = get(f, "cv_fixed")
            if ml is None or mb is None:
                continue
            checks.append(dict(
                criterion=f"{n} accuracy within 1 sd of the cross-validated fixed ω (fraction {f:g})",
                numbers=f"learned {ml:.1f} ± {sl:.1f} vs CV-selected fixed ω {mb:.1f} ± {sb:.1f} "
                        f"(ω chosen per seed: {rows[(f, 'cv_fixed')]['selected_omega']})",
                holds=ml >= mb - sb))
    return checks


def _fmt(ms, digits=1):
    m, s = ms
    return "–" if m is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def write_report(out: Path, summary: dict, meta: dict) -> list:
    p = summary["protocol"]
    rows = {(r["fraction"], r["variant"]): r for r in summary["rows"]}
    fr = list(p["fractions"])
    names = list(variants(p)) + ["cv_fixed"]
    lines = ["# Controlled-symmetry experiment", "",
             f"Protocol `{meta['protocol']}`: {json.dumps(p)}", "",
             f"Seeds {list(p['seeds'])}; mean ± sd over seeds (sample sd). Test accuracy at the epoch of best "
             "validation accuracy. Effective ω: mean over the model's non-stationary layers at the end of training.", "",
             "## Test accuracy (%)", "", "| variant | " + " | ".join(f"fraction {f:g}" for f in fr) + " |",
             "|---|" + "---|" * len(fr)]
    for n in names:
        if any((f, n) in rows for f in fr):
            lines.append(f"| {n} | " + " | ".join(_fmt(rows[(f, n)]["test_acc"]) if (f, n) in rows else "–" for f in fr) + " |")
    lines += ["", "`cv_fixed`: per seed, the fixed ω (strict = 0 included) with the best validation accuracy; "
              "selected ω per fraction: " + "; ".join(
                  f"{f:g}: {rows[(f, 'cv_fixed')]['selected_omega']}" for f in fr if (f, "cv_fixed") in rows), "",
              "## Learned effective ω (mean over layers)", "",
              "| variant | " + " | ".join(f"fraction {f:g}" for f in fr) + " |", "|---|" + "---|" * len(fr)]
    learned = [n for n in names if n.startswith("learned")]
    for n in learned:
        lines.append(f"| {n} | " + " | ".join(_fmt(rows[(f, n)]["effective_omega"], 3) if (f, n) in rows else "–" for f in fr) + " |")
    lines += ["", "Per layer (mean ± sd over seeds):", ""]
    for n in learned:
        layer_names = sorted({k for f in fr if (f, n) in rows for k in rows[(f, n)]["effective_omega_per_layer"]})
        lines += [f"`{n}`:", "", "| layer | " + " | ".join(f"fraction {f:g}" for f in fr) + " |", "|---|" + "---|" * len(fr)]
        for k in layer_names:
            lines.append(f"| {k} | " + " | ".join(
                _fmt(rows[(f, n)]["effective_omega_per_layer"].get(k, (None, None)), 3) if (f, n) in rows else "–" for f in fr) + " |")
        lines.append("")
    lines += ["## Kernel non-stationarity (fraction of kernel energy varying with the absolute rotation; mean over layers)", "",
              "| variant | " + " | ".join(f"fraction {f:g}" for f in fr) + " |", "|---|" + "---|" * len(fr)]
    for n in names:
        if n.startswith(("learned", "fixed")):
            lines.append(f"| {n} | " + " | ".join(
                _fmt(rows[(f, n)]["kernel_nonstationarity"], 3) if (f, n) in rows else "–" for f in fr) + " |")
    lines += ["", "## Issue 11 acceptance checks", "", "| criterion | numbers | holds |", "|---|---|---|"]
    for c in summary["checks"]:
        lines.append(f"| {c['criterion']} | {c['numbers']} | {'yes' if c['holds'] else '**no**'} |")
    inv = meta.get("invocations", [])
    lines += ["", f"Runs: {meta.get('runs')} on {meta.get('device')}, torch {meta.get('torch', torch.__version__)}; "
              f"CPU time of all runs {meta.get('cpu_seconds_all_runs', 0):.0f} s; wall time "
              f"{meta.get('wall_seconds_all_invocations', 0):.0f} s over {len(inv)} invocation(s):", ""]
    for k, i in enumerate(inv, 1):
        lines.append(f"- {k}: {i.get('started', '?')}, {i['runs_trained']} runs trained in {i['wall_seconds']:.0f} s wall "
                     f"with {i['jobs']} process(es) x {i['threads']} thread(s); 1-minute load average "
                     f"{i.get('load1_mean_during')} on average (start {i.get('load_start')}, end {i.get('load_end')})")
    lines.append("")
    plot = _plot(out, summary)
    if plot:
        lines += [f"![symmetry]({plot.name})", ""]
    md = out / "results.md"
    md.write_text("\n".join(lines))
    return [md] + ([plot] if plot else [])


def _plot(out: Path, summary: dict):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    p = summary["protocol"]
    rows = {(r["fraction"], r["variant"]): r for r in summary["rows"]}
    if not rows:
        return None
    fr = list(p["fractions"])
    names = list(variants(p))
    learned = [n for n in names if n.startswith("learned")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    for i, n in enumerate(learned):
        pts = [(f, *rows[(f, n)]["effective_omega"]) for f in fr if (f, n) in rows]
        ax.errorbar([q[0] for q in pts], [q[1] for q in pts], yerr=[q[2] for q in pts], marker="o", capsize=3, label=n,
                    linestyle="-" if n.startswith("learned_from0") else ":", color=f"C{i % 10}")
    ax.set_xlabel("fraction of orientation-dependent classes")
    ax.set_ylabel("learned effective ω (mean over layers)")
    ax.set_title("mean ± sd over seeds", fontsize=9)
    if learned:
        ax.legend(fontsize=7)
    ax = axes[1]
    shown = [n for n in learned if n.endswith("_penalty")][:2]  # the default penalty, from each start
    for n, style in zip(shown, ("-", "--")):
        layer_names = sorted({k for f in fr if (f, n) in rows for k in rows[(f, n)]["effective_omega_per_layer"]})
        for j, k in enumerate(layer_names):
            ms = [rows[(f, n)]["effective_omega_per_layer"].get(k, (None, None)) if (f, n) in rows else (None, None) for f in fr]
            pts = [(f, m) for f, m in zip(fr, ms) if m[0] is not None]  # a partial protocol lacks some fractions
            ax.errorbar([f for f, _ in pts], [m[0] for _, m in pts], yerr=[m[1] for _, m in pts], fmt=style, color=f"C{j}",
                        marker=".", capsize=2, label=k if n == shown[0] else None)
    ax.set_xlabel("fraction of orientation-dependent classes")
    ax.set_ylabel("learned effective ω per layer (mean ± sd)")
    ax.set_title(" / ".join(f"{st} {n}" for n, st in zip(shown, ("solid", "dashed"))) + "; colour = layer", fontsize=8)
    if shown:
        ax.legend(fontsize=6)
    ax = axes[2]
    cmap = plt.get_cmap("tab20")
    for i, n in enumerate(names + ["cv_fixed"]):
        pts = [(f, *rows[(f, n)]["test_acc"]) for f in fr if (f, n) in rows]
        if pts:
            style = "--" if n.startswith("fixed") else (":" if n.startswith("learned_from") and not n.startswith("learned_from0") else "-")
            ax.errorbar([q[0] for q in pts], [q[1] for q in pts], yerr=[q[2] for q in pts], marker="o", capsize=2,
                        label=n, linestyle=style, color=cmap(i % 20), lw=2.2 if n in ("t2", "strict", "cv_fixed") else 1.2)
    ax.axhline(25, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("fraction of orientation-dependent classes")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = out / "symmetry.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _load1():
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


class ProtocolMismatch(ValueError):
    """The results folder holds runs of another protocol (or other protocol settings)."""


def _claim_folder(out: Path, protocol: str, p: dict) -> None:
    """Record which protocol ``out`` holds (protocol.json); refuse another one. Run files are named by
    fraction, variant and seed only, so a second protocol in the same folder took the first one's
    runs for its own (the cpu protocol reported the smoke protocol's runs as done)."""
    settings = json.loads(json_text({k: v for k, v in p.items() if k != "seeds"}))  # seeds: one file each
    path = out / "protocol.json"
    if path.is_file():
        try:
            held = json.loads(path.read_text())
        except ValueError:
            held = None
        if held is not None and (held.get("protocol"), held.get("settings")) != (protocol, settings):
            what = f"protocol {held.get('protocol')!r}" if held.get("protocol") != protocol else f"protocol {protocol!r} with other settings"
            raise ProtocolMismatch(f"{out} holds runs of {what}; give another --out (run files are named by fraction, "
                                   "variant and seed only, so the two would be mixed)")
        if held is not None:
            return
    elif (out / "summary.json").is_file():  # a folder written before protocol.json existed
        try:
            old = json.loads((out / "summary.json").read_text()).get("meta", {}).get("protocol")
        except (ValueError, AttributeError):
            old = None
        if old is not None and old != protocol:
            raise ProtocolMismatch(f"{out} holds runs of protocol {old!r}; give another --out")
    path.write_text(json_text({"protocol": protocol, "settings": settings}, indent=1))


def run_protocol(protocol: str, out, *, jobs: int = 2, threads: int = 1, device: str = "cpu", log=print,
                 overrides: dict | None = None, time_budget: float | None = None, start_method: str | None = None) -> dict:
    """Run (or finish) every run of ``protocol`` into ``out``; returns the summary.

    Runs go seed by seed, so a stopped protocol leaves whole seeds. With ``time_budget`` (seconds)
    no run starts after the budget is spent; the summary covers the runs that finished.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
    p = {**PROTOCOLS[protocol], **(overrides or {})}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _claim_folder(out, protocol, p)
    t0, load_start = time.time(), _load()
    names = list(variants(p))
    todo, records = [], []
    for f in p["fractions"]:
        for s in p["seeds"]:
            for n in names:
                path = _run_path(out, f, n, s)
                if path.is_file():
                    records.append(json.loads(path.read_text()))
                else:
                    todo.append((f, s, n))
    log(f"symmetry[{protocol}]: {len(records)} runs done, {len(todo)} to run ({jobs} process(es) x {threads} thread(s), {device})")
    if device == "cpu" and start_method in (None, "fork"):
        for f, s in sorted({(f, s) for f, s, _ in todo}):
            _data(p, f, s)
    # Seed by seed (a stopped protocol leaves whole seeds); within a seed the expensive runs first.
    todo.sort(key=lambda t: (t[1], t[2] == "t2", -t[0]))
    deadline = None if time_budget is None else t0 + float(time_budget)
    args = [(p, f, s, n, str(out), threads, device, deadline) for f, s, n in todo]
    done, loads = 0, [_load1()]
    if jobs > 1 and len(args) > 1:
        import multiprocessing as mp

        # CPU: fork, the workers inherit the generated data. CUDA: spawn (CUDA does not survive a
        # fork), each worker generates the splits it needs (deterministic) and shares the GPU.
        method = start_method or ("fork" if device == "cpu" else "spawn")
        with mp.get_context(method).Pool(jobs, initializer=_ignore_sigint) as pool:
            for rec in pool.imap(_worker, args):
                if rec is not None:
                    done += 1
                    records.append(rec)
                    loads.append(_load1())
                    log(_progress_line(rec, done, len(args), t0))
    else:
        for a in args:
            rec = _worker(a)
            if rec is not None:
                done += 1
                records.append(rec)
                loads.append(_load1())
                log(_progress_line(rec, done, len(args), t0))
    if done < len(args):
        log(f"symmetry[{protocol}]: time budget spent; {len(args) - done} runs not started (rerun to finish them)")
    summary = summarise(records, p)
    this = dict(runs_trained=done, jobs=jobs, threads=threads, wall_seconds=round(time.time() - t0, 1),
                load_start=load_start, load_end=_load(),
                load1_mean_during=round(statistics.fmean(loads), 2) if loads[0] is not None else None,
                started=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t0)) + " UTC")
    old = json.loads((out / "summary.json").read_text()).get("meta", {}) if (out / "summary.json").is_file() else {}
    invocations = [i for i in old.get("invocations", []) if i.get("runs_trained")] + [this]
    meta = dict(protocol=protocol, runs=len(records), invocations=invocations,
                wall_seconds_all_invocations=round(sum(i["wall_seconds"] for i in invocations), 1),
                device=device if device != "cpu" else f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
                torch=torch.__version__, cpu_seconds_all_runs=sum(r.get("cpu_seconds", 0.0) for r in records))
    summary["meta"] = meta
    (out / "summary.json").write_text(json_text(summary, indent=1))
    for path in write_report(out, summary, meta):
        log(f"wrote {path}")
    return summary


def summarise_folder(protocol: str, out, *, overrides: dict | None = None, log=print) -> dict:
    """Summary, results.md and plot from the run files in ``out`` (no training); keeps the meta of the
    last full invocation when there is one."""
    p = {**PROTOCOLS[protocol], **(overrides or {})}
    out = Path(out)
    if out.is_dir():
        _claim_folder(out, protocol, p)
    records = [json.loads(f.read_text()) for f in sorted(out.glob("runs/*/*/seed*.json"))]
    records = [r for r in records if r["fraction"] in p["fractions"] and r["seed"] in p["seeds"] and r["variant"] in variants(p)]
    if not records:
        raise FileNotFoundError(f"no finished runs of protocol {protocol!r} under {out}/runs")
    old = json.loads((out / "summary.json").read_text()).get("meta", {}) if (out / "summary.json").is_file() else {}
    summary = summarise(records, p)
    summary["meta"] = {**old, "protocol": protocol, "runs": len(records),
                       "cpu_seconds_all_runs": sum(r.get("cpu_seconds", 0.0) for r in records)}
    (out / "summary.json").write_text(json_text(summary, indent=1))
    for path in write_report(out, summary, summary["meta"]):
        log(f"wrote {path}")
    return summary


def _progress_line(rec, done, total, t0):
    eff = rec["effective_omega_mean"]
    return (f"[{done}/{total} {time.time() - t0:.0f}s] fraction {rec['fraction']:g} {rec['variant']} seed {rec['seed']}: "
            f"test {rec['test_acc_at_best_val']:.1f} (val {rec['best_val_acc']:.1f} @ {rec['best_epoch']})"
            + (f", effective ω {eff:.3f}" if eff is not None else "") + f", {rec['seconds']:.0f}s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="relaxedconv symmetry", description=__doc__.split("\n\n")[0])
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="cpu")
    ap.add_argument("--out", required=True, help="results folder (a rerun finishes an interrupted protocol)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes on CPU (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds overriding the protocol's")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds after which no new run starts")
    ap.add_argument("--summarise-only", action="store_true", help="rewrite summary.json, results.md and the plot from the finished runs")
    args = ap.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        ap.error("--jobs and --threads must be >= 1")
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # ask NVML: the parent must not initialise CUDA
    if args.device == "cuda" and not args.summarise_only and not torch.cuda.is_available():
        print("relaxedconv symmetry: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    overrides = {}
    if args.seeds is not None:
        try:
            overrides["seeds"] = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        except ValueError:
            ap.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
        if not overrides["seeds"]:  # else nothing runs and an empty report is written
            ap.error(f"--seeds: no seed in {args.seeds!r}; give comma-separated integers, e.g. 0,1,2")
    if args.time_budget is not None and not args.time_budget >= 0:
        ap.error(f"--time-budget must be a number of seconds >= 0, got {args.time_budget}")
    if args.summarise_only:
        try:
            summarise_folder(args.protocol, args.out, overrides=overrides)
        except (FileNotFoundError, ProtocolMismatch) as e:
            print(f"relaxedconv symmetry: {e}", file=sys.stderr)
            return 2
        return 0
    from .training.checks import ConfigError, check_out_dir

    try:
        check_out_dir(args.out)
    except ConfigError as e:
        print(f"relaxedconv symmetry: {e}", file=sys.stderr)
        return 2
    try:
        run_protocol(args.protocol, args.out, jobs=args.jobs, threads=args.threads, device=args.device, overrides=overrides,
                     time_budget=args.time_budget)
    except ProtocolMismatch as e:
        print(f"relaxedconv symmetry: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        done = len(list(Path(args.out).glob("runs/*/*/seed*.json")))
        print(f"\nrelaxedconv symmetry: interrupted; the {done} finished run(s) in {Path(args.out) / 'runs'} are kept: rerun "
              "the same command to finish the protocol", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
