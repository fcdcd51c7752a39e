"""The controlled-symmetry task (relaxedconv.synthetic) and its experiment runner."""
from __future__ import annotations

import json

import pytest
import torch

from relaxedconv import symmetry_experiment as se
from relaxedconv.models import build_model
from relaxedconv.synthetic import SymmetryTask, class_angles_deg, glyphs, make_split

CLEAN = dict(angle_spread=0.0, noise=0.0, max_shift=0.0, scale=(1.0, 1.0), size=16)


def test_splits_are_seeded_and_shaped():
    task = SymmetryTask(orientation_fraction=0.5)
    x, y = make_split(task, 200, seed=3)
    assert x.shape == (200, 1, 20, 20) and x.dtype == torch.float32 and y.shape == (200,)
    assert set(y.tolist()) == {0, 1, 2, 3}
    x2, y2 = make_split(task, 200, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(make_split(task, 200, seed=4)[0], x)
    assert class_angles_deg(task) == [0.0, 180.0, None, None]
    assert class_angles_deg(SymmetryTask(orientation_fraction=1.0)) == [0.0, 90.0, 180.0, 270.0]
    assert glyphs(task).shape[0] == 3 and glyphs(SymmetryTask(orientation_fraction=0.0)).shape[0] == 4


def _by_class(task, n=64, seed=0):
    x, y = make_split(task, n, seed)
    return {c: x[y == c][0] for c in range(task.num_classes)}


def test_orientation_classes_are_quarter_turns_of_one_glyph():
    """At fraction 1 (clean images) class j is exactly class 0 turned j quarter turns: the label is an
    orientation and nothing else."""
    img = _by_class(SymmetryTask(orientation_fraction=1.0, **CLEAN))
    for j in (1, 2, 3):
        assert torch.allclose(img[j], torch.rot90(img[0], j, dims=(-2, -1)), atol=1e-5)
    # at fraction 0 the classes are different glyphs: no quarter turn maps one onto another
    free = _by_class(SymmetryTask(orientation_fraction=0.0, **CLEAN), n=400)
    for a in range(4):
        for b in range(a + 1, 4):
            for q in range(4):
                assert (free[a] - torch.rot90(free[b], q, dims=(-2, -1))).abs().max() > 0.5


def test_a_strict_model_cannot_tell_the_orientation_classes_apart():
    """So a strict SE(2)-4 model is at chance on the fully orientation-labelled task, by construction."""
    torch.manual_seed(0)
    model = build_model("se2", num_classes=4, in_channels=1, group_order=4, widths=(4,), kernel_size=3,
                        hidden_channels=8).eval()
    img = _by_class(SymmetryTask(orientation_fraction=1.0, **CLEAN))
    with torch.no_grad():
        logits = model(torch.stack([img[c] for c in range(4)]))
    assert torch.allclose(logits, logits[:1].expand(4, -1), atol=1e-5)


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="orientation_fraction"):
        SymmetryTask(orientation_fraction=1.5)
    with pytest.raises(ValueError, match="one orientation class"):
        SymmetryTask(orientation_fraction=0.25)
    with pytest.raises(ValueError, match="size"):
        SymmetryTask(size=4)


def test_smoke_protocol_writes_results_and_resumes(tmp_path, capsys):
    out = tmp_path / "sym"
    summary = se.run_protocol("smoke", out, jobs=1, threads=1, log=lambda *a: None)
    p = se.PROTOCOLS["smoke"]
    names = list(se.variants(p))
    assert names == ["t2", "strict", "fixed_1", "learned_from0", "learned_from0_penalty"]
    runs = sorted(out.glob("runs/*/*/seed*.json"))
    assert len(runs) == len(p["fractions"]) * len(p["seeds"]) * len(names)
    rec = json.loads(runs[0].read_text())
    for key in ("test_acc_at_best_val", "best_val_acc", "effective_omega_mean", "effective_omegas", "history"):
        assert key in rec
    rows = {(r["fraction"], r["variant"]): r for r in summary["rows"]}
    # the strict model is exactly rotation-invariant; fixed omega stays put; learned omega moved
    assert rows[(0.0, "strict")]["logit_rotation_90_error"][0] < 1e-4
    assert rows[(0.0, "fixed_1")]["effective_omega"] == (1.0, 0.0)
    assert rows[(1.0, "learned_from0")]["effective_omega"][0] > 0
    assert rows[(1.0, "cv_fixed")]["selected_omega"][0] in (0.0, 1.0)
    assert {c["criterion"].split(":")[0] for c in summary["checks"]} >= {"learned_from0", "learned_from0_penalty"}
    md = (out / "results.md").read_text()
    assert "## Issue 11 acceptance checks" in md and "| learned_from0 |" in md
    assert (out / "summary.json").is_file()
    # a rerun finds every run done and trains nothing
    lines = []
    se.run_protocol("smoke", out, jobs=1, threads=1, log=lines.append)
    assert lines[0].startswith(f"symmetry[smoke]: {len(runs)} runs done, 0 to run")
    # the report can be rebuilt from the run files alone
    (out / "results.md").unlink()
    assert se.main(["--protocol", "smoke", "--out", str(out), "--summarise-only"]) == 0
    assert "## Issue 11 acceptance checks" in (out / "results.md").read_text()
    assert se.main(["--protocol", "smoke", "--out", str(tmp_path / "empty"), "--summarise-only"]) == 2


