"""``relaxedconv train | sweep | report``.

    relaxedconv train --dataset cifar10 --data-dir ./data --variant se2 --group-order 8 --out runs/se2_8
    relaxedconv train --out runs/se2_8 --resume                 # continue an interrupted run exactly
    torchrun --nproc_per_node 4 -m relaxedconv train ...        # the same command on 4 GPUs (DDP)
    relaxedconv sweep --variant se2_rot --omega-rot-grid 0,1,2,4,8 --out runs/sweep_rot -- <train options>
    relaxedconv report runs/ --out runs/report
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path

from .. import __version__
from ..dispatch import AUTO_POLICIES, BACKENDS
from ..models import ARCHITECTURES, DEFAULT_OMEGA_POS, DEFAULT_OMEGA_ROT, VARIANTS
from .checkpoint import RunFileWriteError, atomic_write_json, has_value
from .checks import ConfigError, check_config, check_out_dir, resolved_model_options
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


class _DefaultsHelp(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to an option's help, except where the help already says it or there
    is no meaningful default (flags, None)."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if "%(default)" in h or "default" in h or d is None or d is False or d is argparse.SUPPRESS or not action.option_strings:
            return h
        shown = ",".join(map(str, d)) if isinstance(d, (list, tuple)) else ("on" if d is True else "%(default)s")
        return f"{h} (default: {shown})" if h else f"(default: {shown})"


TRAIN_EPILOG = """\
The defaults are the paper's protocol (design §7 of docs/design.md): 300 epochs of the full model,
sized for a GPU. On a CPU start from experiments/run_cpu.sh's reduced options.

examples:
  relaxedconv train --data-dir ./data --download --variant se2 --out runs/c10_se2_8
  relaxedconv train --out runs/c10_se2_8 --resume           # continue an interrupted run exactly
  relaxedconv train --data-dir ./data --variant se2_rot --omega-rot 2 --widths 8,16 --kernel-size 5 \\
      --hidden-channels 16 --epochs 4 --warmup-epochs 1 --train-subset 5000 --device cpu --out runs/cpu_se2_rot
