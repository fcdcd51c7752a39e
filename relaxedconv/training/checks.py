"""Checks of a ``relaxedconv train`` configuration, run before anything is loaded or built.

Every option that cannot work is refused with a :class:`ConfigError` whose message is one line
naming the option, the value and what to use instead (the CLI prints it and exits 2). Options that
work but probably not as meant come back as warnings. :func:`check_config` sees only the options;
:func:`check_against_data` runs once the data's size is known, before the model is built.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch

from .. import dispatch
from ..models import _SPECS as VARIANT_SPECS
from ..models import DEFAULT_OMEGA_POS, DEFAULT_OMEGA_ROT
from ..validation import check_kernel_size, check_omega

# Above this many image-epochs a CPU run is a matter of days (the reduced SE(2)-8 model of
# experiments/run_cpu.sh takes minutes per epoch of 5k images on a CPU).
CPU_IMAGE_EPOCHS_NOTICE = 500_000


class ConfigError(ValueError):
    """A train option that cannot work; the message says what to do instead."""


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _int_at_least(cfg: dict, key: str, low: int, meaning: str = "") -> None:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{_flag(key)} must be an integer, got {v!r}")
    if v < low:
        raise ConfigError(f"{_flag(key)} must be >= {low}{meaning}, got {v}")


def _number(cfg: dict, key: str, *, positive: bool) -> None:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (positive and v == 0):
        want = "a positive number" if positive else "a number >= 0"
        raise ConfigError(f"{_flag(key)} must be {want}, got {v!r}")


def resolved_model_options(cfg: dict) -> dict:
    """The options that ``build_model`` resolves per variant, as it resolves them (t2's N = 1, the
    default omegas of the non-stationary variants, an omega a variant cannot use as 0, learning on
    for the *_learned variants). The trainer records the built model's own values in config.json;
    this is for comparing configurations before anything is built."""
    spec = VARIANT_SPECS.get(cfg.get("variant"))
    if spec is None:
        return {}
    rot = DEFAULT_OMEGA_ROT if cfg["omega_rot"] is None else float(cfg["omega_rot"])
    pos = DEFAULT_OMEGA_POS if cfg["omega_pos"] is None else float(cfg["omega_pos"])
    return dict(
        group_order=spec["group_order"] or cfg["group_order"],
        omega_rot=rot if spec["rot"] else 0.0,
        omega_pos=pos if spec["trans"] else 0.0,
        learn_omega=bool(cfg["learn_omega"] or spec["learn"]) if (spec["rot"] or spec["trans"]) else False,
    )


def resolved_device_type(device: str) -> str:
    """'cuda' or 'cpu': what ``--device auto|cpu|cuda`` runs on here."""
    return "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"


def check_config(cfg: dict) -> list[str]:
    """Refuse (:class:`ConfigError`) any option of ``cfg`` that cannot work; return warnings."""
    warnings: list[str] = []
    variant = cfg["variant"]
    if variant not in VARIANT_SPECS:
        raise ConfigError(f"--variant must be one of {', '.join(VARIANT_SPECS)}, got {variant!r}")
    spec = VARIANT_SPECS[variant]

    # --- data
    _int_at_least(cfg, "val_size", 0, " (0 = no validation split)")
    _int_at_least(cfg, "train_subset", 0, " (0 = the whole training split)")
    _int_at_least(cfg, "test_subset", 0, " (0 = the whole test set)")

    # --- model
    if variant != "t2":  # t2 is always N = 1
        _int_at_least(cfg, "group_order", 2 if spec["partial"] else 1, " (the partial variant needs 2 rotations or more)" if spec["partial"] else "")
    try:
        check_kernel_size(cfg["kernel_size"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--kernel-size: {e}") from None
    _int_at_least(cfg, "hidden_channels", 1)
    widths = cfg["widths"]
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ConfigError(f"--widths must be comma-separated integers >= 1 (one per residual block, e.g. 32,64), got {widths!r}")
    for key in ("omega_rel", "omega_rot", "omega_pos"):
        if cfg[key] is not None:
            try:
                check_omega(key, cfg[key])
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{_flag(key)}: {e}") from None
    for key, used in (("omega_rot", spec["rot"]), ("omega_pos", spec["trans"])):
        # 0 is what such a variant uses (and what its saved config records, so a resume says nothing)
        if cfg[key] is not None and cfg[key] != 0 and not used:
            what = "rotation" if key == "omega_rot" else "translation"
            warnings.append(f"{_flag(key)} {cfg[key]:g} is ignored: variant {variant} has no {what} non-stationarity")
    if cfg["learn_omega"] and not (spec["rot"] or spec["trans"]):
        warnings.append(f"--learn-omega is ignored: variant {variant} has no non-stationary frequency to learn")
    if cfg["backend"] == "expand_conv" and spec["trans"]:
        raise ConfigError(f"--backend expand_conv cannot run variant {variant} (translation non-stationary: a kernel per "
                          "position, which conv2d cannot express); use --backend auto or factored_torch")

    # --- optimisation
    _int_at_least(cfg, "epochs", 1)
    _int_at_least(cfg, "warmup_epochs", 0)
    _int_at_least(cfg, "batch_size", 1)
    _int_at_least(cfg, "eval_batch_size", 1)
    _int_at_least(cfg, "interrupt_after_steps", 0)
    _number(cfg, "lr", positive=True)
    _number(cfg, "weight_decay", positive=False)
    _number(cfg, "omega_penalty", positive=False)
    _number(cfg, "omega_lr", positive=False)  # 0 freezes the omegas; < 0 or NaN trained them into nonsense
    seed = cfg["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**62) < seed < 2**62:
        # torch.Generator.manual_seed takes 64 bits; the trainer derives seeds from it (seed + 1, ...)
        raise ConfigError(f"--seed must be an integer of magnitude below 2**62, got {seed!r}")
    if cfg["warmup_epochs"] >= cfg["epochs"]:
        warnings.append(f"--warmup-epochs {cfg['warmup_epochs']} >= --epochs {cfg['epochs']}: the learning rate never "
                        "leaves its linear warm-up (no cosine decay); use fewer warm-up epochs")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg["batch_size"] % world:
        raise ConfigError(f"--batch-size {cfg['batch_size']} is the global batch; it must be divisible by the {world} processes")

    # --- where it runs
    device = resolved_device_type(cfg["device"])
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible to PyTorch (torch.cuda.is_available() is False); "
                          "use --device cpu, or auto")
    try:  # RELAXEDCONV_AUTO, read at the first forward: a bad value would stop the run there
        dispatch.auto_policy(device, cfg.get("auto_policy"))
    except ValueError as e:
        raise ConfigError(f"{e}; fix or unset {dispatch.AUTO_ENV}, or pass --auto-policy") from None
    if cfg["backend"] == "triton" and device != "cuda" and not dispatch.interpreting():
        raise ConfigError("--backend triton needs a CUDA device and this run is on the CPU; use --backend auto, "
                          "expand_conv or factored_torch")
    if cfg.get("compile") == "reduce-overhead" and device != "cuda":
        warnings.append("--compile reduce-overhead captures CUDA graphs, which a CPU run has not: it compiles as "
                        "--compile default")
    return warnings


def check_out_dir(out) -> None:
    """Create the run directory if needed and make sure files can be written there."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory; choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write a run directory there ({e.strerror or e}); choose a writable path") from None


