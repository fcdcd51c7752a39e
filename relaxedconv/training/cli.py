"""``relaxedconv train | sweep | report``.

    relaxedconv train --dataset cifar10 --data-dir ./data --variant se2 --group-order 8 --out runs/se2_8
    relaxedconv train --out runs/se2_8 --resume                 # continue an interrupted run exactly
    torchrun --nproc_per_node 4 -m relaxedconv train ...        # the same command on 4 GPUs (DDP)
    relaxedconv sweep --variant se2_rot --omega-rot-grid 0,1,2,4,8 --out runs/sweep_rot -- <train options>
    relaxedconv report runs/ --out runs/report
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..models import ARCHITECTURES, VARIANTS
from .data import DATASETS, DatasetError
from .trainer import DEFAULTS, RESUMABLE_CHANGES


def _floats(s: str) -> list[float]:
    try:
        return [float(v) for v in s.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from e


def _ints(s: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from e


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off, got {s!r}")


def train_parser(prog: str = "relaxedconv train") -> argparse.ArgumentParser:
    d = DEFAULTS
    ap = argparse.ArgumentParser(prog=prog, description="Train a continuous-kernel (relaxed) group ResNet on CIFAR-10/100 or an image folder.")
    g = ap.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default=d["dataset"])
    g.add_argument("--data-dir", default=d["data_dir"], help="CIFAR python batches, or train/<class>/ and test/<class>/ image folders (default %(default)s)")
    g.add_argument("--download", action="store_true", help="fetch the official CIFAR archive (md5-checked) when it is not in --data-dir")
    g.add_argument("--label-type", choices=("fine", "coarse"), default=d["label_type"], help="CIFAR-100 labels")
    g.add_argument("--val-size", type=int, default=d["val_size"], help="validation images held out of the training set (seeded; default %(default)s = the 45k/5k split)")
    g.add_argument("--train-subset", type=int, default=d["train_subset"], help="train on a seeded random subset of this many images (0 = all)")
    g.add_argument("--test-subset", type=int, default=d["test_subset"], help="evaluate on a seeded random subset of the test set (0 = all)")
    g.add_argument("--augment", type=_bool, default=d["augment"], metavar="on/off", help="random crop (pad 4) + horizontal flip, on the training device (on/off)")
    g = ap.add_argument_group("model")
    g.add_argument("--variant", choices=VARIANTS, default=d["variant"])
    g.add_argument("--group-order", type=int, default=d["group_order"], help="N rotations (ignored by t2)")
    g.add_argument("--widths", type=_ints, default=d["widths"], help="residual block widths (default 32,64)")
    g.add_argument("--kernel-size", type=int, default=d["kernel_size"])
    g.add_argument("--hidden-channels", type=int, default=d["hidden_channels"], help="kernel-net width")
    g.add_argument("--omega-rel", type=float, default=d["omega_rel"])
    g.add_argument("--omega-rot", type=float, default=d["omega_rot"], help="rotation frequency of non-stationary variants (default 2)")
    g.add_argument("--omega-pos", type=float, default=d["omega_pos"], help="position frequency of non-stationary variants (default 1)")
    g.add_argument("--learn-omega", action="store_true", help="learn the omegas of a non-stationary variant (the *_learned variants always do)")
    g.add_argument("--omega-penalty", type=float, default=d["omega_penalty"], help="strength of the penalty sum |omega|^2 toward equivariance on learned omegas (default %(default)s)")
    g.add_argument("--omega-lr", type=float, default=d["omega_lr"], help="learning rate of the omegas' own optimiser group, no weight decay (default %(default)s)")
    g.add_argument("--architecture", choices=ARCHITECTURES, default=d["architecture"], help="residual block: the authors' (default) or this package's first 'simple' one")
    g.add_argument("--mc-rotation", type=_bool, default=d["mc_rotation"], metavar="on/off", help="random offset of the rotation grid per training step, as in the authors' Monte-Carlo runs (default off)")
    g.add_argument("--backend", default=d["backend"], choices=("auto", "materialize", "expand_conv", "factored_torch", "triton"))
    g = ap.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d["epochs"])
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="global batch (split over DDP processes)")
    g.add_argument("--eval-batch-size", type=int, default=d["eval_batch_size"])
    g.add_argument("--lr", type=float, default=d["lr"])
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    g.add_argument("--warmup-epochs", type=int, default=d["warmup_epochs"])
    g.add_argument("--seed", type=int, default=d["seed"])
    g = ap.add_argument_group("run")
    g.add_argument("--out", required=False, default=None, help="run directory (required)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint (its saved config is used)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d["device"])
    g.add_argument("--amp", choices=("auto", "bf16", "off"), default=d["amp"], help="auto: bf16 autocast on GPU, none on CPU")
    g.add_argument("--progress", choices=("auto", "on", "off"), default=d["progress"])
    g.add_argument("--test-every-epoch", action="store_true", help="evaluate the test set every epoch (default: at each new best validation epoch)")
    g.add_argument("--interrupt-after-steps", type=int, default=0, help=argparse.SUPPRESS)
    return ap


def _explicit_keys(ap: argparse.ArgumentParser, argv) -> set:
    """Destinations given on the command line (not defaults)."""
    probe = argparse.ArgumentParser(add_help=False)
    for a in ap._actions:  # noqa: SLF001 - rebuild with suppressed defaults
        if a.dest == "help" or not a.option_strings:
            continue
        kw = dict(dest=a.dest, default=argparse.SUPPRESS)
        if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):  # noqa: SLF001
            kw["action"] = "store_true"
        else:
            kw["nargs"] = a.nargs
        probe.add_argument(*a.option_strings, **kw)
    ns, _ = probe.parse_known_args(argv)
    return set(vars(ns))


def resolve_config(argv) -> tuple[dict, bool]:
    ap = train_parser()
    args = ap.parse_args(argv)
    if not args.out:
        ap.error("--out RUN_DIR is required")
    cfg = {k: v for k, v in vars(args).items() if k != "resume"}
    if args.resume:
        saved_path = Path(args.out) / "config.json"
        if saved_path.is_file():
            saved = json.loads(saved_path.read_text())["config"]
            explicit = _explicit_keys(ap, argv) - {"resume"}
            conflicts = {
                k: (saved.get(k), cfg[k]) for k in explicit
                if k not in RESUMABLE_CHANGES and k in saved and saved[k] != cfg[k]
            }
            if conflicts:
                lines = ", ".join(f"--{k.replace('_', '-')} was {a!r}, now {b!r}" for k, (a, b) in conflicts.items())
                ap.error(f"--resume continues {args.out} with its saved config; these options differ: {lines}")
            merged = {**DEFAULTS, **saved}
            for k in explicit & RESUMABLE_CHANGES:
                merged[k] = cfg[k]
            merged["interrupt_after_steps"] = cfg["interrupt_after_steps"]
            cfg = merged
    return cfg, bool(args.resume)


def train_main(argv=None) -> int:
    from .trainer import Interrupted, train

    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, resume = resolve_config(argv)
    try:
        train(cfg, resume=resume)
    except DatasetError as e:
        print(f"relaxedconv train: dataset problem: {e}", file=sys.stderr)
        return 2
    except FileExistsError as e:
        print(f"relaxedconv train: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"relaxedconv train: {e}; continue with --resume", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"\nrelaxedconv train: interrupted; continue with: relaxedconv train --out {cfg['out']} --resume", file=sys.stderr)
        return 130
    return 0


def _fmt(w: float) -> str:
    return f"{w:g}".replace("-", "m").replace(".", "p")


def sweep_main(argv=None) -> int:
    """Cross-validate omega over a fixed grid: one train run per grid point (resumable), the point with
    the best validation accuracy selected, its test accuracy reported."""
    from .trainer import train

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(
        prog="relaxedconv sweep",
        description="Cross-validate omega over a fixed grid (selection on the validation split). "
        "Any other option is passed to 'relaxedconv train'.",
    )
    ap.add_argument("--variant", default="se2_rot", choices=[v for v in VARIANTS if v not in ("t2", "se2", "partial")])
    ap.add_argument("--omega-rot-grid", type=_floats, default=None, help="e.g. 0,1,2,4,8")
    ap.add_argument("--omega-pos-grid", type=_floats, default=None, help="e.g. 0,0.5,1,2")
    ap.add_argument("--out", required=True, help="sweep directory: one run directory per grid point")
    args, rest = ap.parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    for banned in ("--out", "--omega-rot", "--omega-pos", "--variant", "--resume"):
        if banned in rest:
            ap.error(f"{banned} is set by the sweep")
    rot_grid = args.omega_rot_grid or [None]
    pos_grid = args.omega_pos_grid or [None]
    if rot_grid == [None] and pos_grid == [None]:
        ap.error("give --omega-rot-grid and/or --omega-pos-grid")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for wr in rot_grid:
        for wp in pos_grid:
            name = args.variant + (f"_rot{_fmt(wr)}" if wr is not None else "") + (f"_pos{_fmt(wp)}" if wp is not None else "")
            run_argv = rest + ["--variant", args.variant, "--out", str(out / name), "--resume"]
            if wr is not None:
                run_argv += ["--omega-rot", str(wr)]
            if wp is not None:
                run_argv += ["--omega-pos", str(wp)]
            cfg, _ = resolve_config(run_argv)
            final_path = out / name / "final.json"
            if final_path.is_file() and json.loads(final_path.read_text()).get("epochs") == cfg["epochs"]:
                final = json.loads(final_path.read_text())
                print(f"sweep: {name} already done")
            else:
                print(f"sweep: {name}")
                try:
                    final = train(cfg, resume=True)
                except DatasetError as e:
                    print(f"relaxedconv sweep: dataset problem: {e}", file=sys.stderr)
                    return 2
            rows.append({"run": name, "omega_rot": wr, "omega_pos": wp, "best_val_acc": final["best_val_acc"],
                         "test_acc_at_best_val": final["test_acc_at_best_val"], "best_epoch": final["best_epoch"]})
    best = max(rows, key=lambda r: r["best_val_acc"])
    summary = {"variant": args.variant, "grid": rows, "selected": best}
    from .checkpoint import atomic_write_json

    atomic_write_json(out / "sweep.json", summary)
    print(f"sweep: selected {best['run']} (val acc {best['best_val_acc']:.2f}); test acc {best['test_acc_at_best_val']:.2f}")
    return 0


def report_main(argv=None) -> int:
    from .report import write_report

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="relaxedconv report", description="Run directories -> Markdown results table and PNG plots.")
    ap.add_argument("runs", nargs="+", help="run directories, or folders searched for them")
    ap.add_argument("--out", default=None, help="where results.md and the plots go (default: the first argument)")
    args = ap.parse_args(argv)
    try:
        paths = write_report(args.runs, args.out or args.runs[0])
    except FileNotFoundError as e:
        print(f"relaxedconv report: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0
