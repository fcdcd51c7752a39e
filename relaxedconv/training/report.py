"""``relaxedconv report``: run directories -> ``results.md`` (a Markdown table) and PNG plots of the
effective omegas per layer over training and of accuracy against the effective omega (matplotlib,
optional). The effective omega is what scales a layer's non-stationarity (|omega| with the kernel
net's fixed unit directions; :func:`relaxedconv.effective_omegas`); runs recorded before it existed
fall back to |omega|. The accuracy plot is drawn only for a sweep (one variant at two omegas or more)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .checkpoint import atomic_write_text, has_value


def find_runs(paths) -> list[Path]:
    """Run directories (holding config.json and metrics.jsonl) at or below ``paths``, sorted."""
    runs = set()
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        if (p / "config.json").is_file() and (p / "metrics.jsonl").is_file():
            runs.add(p)
        for c in p.rglob("config.json"):
            if (c.parent / "metrics.jsonl").is_file():
                runs.add(c.parent)
    return sorted(runs)


class UnreadableRun(ValueError):
    """A run directory whose files are not what ``relaxedconv train`` writes (damaged, or another tool's)."""


def _read_json(path: Path, *, lines: bool = False):
    try:
        text = path.read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()] if lines else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UnreadableRun(f"{path}: {e}") from None


def load_run(d: Path) -> dict:
    cfg = _read_json(d / "config.json")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("config"), dict) or not isinstance(cfg.get("model"), dict):
        raise UnreadableRun(f"{d / 'config.json'}: not a relaxedconv train config (no 'config' and 'model')")
    history = _read_json(d / "metrics.jsonl", lines=True)
    final = _read_json(d / "final.json") if (d / "final.json").is_file() else None
    return {"dir": d, "config": cfg, "history": history, "final": final}


def _mean_omega(om: dict, key: str):
    vals = [v[key] for v in om.values() if has_value(v.get(key))]
    return sum(vals) / len(vals) if vals else None


def _effective(entry: dict) -> dict:
    """A metrics or final entry's effective omegas ({layer: {'rot': .., 'pos': ..}})."""
    if "effective_omegas" in entry:
        return entry["effective_omegas"]
    return {layer: {k: abs(v) if has_value(v) else None for k, v in om.items() if k in ("rot", "pos")} for layer, om in entry.get("omegas", {}).items()}


def _max_err(eq: dict, key_prefix: str):
    vals = [v for layer in eq.values() for k, v in layer.items() if k.startswith(key_prefix) and has_value(v)]
    return max(vals) if vals else None


def _f(v, fmt="{:.2f}"):
    if not has_value(v):
        return "–"
    return fmt.format(v)