def check_against_data(cfg: dict, n_train_images: int, image_hw) -> list[str]:
    """Options that depend on the data: the validation split, the subsets, the image size."""
    warnings: list[str] = []
    n = n_train_images
    if cfg["val_size"] >= n:
        raise ConfigError(f"--val-size {cfg['val_size']} leaves no training images: the data has {n}; use a value "
                          f"below {n} (CIFAR's 45k/5k split is --val-size 5000)")
    n_train = n - cfg["val_size"]
    if cfg["val_size"] > n_train:
        # the default 5000 is CIFAR's 45k/5k split; on a small image folder it took most of the data
        warnings.append(f"--val-size {cfg['val_size']} holds out more images for validation than are left to train on "
                        f"({n_train} of {n}); give a smaller --val-size (e.g. {max(1, n // 10)}, a tenth)")
    if cfg["train_subset"] > n_train:
        warnings.append(f"--train-subset {cfg['train_subset']} is more than the {n_train} training images: all are used")
    images = min(cfg["train_subset"] or n_train, n_train)
    if resolved_device_type(cfg["device"]) == "cpu" and cfg["epochs"] * images > CPU_IMAGE_EPOCHS_NOTICE:
        warnings.append(
            f"note: this trains {cfg['epochs']} epochs of {images:,} images on the CPU, which takes days to weeks "
            "(the defaults are the paper's GPU protocol); for a CPU-sized run see experiments/run_cpu.sh, e.g. "
            "--widths 8,16 --kernel-size 5 --hidden-channels 16 --epochs 4 --warmup-epochs 1 --train-subset 5000"
        )
    # Each residual block halves the map (2x2 max-pool); the head is a 'valid' KxK convolution.
    h, w = image_hw
    blocks, k = len(cfg["widths"]), cfg["kernel_size"]
    head_h, head_w = h >> blocks, w >> blocks
    if min(head_h, head_w) < k:
        need = k << blocks
        raise ConfigError(
            f"--kernel-size {k} with {blocks} residual block(s) needs images of at least {need}x{need} (the head's "
            f"'valid' {k}x{k} convolution runs on the map pooled {blocks} time(s)), the data has {h}x{w}; "
            "use a smaller --kernel-size or fewer --widths"
        )
    return warnings
