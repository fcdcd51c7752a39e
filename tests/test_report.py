"""``relaxedconv report`` plots (issue 12, item 14): whole-number epoch ticks; accuracy against ω only
for a sweep (one variant at two ω's or more), not for a single run."""
from __future__ import annotations

import json

import pytest

from relaxedconv.training.report import _omega_figure, load_run, write_report

plt = pytest.importorskip("matplotlib.pyplot")


def _run_dir(root, name, *, variant="se2_learned", omega=2.0, epochs=2, learn=True, val=50.0):
    d = root / name
    d.mkdir(parents=True)
    model = dict(variant=variant, group_order=8, omega_rot=omega, omega_pos=0.0, learn_omega=learn)
    (d / "config.json").write_text(json.dumps({"config": {"epochs": epochs}, "model": model, "parameters": 10}))
    hist = [dict(epoch=e, val_acc=val, omegas={"lift": {"rel": 10.0, "rot": omega - 0.1 * e}}) for e in range(1, epochs + 1)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hist))
    final = dict(omegas=hist[-1]["omegas"], equivariance_error={}, best_val_acc=val, test_acc_at_best_val=None if val is None else val - 1,
                 best_epoch=epochs)
    (d / "final.json").write_text(json.dumps(final))
    return d


@pytest.mark.parametrize("epochs", [2, 3, 7])
def test_omega_plot_has_whole_epoch_ticks(tmp_path, epochs):
    run = load_run(_run_dir(tmp_path, "r", epochs=epochs))
    fig = _omega_figure([run], plt)
    try:
        fig.canvas.draw()
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
    finally:
        plt.close(fig)


def test_accuracy_vs_omega_only_for_a_sweep(tmp_path):
    single = tmp_path / "single"
    _run_dir(single, "se2_learned")
    _run_dir(single, "se2", variant="se2", omega=0.0, learn=False)  # other variants do not make a sweep
    names = [p.name for p in write_report([single], tmp_path / "rep1")]
    assert "accuracy_vs_omega.png" not in names and "omega_per_layer.png" in names
    assert "accuracy_vs_omega" not in (tmp_path / "rep1" / "results.md").read_text()

    sweep = tmp_path / "sweep"
    _run_dir(sweep, "rot0", variant="se2_rot", omega=0.0, learn=False, val=40.0)
    _run_dir(sweep, "rot2", variant="se2_rot", omega=2.0, learn=False, val=45.0)
    names = [p.name for p in write_report([sweep], tmp_path / "rep2")]
    assert "accuracy_vs_omega.png" in names and "omega_per_layer.png" not in names  # fixed omegas: no curves
    assert (tmp_path / "rep2" / "accuracy_vs_omega.png").stat().st_size > 0


def test_null_values_are_no_value(tmp_path):
    """The trainer writes null for an undefined number (no validation split, an undefined omega); the
    report read only NaN as missing, and max() over a history of nulls raised a TypeError."""
    d = _run_dir(tmp_path, "noval", epochs=2, val=None)
    (d / "final.json").unlink()  # an unfinished run: the best validation accuracy comes from the history
    hist = [dict(epoch=e, val_acc=None, test_acc=30.0, omegas={"lift": {"rel": 10.0, "rot": None}}) for e in (1, 2)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hist))
    sweep = tmp_path / "sweep"
    _run_dir(sweep, "rot0", variant="se2_rot", omega=0.0, learn=False, val=None)
    _run_dir(sweep, "rot2", variant="se2_rot", omega=2.0, learn=False, val=45.0)
    write_report([tmp_path], tmp_path / "rep")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in (tmp_path / "rep" / "results.md").read_text().splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["noval"][4] == "–" and rows["noval"][9] == "–"  # final ω_rot, val acc
    assert rows["sweep/rot0"][9] == "–" and rows["sweep/rot0"][10] == "–" and rows["sweep/rot2"][9] == "45.00"
