#!/usr/bin/env python
"""Turn torchvision's CIFAR-10 / CIFAR-100 download into image folders plus long-tailed split lists (OLTR format).

    python data_lists/make_cifar_lt.py --src ~/data --out ~/data/cifar10_lt_r100
    python data_lists/make_cifar_lt.py --src ~/data/cifar-100-python --out ~/data/cifar100_lt_r50 --imbalance 50

--src holds the "python version" pickle batches that torchvision.datasets.CIFAR10 / CIFAR100(root, download=True)
leave in root/cifar-10-batches-py or root/cifar-100-python (either that folder or root itself). Written under --out:

    train/<class>/NNNNN.<format>  only the training images kept for the long-tailed split
    test/<class>/NNNNN.<format>   the whole balanced test set
    CIFAR10_LT_r100_train.txt     `train/<class>/NNNNN.png label` per line (CIFAR100_LT_r<ratio>_train.txt)
    CIFAR10_test.txt              `test/<class>/NNNNN.png label` per line (CIFAR100_test.txt)

NNNNN is the image's row in the source (train: batches 1..5 one after another), so each file traces back to its
pickle; labels are 0..C-1 in the dataset's own order (batches.meta / meta). Class c keeps
n_c = int(n_max * (1 / imbalance) ** (c / (C - 1))) training images, the exponential profile of LDAM (Cao et al.,
NeurIPS 2019; CIFAR-10 ratio 100: 5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50 = 12,406 images). Which images:
random.Random(seed) shuffles the row indices of each class in label order, and the first n_c are kept.
The pickles are read by a restricted unpickler that rebuilds numpy's uint8 arrays as raw bytes: numpy is not needed,
and a foreign pickle cannot run code. The tree is written to a hidden sibling folder and renamed to --out at the end,
so a stopped run leaves no half-written --out. Every input error is one line `error: <file>: ...`, exit status 2.
"""

import argparse
import codecs
import os
import pickle
import random
import shlex
import shutil
import sys

from PIL import Image

# name: download folder, train / test / meta pickles, label and class-name keys, images of the largest class, list tag
DATASETS = {
    "cifar10": dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)], test="test_batch",
                    meta="batches.meta", labels=b"labels", names=b"label_names", n_max=5000, tag="CIFAR10"),
    "cifar100": dict(folder="cifar-100-python", train=["train"], test="test", meta="meta",
                     labels=b"fine_labels", names=b"fine_label_names", n_max=500, tag="CIFAR100"),
}
ROW = 3 * 32 * 32  # one image: the R, G and B planes of 32 x 32, one after another
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
    p = _Parser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--src", required=True, help="folder holding cifar-10-batches-py or cifar-100-python, "
                   "or that folder itself")
    p.add_argument("--out", required=True, help="dataset root to write (must not exist, or be empty)")
    p.add_argument("--dataset", default=None, choices=list(DATASETS), help="detected from --src when unset")
    p.add_argument("--imbalance", type=float, default=100.0, help="ratio of the largest to the smallest class")
    p.add_argument("--seed", type=int, default=0, help="seed of random.Random picking each class's images")
    p.add_argument("--format", default="png", choices=list(SAVE), help="image files: png (lossless) or jpg (q95)")
    p.add_argument("--max-per-class", type=int, default=None, help="training images of the largest class; "
                   "unset: the whole class, 5000 for CIFAR-10, 500 for CIFAR-100")
    return p


# ----------------------------------------------------------------------------------------------------------------------
# reading the pickles without numpy

class _Array:
    """Stand-in for a numpy array: shape, dtype string and raw bytes in C order."""

    def __init__(self, shape=(0,), dtype=None, raw=b""):
        self.shape, self.dtype, self.raw = tuple(shape), dtype, raw

    def __setstate__(self, state):  # ndarray.__reduce__'s state: ([version,] shape, dtype, fortran_order, raw)
        shape, dtype, fortran, raw = state[-4:]
        if fortran and len(shape) > 1:
            raise pickle.UnpicklingError("Fortran-ordered array")
        self.__init__(shape, dtype, raw)


class _DType(str):
    """Stand-in for numpy.dtype: its type string ('u1'); the byte order etc. do not matter for uint8."""

    def __new__(cls, code, *_):
        return super().__new__(cls, code.decode() if isinstance(code, bytes) else code)

    def __setstate__(self, state):
        pass


def _reconstruct(cls, shape, typecode):  # protocols 2-4: an empty array, then __setstate__ fills it
    return _Array()


def _frombuffer(buf, dtype, shape, order):  # protocol 5 (out-of-band buffers)
    if order not in ("C", b"C") and len(shape) > 1:
        raise pickle.UnpicklingError("Fortran-ordered array")
    return _Array(shape, dtype, bytes(buf))


