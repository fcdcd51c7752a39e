#!/usr/bin/env python
"""Convert the offline CIFAR-10 copy (JPEG bytes in .npz, see its README) to a layout that
`relaxedconv train` reads.

    python experiments/convert_npz.py SRC_DIR DST_DIR [--layout batches|folder]

SRC_DIR holds cifar10-train-jpeg.npz and cifar10-test-jpeg.npz (arrays jpeg, offsets, labels,
classes). DST_DIR receives either
  batches: DST_DIR/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
           (the official python-batch format; samples shuffled with a fixed seed, since the
           source is sorted by class), or
  folder:  DST_DIR/train/<class>/NNNNN.png and DST_DIR/test/<class>/NNNNN.png (lossless PNG of
           the decoded pixels).
The pixels are the decoded JPEGs: lossy re-encodings of CIFAR-10, not bit-identical to the
official archive (see the source README).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import pickle
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np


class ArchiveError(Exception):
    """An input archive that cannot be read; the message names the file and what to do."""


ARRAYS = ("jpeg", "offsets", "labels", "classes")


def decode(npz: Path):
    from PIL import Image

    try:
        with np.load(npz) as d:
            missing = [k for k in ARRAYS if k not in d.files]
            if missing:
                raise ArchiveError(f"{npz}: no array(s) {missing}; expected {list(ARRAYS)} (the offline CIFAR-10 copy's layout)")
            j, o, labels, classes = (d[k] for k in ARRAYS)
    except ArchiveError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
        # np.load reads the zip directory at the end of the file; a truncated download has none
        raise ArchiveError(f"{npz} is not a complete .npz archive ({type(e).__name__}: {e}); "
                           "it is truncated or corrupt: copy or download it again") from None
    if o.ndim != 1 or len(o) != len(labels) + 1 or (len(o) and o[-1] > len(j)):
        raise ArchiveError(f"{npz}: {len(o)} offsets for {len(labels)} labels and {len(j)} JPEG bytes do not fit together; "
                           "the archive is not the offline CIFAR-10 copy or is damaged: copy it again")
    images = []
    for i in range(len(o) - 1):
        try:
            images.append(np.asarray(Image.open(io.BytesIO(j[o[i]:o[i + 1]].tobytes())).convert("RGB")))
        except OSError as e:  # PIL.UnidentifiedImageError is an OSError
            raise ArchiveError(f"{npz}: image {i} is not a readable JPEG ({e}); the archive is damaged: copy it again") from None
    return np.stack(images), labels.astype(np.int64), [str(c) for c in classes]


def write_batches(dst: Path, train, test, classes, seed: int = 0) -> None:
    out = dst / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def dump(name, x, y):
        data = x.transpose(0, 3, 1, 2).reshape(len(x), 3072)
        with open(out / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": [int(v) for v in y], "data": data}, f, protocol=4)

    x, y = train
    perm = rng.permutation(len(x))
    for b, part in enumerate(np.array_split(perm, 5), start=1):
        dump(f"data_batch_{b}", x[part], y[part])
    tx, ty = test
    tperm = rng.permutation(len(tx))
    dump("test_batch", tx[tperm], ty[tperm])
    with open(out / "batches.meta", "wb") as f:
        pickle.dump({"label_names": classes, "num_cases_per_batch": len(x) // 5, "num_vis": 3072}, f, protocol=4)


def write_folder(dst: Path, train, test, classes) -> None:
    from PIL import Image

    for split, (x, y) in (("train", train), ("test", test)):
        for c in classes:
            (dst / split / c).mkdir(parents=True, exist_ok=True)
        for i, (img, lab) in enumerate(zip(x, y)):
            Image.fromarray(img).save(dst / split / classes[lab] / f"{i:05d}.png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--layout", choices=("batches", "folder"), default="batches")
    args = ap.parse_args(argv)
    files = {s: args.src / f"cifar10-{s}-jpeg.npz" for s in ("train", "test")}
    for f in files.values():
        if not f.is_file():
            print(f"convert_npz: {f} not found; expected cifar10-train-jpeg.npz and cifar10-test-jpeg.npz in {args.src}", file=sys.stderr)
            return 2
    try:
        train = decode(files["train"])
        test = decode(files["test"])
    except ArchiveError as e:
        print(f"convert_npz: {e}", file=sys.stderr)
        return 2
    classes = train[2]
    if args.layout == "batches":
        write_batches(args.dst, train[:2], test[:2], classes)
    else:
        write_folder(args.dst, train[:2], test[:2], classes)
    digest = hashlib.sha256(train[0].tobytes() + test[0].tobytes()).hexdigest()[:16]
    print(f"wrote {len(train[0])} train + {len(test[0])} test images ({args.layout}) to {args.dst}; "
          f"decoded-pixel sha256[:16] {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
