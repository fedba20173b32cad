#!/usr/bin/env python
"""Turn torchvision's CIFAR-10 / CIFAR-100 download into image folders plus long-tailed split lists (OLTR
format).

    python data_lists/make_cifar_lt.py --src ~/data --out ~/data/cifar10_lt_r100
    python data_lists/make_cifar_lt.py --src ~/data/cifar-100-python --out ~/data/cifar100_lt_r50 \
        --imbalance 50

--src holds the "python version" pickle batches that torchvision.datasets.CIFAR10 / CIFAR100(root,
download=True) leave in root/cifar-10-batches-py or root/cifar-100-python (either that folder, under any
name, or root itself). Written under --out:

    train/<class>/NNNNN.<format>  only the training images kept for the long-tailed split
    test/<class>/NNNNN.<format>   the whole balanced test set
    CIFAR10_LT_r100_train.txt     `train/<class>/NNNNN.png label` per line (CIFAR100_LT_r<ratio>_train.txt)
    CIFAR10_test.txt              `test/<class>/NNNNN.png label` per line (CIFAR100_test.txt)

NNNNN is the image's row in the source (train: batches 1..5 one after another), so each file traces back to
its pickle; labels are 0..C-1 in the dataset's own order (batches.meta / meta). Class c keeps
n_c = int(n_max * (1 / imbalance) ** (c / (C - 1))) training images, the exponential profile of LDAM (Cao et
al., NeurIPS 2019; CIFAR-10 ratio 100: 5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50 = 12,406 images).
Which images: random.Random(seed) shuffles the row indices of each class in label order, and the first n_c are
kept. The files are read by torchvision's CIFAR10 / CIFAR100 dataset classes once every file's MD5 is the one
torchvision publishes: a damaged, edited or foreign file is refused by name before anything is unpickled. The
tree is written to a hidden sibling folder and renamed to --out at the end, so a stopped run leaves no
half-written --out. Every input error is one line `error: <file>: ...`, exit status 2.
"""

import argparse
import os
import random
import shlex
import shutil
import sys

from PIL import Image

# name: (torchvision's dataset class, also the lists' tag; training images of its largest class)
DATASETS = {"cifar10": ("CIFAR10", 5000), "cifar100": ("CIFAR100", 500)}
MANY, FEW = 100, 20  # the paper's shot groups (Section 4.2): many >= 100 training images, few <= 20
SAVE = {"png": {}, "jpg": dict(quality=95, subsampling=0)}  # Pillow save options per --format


