"""Datasets for ``relaxedconv train``: CIFAR-10/100 and image folders, held in memory as uint8.

Layouts read from a local directory ``D`` (``--data-dir D``):

- CIFAR-10 python batches (what torchvision and the official ``cifar-10-python.tar.gz`` unpack to):
  ``D/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` (or those files in ``D``);
- CIFAR-100 python batches: ``D/cifar-100-python/{train, test, meta}`` (or in ``D``), labels from
  ``fine_labels`` (``--label-type coarse`` for ``coarse_labels``);
- an image-folder tree: ``D/train/<class>/*.png|jpg|...`` and ``D/test/<class>/*`` (read with Pillow;
  all images the same size). Class indices are the sorted class folder names.

With ``--download`` a missing CIFAR archive is fetched from the official URL with urllib and
checked against its md5 (the same URLs and checksums torchvision uses); torchvision is not needed.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import use_default_mode


class DatasetError(RuntimeError):
    """A missing or malformed dataset; the message says what was expected where."""


@dataclass
class ImageData:
    train_images: np.ndarray  # uint8 [N, H, W, C]
    train_labels: np.ndarray  # int64 [N]
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list = field(default_factory=list)
    source: str = ""  # what was read, for the run's config

    @property
    def num_classes(self) -> int:
        return len(self.classes)


ARCHIVES = {
    "cifar10": dict(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        filename="cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
    ),
    "cifar100": dict(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        filename="cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
    ),
}
DATASETS = ("cifar10", "cifar100", "folder")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}

_BATCH_FILES = {  # the python batches of each archive
    "cifar10": [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"],
    "cifar100": ["train", "test", "meta"],
}


def _layout_help(name: str, root: Path, *, download_failed: bool = False) -> str:
    folder = ARCHIVES[name]["folder"] if name in ARCHIVES else None
    lines = [f"expected under {root}:"]
    if name == "cifar10":
        lines.append(f"  CIFAR-10 python batches: {root / folder}/{{data_batch_1..data_batch_5, test_batch, batches.meta}}")
        lines.append("    (or those files directly in the directory; the official cifar-10-python.tar.gz unpacks to this)")
    elif name == "cifar100":
        lines.append(f"  CIFAR-100 python batches: {root / folder}/{{train, test, meta}} with 'data' and 'fine_labels'")
        lines.append("    (or those files directly in the directory; the official cifar-100-python.tar.gz unpacks to this)")
    if name in ARCHIVES:
        lines.append("  or an image-folder tree:")
    lines.append(f"  {root / 'train'}/<class name>/<image files>  and  {root / 'test'}/<class name>/<image files>")
    if name in ARCHIVES and download_failed:
        spec = ARCHIVES[name]
        lines.append(f"to place it by hand: on a machine with internet fetch {spec['url']} (md5 {spec['md5']}) and copy it to "
                     f"{root / spec['filename']}; --download then checks and unpacks it without the network. Or unpack it "
                     f"yourself (tar -xzf {spec['filename']} -C {root}), which gives {root / spec['folder']}/ as above")
    elif name in ARCHIVES:
        lines.append("or pass --download to fetch the official archive (needs internet)")
    return "\n".join(lines)


def _npz_hint(root: Path) -> str:
    """What to do with the offline CIFAR-10 copy (JPEG bytes in .npz), which train does not read itself."""
    try:
        found = sorted(p.name for p in root.glob("*.npz"))
    except OSError:
        return ""
    if not found:
        return ""
    return (f"\n{root} holds {', '.join(found[:3])}{' ...' if len(found) > 3 else ''}: the offline CIFAR-10 copy "
            f"(cifar10-{{train,test}}-jpeg.npz) is converted once to python batches with "
            f"'python experiments/convert_npz.py {root} DIR', then --data-dir DIR (experiments/README.md, Data)")


# ---- CIFAR python batches ---------------------------------------------------------------------
def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")
    except Exception as e:  # noqa: BLE001 - any failure is a malformed file for the user
        raise DatasetError(f"could not read {path} as a CIFAR python batch (a pickled dict): {e}") from e
    if not isinstance(d, dict):
        raise DatasetError(f"{path}: expected a pickled dict (CIFAR python batch), got {type(d).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _names(names) -> list:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _batch_arrays(path: Path, label_key: str, num_classes: int | None = None):
    d = _unpickle(path)
    missing = [k for k in ("data", label_key) if k not in d]
    if missing:
        raise DatasetError(f"{path}: missing key(s) {missing}; a CIFAR batch holds 'data' (N x 3072 uint8) and '{label_key}'")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise DatasetError(f"{path}: 'data' must be uint8 of shape (N, 3072) (32x32x3, channel-major), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise DatasetError(f"{path}: {len(labels)} labels for {data.shape[0]} images")
    if num_classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{path}: labels must be in [0, {num_classes}), found [{labels.min()}, {labels.max()}]")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def _find_batch_dir(root: Path, folder: str, files) -> Path | None:
    for cand in (root / folder, root):
        if all((cand / f).is_file() for f in files):
            return cand
    return None


def _partial_batch_dir(root: Path, folder: str, files) -> tuple[Path, list] | None:
    """A directory that has some but not all of the batch files: the user meant this layout."""
    for cand in (root / folder, root):
        present = [f for f in files if (cand / f).exists()]
        if present and len(present) < len(files):
            return cand, [f for f in files if f not in present]
    return None


def _read_cifar10(d: Path) -> ImageData:
    meta = _unpickle(d / "batches.meta")
    names = meta.get("label_names")
    if not names or len(names) != 10:
        raise DatasetError(f"{d / 'batches.meta'}: expected 'label_names' with 10 class names")
    parts = [_batch_arrays(d / f"data_batch_{i}", "labels", 10) for i in range(1, 6)]
    tx, ty = _batch_arrays(d / "test_batch", "labels", 10)
    return ImageData(
        np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), tx, ty, _names(names),
        source=f"cifar10 python batches in {d}",
    )


def _read_cifar100(d: Path, label_type: str = "fine") -> ImageData:
    key = f"{label_type}_labels"
    names_key = f"{label_type}_label_names"
    meta = _unpickle(d / "meta")
    names = meta.get(names_key)
    expected = 100 if label_type == "fine" else 20
    if not names or len(names) != expected:
        raise DatasetError(f"{d / 'meta'}: expected '{names_key}' with {expected} class names")
    x, y = _batch_arrays(d / "train", key, expected)
    tx, ty = _batch_arrays(d / "test", key, expected)
    return ImageData(x, y, tx, ty, _names(names), source=f"cifar100 python batches ({key}) in {d}")


# ---- image folders ----------------------------------------------------------------------------
def _read_split_folder(split_dir: Path, classes=None):
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow is in the "data" extra
        raise DatasetError("reading an image-folder tree needs Pillow: pip install 'relaxedconv[data]'") from e
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise DatasetError(f"{split_dir}: no class folders; expected {split_dir}/<class name>/<image files>")
    if classes is not None and found != classes:
        extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
        raise DatasetError(
            f"{split_dir}: class folders differ from the train split's (missing {missing}, extra {extra}); "
            "train/ and test/ must hold the same class names"
        )
    images, labels, size, first = [], [], None, None
    for idx, name in enumerate(found):
        files = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DatasetError(f"{split_dir / name}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for f in files:
            try:
                with Image.open(f) as im:
                    a = np.asarray(im.convert("RGB"))
            except Exception as e:  # noqa: BLE001
                raise DatasetError(f"{f}: not a readable image: {e}") from e
            if size is None:
                size, first = a.shape, f
            elif a.shape != size:
                # the first image sets the size, and may be the odd one: name it too
                raise DatasetError(f"{f}: size {a.shape[1]}x{a.shape[0]} differs from {size[1]}x{size[0]} (the size of {first}, "
                                   "the first image read); all images must be the same size")
            images.append(a)
            labels.append(idx)
    return np.stack(images), np.asarray(labels, dtype=np.int64), found


def _read_folder_tree(root: Path) -> ImageData:
    x, y, classes = _read_split_folder(root / "train")
    if len(classes) < 2:  # else every image is labelled right: 100% accuracy that means nothing
        raise DatasetError(f"{root / 'train'}: one class folder ({classes[0]}); a classifier needs two or more, "
                           f"each in its own folder: {root / 'train'}/<class name>/<image files>")
    tx, ty, _ = _read_split_folder(root / "test", classes)
    if x.shape[1:] != tx.shape[1:]:
        raise DatasetError(f"{root}: train images are {x.shape[1:]} but test images are {tx.shape[1:]}")
    return ImageData(x, y, tx, ty, classes, source=f"image folders in {root}")


# ---- download ---------------------------------------------------------------------------------
def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(name: str, root: Path, log=print) -> Path:
    """Fetch and unpack the official archive of ``name`` into ``root``; returns the batch folder."""
    spec = ARCHIVES[name]
    root.mkdir(parents=True, exist_ok=True)
    archive = root / spec["filename"]
    if not (archive.is_file() and _md5(archive) == spec["md5"]):
        log(f"downloading {spec['url']} -> {archive}")
        fd, tmp = tempfile.mkstemp(dir=root, suffix=".part")
        os.close(fd)
        use_default_mode(tmp)
        try:
            with urllib.request.urlopen(spec["url"], timeout=60) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        except Exception as e:  # noqa: BLE001
            os.unlink(tmp)
            held = (f"\n{archive} is there but its md5 is {_md5(archive)}, not {spec['md5']} (an incomplete copy?)"
                    if archive.is_file() else "")
            raise DatasetError(f"could not download {spec['url']}: {e}{held}\n"
                               f"{_layout_help(name, root, download_failed=True)}") from e
        got = _md5(Path(tmp))
        if got != spec["md5"]:
            os.unlink(tmp)
            raise DatasetError(f"{spec['url']}: md5 {got} does not match the expected {spec['md5']}")
        os.replace(tmp, archive)
    with tarfile.open(archive, "r:gz") as tar:
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(root, **kw)
    return root / spec["folder"]


# ---- entry point ------------------------------------------------------------------------------
def load_dataset(name: str, data_dir, *, download_missing: bool = False, label_type: str = "fine", log=print) -> ImageData:
    """Read ``name`` ('cifar10', 'cifar100' or 'folder') from ``data_dir`` (see the module docstring)."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    root = Path(data_dir).expanduser()
    if root.is_file():
        raise DatasetError(f"--data-dir {root} is a file; give the directory that holds the dataset\n{_layout_help(name, root.parent)}"
                           + _npz_hint(root.parent))
    if name in ARCHIVES:
        spec = ARCHIVES[name]
        files = _BATCH_FILES[name]
        d = _find_batch_dir(root, spec["folder"], files)
        if d is None and (root / "train").is_dir() and (root / "test").is_dir() and not (root / "train").is_file():
            data = _read_folder_tree(root)
            if name == "cifar10" and data.num_classes != 10 or name == "cifar100" and data.num_classes not in (20, 100):
                raise DatasetError(f"{root}: an image-folder tree with {data.num_classes} classes is not {name}; "
                                   "for your own classes pass --dataset folder")
            return data
        if d is None:
            partial = _partial_batch_dir(root, spec["folder"], files)
            if partial is not None and not download_missing:
                raise DatasetError(f"{partial[0]}: incomplete {name} python batches, missing {partial[1]}\n{_layout_help(name, root)}")
            if not download_missing:
                what = "does not exist" if not root.exists() else "holds no dataset in a known layout"
                other = "cifar100" if name == "cifar10" else "cifar10"
                if _find_batch_dir(root, ARCHIVES[other]["folder"], _BATCH_FILES[other]):
                    what = f"holds {other}, not {name}: pass --dataset {other}"
                raise DatasetError(f"{name}: {root} {what}\n{_layout_help(name, root)}" + _npz_hint(root))
            d = download(name, root, log=log)
        return _read_cifar10(d) if name == "cifar10" else _read_cifar100(d, label_type)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise DatasetError(f"folder: {root} has no train/ and test/ folders\n{_layout_help('folder', root)}" + _npz_hint(root))
    return _read_folder_tree(root)


def split_indices(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices: a seeded permutation of ``range(n)``, the first ``val_size`` to
    validation. CIFAR's 50k training images with val_size=5000 give the 45k/5k split."""
    if not 0 <= val_size < n:
        raise ValueError(f"validation size must be in [0, {n}) for {n} training images, got {val_size}")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] -> uint8 [N, C, H, W] (contiguous)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 [N, C, H, W] images scaled to [0, 1] (float64 sums)."""
    x = x.to(torch.float64) / 255.0
    return x.mean((0, 2, 3)).float(), x.std((0, 2, 3)).float()


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding + horizontal flip of a float batch [B, C, H, W], on x's device.

    Randomness comes only from ``generator`` (on x's device), so a seeded run is reproducible."""
    b, c, h, w = x.shape
    if pad > 0:
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=x.device)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        bi = torch.arange(b, device=x.device)[:, None, None, None]
        ci = torch.arange(c, device=x.device)[None, :, None, None]
        x = xp[bi, ci, rows, cols]
    if flip:
        f = torch.rand(b, generator=generator, device=x.device) < 0.5
        x = torch.where(f[:, None, None, None], x.flip(-1), x)
    return x