"""


def train_parser(prog: str = "relaxedconv train") -> argparse.ArgumentParser:
    d = DEFAULTS
    ap = argparse.ArgumentParser(
        prog=prog, formatter_class=lambda prog: _DefaultsHelp(prog, max_help_position=30),
        description="Train a continuous-kernel (relaxed) group ResNet on CIFAR-10/100 or an image folder.",
        epilog=TRAIN_EPILOG,
    )
    ap.add_argument("--version", action="version", version=f"relaxedconv {__version__}")
    g = ap.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default=d["dataset"], help="which data --data-dir holds")
    g.add_argument("--data-dir", metavar="DIR", default=d["data_dir"], help="CIFAR python batches, or train/<class>/ and test/<class>/ image folders")
    g.add_argument("--download", action="store_true", help="fetch the official CIFAR archive (md5-checked) when it is not in --data-dir")
    g.add_argument("--label-type", choices=("fine", "coarse"), default=d["label_type"], help="CIFAR-100 labels")
    g.add_argument("--val-size", metavar="N", type=int, default=d["val_size"], help="validation images held out of the training set, seeded; 5000 gives the 45k/5k split")
    g.add_argument("--train-subset", metavar="N", type=int, default=d["train_subset"], help="train on a seeded random subset of this many images (0 = all)")
    g.add_argument("--test-subset", metavar="N", type=int, default=d["test_subset"], help="evaluate on a seeded random subset of the test set (0 = all)")
    g.add_argument("--augment", type=_bool, default=d["augment"], metavar="on/off", help="random crop (pad 4) + horizontal flip, on the training device")
    g = ap.add_argument_group("model")
    g.add_argument("--variant", choices=VARIANTS, default=d["variant"], help="layer type of every convolution (README: Models and training)")
    g.add_argument("--group-order", metavar="N", type=int, default=d["group_order"], help="N rotations (t2 always uses 1)")
    g.add_argument("--widths", type=_ints, default=",".join(map(str, d["widths"])), metavar="W1,W2,...", help="residual block widths, channels per rotation")
    g.add_argument("--kernel-size", metavar="K", type=int, default=d["kernel_size"], help="K, odd")
    g.add_argument("--hidden-channels", metavar="H", type=int, default=d["hidden_channels"], help="kernel-net (SIREN) width H")
    g.add_argument("--omega-rel", metavar="W", type=float, default=d["omega_rel"], help="frequency of the relative coordinates")
    g.add_argument("--omega-rot", metavar="W", type=float, default=d["omega_rot"], help=f"initial rotation frequency of the rotation non-stationary variants (default: {DEFAULT_OMEGA_ROT:g})")
    g.add_argument("--omega-pos", metavar="W", type=float, default=d["omega_pos"], help=f"initial position frequency of the translation non-stationary variants (default: {DEFAULT_OMEGA_POS:g})")
    g.add_argument("--learn-omega", action="store_true", help="learn the omegas of a non-stationary variant (the *_learned variants always do)")
    g.add_argument("--omega-penalty", metavar="S", type=float, default=d["omega_penalty"], help="strength of the penalty: S times the sum over layers of effective omega^2 (learned omegas only)")
    g.add_argument("--omega-lr", metavar="LR", type=float, default=d["omega_lr"], help="learning rate of the omegas' own optimiser group, no weight decay")
    g.add_argument("--architecture", choices=ARCHITECTURES, default=d["architecture"], help="residual block: the authors' or this package's first 'simple' one")
    g.add_argument("--mc-rotation", type=_bool, default=d["mc_rotation"], metavar="on/off", help="random offset of the rotation grid per training step, as in the authors' Monte-Carlo runs (default: off)")
    g.add_argument("--backend", default=d["backend"], choices=BACKENDS, help="convolution path of every layer (README: backend=\"auto\")")
    g.add_argument("--auto-policy", default=d["auto_policy"], choices=AUTO_POLICIES,
                   help="how --backend auto chooses: measure (time the backends on the first call per shape) or static "
                   "(the documented rule, for runs that must not depend on timings); default: RELAXEDCONV_AUTO, "
                   "else measure on CUDA and static on CPU")
    g = ap.add_argument_group("optimisation")
    g.add_argument("--epochs", metavar="N", type=int, default=d["epochs"], help="training epochs")
    g.add_argument("--batch-size", metavar="B", type=int, default=d["batch_size"], help="global batch (split over DDP processes)")
    g.add_argument("--eval-batch-size", metavar="B", type=int, default=d["eval_batch_size"], help="batch of validation and test passes")
    g.add_argument("--lr", metavar="LR", type=float, default=d["lr"], help="Adam learning rate after warm-up, cosine-decayed")
    g.add_argument("--weight-decay", metavar="WD", type=float, default=d["weight_decay"], help="Adam weight decay")
    g.add_argument("--warmup-epochs", metavar="N", type=int, default=d["warmup_epochs"], help="epochs of linear learning-rate warm-up")
    g.add_argument("--seed", metavar="S", type=int, default=d["seed"], help="seeds the split, subsets, initialisation, shuffling, augmentation")
    g = ap.add_argument_group("run")
    g.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory: config, metrics, checkpoints, results")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint with its saved config; when --out holds no run yet, "
                   "start one only if the command gives its options (so one command can start or continue a run)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d["device"], help="auto: the GPU when there is one")
    g.add_argument("--amp", choices=("auto", "bf16", "off"), default=d["amp"], help="auto: bf16 autocast on GPU, none on CPU")
    g.add_argument("--compile", choices=("off", "default", "reduce-overhead", "max-autotune"), default=d["compile"],
                   help="torch.compile the training forward/backward with this mode; reduce-overhead also captures "
                   "them in CUDA graphs (CUDA only). The first steps compile (minutes)")
    g.add_argument("--deterministic", action="store_true", default=d["deterministic"],
                   help="deterministic kernels (cuDNN without autotuning, torch.use_deterministic_algorithms): slower on a "
                   "GPU, but a run and its resumption give the same bits there too")
    g.add_argument("--progress", choices=("auto", "on", "off"), default=d["progress"], help="progress bar; auto: when stderr is a terminal")
    g.add_argument("--test-every-epoch", action="store_true", help="evaluate the test set every epoch (else at each new best validation epoch)")
    g.add_argument("--interrupt-after-steps", type=int, default=0, help=argparse.SUPPRESS)
    return ap


def _explicit_keys(ap: argparse.ArgumentParser, argv) -> set:
    """Destinations given on the command line (not defaults)."""
    probe = argparse.ArgumentParser(add_help=False)
    for a in ap._actions:  # noqa: SLF001 - rebuild with suppressed defaults
        if a.dest in ("help", "version") or not a.option_strings:
            continue
        kw = dict(dest=a.dest, default=argparse.SUPPRESS)
        if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):  # noqa: SLF001
            kw["action"] = "store_true"
        else:
            kw["nargs"] = a.nargs
        probe.add_argument(*a.option_strings, **kw)
    ns, _ = probe.parse_known_args(argv)
    return set(vars(ns))


def _saved_config(out: str) -> dict | None:
    """The config a run directory was started with (its config.json), or None when it holds no run."""
    path = Path(out) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--resume: {path} is not a readable run config ({e}); choose another --out") from None


def resolve_config(argv, log=None) -> tuple[dict, bool]:
    """The train config of ``argv``: with --resume, the run's saved config plus the options that may
    change on resume. Raises ConfigError when --resume has nothing to continue and no options to start."""
    ap = train_parser()
    args = ap.parse_args(argv)
    cfg = {k: v for k, v in vars(args).items() if k != "resume"}
    if args.resume:
        saved = _saved_config(args.out)
        explicit = _explicit_keys(ap, argv) - {"resume"}
        if saved is None:
            if not explicit - RESUMABLE_CHANGES:
                # Bare --resume on an empty directory would start the default (300-epoch) config.
                raise ConfigError(
                    f"--resume: {args.out} holds no run to continue (no config.json); to start one, give its options "
                    f"without --resume (relaxedconv train --out {args.out} --data-dir ... --variant ...)"
                )
            (log or _stderr)(f"relaxedconv train: note: {args.out} holds no run yet; starting a new one with the given options")
        else:
            # Compared as the model uses them: `--variant t2 --group-order 8` resumes a run saved as N = 1.
            before = {**DEFAULTS, **saved}
            before.update(resolved_model_options(before))
            now = {**cfg, **resolved_model_options(cfg)}
            conflicts = {
                k: (before[k], now[k]) for k in explicit
                if k not in RESUMABLE_CHANGES and k in saved and before[k] != now[k]
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


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def interrupted_hint(out) -> str:
    """What to run after an interruption: --resume only once the run's config has been saved."""
    if out and (Path(out) / "config.json").is_file():
        return f"continue with: relaxedconv train --out {out} --resume"
    where = f" ({out} has no config.json)" if out else ""
    return f"nothing of the run was saved yet{where}: rerun the same command to start it"


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM (``timeout``, a batch scheduler's kill) stops a single-process run as
    Ctrl-C does: the exception path removes half-written files and the CLI says how to continue
    (the default action killed the process silently). The previous handler is restored after."""
    from .trainer import Interrupted

    # Signal handlers live in the main thread. Under torchrun the agent stops its workers with SIGTERM
    # and kills them 30 s later: a worker that handled it printed the hint, then hung in the process
    # group's shutdown until then, so DDP workers keep the default action.
    if threading.current_thread() is not threading.main_thread() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        yield
        return

    class Terminated(Interrupted):
        exit_code = 128 + signal.SIGTERM

    def handler(signum, frame):
        raise Terminated("terminated (SIGTERM)")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# What a run stops on that the user's input caused (options, data, the run folder): exit 2, one line.
# (FileExistsError: --out holds a run and --resume was not given.)
_INPUT_ERRORS = (ConfigError, DatasetError, FileExistsError)


def _input_error(command: str, e: Exception) -> int:
    """Print ``e`` (one of :data:`_INPUT_ERRORS`) as ``relaxedconv COMMAND``'s one line; the exit code 2."""
    what = "dataset problem: " if isinstance(e, DatasetError) else ""
    print(f"relaxedconv {command}: {what}{e}", file=sys.stderr)
    return 2


def train_main(argv=None) -> int:
    from .trainer import Diverged, Interrupted, train

    argv = list(sys.argv[1:] if argv is None else argv)
    out = None
    try:
        cfg, resume = resolve_config(argv)
        out = cfg["out"]
        with sigterm_interrupts():
            train(cfg, resume=resume)
    except _INPUT_ERRORS as e:
        return _input_error("train", e)
    except RunFileWriteError as e:
        print(f"relaxedconv train: {e.strerror}; {interrupted_hint(out)}", file=sys.stderr)
        return 1
    except Diverged as e:
        if int(os.environ.get("RANK", "0")) == 0:  # every DDP process stops; one says why
            print(f"relaxedconv train: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"relaxedconv train: {e}; {interrupted_hint(out)}", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except KeyboardInterrupt:
        print(f"\nrelaxedconv train: interrupted; {interrupted_hint(out)}", file=sys.stderr)
        return 130
    return 0


def _fmt(w: float) -> str:
    return f"{w:g}".replace("-", "m").replace(".", "p")


def sweep_main(argv=None) -> int:
    """Cross-validate omega over a fixed grid: one train run per grid point (resumable), the point with
    the best validation accuracy selected, its test accuracy reported."""
    from .trainer import Diverged, train

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
    from ..models import _SPECS as VARIANT_SPECS

    spec = VARIANT_SPECS[args.variant]
    for flag, grid, key, what in (("--omega-rot-grid", rot_grid, "rot", "rotation"),
                                  ("--omega-pos-grid", pos_grid, "trans", "translation")):
        if grid != [None] and not spec[key]:  # every grid point would train the same model
            with_one = ", ".join(v for v, sp in VARIANT_SPECS.items() if sp[key])
            ap.error(f"{flag}: variant {args.variant} has no {what} non-stationarity, so every point would train the same "
                     f"model; choose a variant with one ({with_one})")
    out = Path(args.out)
    # Every grid point's options are checked before the first run trains (a bad value must not
    # surface hours later, when the sweep reaches it).
    points = []
    for wr in rot_grid:
        for wp in pos_grid:
            name = args.variant + (f"_rot{_fmt(wr)}" if wr is not None else "") + (f"_pos{_fmt(wp)}" if wp is not None else "")
            run_argv = rest + ["--variant", args.variant, "--out", str(out / name), "--resume"]
            if wr is not None:
                run_argv += ["--omega-rot", str(wr)]
            if wp is not None:
                run_argv += ["--omega-pos", str(wp)]
            try:
                cfg, _ = resolve_config(run_argv)
                check_config({**DEFAULTS, **cfg})
            except ConfigError as e:
                print(f"relaxedconv sweep: {name}: {e}", file=sys.stderr)
                return 2
            if cfg["val_size"] == 0:
                # every run's best_val_acc would be NaN and the selection arbitrary
                print("relaxedconv sweep: --val-size 0 leaves no validation split to select omega on; give --val-size N "
                      "(N >= 1, e.g. 5000 for CIFAR's 45k/5k split)", file=sys.stderr)
                return 2
            points.append((name, wr, wp, cfg))
    try:
        check_out_dir(out)
    except ConfigError as e:  # a file, or not writable (was a FileExistsError traceback)
        print(f"relaxedconv sweep: {e}", file=sys.stderr)
        return 2
    rows, diverged = [], []
    for name, wr, wp, cfg in points:
        final_path = out / name / "final.json"
        final = json.loads(final_path.read_text()) if final_path.is_file() else None
        if final is not None and final.get("epochs") == cfg["epochs"]:
            print(f"sweep: {name} already done")
        else:
            print(f"sweep: {name}")
            try:
                with sigterm_interrupts():
                    final = train(cfg, resume=True)
            except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, or the trainer's Interrupted
                print(f"\nrelaxedconv sweep: interrupted in {out / name}; rerun the same sweep command to continue "
                      "(finished runs are kept, the interrupted one resumes from its last checkpoint)", file=sys.stderr)
                return getattr(e, "exit_code", 130)
            except _INPUT_ERRORS as e:
                return _input_error("sweep", e)
            except RunFileWriteError as e:
                print(f"relaxedconv sweep: {e.strerror}; rerun the same sweep command once it can write there", file=sys.stderr)
                return 1
            except Diverged as e:
                # A grid point that diverges (a large omega) is a result, not the end of the sweep: it
                # is left out of the selection and recorded as diverged in sweep.json.
                print(f"relaxedconv sweep: {name}: {e}", file=sys.stderr)
                diverged.append(name)
                rows.append({"run": name, "omega_rot": wr, "omega_pos": wp, "best_val_acc": None,
                             "test_acc_at_best_val": None, "best_epoch": None, "diverged": True})
                continue
        rows.append({"run": name, "omega_rot": wr, "omega_pos": wp, "best_val_acc": final["best_val_acc"],
                     "test_acc_at_best_val": final["test_acc_at_best_val"], "best_epoch": final["best_epoch"]})
    # A run without a validation accuracy (null in final.json) cannot be selected.
    scored = [r for r in rows if has_value(r["best_val_acc"])]
    best = max(scored, key=lambda r: r["best_val_acc"]) if scored else None
    atomic_write_json(out / "sweep.json", {"variant": args.variant, "grid": rows, "selected": best})
    if best is None:
        print(f"relaxedconv sweep: no run of {out} has a validation accuracy to select on (see {out / 'sweep.json'})", file=sys.stderr)
        return 1
    if diverged:
        print(f"relaxedconv sweep: warning: {', '.join(diverged)} diverged and {'was' if len(diverged) == 1 else 'were'} "
              "left out of the selection", file=sys.stderr)
    ta = best["test_acc_at_best_val"]
    print(f"sweep: selected {best['run']} (val acc {best['best_val_acc']:.2f}); test acc {f'{ta:.2f}' if has_value(ta) else '–'}")
    return 0


def report_main(argv=None) -> int:
    from .report import write_report

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="relaxedconv report", description="Run directories -> Markdown results table and PNG plots.")
    ap.add_argument("runs", nargs="+", help="run directories, or folders searched for them")
    ap.add_argument("--out", default=None, help="where results.md and the plots go (default: the first argument)")
    args = ap.parse_args(argv)
    out = args.out or args.runs[0]
    try:
        paths = write_report(args.runs, out)
    except FileNotFoundError as e:
        print(f"relaxedconv report: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --out is a file, or not writable
        print(f"relaxedconv report: cannot write the report to {out} ({e.strerror or e}); choose another --out", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0
