"""The training loop of ``relaxedconv train``: data on the device, augmentation there, bf16 autocast on
GPU, a checkpoint every epoch, exact resume, DDP under ``torchrun``.

Run directory (``--out``):

    config.json        the resolved configuration, environment (torch, device, git commit), data source
    metrics.jsonl      one JSON object per epoch (losses, accuracies, lr, every layer's omegas, effective
                       omegas and kernel non-stationarity)
    checkpoint.pt      model, optimizer, scheduler, epoch, history, RNG states (atomic, every epoch)
    best.pt            model weights at the best validation epoch
    final.json         best epoch, validation and test accuracy at it, final omegas, equivariance errors
    omegas.json        the final model's omegas, effective omegas and kernel non-stationarity per layer
    equivariance.json  every layer's relative equivariance error of the final model

Exact resume: each epoch's shuffle and augmentation come from generators seeded by (seed, epoch,
rank), and the checkpoint holds everything else that changes (weights, optimizer, scheduler, global
RNG states), so a run resumed after an interruption continues bit for bit as if it had not stopped
(given the same hardware, software and world size). An interrupted epoch is rerun from its start.
"""
from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import platform
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import backends_used, dispatch, equivariance_penalty, omegas
from ..layers import _RelaxedGroupConv
from ..equivariance import (
    _relaxed_layers,
    effective_omegas,
    kernel_nonstationarity,
    layer_equivariance_errors,
    parameter_groups,
)
from ..models import build_model, partial_subsets
from . import data as data_mod
from .checkpoint import atomic_torch_save, atomic_write_json, atomic_write_text, json_text, rng_state, set_rng_state
from .checks import ConfigError, check_against_data, check_config, check_out_dir
from .progress import Progress

DEFAULTS = dict(
    dataset="cifar10",
    data_dir="./data",
    download=False,
    label_type="fine",
    out=None,
    variant="se2",
    group_order=8,
    widths=[32, 64],
    kernel_size=7,
    hidden_channels=32,
    omega_rel=10.0,
    omega_rot=None,
    omega_pos=None,
    learn_omega=False,
    omega_penalty=1e-3,
    omega_lr=1e-2,
    architecture="authors",
    mc_rotation=False,
    backend="auto",
    auto_policy=None,  # None: RELAXEDCONV_AUTO, else measure on CUDA / static on CPU
    compile="off",  # or a torch.compile mode for the training forward/backward ("reduce-overhead": CUDA graphs)
    deterministic=False,  # deterministic kernels: a run and its resumption give the same bits on a GPU too
    epochs=300,
    batch_size=64,
    eval_batch_size=256,
    lr=1e-3,
    weight_decay=0.0,
    warmup_epochs=5,
    val_size=5000,
    train_subset=0,
    test_subset=0,
    augment=True,
    seed=0,
    device="auto",
    amp="auto",
    progress="auto",
    test_every_epoch=False,
    interrupt_after_steps=0,  # testing aid: raise KeyboardInterrupt after this many steps of this process
)

# Keys that may differ when resuming (they do not change what is computed).
RESUMABLE_CHANGES = {"data_dir", "download", "progress", "out", "eval_batch_size", "interrupt_after_steps"}


class Interrupted(KeyboardInterrupt):
    pass


class Diverged(RuntimeError):
    """An epoch ended with a non-finite training loss or non-finite weights. Raised before that epoch
    is saved: the run directory keeps the checkpoint, metrics and best.pt of the epoch before."""


# ---- distributed ------------------------------------------------------------------------------
class Dist:
    def __init__(self, device_pref: str):
        import torch.distributed as dist

        self.dist = dist
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
        if want_cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        self.enabled = self.world > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if want_cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            self.dist.barrier()

    def sum(self, values):
        """Sum of ``values`` (numbers, or a tensor on the device) over the processes, as a list."""
        t = values.to(self.device, torch.float64) if torch.is_tensor(values) else torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.enabled:
            self.dist.all_reduce(t)
        return t.tolist()


# ---- helpers ----------------------------------------------------------------------------------
def git_commit() -> dict:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        # dirty: the code that ran differs from the commit (changed or new files in the package)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "relaxedconv", "kernels", "setup.py"],
                               cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode == 0:
            return {"commit": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except Exception:  # noqa: BLE001
        pass
    return {"commit": "unknown", "dirty": None}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def lr_lambda_factory(warmup_steps: int, total_steps: int):
    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return f


def _epoch_generator(seed: int, epoch: int, rank: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + epoch * 1009 + rank) % (2**63))
    return g


