"""`relaxedconv train`: the omegas' own optimiser group (--omega-lr, no weight decay), effective omegas
in metrics.jsonl / omegas.json / final.json, and the architecture and Monte-Carlo options."""
from __future__ import annotations

import json

import torch

from relaxedconv.training import cli
from test_training import TINY, make_folder  # the tiny image-folder task of the training tests


def test_omegas_get_their_own_group_and_are_reported(tmp_path):
    data = make_folder(tmp_path / "f", n_train=32, n_test=8)
    out = tmp_path / "run"
    argv = ["--dataset", "folder", "--data-dir", str(data), "--out", str(out), "--val-size", "8",
            "--variant", "se2_learned", "--omega-rot", "0.5", "--epochs", "2", "--weight-decay", "0.01",
            "--omega-lr", "0.05", "--warmup-epochs", "0", *TINY]
    assert cli.train_main(argv) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    groups = {g["name"]: g for g in state["optimizer"]["param_groups"]}
    assert set(groups) == {"weights", "omegas"}
    assert groups["omegas"]["initial_lr"] == 0.05 and groups["omegas"]["weight_decay"] == 0.0
    assert groups["weights"]["initial_lr"] == 1e-3 and groups["weights"]["weight_decay"] == 0.01
    omega_keys = [k for k in state["model"] if k.endswith("omega_rot")]
    assert len(groups["omegas"]["params"]) == len(omega_keys) > 0

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    eff = lines[-1]["effective_omegas"]
    assert eff and all(v["rot"] == abs(lines[-1]["omegas"][k]["rot"]) for k, v in eff.items())
    assert set(lines[-1]["kernel_nonstationarity"]) == set(eff)
    assert any(abs(v["rot"] - 0.5) > 1e-3 for v in eff.values())  # they learned at their own rate
    saved = json.loads((out / "omegas.json").read_text())
    assert set(saved) == {"omegas", "effective_omegas", "kernel_nonstationarity"}
    final = json.loads((out / "final.json").read_text())
    assert final["effective_omegas"] == saved["effective_omegas"]
    assert all(0.0 <= v["rot"] <= 1.0 for v in saved["kernel_nonstationarity"].values())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["omega_lr"] == 0.05 and cfg["model"]["architecture"] == "authors"
    report = tmp_path / "rep"
    assert cli.report_main([str(out), "--out", str(report)]) == 0
    assert "effective ω rot / pos" in (report / "results.md").read_text()


def test_architecture_and_mc_rotation_options(tmp_path):
    data = make_folder(tmp_path / "f", n_train=16, n_test=8)
    out = tmp_path / "run"
    argv = ["--dataset", "folder", "--data-dir", str(data), "--out", str(out), "--val-size", "8", "--variant", "se2",
            "--epochs", "1", "--architecture", "simple", "--mc-rotation", "on", *TINY]
    assert cli.train_main(argv) == 0
    model = json.loads((out / "config.json").read_text())["model"]
    assert model["architecture"] == "simple" and model["mc_rotation"] is True
