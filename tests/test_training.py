"""relaxedconv train / sweep / report on tiny generated data, in both directory layouts.

Real properties: the 45k/5k split is a seeded partition; missing or malformed data names the path
and the expected layout; an interrupted run resumed from its checkpoint ends with bit-identical
weights to an uninterrupted one; the report tabulates every run.
"""
import json
import pickle

import numpy as np
import pytest
import torch

from relaxedconv import dispatch
from relaxedconv.training import cli
from relaxedconv.training.data import DatasetError, augment, load_dataset, split_indices
from relaxedconv.training.checks import check_config
from relaxedconv.training.trainer import DEFAULTS, Interrupted, train

TINY = ["--group-order", "4", "--widths", "4,8", "--kernel-size", "3", "--hidden-channels", "8",
        "--batch-size", "8", "--eval-batch-size", "16", "--warmup-epochs", "1", "--progress", "off"]


# ---- generated data in each layout ------------------------------------------------------------
def _images(rng, n, size):
    """Images whose label is recoverable (a bright quadrant), so training has something to learn."""
    y = rng.permutation(np.arange(n) % 4)  # every class present in every split
    x = rng.integers(0, 80, (n, size, size, 3)).astype(np.uint8)
    h = size // 2
    for i, c in enumerate(y):
        r, col = divmod(int(c), 2)
        x[i, r * h : (r + 1) * h, col * h : (col + 1) * h] += 150
    return x, y


def make_cifar10(root, per_batch=8, test=16, seed=0):
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)

    def dump(name, n):
        x, y = _images(rng, n, 32)
        data = x.transpose(0, 3, 1, 2).reshape(n, 3072)
        # the official files are Python-2 pickles with bytes keys
        with open(d / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [int(v) for v in y], b"batch_label": b"x"}, f)

    for i in range(1, 6):
        dump(f"data_batch_{i}", per_batch)
    dump("test_batch", test)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, f)
    return root