def test_time_budget_stops_starting_runs(tmp_path):
    lines = []
    summary = se.run_protocol("smoke", tmp_path / "b", jobs=1, threads=1, log=lines.append, time_budget=0.0,
                              overrides=dict(fractions=(0.0,), seeds=(0,)))
    assert any("time budget spent; 5 runs not started" in x for x in lines)
    assert not list((tmp_path / "b").glob("runs/*/*/*.json")) and summary["rows"] == []


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        se.main(["--protocol", "nope", "--out", "x"])
    with pytest.raises(SystemExit):
        se.main(["--out", "x", "--jobs", "0"])


@pytest.mark.parametrize("options, message", [
    (["--seeds", ","], "--seeds: no seed in ','"),  # ran nothing and wrote an empty report
    (["--seeds", ""], "--seeds: no seed in ''"),
    (["--time-budget", "-5"], "--time-budget must be a number of seconds >= 0, got -5.0"),
    (["--time-budget", "nan"], "--time-budget must be a number of seconds >= 0, got nan"),
])
def test_cli_refuses_options_that_would_run_nothing(tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as e:
        se.main(["--protocol", "smoke", "--out", str(tmp_path / "o"), "--jobs", "1", *options])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_out_that_cannot_be_a_folder_exits_2(tmp_path, capsys):
    """--out naming a file (or an unwritable place) ended in a mkdir traceback."""
    f = tmp_path / "file"
    f.write_text("x")
    assert se.main(["--protocol", "smoke", "--out", str(f), "--jobs", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"relaxedconv symmetry: --out {f} is a file, not a directory" in err


def test_spawned_workers_make_their_own_data(tmp_path):
    """The GPU protocol's path: spawned worker processes (CUDA does not survive a fork) generate the
    splits themselves and give the same runs as the in-process path."""
    ov = dict(fractions=(1.0,), seeds=(0,), fixed_omegas=(), learned_starts=())
    a = se.run_protocol("smoke", tmp_path / "a", jobs=2, threads=1, log=lambda *x: None, overrides=ov, start_method="spawn")
    b = se.run_protocol("smoke", tmp_path / "b", jobs=1, threads=1, log=lambda *x: None, overrides=ov)
    acc = lambda s: {r["variant"]: r["test_acc"] for r in s["rows"]}  # noqa: E731
    assert acc(a) == acc(b) and set(acc(a)) == {"t2", "strict", "cv_fixed"}


def test_ctrl_c_keeps_the_finished_runs_and_says_how_to_finish(tmp_path, capsys, monkeypatch):
    """Ctrl-C ended the command with a KeyboardInterrupt traceback (one per pool worker, too); it must
    exit 130 with one message, keep the finished runs, and a rerun must finish the protocol."""
    out = tmp_path / "sym"
    real, calls = se.run_one, []

    def interrupted_third(*a, **k):
        calls.append(a[3])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(se, "run_one", interrupted_third)
    assert se.main(["--protocol", "smoke", "--out", str(out), "--jobs", "1", "--seeds", "0"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"interrupted; the 2 finished run(s) in {out / 'runs'} are kept: rerun the same command" in err
    assert len(list(out.glob("runs/*/*/seed*.json"))) == 2
    monkeypatch.setattr(se, "run_one", real)
    assert se.main(["--protocol", "smoke", "--out", str(out), "--jobs", "1", "--seeds", "0"]) == 0
    assert "symmetry[smoke]: 2 runs done, 8 to run" in capsys.readouterr().out
    assert len(list(out.glob("runs/*/*/seed*.json"))) == 10


def test_pool_workers_leave_ctrl_c_to_the_parent():
    import multiprocessing as mp
    import signal

    with mp.get_context("fork").Pool(1, initializer=se._ignore_sigint) as pool:
        assert pool.apply(signal.getsignal, (signal.SIGINT,)) == signal.SIG_IGN


def test_a_folder_holds_one_protocol(tmp_path, capsys):
    """Run files are named by fraction, variant and seed only: the cpu protocol run into a smoke
    protocol's folder reported the smoke runs (other data sizes, model, epochs) as its own."""
    out = tmp_path / "sym"
    ov = dict(fractions=(1.0,), fixed_omegas=(), learned_starts=())
    assert se.main(["--protocol", "smoke", "--out", str(out), "--jobs", "1", "--seeds", "0"]) == 0
    capsys.readouterr()
    for argv in (["--protocol", "cpu", "--out", str(out), "--jobs", "1", "--seeds", "0", "--time-budget", "0"],
                 ["--protocol", "cpu", "--out", str(out), "--summarise-only"]):
        assert se.main(argv) == 2
        err = capsys.readouterr().err
        assert f"{out} holds runs of protocol 'smoke'; give another --out" in err and "Traceback" not in err
    with pytest.raises(se.ProtocolMismatch, match="protocol 'smoke' with other settings"):
        se.run_protocol("smoke", out, jobs=1, log=lambda *a: None, overrides=ov)
    # the same protocol again (other seeds included) is the same folder
    assert se.main(["--protocol", "smoke", "--out", str(out), "--jobs", "1", "--seeds", "0", "--time-budget", "0"]) == 0


def test_the_plot_of_a_partial_protocol(tmp_path):
    """A protocol stopped by --time-budget or Ctrl-C has some fractions of a variant only; the plot's
    per-layer panel passed None to errorbar and the summary ended in a ValueError traceback."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "sym"
    ov = dict(fractions=(0.0, 1.0), seeds=(0,), fixed_omegas=(), learned_starts=(0.0,))
    se.run_protocol("smoke", out, jobs=1, log=lambda *a: None, overrides=ov)
    (out / "runs" / "fraction1" / "learned_from0_penalty" / "seed0.json").unlink()
    (out / "symmetry.png").unlink()
    se.summarise_folder("smoke", out, overrides=ov, log=lambda *a: None)
    assert (out / "symmetry.png").stat().st_size > 0


def test_run_files_hold_null_for_undefined_numbers_and_the_summary_skips_them(tmp_path, monkeypatch):
    """A diverged run's NaN (loss, equivariance error, omegas) was written as NaN, which is not JSON."""
    p = se.PROTOCOLS["smoke"]
    nan = float("nan")
    rec = {"fraction": 0.0, "seed": 0, "variant": "learned_from0", "spec": {}, "best_epoch": 1, "best_val_acc": 25.0,
           "test_acc_at_best_val": 25.0, "final_val_acc": 25.0, "final_test_acc": 25.0, "effective_omega_mean": nan,
           "effective_omegas": {"lift": nan, "head": 0.5}, "effective_omega_mean_at_best_val": nan,
           "kernel_nonstationarity": {"lift": nan, "head": 0.25}, "logit_rotation_90_error_at_best_val": nan,
           "seconds": 1.0, "cpu_seconds": 1.0, "history": [{"epoch": 1, "train_loss": nan}]}
    monkeypatch.setattr(se, "run_one", lambda *a, **k: rec)
    monkeypatch.setattr(se, "_data", lambda *a: None)
    se._worker((p, 0.0, 0, "learned_from0", str(tmp_path), 1, "cpu", None))
    path = se._run_path(tmp_path, 0.0, "learned_from0", 0)
    back = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in {path.name}"))
    assert back["effective_omega_mean"] is None and back["history"][0]["train_loss"] is None
    row = {r["variant"]: r for r in se.summarise([back], p)["rows"]}["learned_from0"]
    assert row["effective_omega"] == (None, None) and row["logit_rotation_90_error"] == (None, None)
    assert row["kernel_nonstationarity"] == (0.25, 0.0) and row["effective_omega_per_layer"]["head"] == (0.5, 0.0)
    assert row["effective_omega_per_layer"]["lift"] == (None, None)