# the only globals a CIFAR pickle may name (numpy 1 says numpy.core, numpy 2 numpy._core); anything else is refused
_GLOBALS = {("numpy", "ndarray"): _Array, ("numpy", "dtype"): _DType, ("_codecs", "encode"): codecs.encode}
for _m in ("numpy.core", "numpy._core"):
    _GLOBALS[_m + ".multiarray", "_reconstruct"] = _reconstruct
    _GLOBALS[_m + ".numeric", "_frombuffer"] = _frombuffer


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _GLOBALS:
            raise pickle.UnpicklingError(f"refers to {module}.{name}")
        return _GLOBALS[module, name]


def load_pickle(path):
    try:
        with open(path, "rb") as f:
            return _Unpickler(f, encoding="bytes").load()  # bytes: the files were written by Python 2
    except OSError as e:
        raise UserError(path, e.strerror or str(e))
    except Exception as e:  # garbage raises all sorts: UnpicklingError, EOFError, ValueError, KeyError, ...
        raise UserError(path, f"not a CIFAR pickle ({type(e).__name__}: {e})")


def read_batch(path, key):
    """(raw bytes of N rows, N labels) of one batch file."""
    d = load_pickle(path)
    if not isinstance(d, dict) or b"data" not in d or key not in d:
        raise UserError(path, f"not a CIFAR batch with {key.decode()!r} labels (wrong --dataset or file?)")
    data, labels = d[b"data"], d[key]
    raw = data.raw if isinstance(data, _Array) else data
    if isinstance(data, _Array) and (data.dtype not in ("u1", "|u1") or data.shape[1:] != (ROW,)):
        raise UserError(path, f"data is a {data.dtype} array of shape {data.shape}, not uint8 (N, {ROW})")
    if not isinstance(labels, list) or not all(isinstance(y, int) for y in labels):
        raise UserError(path, "labels are not a list of ints")
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != ROW * len(labels):
        raise UserError(path, f"data does not hold {len(labels)} images of {ROW} bytes")
    return bytes(raw), labels


def read_split(folder, files, key, C):
    """The batches of one split, concatenated: (raw bytes, labels)."""
    raws, labels = [], []
    for name in files:
        raw, y = read_batch(os.path.join(folder, name), key)
        if any(not 0 <= v < C for v in y):
            raise UserError(os.path.join(folder, name), f"a label outside 0..{C - 1}")
        raws.append(raw)
        labels += y
    return b"".join(raws), labels