class UserError(Exception):
    """Bad input: main() prints it as the one line `error: <file>: <message>` and exits with status 2."""

    def __init__(self, path, msg):
        super().__init__(f"{path}: {msg}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other user error (argparse's own adds the usage)
        self.exit(2, f"error: {self.prog}: {message}\n")


def get_args_parser():
    p = _Parser(description=" ".join(__doc__.split("\n\n")[0].split()),
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--src", required=True, help="folder holding cifar-10-batches-py or cifar-100-python, "
                   "or that folder itself")
    p.add_argument("--out", required=True, help="dataset root to write (must not exist, or be empty)")
    p.add_argument("--dataset", default=None, choices=list(DATASETS), help="detected from --src when unset")
    p.add_argument("--imbalance", type=float, default=100.0,
                   help="ratio of the largest to the smallest class")
    p.add_argument("--seed", type=int, default=0, help="seed of random.Random picking each class's images")
    p.add_argument("--format", default="png", choices=list(SAVE),
                   help="image files: png (lossless) or jpg (q95)")
    p.add_argument("--max-per-class", type=int, default=None, help="training images of the largest class; "
                   "unset: the whole class, 5000 for CIFAR-10, 500 for CIFAR-100")
    return p


def dataset_class(name):
    """torchvision.datasets.CIFAR10 or CIFAR100: its file names, their MD5s and the reader of the batches."""
    import torchvision.datasets  # here, not at the top: --help and argument errors need no torch
    return getattr(torchvision.datasets, DATASETS[name][0])


def check_download(folder, cls):
    """Refuse by name a missing file or one whose MD5 is not torchvision's: unpickling can run its code."""
    from torchvision.datasets.utils import check_integrity
    for fname, md5 in [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]:
        path = os.path.join(folder, fname)
        if not os.path.isfile(path):
            raise UserError(path, f"missing: not a whole {cls.__name__} download")
        if not check_integrity(path, md5):
            raise UserError(path, f"its MD5 is not that of torchvision's {cls.__name__} download: a damaged "
                            "or foreign file (download it again)")


def load(folder, cls):
    """(class names, train, test) of the download in `folder`, each split = (uint8 array N x 32 x 32 x 3 in
    the batches' row order, N labels), read by torchvision's dataset class after check_download."""
    check_download(folder, cls)
    here = type(cls.__name__, (cls,), {"base_folder": ""})  # the files in `folder` itself, whatever its name
    train, test = here(folder, train=True), here(folder, train=False)
    return list(train.classes), (train.data, list(train.targets)), (test.data, list(test.targets))


def find_source(src, dataset):
    """(dataset, folder of its files) from --src: the download folder itself or the folder holding it."""
    if not os.path.isdir(src):
        raise UserError(src, "is a file, not the folder holding CIFAR's download (cifar-10-batches-py / "
                        "cifar-100-python)" if os.path.isfile(src) else "no such folder")
    found = []
    for name in [dataset] if dataset else DATASETS:
        cls = dataset_class(name)
        for d in (src, os.path.join(src, cls.base_folder)):
            if all(os.path.isfile(os.path.join(d, f)) for f in (cls.meta["filename"], cls.test_list[0][0])):
                found.append((name, d))
                break
    if not found:
        want = dataset_class(dataset).base_folder if dataset else "cifar-10-batches-py or cifar-100-python"
        raise UserError(src, f"no {want} here (the folder torchvision downloads, or the folder holding it)")
    if len(found) > 1:
        raise UserError(src, "holds both CIFAR-10 and CIFAR-100: choose one with --dataset")
    return found[0]


def ldam_counts(C, n_max, imbalance):
    """Training images per class, LDAM's exponential profile: n_c = int(n_max * (1/imbalance)^(c/(C-1)))."""
    return [int(n_max * (1.0 / imbalance) ** (c / max(C - 1, 1))) for c in range(C)]


def select(labels, counts, seed, where):
    """Kept training rows: random.Random(seed) shuffles each class's rows in turn, the first n_c stay."""
    rng, keep = random.Random(seed), []
    for c, n in enumerate(counts):
        rows = [i for i, y in enumerate(labels) if y == c]
        if n > len(rows):
            raise UserError(where, f"class {c} has {len(rows)} training images, the profile asks for {n}")
        rng.shuffle(rows)
        keep += sorted(rows[:n])
    return keep


def to_image(images, i):
    """Row i of a split's uint8 array N x 32 x 32 x 3 (torchvision's H x W x C) -> 32 x 32 RGB image."""
    return Image.fromarray(images[i])


def write_split(root, split, data, rows, names, fmt):
    """Save rows of data = (uint8 array N x 32 x 32 x 3, N labels) as <split>/<class>/NNNNN.<fmt> under root;
    returns the list lines, by label then row."""
    images, labels = data
    for name in names:
        os.makedirs(os.path.join(root, split, name), exist_ok=True)
    lines = []
    for i in sorted(rows, key=lambda i: (labels[i], i)):
        rel = f"{split}/{names[labels[i]]}/{i:05d}.{fmt}"
        to_image(images, i).save(os.path.join(root, rel), **SAVE[fmt])
        lines.append(f"{rel} {labels[i]}\n")
    return lines


def check_out(out):
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise UserError(out, "exists and is not empty: choose a new --out")


def write_tree(out, lists_fn):
    """Run lists_fn(tmp) -> {list file: lines} in a hidden sibling tmp of out, write the lists, rename tmp."""
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.part-{os.getpid()}")
    try:
        for fname, lines in lists_fn(tmp).items():
            with open(os.path.join(tmp, fname), "w") as f:
                f.writelines(lines)
        check_out(out)  # again: it may have appeared meanwhile
        if os.path.isdir(out):
            os.rmdir(out)  # empty: make room for the rename
        os.rename(tmp, out)
    except BaseException:  # errors and Ctrl-C alike: leave nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert(args):
    """The whole conversion; returns the summary to print: what was written, with the shot groups and the
    command to train on it."""
    if not args.imbalance >= 1:  # also NaN
        raise UserError("--imbalance", f"{args.imbalance:g} is not a ratio >= 1")
    if args.max_per_class is not None and args.max_per_class < 1:
        raise UserError("--max-per-class", f"{args.max_per_class} is not >= 1")
    out = os.path.abspath(args.out)
    check_out(out)
    name, folder = find_source(args.src, args.dataset)
    tag, n_max = DATASETS[name]
    names, train, test = load(folder, dataset_class(name))
    counts = ldam_counts(len(names), args.max_per_class or n_max, args.imbalance)
    if min(counts) < 1:
        raise UserError("--imbalance", f"{args.imbalance:g} leaves the last class no training image")
    keep = select(train[1], counts, args.seed, folder)
    train_list, test_list = f"{tag}_LT_r{args.imbalance:g}_train.txt", f"{tag}_test.txt"
    write_tree(out, lambda tmp: {
        train_list: write_split(tmp, "train", train, keep, names, args.format),
        test_list: write_split(tmp, "test", test, range(len(test[1])), names, args.format)})
    lists = [os.path.join(out, train_list), os.path.join(out, test_list)]
    many, few = sum(n >= MANY for n in counts), sum(n <= FEW for n in counts)
    return "\n".join([
        f"{tag}-LT, imbalance {args.imbalance:g}: {len(counts)} classes, {sum(counts)} train images "
        f"({min(counts)} ... {max(counts)} per class), {len(test[1])} test images",
        f"  many-shot (>= {MANY}): {many} classes, medium: {len(counts) - many - few}, "
        f"few-shot (<= {FEW}): {few}",
        f"  train list: {lists[0]}",
        f"  test list:  {lists[1]}",
        "train with:",
        f"  python train.py --recipe {tag.lower()}_lt --data {shlex.quote(out)} --split "
        f"{shlex.quote(lists[0])} --test-split {shlex.quote(lists[1])}"])


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        print(convert(args))
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, no permission, ...
        print(f"error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: {args.out}: interrupted, nothing written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
