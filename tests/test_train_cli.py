"""``relaxedconv train`` as a new user meets it (issue 12): options checked before any data is read,
--resume that cannot start the default run by accident, help text with defaults, honest run files.
"""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from relaxedconv import __version__
from relaxedconv.cli import main as relaxedconv_main
from relaxedconv.training import cli
from relaxedconv.training import data as data_mod
from relaxedconv.training.checks import check_against_data, check_config, resolved_model_options
from relaxedconv.training.trainer import DEFAULTS

from test_training import TINY, make_folder


@pytest.fixture
def data_never_loaded(monkeypatch):
    """Fails the test if the run gets as far as reading its data."""

    def refuse(*a, **k):
        raise AssertionError("the data was loaded although an option was invalid")

    monkeypatch.setattr(data_mod, "load_dataset", refuse)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ---- item 2/3: every option checked before anything is loaded ---------------------------------------
BAD_OPTIONS = [
    (["--train-subset", "-5"], "--train-subset must be >= 0 (0 = the whole training split), got -5"),
    (["--test-subset", "-1"], "--test-subset must be >= 0"),
    (["--epochs", "-1"], "--epochs must be >= 1, got -1"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--warmup-epochs", "-2"], "--warmup-epochs must be >= 0, got -2"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be >= 1, got 0"),
    (["--lr", "-1"], "--lr must be a positive number, got -1.0"),
    (["--lr", "0"], "--lr must be a positive number, got 0.0"),
    (["--lr", "nan"], "--lr must be a positive number, got nan"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a number >= 0"),
    (["--omega-penalty", "-1"], "--omega-penalty must be a number >= 0"),
    (["--kernel-size", "4"], "--kernel-size: kernel_size must be a positive odd number"),
    (["--group-order", "0"], "--group-order must be >= 1, got 0"),
    (["--variant", "partial", "--group-order", "1"], "--group-order must be >= 2 (the partial variant needs 2 rotations or more)"),
    (["--hidden-channels", "0"], "--hidden-channels must be >= 1, got 0"),
    (["--widths", "4,0"], "--widths must be comma-separated integers >= 1"),
    (["--widths", ","], "--widths must be comma-separated integers >= 1"),
    (["--omega-rel", "-1"], "--omega-rel: omega_rel must be >= 0, got -1.0"),
    (["--variant", "se2_rot", "--omega-rot", "nan"], "--omega-rot: omega_rot must be a finite number >= 0, got nan"),
    (["--variant", "se2_trans", "--backend", "expand_conv"], "--backend expand_conv cannot run variant se2_trans"),
    (["--val-size", "-1"], "--val-size must be >= 0"),
    (["--omega-lr", "-1"], "--omega-lr must be a number >= 0, got -1.0"),  # trained the omegas uphill
    (["--omega-lr", "nan"], "--omega-lr must be a number >= 0, got nan"),  # NaN omegas in final.json
    (["--omega-lr", "inf"], "--omega-lr must be a number >= 0, got inf"),
    (["--seed", str(2**64)], "--seed must be an integer of magnitude below 2**62"),  # was an overflow traceback
]


@pytest.mark.parametrize("options, message", BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_bad_option_exits_2_with_one_line_before_loading(tmp_path, capsys, data_never_loaded, options, message):
    rc = cli.train_main(["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"), *TINY, *options])
    assert rc == 2
    line = _one_line_error(capsys)
    assert line.startswith("relaxedconv train: ") and message in line, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_cuda_and_triton_refused_without_a_gpu(tmp_path, capsys, data_never_loaded, monkeypatch):
    base = ["--data-dir", str(tmp_path), "--out", str(tmp_path / "run"), *TINY]
    assert cli.train_main([*base, "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA device is visible" in _one_line_error(capsys)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cli.train_main([*base, "--backend", "triton"]) == 2
    assert "--backend triton needs a CUDA device and this run is on the CPU; use --backend auto" in _one_line_error(capsys)


def test_a_bad_relaxedconv_auto_is_refused_before_loading(tmp_path, capsys, data_never_loaded, monkeypatch):
    """RELAXEDCONV_AUTO is read at the first forward: a misspelt value stopped the run there, with a
    traceback, after the data had loaded."""
    monkeypatch.setenv("RELAXEDCONV_AUTO", "fastest")
    base = ["--data-dir", str(tmp_path), "--out", str(tmp_path / "run"), *TINY]
    assert cli.train_main(base) == 2
    assert "got 'fastest'; fix or unset RELAXEDCONV_AUTO, or pass --auto-policy" in _one_line_error(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_triton_interpret_is_read_as_triton_reads_it(tmp_path, capsys, data_never_loaded, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "true")  # on for Triton: the triton backend runs on CPU
    from relaxedconv.training.checks import check_config
    from relaxedconv.training.trainer import DEFAULTS

    check_config({**DEFAULTS, "out": str(tmp_path / "run"), "backend": "triton", "device": "cpu"})
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert cli.train_main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "run"), *TINY, "--backend", "triton"]) == 2
    assert "--backend triton needs a CUDA device" in _one_line_error(capsys)


def test_unwritable_out_is_refused_before_loading(tmp_path, capsys, data_never_loaded):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    assert cli.train_main(["--out", str(a_file), *TINY]) == 2
    assert f"--out {a_file} is a file, not a directory" in _one_line_error(capsys)
    assert cli.train_main(["--out", str(a_file / "run"), *TINY]) == 2  # parent is a file
    assert "cannot write a run directory there" in _one_line_error(capsys)
    if os.path.isdir("/proc"):
        assert cli.train_main(["--out", "/proc/x", *TINY]) == 2
        assert "--out /proc/x: cannot write a run directory there" in _one_line_error(capsys)


def test_options_that_depend_on_the_data_are_refused_before_building(tmp_path, capsys, monkeypatch):
    import relaxedconv.training.trainer as trainer_mod

    data = make_folder(tmp_path / "f", n_train=16, n_test=4)  # 16x16 images

    def no_model(*a, **k):
        raise AssertionError("the model was built although an option did not fit the data")

    monkeypatch.setattr(trainer_mod, "build_model", no_model)
    base = ["--dataset", "folder", "--data-dir", str(data), "--epochs", "2", *TINY]
    assert cli.train_main([*base, "--out", str(tmp_path / "a"), "--val-size", "60000"]) == 2
    assert "--val-size 60000 leaves no training images: the data has 16; use a value below 16" in _one_line_error(capsys)
    assert cli.train_main([*base, "--out", str(tmp_path / "b"), "--val-size", "16"]) == 2
    capsys.readouterr()
    # widths 4,8: two 2x2 pools, 16 -> 4, and the head's 'valid' 5x5 convolution does not fit
    assert cli.train_main([*base, "--out", str(tmp_path / "c"), "--val-size", "4", "--kernel-size", "5"]) == 2
    assert "--kernel-size 5 with 2 residual block(s) needs images of at least 20x20" in _one_line_error(capsys)


def test_questionable_options_warn_and_run(tmp_path, capsys):
    data = make_folder(tmp_path / "f", n_train=16, n_test=4)
    rc = cli.train_main(["--dataset", "folder", "--data-dir", str(data), "--out", str(tmp_path / "r"), "--val-size", "4",
                         "--epochs", "1", *TINY, "--warmup-epochs", "5", "--variant", "se2", "--omega-rot", "3",
                         "--train-subset", "100"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "warning: --warmup-epochs 5 >= --epochs 1: the learning rate never leaves its linear warm-up" in err
    assert "warning: --omega-rot 3 is ignored: variant se2 has no rotation non-stationarity" in err
    assert "warning: --train-subset 100 is more than the 12 training images: all are used" in err


def test_a_validation_split_larger_than_the_training_split_warns():
    """The default --val-size 5000 (CIFAR's 45k/5k split) took 5000 of a 6000-image folder without a word."""
    cfg = dict(DEFAULTS, device="cpu", epochs=1, warmup_epochs=0)
    (w,) = [w for w in check_against_data(cfg, 6000, (32, 32)) if "--val-size" in w]
    assert "--val-size 5000 holds out more images for validation than are left to train on (1000 of 6000)" in w
    assert "e.g. 600" in w
    assert not [w for w in check_against_data(cfg, 50_000, (32, 32)) if "--val-size" in w]


def test_full_protocol_on_a_cpu_is_announced():
    cpu = dict(DEFAULTS, device="cpu")
    assert check_config(cpu) == []
    notes = [w for w in check_against_data(cpu, 50_000, (32, 32)) if w.startswith("note:")]
    assert len(notes) == 1, notes
    assert "300 epochs of 45,000 images on the CPU" in notes[0] and "days to weeks" in notes[0] and "run_cpu.sh" in notes[0]
    small = dict(cpu, epochs=4, train_subset=5000, warmup_epochs=1)
    assert check_config(small) == [] and check_against_data(small, 50_000, (32, 32)) == []


# ---- item 1: --resume never starts the default run by accident -----------------------------------
def test_bare_resume_of_an_empty_directory_is_refused(tmp_path, capsys, data_never_loaded):
    out = tmp_path / "k"
    assert cli.train_main(["--out", str(out), "--resume"]) == 2
    line = _one_line_error(capsys)
    assert f"--resume: {out} holds no run to continue (no config.json)" in line and "without --resume" in line
    assert not (out / "config.json").exists()
    # options that may change on resume do not define a run either
    assert cli.train_main(["--out", str(out), "--resume", "--progress", "off", "--data-dir", str(tmp_path)]) == 2
    assert "holds no run to continue" in _one_line_error(capsys)


def test_resume_with_the_run_options_starts_it_once(tmp_path, capsys):
    """What experiments/run_cpu.sh relies on: one command that starts a run or continues it."""
    data = make_folder(tmp_path / "f", n_train=16, n_test=4)
    cmd = ["--dataset", "folder", "--data-dir", str(data), "--out", str(tmp_path / "r"), "--val-size", "4",
           "--epochs", "1", "--resume", *TINY, "--warmup-epochs", "0"]
    assert cli.train_main(cmd) == 0
    assert "holds no run yet; starting a new one with the given options" in capsys.readouterr().err
    assert json.loads((tmp_path / "r" / "final.json").read_text())["epochs"] == 1


def test_interrupt_before_anything_is_saved_does_not_suggest_resume(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(data_mod, "load_dataset", interrupted)
    out = tmp_path / "k"
    assert cli.train_main(["--data-dir", str(tmp_path), "--out", str(out), *TINY]) == 130
    err = capsys.readouterr().err
    assert "--resume" not in err and "nothing of the run was saved yet" in err and "rerun the same command" in err
    # once config.json is written, --resume continues with the saved config
    (out / "config.json").write_text(json.dumps({"config": {}}))
    assert cli.interrupted_hint(str(out)) == f"continue with: relaxedconv train --out {out} --resume"


# ---- item 8: help, --out, --version ---------------------------------------------------------------
def test_help_shows_defaults_and_out_as_required(capsys):
    text = cli.train_parser().format_help()
    flat = " ".join(text.split())
    for shown in ("(default: 300)", "(default: 32,64)", "(default: 7)", "(default: 0.001)", "(default: 5000)",
                  "(default: se2)", "(default: on)", "(default: 2)", "docs/design.md", "run_cpu.sh"):
        assert shown in flat, shown
    usage = " ".join(text.split("\n\n")[0].split()) + " "
    assert " --out RUN_DIR " in usage and "[--out" not in usage
    with pytest.raises(SystemExit) as e:
        cli.train_main([*TINY])
    assert e.value.code == 2 and "the following arguments are required: --out" in capsys.readouterr().err


def test_version(capsys):
    assert relaxedconv_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"relaxedconv {__version__}"
    with pytest.raises(SystemExit) as e:
        cli.train_main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out


# ---- item 9: run files say what ran ---------------------------------------------------------------
@pytest.mark.parametrize("variant, expect", [
    ("se2_learned", dict(learn_omega=True, omega_rot=2.0, omega_pos=0.0, group_order=4)),
    ("t2", dict(learn_omega=False, group_order=1, omega_rot=0.0)),
    ("se2_rot", dict(learn_omega=False, omega_rot=2.0, group_order=4)),
])
def test_config_json_records_what_the_model_uses(tmp_path, variant, expect):
    data = make_folder(tmp_path / "f", n_train=16, n_test=4)
    out = tmp_path / variant
    cmd = ["--dataset", "folder", "--data-dir", str(data), "--out", str(out), "--val-size", "4",
           "--epochs", "1", "--variant", variant, *TINY, "--warmup-epochs", "0"]
    assert cli.train_main(cmd) == 0
    doc = json.loads((out / "config.json").read_text())
    for k, v in expect.items():
        assert doc["config"][k] == v == doc["model"][k], k
    # the resolution the CLI compares configurations with agrees with the built model's
    raw, _ = cli.resolve_config(cmd)
    assert resolved_model_options(raw) == {k: doc["model"][k] for k in ("group_order", "omega_rot", "omega_pos", "learn_omega")}
    # rerunning the very same command with --resume (what experiments/run_*.sh do) finds the finished run,
    # although the command says --group-order 4 and a t2 run is saved with N = 1
    assert cli.train_main([*cmd, "--resume"]) == 0


def test_final_json_timing_and_a_resumed_finished_run(tmp_path, capsys):
    data = make_folder(tmp_path / "f", n_train=16, n_test=4)
    out = tmp_path / "r"
    common = ["--dataset", "folder", "--data-dir", str(data), "--out", str(out), "--val-size", "4", "--epochs", "3",
              *TINY, "--warmup-epochs", "0"]
    # 2 steps per epoch: interrupted in epoch 2, resumed for epochs 2 and 3
    assert cli.train_main([*common, "--interrupt-after-steps", "3"]) == 130
    assert cli.train_main(["--out", str(out), "--resume", "--progress", "off"]) == 0
    final = json.loads((out / "final.json").read_text())
    seconds = [json.loads(x)["seconds"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert final["epochs_this_process"] == 2
    assert final["train_seconds_this_process"] == pytest.approx(sum(seconds[1:]))
    assert final["train_seconds_total"] == pytest.approx(sum(seconds))
    assert 0 < final["train_seconds_this_process"] < final["train_seconds_total"]
    # resuming the finished run changes nothing and says so
    before = (out / "final.json").read_bytes()
    assert cli.train_main(["--out", str(out), "--resume", "--progress", "off"]) == 0
    assert "has finished its 3 epochs; nothing to resume" in capsys.readouterr().out
    assert (out / "final.json").read_bytes() == before


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_run_files_respect_the_umask(tmp_path, umask, mode):
    data = make_folder(tmp_path / "f", n_train=16, n_test=4)
    out = tmp_path / "r"
    old = os.umask(umask)
    try:
        assert cli.train_main(["--dataset", "folder", "--data-dir", str(data), "--out", str(out), "--val-size", "4",
                               "--epochs", "1", *TINY, "--warmup-epochs", "0"]) == 0
    finally:
        os.umask(old)
    files = sorted(p.name for p in out.iterdir())
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "best.pt", "final.json"} <= set(files)
    for p in out.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == mode, (p.name, oct(p.stat().st_mode))


# ---- audit: resuming a run says nothing about options the user did not give; a damaged checkpoint ----
def _interrupted_run(tmp_path, out, *extra):
    data = make_folder(tmp_path / "f", n_train=16, n_test=4)
    cmd = ["--dataset", "folder", "--data-dir", str(data), "--out", str(out), "--val-size", "4", "--epochs", "2",
           *TINY, "--warmup-epochs", "0", *extra]
    assert cli.train_main([*cmd, "--interrupt-after-steps", "3"]) == 130
    return cmd


def test_resume_warns_only_about_what_the_command_says(tmp_path, capsys):
    """The saved config records the omegas se2 uses (0); resuming must not warn that they are ignored."""
    out = tmp_path / "r"
    _interrupted_run(tmp_path, out, "--variant", "se2")
    capsys.readouterr()
    assert cli.train_main(["--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "warning" not in err, err
    # a value the command does give still warns
    assert any("--omega-rot 3 is ignored" in w for w in check_config({**DEFAULTS, "variant": "se2", "omega_rot": 3.0}))


def _truncated(p):
    p.write_bytes(p.read_bytes()[:1000])


def _empty(p):
    p.write_bytes(b"")


def _not_a_checkpoint(p):
    torch.save([1, 2], p)


@pytest.mark.parametrize("damage, message", [
    (_truncated, "is not a readable checkpoint (RuntimeError"),
    (_empty, "is not a readable checkpoint (EOFError"),
    (_not_a_checkpoint, "is not a relaxedconv train checkpoint (missing"),
])
def test_a_damaged_checkpoint_exits_2_with_what_to_do(tmp_path, capsys, damage, message):
    out = tmp_path / "r"
    _interrupted_run(tmp_path, out)
    damage(out / "checkpoint.pt")
    capsys.readouterr()
    assert cli.train_main(["--out", str(out), "--resume"]) == 2
    line = _one_line_error(capsys)
    assert f"{out / 'checkpoint.pt'} " in line and message in line and "delete it to restart" in line
    # what the message offers works: without the checkpoint the saved config starts again from epoch 1
    (out / "checkpoint.pt").unlink()
    assert cli.train_main(["--out", str(out), "--resume"]) == 0
    assert json.loads((out / "final.json").read_text())["epochs"] == 2


def test_a_checkpoint_of_another_model_exits_2(tmp_path, capsys):
    out, other = tmp_path / "r", tmp_path / "other"
    _interrupted_run(tmp_path, out)
    data = tmp_path / "f"
    assert cli.train_main(["--dataset", "folder", "--data-dir", str(data), "--out", str(other), "--val-size", "4",
                           "--epochs", "2", *TINY, "--widths", "8", "--interrupt-after-steps", "3"]) == 130
    (out / "checkpoint.pt").write_bytes((other / "checkpoint.pt").read_bytes())
    capsys.readouterr()
    assert cli.train_main(["--out", str(out), "--resume"]) == 2
    line = _one_line_error(capsys)
    assert "does not fit the model of" in line and "choose another --out" in line


def test_sigterm_stops_a_run_like_ctrl_c(tmp_path, capsys, monkeypatch):
    """`timeout 600 relaxedconv train ...` (or a scheduler's kill) sends SIGTERM, which killed the process
    without a word and could leave a half-written temporary file; it must exit 143 with how to continue,
    and the resumed run must end as an uninterrupted one."""
    import signal

    import relaxedconv.training.trainer as trainer_mod

    data = make_folder(tmp_path / "f", n_train=16, n_test=4)
    common = ["--dataset", "folder", "--data-dir", str(data), "--val-size", "4", "--epochs", "3", "--augment", "off",
              *TINY, "--warmup-epochs", "0"]
    assert cli.train_main([*common, "--out", str(tmp_path / "whole")]) == 0
    real = trainer_mod.Trainer._checkpoint

    def checkpoint_then_sigterm(self, epoch, *a):
        real(self, epoch, *a)
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer_mod.Trainer, "_checkpoint", checkpoint_then_sigterm)

    def outside(signum, frame):  # stands for the default action (which would end pytest)
        raise AssertionError("SIGTERM was not handled by the run")

    before = signal.signal(signal.SIGTERM, outside)
    out = tmp_path / "cut"
    try:
        assert cli.train_main([*common, "--out", str(out)]) == 143
        assert signal.getsignal(signal.SIGTERM) is outside
    finally:
        signal.signal(signal.SIGTERM, before)
    err = capsys.readouterr().err
    assert f"terminated (SIGTERM); continue with: relaxedconv train --out {out} --resume" in err and "Traceback" not in err
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(trainer_mod.Trainer, "_checkpoint", real)
    assert cli.train_main(["--out", str(out), "--resume"]) == 0
    whole, cut = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False)["model"] for d in ("whole", "cut"))
    assert all(torch.equal(whole[k], cut[k]) for k in whole if isinstance(whole[k], torch.Tensor))


def test_the_suggested_cpu_commands_run_without_warnings(tmp_path):
    """The help's CPU example and the CPU notice's suggestion left --warmup-epochs at 5 with --epochs 4: the
    run warned that its learning rate never leaves the warm-up. Both are parsed here as written."""
    import re
    import shlex

    epilog = cli.train_parser().epilog
    example = " ".join(epilog.split("examples:")[1].split("\n  relaxedconv train ")[3].replace("\\\n", " ").split())
    assert "--device cpu" in example
    cfg, _ = cli.resolve_config(shlex.split(example))
    assert check_config(cfg) == [] and check_against_data(cfg, 50_000, (32, 32)) == []
    note = next(w for w in check_against_data(dict(DEFAULTS, device="cpu"), 50_000, (32, 32)) if w.startswith("note:"))
    suggested = re.search(r"e\.g\. (--.*)$", note).group(1)
    cfg, _ = cli.resolve_config([*shlex.split(suggested), "--device", "cpu", "--out", str(tmp_path / "r")])
    assert check_config(cfg) == [] and check_against_data(cfg, 50_000, (32, 32)) == []


def test_a_full_disk_stops_the_run_with_one_line_and_it_resumes(tmp_path, capsys, monkeypatch):
    """torch.save onto a full disk raised "enforce fail at inline_container.cc ... unexpected pos" (a
    RuntimeError traceback that does not say why); the run must say which file and why, keep the
    previous checkpoint, leave no temporary file, and resume to the uninterrupted result."""
    import errno

    from relaxedconv.training import checkpoint as ckpt_mod

    data = make_folder(tmp_path / "f", n_train=16, n_test=4)
    common = ["--dataset", "folder", "--data-dir", str(data), "--val-size", "4", "--epochs", "3", "--augment", "off",
              *TINY, "--warmup-epochs", "0"]
    assert cli.train_main([*common, "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "cut"
    real_fsync, writes = os.fsync, []

    def full_disk_in_epoch_2(fd):
        name = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        writes.append(name)
        if ".checkpoint.pt." in name and sum(".checkpoint.pt." in w for w in writes) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(ckpt_mod.os, "fsync", full_disk_in_epoch_2)
    assert cli.train_main([*common, "--out", str(out)]) == 1
    line = _one_line_error(capsys)
    assert f"could not write {out / 'checkpoint.pt'} (No space left on device); its previous version is intact" in line
    assert f"continue with: relaxedconv train --out {out} --resume" in line
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 1
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(ckpt_mod.os, "fsync", real_fsync)
    assert cli.train_main(["--out", str(out), "--resume"]) == 0
    whole, cut = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False)["model"] for d in ("whole", "cut"))
    assert all(torch.equal(whole[k], cut[k]) for k in whole if isinstance(whole[k], torch.Tensor))


def test_a_checkpoint_that_cannot_be_written_raises_an_os_error_naming_it(tmp_path, monkeypatch):
    """The checkpoint goes through a plain file write (torch.save straight onto a full disk raised
    "enforce fail at inline_container.cc ... unexpected pos", a RuntimeError that does not say why)."""
    import builtins
    import errno

    from relaxedconv.training import checkpoint as ckpt_mod

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(ckpt_mod, "open", lambda *a, **k: FullDisk(builtins.open(*a, **k)), raising=False)
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(ckpt_mod.RunFileWriteError, match=r"could not write .*checkpoint.pt \(No space left on device\)"):
        ckpt_mod.atomic_torch_save({"w": torch.zeros(10)}, path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("other", ["other images", "other classes"])
def test_resume_on_other_data_is_refused(tmp_path, capsys, other):
    """--data-dir may change on resume (the data moved); other data trained on silently (same classes)
    or failed with a message about the checkpoint not fitting the model (other classes)."""
    out = tmp_path / "r"
    _interrupted_run(tmp_path, out)
    if other == "other images":
        moved = make_folder(tmp_path / "g", n_train=16, n_test=4, seed=1)
    else:
        moved = make_folder(tmp_path / "g", n_train=16, n_test=4)
        for split in ("train", "test"):
            (moved / split / "class3").rename(moved / split / "class9")
    capsys.readouterr()
    assert cli.train_main(["--out", str(out), "--resume", "--data-dir", str(moved)]) == 2
    line = _one_line_error(capsys)
    assert f"--resume: the data in {moved} differ from the data {out} was trained on" in line
    assert ("mean: was" in line) if other == "other images" else ("classes: was" in line)
    # the same data in a new place resumes
    same = make_folder(tmp_path / "h", n_train=16, n_test=4)
    assert cli.train_main(["--out", str(out), "--resume", "--data-dir", str(same)]) == 0


def test_ddp_workers_keep_the_default_sigterm(monkeypatch):
    """torchrun stops its workers with SIGTERM and kills them 30 s later; a worker that handled it hung
    in the process group's shutdown until then (gloo, 2 processes)."""
    import signal

    monkeypatch.setenv("WORLD_SIZE", "2")
    before = signal.getsignal(signal.SIGTERM)
    with cli.sigterm_interrupts():
        assert signal.getsignal(signal.SIGTERM) is before
    monkeypatch.setenv("WORLD_SIZE", "1")
    with cli.sigterm_interrupts():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


# ---- audit 2: strict JSON, divergence, unknown config keys -----------------------------------------
def _strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as jq and JavaScript do."""
    def refuse(token):
        raise AssertionError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_run_without_validation_writes_null_not_nan(tmp_path, capsys):
    """--val-size 0: the validation numbers are undefined and were written as NaN (not JSON)."""
    data = make_folder(tmp_path / "f", n_train=16, n_test=4)
    out = tmp_path / "r"
    cmd = ["--dataset", "folder", "--data-dir", str(data), "--out", str(out), "--val-size", "0", "--epochs", "2",
           *TINY, "--warmup-epochs", "0"]
    # 2 steps per epoch: interrupted in epoch 2, so the resume reads the files of epoch 1
    assert cli.train_main([*cmd, "--interrupt-after-steps", "3"]) == 130
    assert cli.train_main(["--out", str(out), "--resume", "--progress", "off"]) == 0
    final = _strict_json((out / "final.json").read_text())
    assert final["best_val_acc"] is None and final["final_val_acc"] is None
    assert final["best_epoch"] == 2 and isinstance(final["test_acc_at_best_val"], float)  # the last epoch counts
    metrics = [_strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["val_loss"], m["val_acc"]) for m in metrics] == [(None, None)] * 2
    assert all(isinstance(m["test_acc"], float) for m in metrics)
    for name in ("config.json", "omegas.json", "equivariance.json"):
        _strict_json((out / name).read_text())
    # the readers take null as no value: the report shows a dash where the accuracy is undefined
    assert cli.report_main([str(out), "--out", str(tmp_path / "rep")]) == 0
    row = [line for line in (tmp_path / "rep" / "results.md").read_text().splitlines() if line.startswith("| r |")]
    cells = [c.strip() for c in row[0].split("|")]
    assert cells[10] == "–" and cells[11] == f"{final['test_acc_at_best_val']:.2f}", row


def test_json_run_files_hold_null_for_every_non_finite_number(tmp_path):
    from relaxedconv.training.checkpoint import atomic_write_json, json_text

    doc = {"a": float("nan"), "b": [1.5, float("inf"), {"c": -float("inf")}], "d": (2, float("nan")), "e": "nan", "f": 0}
    atomic_write_json(tmp_path / "x.json", doc)
    assert _strict_json((tmp_path / "x.json").read_text()) == {"a": None, "b": [1.5, None, {"c": None}], "d": [2, None], "e": "nan", "f": 0}
    assert json_text(float("nan")) == "null"


def _poisoned_in_epoch(monkeypatch, bad_epoch):
    """Make the weights NaN at the start of ``bad_epoch`` (a divergence the test controls)."""
    from relaxedconv.training import trainer as trainer_mod

    real = trainer_mod.Trainer._train_epoch

    def train_epoch(self, epoch):
        if epoch == bad_epoch:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return real(self, epoch)

    monkeypatch.setattr(trainer_mod.Trainer, "_train_epoch", train_epoch)


def test_a_diverged_run_stops_with_exit_1_keeps_the_last_good_epoch_and_resumes(tmp_path, capsys, monkeypatch):
    """A run whose loss became NaN went on to the end and saved NaN weights and NaN metrics."""
    data = make_folder(tmp_path / "f", n_train=16, n_test=4)
    common = ["--dataset", "folder", "--data-dir", str(data), "--val-size", "4", "--epochs", "3", *TINY,
              "--warmup-epochs", "0", "--variant", "se2_learned"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert cli.train_main([*common, "--out", str(full)]) == 0
    capsys.readouterr()
    with monkeypatch.context() as m:
        _poisoned_in_epoch(m, 2)
        assert cli.train_main([*common, "--out", str(cut)]) == 1
    line = _one_line_error(capsys)
    assert line.startswith("relaxedconv train: training diverged in epoch 2/3: the training loss became nan"), line
    assert f"{cut} keeps the checkpoint, metrics and best.pt of epoch 1" in line
    assert "a lower --lr (this run: 0.001)" in line and "--omega-lr" in line and "another --out" in line
    # nothing of the diverged epoch was saved: the checkpoint, best.pt and the metrics are epoch 1's
    ckpt = torch.load(cut / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if torch.is_tensor(v) and v.is_floating_point())
    best = torch.load(cut / "best.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in best.values() if torch.is_tensor(v) and v.is_floating_point())
    assert [_strict_json(x)["epoch"] for x in (cut / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (cut / "final.json").exists()
    # --resume from that checkpoint continues as if nothing had happened (the divergence here was injected)
    assert cli.train_main(["--out", str(cut), "--resume", "--progress", "off"]) == 0
    a, b = torch.load(full / "checkpoint.pt", weights_only=False), torch.load(cut / "checkpoint.pt", weights_only=False)
    assert b["epoch"] == 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"] if torch.is_tensor(a["model"][k]))


def test_a_too_large_learning_rate_stops_in_the_first_epoch(tmp_path, capsys):
    """A real divergence (--lr 1e30: weights of 1e30 overflow float32 in the first steps): exit 1, one line that says what to change, no NaN checkpoint."""
    data = make_folder(tmp_path / "f", n_train=16, n_test=4)
    out = tmp_path / "r"
    assert cli.train_main(["--dataset", "folder", "--data-dir", str(data), "--out", str(out), "--val-size", "0",
                           "--epochs", "2", *TINY, "--warmup-epochs", "0", "--variant", "se2_learned", "--lr", "1e30"]) == 1
    line = _one_line_error(capsys)
    assert "training diverged in epoch 1/2" in line and "a lower --lr (this run: 1e+30)" in line
    assert f"no epoch finished, so {out} holds no checkpoint" in line
    assert not (out / "checkpoint.pt").exists() and not (out / "final.json").exists()
    assert (out / "metrics.jsonl").read_text() == ""


def test_the_python_api_refuses_unknown_keys_with_the_closest_option(tmp_path, data_never_loaded):
    """train(dict(epoch=3)) ran the default 300 epochs."""
    from relaxedconv.training.checks import ConfigError
    from relaxedconv.training.trainer import train

    with pytest.raises(ConfigError, match=r"unknown train option 'epoch' \(did you mean 'epochs'\?\)$"):
        train(dict(epoch=3, out=str(tmp_path / "r")))
    with pytest.raises(ValueError, match=r"unknown train options 'lr_rate', 'zzz' \(did you mean 'seed'\?\)|"
                                         r"unknown train options 'lr_rate', 'zzz'; the options are .*epochs"):
        train(dict(lr_rate=0.1, zzz=1, out=str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()