def read_names(folder, spec):
    path = os.path.join(folder, spec["meta"])
    meta = load_pickle(path)
    names = meta.get(spec["names"]) if isinstance(meta, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise UserError(path, f"no {spec['names'].decode()!r} class names")
    try:
        names = [n.decode() if isinstance(n, bytes) else n for n in names]
    except UnicodeDecodeError:
        raise UserError(path, "a class name is not UTF-8 text") from None
    bad = [n for n in names if not n.isprintable() or any(ch.isspace() for ch in n)]
    if bad:  # the list format is 'path label' split on whitespace: a name must be one printable word
        raise UserError(path, f"class name {bad[0]!r} holds whitespace or a control character: not usable in a split list")
    if len(set(names)) != len(names) or any(not n or n in (".", "..") or "/" in n or "\\" in n for n in names):
        raise UserError(path, "class names are not distinct folder names")
    return names


def find_source(src, dataset):
    """(dataset, folder of its pickles) from --src: the download folder itself or the folder holding it."""
    if not os.path.isdir(src):
        raise UserError(src, "is a file, not the folder holding CIFAR's download (cifar-10-batches-py / "
                        "cifar-100-python)" if os.path.isfile(src) else "no such folder")
    found = []
    for name, spec in DATASETS.items():
        for d in (src, os.path.join(src, spec["folder"])):
            if os.path.isfile(os.path.join(d, spec["meta"])) and os.path.isfile(os.path.join(d, spec["test"])):
                found.append((name, d))
                break
    found = [f for f in found if dataset in (None, f[0])]
    if not found:
        want = DATASETS[dataset]["folder"] if dataset else "cifar-10-batches-py or cifar-100-python"
        raise UserError(src, f"no {want} here (the folder torchvision downloads, or the folder holding it)")
    if len(found) > 1:
        raise UserError(src, "holds both CIFAR-10 and CIFAR-100: choose one with --dataset")
    return found[0]


# ----------------------------------------------------------------------------------------------------------------------
# the long-tailed split

def ldam_counts(C, n_max, imbalance):
    """Training images per class, LDAM's exponential profile: n_c = int(n_max * (1/imbalance)^(c/(C-1)))."""
    return [int(n_max * (1.0 / imbalance) ** (c / max(C - 1, 1))) for c in range(C)]


def select(labels, counts, seed, where):
    """Kept training rows, class by class: random.Random(seed) shuffles each class's rows, the first n_c stay."""
    rng = random.Random(seed)
    by_class = [[] for _ in counts]
    for i, y in enumerate(labels):
        by_class[y].append(i)
    keep = []
    for c, (rows, n) in enumerate(zip(by_class, counts)):
        if n > len(rows):
            raise UserError(where, f"class {c} has {len(rows)} training images, the profile asks for {n}")
        rng.shuffle(rows)
        keep += sorted(rows[:n])
    return keep


# ----------------------------------------------------------------------------------------------------------------------
# writing

def to_image(raw, i):
    """Row i -> 32 x 32 RGB image: interleave the R, G and B planes into the H x W x C bytes Pillow wants."""
    row = raw[i * ROW:(i + 1) * ROW]
    hwc = bytearray(ROW)
    hwc[0::3], hwc[1::3], hwc[2::3] = row[:1024], row[1024:2048], row[2048:]
    return Image.frombytes("RGB", (32, 32), bytes(hwc))


def write_split(root, split, data, rows, names, fmt):
    """Save rows of data = (raw bytes, labels) as <split>/<class>/NNNNN.<fmt> under root; returns the list
    lines, by label then row."""
    raw, labels = data
    for name in names:
        os.makedirs(os.path.join(root, split, name), exist_ok=True)
    lines = []
    for i in sorted(rows, key=lambda i: (labels[i], i)):
        rel = f"{split}/{names[labels[i]]}/{i:05d}.{fmt}"
        to_image(raw, i).save(os.path.join(root, rel), **SAVE[fmt])
        lines.append(f"{rel} {labels[i]}\n")
    return lines


def check_out(out):
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise UserError(out, "exists and is not empty: choose a new --out")


def write_tree(out, lists_fn):
    """Run lists_fn(tmp) -> {list file: lines} in a hidden sibling of out, write the lists, rename tmp to out."""
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


# ----------------------------------------------------------------------------------------------------------------------

def convert(args):
    """The whole conversion; returns the summary to print."""
    if not args.imbalance >= 1:  # also NaN
        raise UserError("--imbalance", f"{args.imbalance:g} is not a ratio >= 1")
    if args.max_per_class is not None and args.max_per_class < 1:
        raise UserError("--max-per-class", f"{args.max_per_class} is not >= 1")
    out = os.path.abspath(args.out)
    check_out(out)
    name, folder = find_source(args.src, args.dataset)
    spec = DATASETS[name]
    names = read_names(folder, spec)
    C = len(names)
    train_raw, train_y = read_split(folder, spec["train"], spec["labels"], C)
    test_raw, test_y = read_split(folder, [spec["test"]], spec["labels"], C)
    counts = ldam_counts(C, args.max_per_class or spec["n_max"], args.imbalance)
    if min(counts) < 1:
        raise UserError("--imbalance", f"{args.imbalance:g} leaves the last class no training image")
    keep = select(train_y, counts, args.seed, folder)
    train_list = f"{spec['tag']}_LT_r{args.imbalance:g}_train.txt"
    test_list = f"{spec['tag']}_test.txt"
    write_tree(out, lambda tmp: {
        train_list: write_split(tmp, "train", (train_raw, train_y), keep, names, args.format),
        test_list: write_split(tmp, "test", (test_raw, test_y), range(len(test_y)), names, args.format)})
    lists = [os.path.join(out, train_list), os.path.join(out, test_list)]
    return summary(spec, args, counts, len(test_y), lists)


def summary(spec, args, counts, n_test, lists):
    """What was written, with the shot groups and the command to train on it."""
    many = sum(n >= MANY for n in counts)
    few = sum(n <= FEW for n in counts)
    q = shlex.quote
    return "\n".join([
        f"{spec['tag']}-LT, imbalance {args.imbalance:g}: {len(counts)} classes, {sum(counts)} train images "
        f"({min(counts)} ... {max(counts)} per class), {n_test} test images",
        f"  many-shot (>= {MANY}): {many} classes, medium: {len(counts) - many - few}, few-shot (<= {FEW}): {few}",
        f"  train list: {lists[0]}",
        f"  test list:  {lists[1]}",
        "train with:",
        f"  python train.py --recipe {spec['tag'].lower()}_lt --data {q(os.path.abspath(args.out))} --split "
        f"{q(lists[0])} --test-split {q(lists[1])}"])


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
