"""``relaxedconv`` command line: one subcommand per job, each in its own module."""
from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function taking argv, one-line help)
COMMANDS = {
    "demo": ("relaxedconv.demo", "main", "build a relaxed SE(2) model, run a batch, print omegas and equivariance errors"),
    "bench": ("relaxedconv.benchmark.runner", "main", "benchmark the backends (GPU when there is one)"),
    "train": ("relaxedconv.training.cli", "train_main", "train a model on CIFAR-10/100 or an image folder"),
    "sweep": ("relaxedconv.training.cli", "sweep_main", "cross-validate over a grid of omegas"),
    "report": ("relaxedconv.training.cli", "report_main", "run directories -> Markdown table and PNG plots"),
    "export": ("relaxedconv.export", "main", "a run's best model -> plain PyTorch modules (and ONNX) for deployment"),
    "symmetry": ("relaxedconv.symmetry_experiment", "main", "the controlled-symmetry experiment: does a learned omega find the data's symmetry?"),
}


def _usage() -> str:
    lines = ["usage: relaxedconv <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "run 'relaxedconv <command> --help' for a command's options; 'relaxedconv --version' for the version",
              "documentation: README.md; the method, conventions and backends: docs/design.md"]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"relaxedconv {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"relaxedconv: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    result = getattr(importlib.import_module(module), func)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