def markdown_table(runs: list[dict], root: Path) -> str:
    head = ("| run | variant | N | ω_rot init → final (mean) | ω_pos init → final (mean) | learned | effective ω rot / pos (mean) | epochs | best epoch "
            "| val acc | test acc @ best val | params | max rot. eq. err | max transl. eq. err |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        cfg, model, fin = r["config"]["config"], r["config"]["model"], r["final"]
        om = fin["omegas"] if fin else (r["history"][-1]["omegas"] if r["history"] else {})
        eff = _effective(fin if fin else (r["history"][-1] if r["history"] else {}))
        er, ep = _mean_omega(eff, "rot"), _mean_omega(eff, "pos")
        eq = fin["equivariance_error"] if fin else {}
        best_val = fin["best_val_acc"] if fin else max((h["val_acc"] for h in r["history"] if has_value(h.get("val_acc"))), default=None)
        try:
            name = str(r["dir"].relative_to(root)) or r["dir"].name
        except ValueError:
            name = str(r["dir"])
        if name == ".":
            name = r["dir"].name
        wr, wp = _mean_omega(om, "rot"), _mean_omega(om, "pos")
        lines.append(
            "| " + " | ".join([
                name, model["variant"], str(model["group_order"]),
                f"{_f(model['omega_rot'], '{:.3g}')} → {_f(wr, '{:.3g}')}" if wr is not None else "–",
                f"{_f(model['omega_pos'], '{:.3g}')} → {_f(wp, '{:.3g}')}" if wp is not None else "–",
                "yes" if model.get("learn_omega") else "no",
                f"{_f(er, '{:.3g}')} / {_f(ep, '{:.3g}')}",
                f"{len(r['history'])}/{cfg['epochs']}",
                str(fin["best_epoch"]) if fin else "–",
                _f(best_val), _f(fin["test_acc_at_best_val"]) if fin else "–",
                f"{r['config'].get('parameters', 0):,}",
                _f(_max_err(eq, "rotation"), "{:.1e}"), _f(_max_err(eq, "translation"), "{:.1e}"),
            ]) + " |"
        )
    return "\n".join(lines) + "\n"


def _omega_figure(runs: list[dict], plt):
    """Every layer's omegas over training, one panel per run that learns them (fixed omegas are flat
    lines), from their initial value at epoch 0; None when no run learns an omega."""
    from matplotlib.ticker import MaxNLocator

    with_omega = [r for r in runs if r["config"]["model"].get("learn_omega") and r["history"]]
    if not with_omega:
        return None
    fig, axes = plt.subplots(len(with_omega), 1, figsize=(7, 3 * len(with_omega)), squeeze=False)
    for ax, r in zip(axes[:, 0], with_omega):
        epochs = [0] + [h["epoch"] for h in r["history"]]
        layers = list(_effective(r["history"][-1]))
        model = r["config"]["model"]
        for layer in layers:
            for key, style in (("rot", "-"), ("pos", "--")):
                ys = [_effective(h).get(layer, {}).get(key) for h in r["history"]]
                ys = [abs(model[f"omega_{key}"]) if ys[0] is not None else None] + ys
                if any(y is not None for y in ys):
                    ax.plot(epochs, ys, style, marker=".", label=f"{layer} ω_{key}")
        ax.set_title(r["dir"].name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_ylabel("effective ω")
        if ax.get_legend_handles_labels()[0]:  # every omega of the run null: an empty panel
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def _accuracy_points(runs: list[dict]) -> list[tuple]:
    """(mean final effective ω_rot and ω_pos, val acc, test acc, variant) of each finished group model."""
    pts = []
    for r in runs:
        if not r["final"]:
            continue
        om, model = _effective(r["final"]), r["config"]["model"]
        if model["group_order"] == 1:
            continue  # T(2) has no rotation axis
        wr, wp = _mean_omega(om, "rot") or 0.0, _mean_omega(om, "pos") or 0.0
        # an accuracy without a value (no validation split) is a gap in the plot
        acc = [v if has_value(v) else float("nan") for v in (r["final"]["best_val_acc"], r["final"]["test_acc_at_best_val"])]
        pts.append((wr, wp, *acc, model["variant"]))
    return pts


def is_sweep(pts: list[tuple]) -> bool:
    """Accuracy against ω says something only for a sweep: one variant at two ω's or more."""
    return any(len({(p[0], p[1]) for p in pts if p[4] == v}) >= 2 for v in {p[4] for p in pts})


def _accuracy_figure(runs: list[dict], plt):
    """Accuracy against the mean final effective ω, one line per variant; None unless there is a sweep."""
    pts = _accuracy_points(runs)
    if not is_sweep(pts):
        return None
    panels = [(0, "effective ω_rot (mean over layers)")] + ([(1, "effective ω_pos (mean over layers)")] if any(p[1] for p in pts) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (idx, label) in zip(axes[0], panels):
        for variant in sorted({p[4] for p in pts}):
            sel = sorted((p for p in pts if p[4] == variant), key=lambda p: p[idx])
            ax.plot([p[idx] for p in sel], [p[3] for p in sel], "o-", label=f"{variant} test")
            ax.plot([p[idx] for p in sel], [p[2] for p in sel], "x:", label=f"{variant} val")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def _plots(runs: list[dict], out: Path) -> tuple[list[Path], str | None]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed (pip install 'relaxedconv[plots]'): no PNG plots were written"
    paths = []
    for name, make in (("omega_per_layer.png", _omega_figure), ("accuracy_vs_omega.png", _accuracy_figure)):
        fig = make(runs, plt)
        if fig is None:
            continue
        p = out / name
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths, None


def write_report(paths, out, warn=None) -> list[Path]:
    """Write ``results.md`` (and plots when matplotlib is available) to ``out``; returns the files.

    A run directory whose files cannot be read is left out with a warning (``warn``, default stderr)
    and listed in results.md, so one damaged run does not stop the report of the others."""
    warn = warn or (lambda msg: print(f"relaxedconv report: warning: {msg}", file=sys.stderr))
    runs_dirs = find_runs(paths)
    if not runs_dirs:
        raise FileNotFoundError(f"no run directories (config.json + metrics.jsonl) under {', '.join(map(str, paths))}")
    runs, skipped = [], []
    for d in runs_dirs:
        try:
            runs.append(load_run(d))
        except UnreadableRun as e:
            skipped.append(str(e))
            warn(f"left out {d}: {e}")
    if not runs:
        raise FileNotFoundError(f"no readable run directories under {', '.join(map(str, paths))} ({len(skipped)} unreadable)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(paths[0]) if len(paths) == 1 else Path(".")
    plots, note = _plots(runs, out)
    text = "# Results\n\n" + markdown_table(runs, root)
    text += ("\nTest accuracy is taken at the epoch of best validation accuracy. ω columns: the initial value of "
             "the non-stationary layers and the mean over layers at the end; effective ω: what scales each layer's "
             "non-stationarity (|ω| with fixed unit directions), mean over the non-stationary layers. Equivariance errors are relative, per layer, "
             "of the final model, for 90° rotations (group elements) and integer shifts.\n")
    if plots:
        text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    if skipped:
        text += "\nLeft out (files unreadable):\n\n" + "".join(f"- {reason}\n" for reason in skipped)
    if note:
        text += f"\n_{note}_\n"
        print(f"relaxedconv report: {note}")
    md = out / "results.md"
    atomic_write_text(md, text)
    return [md, *plots]