def _first_line(e: BaseException) -> str:
    """``e``'s message cut to its first line (torch's errors run to many lines), or its type's name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _load_checkpoint(path: Path) -> dict:
    """The checkpoint at ``path``, or a ConfigError that says what to do when it cannot be read.

    Checkpoints are written atomically, so a damaged one was truncated or changed after it was
    written (a partial copy, a full disk)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle is a damaged file for the user
        raise ConfigError(f"{path} is not a readable checkpoint ({type(e).__name__}: {_first_line(e)[:200]}); it is truncated "
                          f"or damaged: restore it from a copy, or delete it to restart the run from epoch 1") from None
    missing = [k for k in ("epoch", "model", "optimizer", "scheduler", "history", "best", "rng") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ConfigError(f"{path} is not a relaxedconv train checkpoint (missing {missing}); delete it to restart "
                          "the run from epoch 1, or choose another --out")
    return ckpt


def _same_number(a, b) -> bool:
    """Equal to rounding; config.json holds null for a number without a value (the std of a single
    pixel), which equals only null or NaN."""
    undefined = lambda v: v is None or (isinstance(v, float) and math.isnan(v))  # noqa: E731
    if undefined(a) or undefined(b):
        return undefined(a) and undefined(b)
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)


def check_known_keys(cfg) -> None:
    """Refuse a config key that is no option (``epoch=3`` for ``epochs=3`` ran the default 300 epochs),
    naming the closest option."""
    if not isinstance(cfg, dict):
        raise TypeError(f"the train config must be a dict of options (see trainer.DEFAULTS), got {type(cfg).__name__}")
    unknown = [k for k in cfg if k not in DEFAULTS]
    if unknown:
        hints, all_close = [], True
        for k in unknown:
            close = difflib.get_close_matches(str(k), list(DEFAULTS), n=1, cutoff=0.6)
            hints.append(f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k))
            all_close = all_close and bool(close)
        raise ConfigError(f"unknown train option{'s' if len(unknown) > 1 else ''} {', '.join(hints)}"
                          + ("" if all_close else f"; the options are the keys of relaxedconv.training.trainer.DEFAULTS: {', '.join(DEFAULTS)}"))


# ---- the run ----------------------------------------------------------------------------------
def _warn_stderr(msg: str) -> None:
    print(f"relaxedconv train: {msg if msg.startswith('note:') else 'warning: ' + msg}", file=sys.stderr, flush=True)


