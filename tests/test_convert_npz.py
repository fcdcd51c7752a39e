"""experiments/convert_npz.py: the offline CIFAR-10 copy (JPEG bytes in .npz) to python batches, and a
clear exit 2 — not a BadZipFile traceback — on a truncated or damaged archive (issue 12, item 13)."""
from __future__ import annotations

import importlib.util
import io
import pickle
from pathlib import Path

import numpy as np
import pytest

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "convert_npz.py"


@pytest.fixture(scope="module")
def convert():
    spec = importlib.util.spec_from_file_location("convert_npz", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_npz(path: Path, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    blobs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])])
    np.savez(path, jpeg=np.concatenate(blobs), offsets=offsets, labels=np.arange(n) % 10,
             classes=np.array([f"c{i}" for i in range(10)]))
    return images


def _sources(tmp_path):
    src = tmp_path / "npz"
    src.mkdir()
    _write_npz(src / "cifar10-train-jpeg.npz", 10, 0)
    _write_npz(src / "cifar10-test-jpeg.npz", 5, 1)
    return src


def test_converts_to_python_batches(tmp_path, convert, capsys):
    src = _sources(tmp_path)
    assert convert.main([str(src), str(tmp_path / "out")]) == 0
    d = tmp_path / "out" / "cifar-10-batches-py"
    batches = [pickle.load(open(d / f"data_batch_{i}", "rb")) for i in range(1, 6)]
    assert sum(len(b["labels"]) for b in batches) == 10
    assert pickle.load(open(d / "test_batch", "rb"))["data"].shape == (5, 3072)
    assert "wrote 10 train + 5 test images" in capsys.readouterr().out


@pytest.mark.parametrize("keep", [0.5, 0.95, 0.0])
def test_truncated_archive_exits_2_with_a_message(tmp_path, convert, capsys, keep):
    src = _sources(tmp_path)
    f = src / "cifar10-test-jpeg.npz"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    assert convert.main([str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"convert_npz: {f} is not a complete .npz archive" in err and "copy or download it again" in err


def test_archive_without_the_expected_arrays(tmp_path, convert, capsys):
    src = _sources(tmp_path)
    np.savez(src / "cifar10-train-jpeg.npz", pixels=np.zeros(3))
    assert convert.main([str(src), str(tmp_path / "out")]) == 2
    assert "no array(s) ['jpeg', 'offsets', 'labels', 'classes']" in capsys.readouterr().err


def test_train_pointed_at_the_npz_copy_says_how_to_convert_it_and_then_reads_it(tmp_path, convert):
    """`relaxedconv train --data-dir <the npz folder>` (or the .npz file itself) said only 'no dataset in a
    known layout'; it must name the converter, whose output it then reads."""
    from relaxedconv.training.data import DatasetError, load_dataset

    src = _sources(tmp_path)
    for data_dir, name in ((src, "cifar10"), (src / "cifar10-train-jpeg.npz", "cifar10"), (src, "folder")):
        with pytest.raises(DatasetError) as e:
            load_dataset(name, data_dir)
        msg = str(e.value)
        assert "cifar10-test-jpeg.npz, cifar10-train-jpeg.npz" in msg and f"experiments/convert_npz.py {src} DIR" in msg
    assert "is a file; give the directory" in str(pytest.raises(DatasetError, load_dataset, "cifar10", src / "cifar10-train-jpeg.npz").value)
    assert convert.main([str(src), str(tmp_path / "out")]) == 0
    data = load_dataset("cifar10", tmp_path / "out")
    assert data.train_images.shape == (10, 32, 32, 3) and len(data.test_labels) == 5 and data.num_classes == 10