def make_cifar100(root, n=20, seed=0):
    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for name, m in (("train", n), ("test", n // 2)):
        x, _ = _images(rng, m, 32)
        fine = rng.integers(0, 100, m)
        with open(d / name, "wb") as f:
            pickle.dump({"data": x.transpose(0, 3, 1, 2).reshape(m, 3072), "fine_labels": list(map(int, fine)),
                         "coarse_labels": list(map(int, fine // 5))}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]}, f)
    return root


def make_folder(root, n_train=40, n_test=12, size=16, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = _images(rng, n, size)
        for i, (img, c) in enumerate(zip(x, y)):
            p = root / split / f"class{c}"
            p.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(p / f"{i:04d}.png")
    return root


# ---- the split --------------------------------------------------------------------------------
def test_split_is_a_seeded_partition():
    tr, va = split_indices(50_000, 5000, seed=0)
    assert len(tr) == 45_000 and len(va) == 5000
    assert len(set(tr.tolist()) | set(va.tolist())) == 50_000
    assert not set(tr.tolist()) & set(va.tolist())
    tr2, va2 = split_indices(50_000, 5000, seed=0)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    _, va3 = split_indices(50_000, 5000, seed=1)
    assert not torch.equal(va, va3)
    with pytest.raises(ValueError):
        split_indices(10, 10, seed=0)


# ---- reading each layout, and the errors ------------------------------------------------------
def test_reads_cifar10_batches_cifar100_and_folders(tmp_path):
    d = load_dataset("cifar10", make_cifar10(tmp_path / "c10"))
    assert d.train_images.shape == (40, 32, 32, 3) and d.test_images.shape == (16, 32, 32, 3)
    assert d.classes[0] == "class0" and d.num_classes == 10
    d = load_dataset("cifar100", make_cifar100(tmp_path / "c100"))
    assert d.num_classes == 100 and d.train_images.shape == (20, 32, 32, 3) and d.train_labels.max() < 100
    d = load_dataset("cifar100", tmp_path / "c100", label_type="coarse")
    assert d.num_classes == 20
    d = load_dataset("folder", make_folder(tmp_path / "f"))
    assert d.train_images.shape == (40, 16, 16, 3) and d.test_images.shape == (12, 16, 16, 3)
    assert d.classes == sorted(d.classes)
    # an image-folder tree also serves --dataset cifar10 when it has 10 classes; here 4: refused clearly
    with pytest.raises(DatasetError, match="4 classes is not cifar10"):
        load_dataset("cifar10", tmp_path / "f")


def test_missing_or_malformed_data_says_what_was_expected_where(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10", missing)
    msg = str(e.value)
    assert str(missing) in msg and "does not exist" in msg
    assert "data_batch_1" in msg and "cifar-10-batches-py" in msg and "train" in msg and "--download" in msg

    root = make_cifar10(tmp_path / "c10")
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match=r"incomplete cifar10 python batches, missing \['data_batch_3'\]"):
        load_dataset("cifar10", root)

    with open(root / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4}, f)
    with pytest.raises(DatasetError, match=r"data_batch_3: 'data' must be uint8 of shape \(N, 3072\)"):
        load_dataset("cifar10", root)
    with open(root / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({"data": np.zeros((4, 3072), np.uint8)}, f)
    with pytest.raises(DatasetError, match=r"data_batch_3: missing key\(s\) \['labels'\]"):
        load_dataset("cifar10", root)
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="could not read .*data_batch_3"):
        load_dataset("cifar10", root)

    c100 = make_cifar100(tmp_path / "c100")
    with open(c100 / "cifar-100-python" / "train", "wb") as f:
        pickle.dump({"data": np.zeros((4, 3072), np.uint8), "labels": [0] * 4}, f)
    with pytest.raises(DatasetError, match=r"missing key\(s\) \['fine_labels'\]"):
        load_dataset("cifar100", c100)

    f = make_folder(tmp_path / "f", n_train=8, n_test=8)
    with pytest.raises(DatasetError, match="no train/ and test/ folders"):
        load_dataset("folder", tmp_path / "f" / "train")
    extra = f / "test" / "zebra"
    extra.mkdir()
    with pytest.raises(DatasetError, match=r"class folders differ .*extra \['zebra'\]"):
        load_dataset("folder", f)
    extra.rmdir()
    from PIL import Image

    odd = next((f / "train").iterdir()) / "odd.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(odd)
    with pytest.raises(DatasetError, match="odd.png: size 8x8 differs from 16x16"):
        load_dataset("folder", f)
    odd.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="odd.png: not a readable image"):
        load_dataset("folder", f)
    odd.unlink()
    # the odd image read first sets the size; the message names it, not only the normal image after it
    first = next((f / "train").iterdir()) / "-first.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(first)
    with pytest.raises(DatasetError, match=r"differs from 8x8 \(the size of .*-first\.png, the first image read\)"):
        load_dataset("folder", f)


def test_a_folder_tree_of_one_class_is_refused(tmp_path):
    """One class folder (e.g. --data-dir one level too deep) trained to a meaningless 100% accuracy."""
    f = make_folder(tmp_path / "f", n_train=8, n_test=8)
    for split in ("train", "test"):
        for d in sorted((f / split).iterdir())[1:]:
            for img in d.iterdir():
                img.unlink()
            d.rmdir()
    with pytest.raises(DatasetError, match=r"train: one class folder \(class0\); a classifier needs two or more"):
        load_dataset("folder", f)


def test_the_wrong_dataset_option_names_the_right_one(tmp_path):
    """The data were there but --dataset (default cifar10) named another kind: the message now says which."""
    c10, c100, f = make_cifar10(tmp_path / "c10"), make_cifar100(tmp_path / "c100"), make_folder(tmp_path / "f", n_train=8, n_test=4)
    with pytest.raises(DatasetError, match="holds cifar100, not cifar10: pass --dataset cifar100"):
        load_dataset("cifar10", c100)
    with pytest.raises(DatasetError, match="holds cifar10, not cifar100: pass --dataset cifar10"):
        load_dataset("cifar100", c10)
    with pytest.raises(DatasetError, match="with 4 classes is not cifar10; for your own classes pass --dataset folder"):
        load_dataset("cifar10", f)


def test_cli_reports_missing_data_with_exit_code(tmp_path, capsys):
    rc = cli.train_main(["--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "run"), *TINY])
    assert rc == 2
    err = capsys.readouterr().err
    assert "dataset problem" in err and str(tmp_path / "none") in err and "data_batch_1" in err


def test_augment_is_a_seeded_crop_and_flip():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    # every output is a (possibly flipped) shifted window of the zero-padded input
    xp = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(2):
        windows = [xp[i, :, r : r + 8, c : c + 8] for r in range(9) for c in range(9)]
        assert any(torch.equal(a[i], w) or torch.equal(a[i], w.flip(-1)) for w in windows)


# ---- training, resume, sweep, report ----------------------------------------------------------
def _state(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)


def test_short_train_run_writes_the_run_directory(tmp_path):
    data = make_folder(tmp_path / "f")
    out = tmp_path / "run"
    rc = cli.train_main(["--dataset", "folder", "--data-dir", str(data), "--out", str(out), "--val-size", "8",
                         "--variant", "se2_rot", "--epochs", "2", *TINY])
    assert rc == 0
    for f in ("config.json", "metrics.jsonl", "checkpoint.pt", "best.pt", "final.json", "omegas.json", "equivariance.json"):
        assert (out / f).is_file(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["variant"] == "se2_rot" and cfg["data"]["train"] == 32 and cfg["data"]["val"] == 8
    assert cfg["environment"]["commit"] and "device" in cfg["environment"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    # every layer but the authors' (always stationary) shortcuts is non-stationary in rotation
    assert all("rot" in om for name, om in lines[0]["omegas"].items() if not name.endswith("shortcut"))
    assert set(lines[0]["effective_omegas"]) == {name for name, om in lines[0]["omegas"].items() if "rot" in om}
    final = json.loads((out / "final.json").read_text())
    assert final["best_epoch"] in (1, 2) and final["test_acc_at_best_val"] is not None
    # which backend each layer ran (issue 10): CPU, static rule, translation-stationary layers
    assert final["backends"] and set(final["backends"].values()) <= set(dispatch.BACKENDS) - {"auto"}
    if not torch.cuda.is_available():  # the static rule; on a GPU auto times the backends and may differ
        assert set(final["backends"].values()) == {"expand_conv"}
    assert set(final["backends"]) == set(final["omegas"])
    eq = json.loads((out / "equivariance.json").read_text())
    assert set(eq) == set(final["omegas"]) and eq["lift"]["rotation_90"] > 1e-4  # non-stationary: not equivariant
    # running into an existing run directory without --resume is refused
    assert cli.train_main(["--dataset", "folder", "--data-dir", str(data), "--out", str(out), *TINY]) == 2


def test_compile_option_compiles_the_training_model(tmp_path, monkeypatch):
    """--compile MODE wraps the training model in torch.compile(mode=MODE); the compiler backend is
    swapped for dynamo's "eager" here (inductor would take minutes on this CPU; tests/test_compile.py
    checks compiled outputs)."""
    calls = []
    real_compile = torch.compile

    def compile_spy(model, mode=None, **kw):
        calls.append((type(model).__name__, mode))
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_spy)
    data = make_folder(tmp_path / "f", n_train=16, n_test=8)
    out = tmp_path / "run"
    rc = cli.train_main(["--dataset", "folder", "--data-dir", str(data), "--out", str(out), "--val-size", "8",
                         "--variant", "se2", "--epochs", "1", "--compile", "reduce-overhead", *TINY])
    assert rc == 0 and calls == [("CKResNet", "reduce-overhead")]
    assert json.loads((out / "config.json").read_text())["config"]["compile"] == "reduce-overhead"
    assert json.loads((out / "final.json").read_text())["epochs"] == 1


@pytest.mark.parametrize("variant", ["se2_learned", "partial"])
def test_resume_after_interruption_gives_identical_weights(tmp_path, variant):
    data = make_folder(tmp_path / "f", n_train=32, n_test=8)
    common = ["--dataset", "folder", "--data-dir", str(data), "--val-size", "8", "--variant", variant,
              "--epochs", "3", "--omega-penalty", "0.01", "--deterministic", *TINY]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert cli.train_main([*common, "--out", str(full)]) == 0
    # 3 steps per epoch: stop in the middle of epoch 2 (after its checkpoint of epoch 1)...
    assert cli.train_main([*common, "--out", str(cut), "--interrupt-after-steps", "5"]) == 130
    assert _state(cut)["epoch"] == 1
    assert len((cut / "metrics.jsonl").read_text().splitlines()) == 1
    # the report reads an unfinished run too (no final.json yet)
    assert cli.report_main([str(cut), "--out", str(tmp_path / "rep")]) == 0
    assert "| 1/3 |" in (tmp_path / "rep" / "results.md").read_text()
    # ...and continue with the bare resume command
    assert cli.train_main(["--out", str(cut), "--resume", "--progress", "off"]) == 0
    a, b = _state(full), _state(cut)
    assert a["epoch"] == b["epoch"] == 3
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        if k.endswith("_extra_state"):  # the layers' lattice records (dicts)
            assert a["model"][k] == b["model"][k], k
        else:
            assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in p.read_text().splitlines()]  # noqa: E731
    assert strip(full / "metrics.jsonl") == strip(cut / "metrics.jsonl")
    # a resume that would change the computation is refused
    with pytest.raises(SystemExit):
        cli.train_main(["--out", str(cut), "--resume", "--lr", "0.5"])


def test_cifar10_layout_trains_through_the_cli_and_sweep_and_report(tmp_path, capsys):
    data = make_cifar10(tmp_path / "c10")
    runs = tmp_path / "runs"
    rc = cli.sweep_main(["--variant", "se2_rot", "--omega-rot-grid", "0,2", "--out", str(runs / "sweep"), "--",
                         "--data-dir", str(data), "--val-size", "8", "--epochs", "1", "--widths", "4", "--learn-omega", *TINY])
    assert rc == 0
    sweep = json.loads((runs / "sweep" / "sweep.json").read_text())
    assert [r["omega_rot"] for r in sweep["grid"]] == [0.0, 2.0]
    assert sweep["selected"]["best_val_acc"] == max(r["best_val_acc"] for r in sweep["grid"])
    # rerunning the sweep finds the finished runs
    assert cli.sweep_main(["--variant", "se2_rot", "--omega-rot-grid", "0,2", "--out", str(runs / "sweep"), "--",
                           "--data-dir", str(data), "--val-size", "8", "--epochs", "1", "--widths", "4", "--learn-omega", *TINY]) == 0
    assert capsys.readouterr().out.count("already done") == 2
    assert cli.train_main(["--data-dir", str(data), "--out", str(runs / "t2"), "--variant", "t2", "--val-size", "8",
                           "--epochs", "1", "--widths", "4", *TINY]) == 0
    assert cli.report_main([str(runs), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 3
    assert any("| t2 | 1 |" in r for r in rows) and sum("se2_rot" in r for r in rows) == 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in md
    else:
        assert (tmp_path / "rep" / "omega_per_layer.png").stat().st_size > 0
        assert (tmp_path / "rep" / "accuracy_vs_omega.png").stat().st_size > 0
    assert cli.report_main([str(tmp_path / "empty_nothing")]) == 2


def test_an_interrupted_sweep_exits_130_and_its_rerun_finishes_it(tmp_path, capsys):
    """Ctrl-C in a sweep's run printed a KeyboardInterrupt traceback; it must say how to continue, and
    rerunning the same sweep must resume the interrupted run and end as an uninterrupted sweep."""
    data = make_folder(tmp_path / "f", n_train=16, n_test=8)

    def sweep(out, *extra):
        return cli.sweep_main(["--variant", "se2_rot", "--omega-rot-grid", "0,2", "--out", str(out), "--",
                               "--dataset", "folder", "--data-dir", str(data), "--val-size", "8", "--epochs", "4",
                               "--augment", "off", *TINY, *extra])

    assert sweep(tmp_path / "whole") == 0
    # 8 training images, batch 8: one step per epoch; the first run stops in its third epoch
    assert sweep(tmp_path / "cut", "--interrupt-after-steps", "3") == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"interrupted in {tmp_path / 'cut' / 'se2_rot_rot0'}" in err
    assert "rerun the same sweep command to continue" in err
    assert sweep(tmp_path / "cut") == 0
    assert "resuming" in capsys.readouterr().out
    whole, cut = (json.loads((tmp_path / d / "sweep.json").read_text()) for d in ("whole", "cut"))
    assert cut == whole


def test_a_sweep_without_a_validation_split_is_refused(tmp_path, capsys):
    """With --val-size 0 every run's validation accuracy is NaN and the 'selected' omega was the first one."""
    data = make_folder(tmp_path / "f", n_train=16, n_test=8)
    assert cli.sweep_main(["--variant", "se2_rot", "--omega-rot-grid", "0,2", "--out", str(tmp_path / "s"), "--",
                           "--dataset", "folder", "--data-dir", str(data), "--val-size", "0", "--epochs", "1", *TINY]) == 2
    err = capsys.readouterr().err
    assert "--val-size 0 leaves no validation split to select omega on" in err and "Traceback" not in err
    assert not (tmp_path / "s" / "sweep.json").exists()


@pytest.mark.parametrize("grid, message", [
    # the second point's omega is invalid: refused before the first point trains (was: after it)
    (["--variant", "se2_rot", "--omega-rot-grid", "1,-1"], "se2_rot_rotm1: --omega-rot: omega_rot must be >= 0, got -1.0"),
    (["--variant", "se2_rot", "--omega-rot-grid", "1,2", "--", "--epochs", "0"], "--epochs must be >= 1, got 0"),
    # a grid the variant does not use trained the same model at every point and 'selected' the first
    (["--variant", "se2_rot", "--omega-pos-grid", "0,1"], "--omega-pos-grid: variant se2_rot has no translation non-stationarity"),
    (["--variant", "se2_trans", "--omega-rot-grid", "0,1"], "--omega-rot-grid: variant se2_trans has no rotation non-stationarity"),
])
def test_a_sweep_checks_every_grid_point_before_training(tmp_path, capsys, grid, message):
    data = make_folder(tmp_path / "f", n_train=16, n_test=8)
    extra = grid[grid.index("--") + 1:] if "--" in grid else []
    grid = grid[: grid.index("--")] if "--" in grid else grid
    argv = [*grid, "--out", str(tmp_path / "s"), "--", "--dataset", "folder", "--data-dir", str(data), "--val-size", "8",
            "--epochs", "1", *TINY, *extra]
    try:
        rc = cli.sweep_main(argv)
    except SystemExit as e:  # argparse's error: exit 2 with usage
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()  # nothing trained, no folder left behind


def test_training_learns_the_generated_task(tmp_path):
    """Not a smoke test only: on the quadrant task a T(2) model gets well above chance (25%)."""
    data = make_folder(tmp_path / "f", n_train=96, n_test=32, size=8)
    final = train(dict(dataset="folder", data_dir=str(data), out=str(tmp_path / "r"), variant="t2", widths=[8],
                       kernel_size=3, hidden_channels=8, epochs=6, batch_size=16, warmup_epochs=1, lr=1e-2,
                       val_size=16, augment=False, progress="off"))
    assert final["test_acc_at_best_val"] > 50


def test_interrupted_is_a_keyboard_interrupt():
    assert issubclass(Interrupted, KeyboardInterrupt)


def test_torchrun_ddp_runs_the_same_command(tmp_path):
    """DDP on CPU (gloo) with two processes: one run directory, world size 2 recorded."""
    import os
    import subprocess
    import sys

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    data = make_folder(tmp_path / "f", n_train=32, n_test=8)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "relaxedconv",
           "train", "--dataset", "folder", "--data-dir", str(data), "--out", str(out), "--val-size", "8",
           "--variant", "se2_rot", "--epochs", "1", "--device", "cpu", "--auto-policy", "measure", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["environment"]["world_size"] == 2
    final = json.loads((out / "final.json").read_text())
    assert final["epochs"] == 1
    # measured auto under DDP: rank 0 decided for both ranks (tests/test_auto_backend.py checks agreement)
    assert set(final["backends"].values()) <= {"expand_conv", "factored_torch", "materialize"}


def test_download_checks_md5_and_unpacks(tmp_path, monkeypatch):
    """--download: fetched with urllib (a file:// URL here), md5-checked, unpacked, then read."""
    import hashlib
    import tarfile

    from relaxedconv.training import data as data_mod

    src = make_cifar10(tmp_path / "src")
    archive = tmp_path / "c10.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    spec = dict(data_mod.ARCHIVES["cifar10"], url=archive.as_uri(), md5="0" * 32)
    monkeypatch.setitem(data_mod.ARCHIVES, "cifar10", spec)
    with pytest.raises(DatasetError, match="md5 .* does not match"):
        load_dataset("cifar10", tmp_path / "dl", download_missing=True, log=lambda *a: None)
    assert not list((tmp_path / "dl").glob("*.part"))
    spec["md5"] = md5
    d = load_dataset("cifar10", tmp_path / "dl", download_missing=True, log=lambda *a: None)
    assert d.train_images.shape == (40, 32, 32, 3)
    assert (tmp_path / "dl" / "cifar-10-python.tar.gz").is_file()


def test_a_resumed_run_keeps_the_backends_auto_chose_before_the_interruption(tmp_path, capsys):
    """auto times the backends (as on a GPU); the resumed process would time them differently, but
    it must continue with the backends the interrupted run computed with."""
    from relaxedconv import auto_backend

    def timer_preferring(fast):
        def timer(run, *, backend, device):
            return 0.001 if backend == fast else 1.0
        return timer

    data = make_folder(tmp_path / "f", n_train=32, n_test=8)
    cut = tmp_path / "cut"
    args = ["--dataset", "folder", "--data-dir", str(data), "--val-size", "8", "--variant", "se2", "--epochs", "2",
            "--auto-policy", "measure", *TINY, "--out", str(cut)]
    try:
        auto_backend.clear()
        auto_backend.set_timer(timer_preferring("materialize"))
        assert cli.train_main([*args, "--interrupt-after-steps", "4"]) == 130
        before = torch.load(cut / "checkpoint.pt", weights_only=False)["backends"]
        assert set(before.values()) == {"materialize"}
        auto_backend.clear()
        auto_backend.set_timer(timer_preferring("expand_conv"))  # a new process would measure anew
        assert cli.train_main(["--out", str(cut), "--resume", "--progress", "off"]) == 0
    finally:
        auto_backend.set_timer(None)
        auto_backend.clear()
        dispatch.set_auto_policy(None)
    assert json.loads((cut / "final.json").read_text())["backends"] == before
    assert "auto layers keep the backends they ran" in capsys.readouterr().out


def test_deterministic_mode_holds_for_the_run_and_is_restored(tmp_path, monkeypatch):
    from relaxedconv.training import trainer as trainer_mod

    seen = []
    real_run = trainer_mod.Trainer.run

    def run(self, resume=False):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic))
        return real_run(self, resume=resume)

    monkeypatch.setattr(trainer_mod.Trainer, "run", run)
    data = make_folder(tmp_path / "f", n_train=16, n_test=4)
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic
    common = ["--dataset", "folder", "--data-dir", str(data), "--val-size", "4", "--variant", "t2", "--epochs", "1", *TINY]
    assert cli.train_main([*common, "--out", str(tmp_path / "d"), "--deterministic"]) == 0
    assert cli.train_main([*common, "--out", str(tmp_path / "n")]) == 0
    assert seen == [(True, True), before]
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic) == before
    assert json.loads((tmp_path / "d" / "config.json").read_text())["config"]["deterministic"] is True


@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_speed_flags_hold_for_the_run_and_are_restored(deterministic):
    """TF32 and cuDNN autotuning for a GPU run only: the caller's process settings come back (a
    training test once left TF32 on for every later test in its process)."""
    from relaxedconv.training.trainer import cuda_speed_flags

    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = False
    with cuda_speed_flags(torch.device("cuda"), deterministic=deterministic):  # only flags: no GPU needed
        assert flags() == (True, True, not deterministic)
    assert flags() == (False, False, False)
    with pytest.raises(RuntimeError):
        with cuda_speed_flags(torch.device("cuda"), deterministic=False):
            raise RuntimeError("a run that fails")
    assert flags() == (False, False, False)
    with cuda_speed_flags(torch.device("cpu"), deterministic=False):
        assert flags() == (False, False, False)


def test_a_compiled_run_reports_the_backends_it_ran(tmp_path, monkeypatch, capsys):
    """Under --compile the layers cannot note their backend while traced; the run's log, checkpoint and
    final.json must still name them (they said None for every layer), the same as an eager run's."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None, **kw: real_compile(model, backend="eager"))
    data = make_folder(tmp_path / "f", n_train=16, n_test=8)
    finals = {}
    for mode in ("off", "default"):
        out = tmp_path / mode
        # se2_trans: factored_torch in the translation non-stationary layers, expand_conv in the shortcut
        assert cli.train_main(["--dataset", "folder", "--data-dir", str(data), "--out", str(out), "--val-size", "8",
                               "--variant", "se2_trans", "--epochs", "1", "--compile", mode, *TINY]) == 0
        finals[mode] = json.loads((out / "final.json").read_text())["backends"]
        assert torch.load(out / "checkpoint.pt", weights_only=False)["backends"] == finals[mode]
    log = capsys.readouterr().out
    assert "=None" not in log
    assert None not in finals["default"].values() and finals["default"] == finals["off"]
    assert len(set(finals["off"].values())) == 2  # the comparison covers both rules of the static choice
    # reduce-overhead on a CPU says what it does instead
    cfg = dict(DEFAULTS, device="cpu", compile="reduce-overhead")
    assert any("compiles as --compile default" in w for w in check_config(cfg))


@pytest.mark.parametrize("damage", ["config.json", "metrics.jsonl", "final.json", "foreign"])
def test_report_leaves_out_an_unreadable_run_and_says_so(tmp_path, capsys, damage):
    """A damaged file in one run directory (or another tool's config.json + metrics.jsonl) stopped the
    whole report with a JSONDecodeError/KeyError traceback."""
    data = make_folder(tmp_path / "f", n_train=16, n_test=4)
    runs = tmp_path / "runs"
    for name in ("good", "bad"):
        assert cli.train_main(["--dataset", "folder", "--data-dir", str(data), "--out", str(runs / name), "--val-size", "4",
                               "--epochs", "1", "--widths", "4", *TINY]) == 0
    bad = runs / "bad"
    if damage == "foreign":
        (bad / "config.json").write_text(json.dumps({"lr": 0.1}))
    else:
        (bad / damage).write_text((bad / damage).read_text() + "{truncat")
    capsys.readouterr()
    assert cli.report_main([str(runs), "--out", str(tmp_path / "rep")]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"relaxedconv report: warning: left out {bad}" in err
    md = (tmp_path / "rep" / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 1 and rows[0].startswith("| good |")
    assert "Left out (files unreadable):" in md and str(bad) in md
    # nothing readable at all: exit 2 with one line
    assert cli.report_main([str(bad)]) == 2
    assert "no readable run directories" in capsys.readouterr().err


def test_a_message_during_an_epoch_starts_on_a_clean_line(tmp_path, monkeypatch):
    """On a terminal the "backends: ..." line, printed after the first step, was appended to the progress
    bar's text on the same line; the bar is erased first now."""
    import io
    import sys

    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # the built-in bar, whose output is checked here
    screen = io.StringIO()
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    data = make_folder(tmp_path / "f", n_train=16, n_test=4)
    assert cli.train_main(["--dataset", "folder", "--data-dir", str(data), "--out", str(tmp_path / "r"), "--val-size", "4",
                           "--epochs", "1", *TINY, "--warmup-epochs", "0", "--progress", "on"]) == 0
    text = screen.getvalue()
    assert "[" in text.split("backends:")[0]  # a bar was drawn before the message
    assert "\r\x1b[Kbackends:" in text


def test_report_or_sweep_to_a_file_exits_2(tmp_path, capsys):
    data = make_folder(tmp_path / "f", n_train=16, n_test=4)
    assert cli.train_main(["--dataset", "folder", "--data-dir", str(data), "--out", str(tmp_path / "runs" / "a"),
                           "--val-size", "4", "--epochs", "1", "--widths", "4", *TINY]) == 0
    f = tmp_path / "notes.txt"
    f.write_text("x")
    capsys.readouterr()
    assert cli.report_main([str(tmp_path / "runs"), "--out", str(f)]) == 2  # was a FileExistsError traceback
    err = capsys.readouterr().err
    assert f"relaxedconv report: cannot write the report to {f} (File exists); choose another --out" in err
    # the same for a sweep
    assert cli.sweep_main(["--variant", "se2_rot", "--omega-rot-grid", "0,1", "--out", str(f), "--", "--dataset", "folder",
                           "--data-dir", str(data), "--val-size", "4", "--epochs", "1", *TINY]) == 2
    assert f"relaxedconv sweep: --out {f} is a file, not a directory; choose another --out" in capsys.readouterr().err


def test_a_failed_download_says_how_to_place_the_archive_by_hand(tmp_path, monkeypatch):
    """Offline, --download ended its message with "or pass --download" (already passed). It must name
    the URL and where the archive goes; an archive placed there is then unpacked without the network."""
    import hashlib
    import tarfile

    from relaxedconv.training import data as data_mod

    src = make_cifar10(tmp_path / "src")
    archive = tmp_path / "c10.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    unreachable = (tmp_path / "no-network" / "cifar-10-python.tar.gz").as_uri()
    spec = dict(data_mod.ARCHIVES["cifar10"], url=unreachable, md5=hashlib.md5(archive.read_bytes()).hexdigest())
    monkeypatch.setitem(data_mod.ARCHIVES, "cifar10", spec)
    root = tmp_path / "dl"
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10", root, download_missing=True, log=lambda *a: None)
    msg = str(e.value)
    assert "pass --download" not in msg
    assert f"could not download {unreachable}" in msg
    assert f"fetch {unreachable} (md5 {spec['md5']}) and copy it to {root / 'cifar-10-python.tar.gz'}" in msg
    assert f"tar -xzf cifar-10-python.tar.gz -C {root}" in msg and str(root / "cifar-10-batches-py") in msg
    # an incomplete copy in place is named
    (root / "cifar-10-python.tar.gz").write_bytes(archive.read_bytes()[:100])
    with pytest.raises(DatasetError, match=r"is there but its md5 is \w+, not \w+ \(an incomplete copy\?\)"):
        load_dataset("cifar10", root, download_missing=True, log=lambda *a: None)
    # following the message works: the archive copied there by hand is checked and unpacked, offline
    (root / "cifar-10-python.tar.gz").write_bytes(archive.read_bytes())
    assert load_dataset("cifar10", root, download_missing=True, log=lambda *a: None).train_images.shape == (40, 32, 32, 3)


def test_a_sweep_leaves_a_diverged_point_out_of_the_selection(tmp_path, capsys, monkeypatch):
    """A grid point that diverges stops only itself; sweep.json records it (null accuracies) and the
    selection is made among the others."""
    from relaxedconv.training import trainer as trainer_mod

    real = trainer_mod.Trainer._train_epoch

    def diverging_at_omega_2(self, epoch):
        if self.cfg["omega_rot"] == 2.0:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("inf"))
        return real(self, epoch)

    monkeypatch.setattr(trainer_mod.Trainer, "_train_epoch", diverging_at_omega_2)
    data = make_folder(tmp_path / "f", n_train=16, n_test=8)
    out = tmp_path / "s"
    assert cli.sweep_main(["--variant", "se2_rot", "--omega-rot-grid", "0,2", "--out", str(out), "--",
                           "--dataset", "folder", "--data-dir", str(data), "--val-size", "8", "--epochs", "1", *TINY]) == 0
    err = capsys.readouterr().err
    assert "relaxedconv sweep: se2_rot_rot2: training diverged in epoch 1/1" in err
    assert "warning: se2_rot_rot2 diverged and was left out of the selection" in err and "Traceback" not in err
    sweep = json.loads((out / "sweep.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in sweep.json"))
    rows = {r["run"]: r for r in sweep["grid"]}
    assert rows["se2_rot_rot2"]["diverged"] is True and rows["se2_rot_rot2"]["best_val_acc"] is None
    assert sweep["selected"]["run"] == "se2_rot_rot0"
    # a sweep in which no point can be selected exits 1 and says so
    assert cli.sweep_main(["--variant", "se2_rot", "--omega-rot-grid", "2", "--out", str(tmp_path / "s2"), "--",
                           "--dataset", "folder", "--data-dir", str(data), "--val-size", "8", "--epochs", "1", *TINY]) == 1
    assert f"no run of {tmp_path / 's2'} has a validation accuracy to select on" in capsys.readouterr().err