class Trainer:
    def __init__(self, cfg: dict, log=print, warn=_warn_stderr):
        check_known_keys(cfg)
        self.cfg = {**DEFAULTS, **cfg}
        if not self.cfg.get("out"):
            raise ValueError("a run directory (--out) is required")
        # Every option is checked before anything is loaded (a ConfigError says what to use instead).
        self._warn = warn
        self._warnings = check_config(self.cfg)
        check_out_dir(self.cfg["out"])
        self.dist = Dist(self.cfg["device"])
        self.device = self.dist.device
        self._log = log
        self.out = Path(self.cfg["out"])
        self.steps_done = 0
        self.backends = None  # {layer: backend it ran}, after the first training step

    def log(self, *a):
        if self.dist.main:
            self._log(*a)

    def warn(self, msg: str) -> None:
        if self.dist.main:
            self._warn(msg)

    # -- data --
    def _prepare_data(self):
        c = self.cfg
        d = data_mod.load_dataset(c["dataset"], c["data_dir"], download_missing=c["download"], label_type=c["label_type"], log=self.log)
        x = data_mod.to_tensor(d.train_images)
        y = torch.from_numpy(d.train_labels)
        for w in check_against_data(c, len(x), tuple(x.shape[-2:])):
            self.warn(w)
        tr, va = data_mod.split_indices(len(x), c["val_size"], c["seed"])
        if c["train_subset"] and c["train_subset"] < len(tr):
            g = torch.Generator().manual_seed(int(c["seed"]) + 1)
            tr = tr[torch.randperm(len(tr), generator=g)[: c["train_subset"]]].sort().values
        tx, ty = data_mod.to_tensor(d.test_images), torch.from_numpy(d.test_labels)
        if c["test_subset"] and c["test_subset"] < len(tx):
            g = torch.Generator().manual_seed(int(c["seed"]) + 2)
            sel = torch.randperm(len(tx), generator=g)[: c["test_subset"]].sort().values
            tx, ty = tx[sel], ty[sel]
        mean, std = data_mod.channel_stats(x[tr])
        dev = self.device
        self.mean = mean.to(dev)[None, :, None, None]
        self.std = std.to(dev)[None, :, None, None]
        self.train_x, self.train_y = x[tr].to(dev), y[tr].to(dev)
        self.val_x, self.val_y = x[va].to(dev), y[va].to(dev)
        self.test_x, self.test_y = tx.to(dev), ty.to(dev)
        self.num_classes = d.num_classes
        self.data_info = dict(
            source=d.source, classes=d.classes, image_shape=list(x.shape[1:]),
            train=len(tr), val=len(va), test=len(tx), mean=mean.tolist(), std=std.tolist(),
        )

    def _check_same_data(self) -> None:
        """A resumed run must train on the data it started with: --data-dir may change on resume (the
        data moved), and other data would go on training silently, or fail to load the checkpoint
        with a message about the model."""
        path = self.out / "config.json"
        try:
            before = json.loads(path.read_text()).get("data") or {}
        except (OSError, ValueError, AttributeError):
            return
        now = self.data_info
        for key in ("classes", "image_shape", "train", "val", "test", "mean", "std"):
            if key not in before:
                continue
            a, b = before[key], now[key]
            same = (len(a) == len(b) and all(_same_number(x, y) for x, y in zip(a, b))
                    if key in ("mean", "std") else a == b)
            if not same:
                raise ConfigError(f"--resume: the data in {self.cfg['data_dir']} differ from the data {self.out} was trained on "
                                  f"({key}: was {a}, now {b}); resume with the --data-dir the run started with "
                                  f"({before.get('source', 'see config.json')}), or choose another --out")

    def _normalise(self, xb: torch.Tensor) -> torch.Tensor:
        return (xb.float() / 255.0 - self.mean) / self.std

    # -- model --
    def _build(self):
        c = self.cfg
        torch.manual_seed(int(c["seed"]))
        model = build_model(
            c["variant"], num_classes=self.num_classes, group_order=c["group_order"], widths=tuple(c["widths"]),
            kernel_size=c["kernel_size"], hidden_channels=c["hidden_channels"], omega_rel=c["omega_rel"],
            omega_rot=c["omega_rot"], omega_pos=c["omega_pos"], learn_omega=c["learn_omega"], backend=c["backend"],
            in_channels=self.data_info["image_shape"][0], architecture=c["architecture"], mc_rotation=c["mc_rotation"],
        ).to(self.device)
        self.model_config = model.config
        # The run's config records what the model uses: t2's N = 1, the default omegas of the
        # non-stationary variants, learn_omega of the *_learned ones (a resume rebuilds the same model).
        for k in ("group_order", "omega_rot", "omega_pos", "learn_omega"):
            c[k] = model.config[k]
        self.model = model
        self.learns_omega = any(p.requires_grad for m in _relaxed_layers(model) for p in m[1].kernel_net.omegas().values())
        if self.dist.enabled:
            if self.device.type == "cuda":
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
                self.model = model
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        else:
            self.ddp = model
        if c.get("compile", "off") != "off":
            # The training step's forward and backward; evaluation runs the eager model, whose
            # relaxed layers reuse their cached kernels under no_grad.
            self.ddp = torch.compile(self.ddp, mode=None if c["compile"] == "default" else c["compile"])
        # The omegas get their own group: their own learning rate, no weight decay (the penalty is their prior).
        groups = parameter_groups(model, lr=c["lr"], weight_decay=c["weight_decay"], omega_lr=c["omega_lr"])
        self.opt = torch.optim.Adam(groups)
        world = self.dist.world
        self.local_batch = c["batch_size"] // world
        n_local = len(self.train_x) // world
        self.steps_per_epoch = max(1, math.ceil(n_local / self.local_batch))
        total = self.steps_per_epoch * c["epochs"]
        warm = self.steps_per_epoch * c["warmup_epochs"]
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda_factory(warm, total))

    def _backends_ran(self) -> dict:
        """``{layer: backend}`` that the training step runs.

        Eager layers note their backend as they run; under ``--compile`` they cannot (nothing is
        recorded while tracing: every layer would report None). A compiled step runs a layer's own
        backend, or for ``auto`` the static rule, since nothing is timed under torch.compile and a
        fresh run has no earlier choice (a resumed run's pinned choices are the layers' own)."""
        if self.cfg.get("compile", "off") == "off":
            return backends_used(self.model)
        have_triton = dispatch.triton_available()
        return {
            name or type(m).__name__: m.backend if m.backend != "auto" else dispatch.backend_rule(m, self.device.type, have_triton)
            for name, m in self.model.named_modules() if isinstance(m, _RelaxedGroupConv)
        }

    def _autocast(self):
        amp = self.cfg["amp"]
        if self.device.type == "cuda" and amp in ("auto", "bf16"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if amp == "bf16" and self.device.type == "cpu":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return nullcontext()

    # -- epochs --
    def _train_epoch(self, epoch: int) -> dict:
        c, rank, world = self.cfg, self.dist.rank, self.dist.world
        self.ddp.train()
        n = len(self.train_x)
        perm = torch.randperm(n, generator=_epoch_generator(c["seed"], epoch, 0, "cpu"))
        perm = perm[: n - n % world][rank::world].to(self.device)
        aug_g = _epoch_generator(c["seed"], epoch, rank, self.device)
        # Running sums stay on the device: no host sync per step (the progress bar reads them now and then).
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        count, pen = 0, None
        show = {"auto": None, "on": True, "off": False}[c["progress"]] if self.dist.main else False
        with Progress(self.steps_per_epoch, f"epoch {epoch}/{c['epochs']}", show) as bar:
            for step, i in enumerate(range(0, len(perm), self.local_batch)):
                idx = perm[i : i + self.local_batch]
                xb = self._normalise(self.train_x[idx])
                if c["augment"]:
                    xb = data_mod.augment(xb, aug_g)
                yb = self.train_y[idx]
                with self._autocast():
                    logits = self.ddp(xb)
                loss = F.cross_entropy(logits.float(), yb)
                total = loss
                if self.learns_omega and c["omega_penalty"] > 0:
                    pen = equivariance_penalty(self.model, c["omega_penalty"])
                    total = loss + pen
                self.opt.zero_grad(set_to_none=True)
                total.backward()
                self.opt.step()
                self.sched.step()
                b = len(idx)
                loss_sum += loss.detach().double() * b
                correct += (logits.detach().argmax(1) == yb).sum()
                count += b
                if bar.enabled and (step % 20 == 0 or i + b >= len(perm)):
                    bar.update(step + 1 - bar.n, loss=float(loss_sum) / count, acc=100 * float(correct) / count)
                self.steps_done += 1
                if self.backends is None:
                    self.backends = self._backends_ran()
                    bar.clear()
                    self.log("backends: " + ", ".join(f"{k}={v}" for k, v in self.backends.items()))
                if c["interrupt_after_steps"] and self.steps_done >= c["interrupt_after_steps"]:
                    raise Interrupted(f"interrupted after {self.steps_done} steps (--interrupt-after-steps)")
        # One host sync per epoch reads the sums and whether any weight became NaN or inf (checked here,
        # not per step: a per-step check would stall the GPU's queue every step).
        weights = [t for t in (*self.model.parameters(), *self.model.buffers()) if t.is_floating_point()]
        nonfinite = torch.stack([~torch.isfinite(t).all() for t in weights]).sum() if weights else torch.zeros((), device=self.device)
        pen_value = pen.detach().double() if pen is not None else torch.zeros((), dtype=torch.float64, device=self.device)
        s = self.dist.sum(torch.stack([loss_sum, correct, torch.full_like(loss_sum, count), nonfinite.double(), pen_value]))
        return {"train_loss": s[0] / s[2], "train_acc": 100 * s[1] / s[2], "penalty": s[4] / self.dist.world,
                "nonfinite_weights": int(s[3])}

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        if len(x) == 0:
            return float("nan"), float("nan")
        rank, world = self.dist.rank, self.dist.world
        self.model.eval()
        sums = [0.0, 0.0, 0.0]
        idx = torch.arange(rank, len(x), world, device=self.device)
        for i in range(0, len(idx), self.cfg["eval_batch_size"]):
            j = idx[i : i + self.cfg["eval_batch_size"]]
            with self._autocast():
                logits = self.model(self._normalise(x[j]))
            sums[0] += float(F.cross_entropy(logits.float(), y[j], reduction="sum"))
            sums[1] += float((logits.argmax(1) == y[j]).sum())
            sums[2] += len(j)
        s = self.dist.sum(sums)
        return s[0] / s[2], 100 * s[1] / s[2]

    # -- checkpoints --
    def _pin_backends(self, recorded: dict) -> None:
        """Give every ``auto`` layer the backend it ran before the interruption.

        On a GPU ``auto`` times the backends, and a new process may time them differently; the
        backends round differently, so the resumed run would not continue the interrupted one.
        A recorded backend that cannot run here (a GPU run resumed on a CPU) is left to ``auto``."""
        pinned = {}
        for name, m in self.model.named_modules():
            choice = recorded.get(name or type(m).__name__)
            if not isinstance(m, _RelaxedGroupConv) or m.backend != "auto" or choice not in dispatch.BACKEND_TABLE:
                continue
            if self.device.type in dispatch.BACKEND_TABLE[choice].devices:
                m.backend = choice
                pinned[name] = choice
        if pinned:
            self.log(f"resume: {len(pinned)} auto layers keep the backends they ran: " + ", ".join(f"{k}={v}" for k, v in pinned.items()))

    def _checkpoint(self, epoch: int, history: list, best: dict) -> None:
        if self.dist.main:
            atomic_torch_save(
                {
                    "epoch": epoch,
                    "model": self.model.state_dict(),
                    "optimizer": self.opt.state_dict(),
                    "scheduler": self.sched.state_dict(),
                    "history": history,
                    "best": best,
                    "rng": rng_state(),
                    "config": self.cfg,
                    # auto's choices: a resumed run computes with the same backends (see _pin_backends)
                    "backends": self.backends or self._backends_ran(),
                },
                self.out / "checkpoint.pt",
            )
        self.dist.barrier()

    def _write_metrics(self, history: list) -> None:
        if self.dist.main:
            atomic_write_text(self.out / "metrics.jsonl", "".join(json_text(h) + "\n" for h in history))

    # -- main --
    def run(self, resume: bool = False) -> dict:
        # The run's auto policy for the run only: set process-wide in __init__, it outlived the
        # Trainer and overrode what the caller had set (set_auto_policy, another Trainer's).
        with dispatch.using_auto_policy(self.cfg.get("auto_policy")):
            return self._run(resume)

    def _run(self, resume: bool) -> dict:
        c = self.cfg
        for w in self._warnings:
            self.warn(w)
        ckpt_path = self.out / "checkpoint.pt"
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        ckpt = None
        if resume and ckpt_path.is_file():
            # On the CPU: load_state_dict moves the weights and the optimiser's moments to their
            # parameters' device itself and leaves Adam's step counts on the CPU, as a fresh run
            # keeps them (loaded onto the GPU they stayed there: a host sync per read, and a resumed
            # run's state no longer matched an uninterrupted one's; H200, 2026-11-27).
            ckpt = _load_checkpoint(ckpt_path)
        elif not resume and ckpt_path.is_file():
            raise FileExistsError(f"{self.out} already holds a run (checkpoint.pt); pass --resume to continue it or choose another --out")
        final_path = self.out / "final.json"
        if ckpt is not None and ckpt["epoch"] >= c["epochs"] and final_path.is_file():
            # Nothing left to train: keep final.json as the process that trained wrote it.
            self.log(f"{self.out} has finished its {c['epochs']} epochs; nothing to resume (final.json unchanged)")
            return json.loads(final_path.read_text())
        self._prepare_data()
        if ckpt is not None:
            self._check_same_data()
        self._build()
        history, best, start = [], {"epoch": None, "val_acc": -1.0, "test_acc": None}, 1
        if ckpt is not None:
            try:
                self.model.load_state_dict(ckpt["model"])
                self.opt.load_state_dict(ckpt["optimizer"])
                self.sched.load_state_dict(ckpt["scheduler"])
            except (RuntimeError, ValueError, KeyError) as e:
                raise ConfigError(f"{ckpt_path} does not fit the model of {self.out / 'config.json'} ({_first_line(e)}); "
                                  "it was written by another config or an older relaxedconv: choose another --out") from None
            history, best, start = ckpt["history"], ckpt["best"], ckpt["epoch"] + 1
            set_rng_state(ckpt["rng"])
            self._pin_backends(ckpt.get("backends") or {})
            self.log(f"resuming {self.out} after epoch {ckpt['epoch']}")
        env = dict(
            torch=torch.__version__, device=device_name(self.device), world_size=self.dist.world,
            amp=("bf16" if self.device.type == "cuda" and c["amp"] in ("auto", "bf16") else ("bf16" if c["amp"] == "bf16" else "off")),
            **git_commit(),
        )
        if self.dist.main:
            n_params = sum(p.numel() for p in self.model.parameters())
            cfg_doc = {"config": c, "model": self.model_config, "parameters": n_params, "data": self.data_info, "environment": env}
            if ckpt is not None and (self.out / "config.json").is_file():  # a resumed run: keep where it started
                old = json.loads((self.out / "config.json").read_text())
                cfg_doc["environment_first_run"] = old.get("environment_first_run", old.get("environment"))
            atomic_write_json(self.out / "config.json", cfg_doc)
            self._write_metrics(history)
            self.log(f"{c['variant']} N={self.model_config['group_order']} widths={c['widths']} K={c['kernel_size']}: "
                     f"{n_params:,} parameters on {env['device']} (world {self.dist.world}, amp {env['amp']}); "
                     f"data {self.data_info['train']}/{self.data_info['val']}/{self.data_info['test']} train/val/test")
        for epoch in range(start, c["epochs"] + 1):
            t0 = time.time()
            m = {"epoch": epoch, "lr": self.opt.param_groups[0]["lr"]}  # lr at the epoch's first step
            m.update(self._train_epoch(epoch))
            if m.pop("nonfinite_weights") or not math.isfinite(m["train_loss"]):
                raise Diverged(self._divergence_message(epoch, m))
            m["val_loss"], m["val_acc"] = self.evaluate(self.val_x, self.val_y)
            improved = len(self.val_x) > 0 and m["val_acc"] > best["val_acc"]
            if improved or c["test_every_epoch"] or len(self.val_x) == 0:
                m["test_loss"], m["test_acc"] = self.evaluate(self.test_x, self.test_y)
            if improved or len(self.val_x) == 0:  # no validation split: the last epoch counts
                best = {"epoch": epoch, "val_acc": m["val_acc"], "test_acc": m.get("test_acc")}
                if self.dist.main:
                    atomic_torch_save(self.model.state_dict(), self.out / "best.pt")
            m["omegas"] = omegas(self.model)
            m["effective_omegas"] = effective_omegas(self.model)
            m["kernel_nonstationarity"] = kernel_nonstationarity(self.model)
            subsets = partial_subsets(self.model)
            if subsets:
                m["rotation_keep_prob"] = subsets
            m["seconds"] = time.time() - t0
            history.append(m)
            self._checkpoint(epoch, history, best)
            self._write_metrics(history)
            self.log(
                f"epoch {epoch}/{c['epochs']}  train loss {m['train_loss']:.4f} acc {m['train_acc']:.2f}  "
                f"val loss {m['val_loss']:.4f} acc {m['val_acc']:.2f}"
                + (f"  test acc {m['test_acc']:.2f}" if "test_acc" in m else "")
                + f"  lr {m['lr']:.2e}  {m['seconds']:.1f}s"
            )
        return self._finish(history, best, epochs_this_process=len(history) - (start - 1))

    def _divergence_message(self, epoch: int, m: dict) -> str:
        c = self.cfg
        what = (f"the training loss became {m['train_loss']}" if not math.isfinite(m["train_loss"])
                else "weights became NaN or inf")
        kept = (f"{self.out} keeps the checkpoint, metrics and best.pt of epoch {epoch - 1}" if epoch > 1
                else f"no epoch finished, so {self.out} holds no checkpoint")
        amp = self.device.type == "cuda" and c["amp"] in ("auto", "bf16") or c["amp"] == "bf16"
        fixes = [f"a lower --lr (this run: {c['lr']:g})"]
        if amp:
            fixes.append("--amp off")
        if self.learns_omega:
            fixes.append(f"a lower --omega-lr (this run: {c['omega_lr']:g})")
        fixes.append(f"more --warmup-epochs (this run: {c['warmup_epochs']})")
        return (f"training diverged in epoch {epoch}/{c['epochs']}: {what}; stopped without saving that epoch ({kept}). "
                "Start a new run (another --out) with " + ", ".join(fixes[:-1]) + f" or {fixes[-1]} "
                "(--resume would continue with the same settings)")

    def _finish(self, history, best, epochs_this_process: int) -> dict:
        probe = self.val_x[:4] if len(self.val_x) else self.test_x[:4]
        eq = layer_equivariance_errors(self.model, self._normalise(probe))
        om = omegas(self.model)
        last = history[-1] if history else {}
        final = {
            "variant": self.cfg["variant"],
            "epochs": len(history),
            "best_epoch": best["epoch"],
            "best_val_acc": best["val_acc"],
            "test_acc_at_best_val": best["test_acc"],
            "final_val_acc": last.get("val_acc"),
            "final_train_acc": last.get("train_acc"),
            # Seconds are per epoch (training and evaluation, as in metrics.jsonl); this process's
            # share is the sum over the epochs it ran, so it is never more than the total.
            "epochs_this_process": epochs_this_process,
            "train_seconds_this_process": sum(h["seconds"] for h in history[len(history) - epochs_this_process :]),
            "train_seconds_total": sum(h["seconds"] for h in history),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "omegas": om,
            "effective_omegas": effective_omegas(self.model),
            "kernel_nonstationarity": kernel_nonstationarity(self.model),
            "equivariance_error": eq,
            "backends": self.backends or self._backends_ran(),
        }
        subsets = partial_subsets(self.model)
        if subsets:
            final["rotation_keep_prob"] = subsets
        if self.dist.main:
            atomic_write_json(self.out / "omegas.json", {k: final[k] for k in ("omegas", "effective_omegas", "kernel_nonstationarity")})
            atomic_write_json(self.out / "equivariance.json", eq)
            atomic_write_json(self.out / "final.json", final)
            ta = final["test_acc_at_best_val"]
            self.log(f"done: best val acc {best['val_acc']:.2f} at epoch {best['epoch']}, "
                     f"test acc there {ta if ta is None else f'{ta:.2f}'}; results in {self.out}")
        self.dist.barrier()
        return final


@contextlib.contextmanager
def cuda_speed_flags(device: torch.device, deterministic: bool):
    """TF32 matmuls and cuDNN's autotuned algorithms (fixed shapes) for the duration of a GPU run,
    the process's own settings restored afterwards: a run started from a notebook or a test must
    not leave every later fp32 matmul in that process at TF32 precision (on an H200 it turned 20
    exact-fp32 kernel tests that ran after a training test into 1e-3 errors, 2026-11-27)."""
    if device.type != "cuda":
        yield
        return
    flags = (torch.backends.cudnn, "benchmark"), (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32")
    old = [getattr(obj, name) for obj, name in flags]
    torch.backends.cudnn.benchmark = not deterministic  # unless every run must give the same bits
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        for (obj, name), value in zip(flags, old):
            setattr(obj, name, value)


@contextlib.contextmanager
def deterministic_kernels(on: bool):
    """``torch.use_deterministic_algorithms`` (and cuDNN's and cuBLAS's deterministic modes) for the
    duration of a run, restored afterwards. The fused Triton kernels are deterministic by design;
    cuDNN's autotuned algorithms and some backward kernels are not, so without this a GPU run and
    its resumption from a checkpoint agree only to rounding."""
    if not on:
        yield
        return
    old = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
           torch.backends.cudnn.deterministic, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what cuBLAS needs to be deterministic
    torch.use_deterministic_algorithms(True, warn_only=True)  # an op without a deterministic form warns, not fails
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old[0], warn_only=old[1])
        torch.backends.cudnn.deterministic = old[2]
        if old[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def train(cfg: dict, resume: bool = False, log=print) -> dict:
    """Run (or resume) one training run; returns what ``final.json`` holds."""
    trainer = Trainer(cfg, log=log)
    try:
        det = bool(trainer.cfg.get("deterministic"))
        # The GPU speed flags and the deterministic switches hold for the run only.
        with cuda_speed_flags(trainer.device, deterministic=det), deterministic_kernels(det):
            return trainer.run(resume=resume)
    finally:
        if trainer.dist.enabled and trainer.dist.dist.is_initialized():
            trainer.dist.dist.destroy_process_group()
