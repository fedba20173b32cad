#!/usr/bin/env python
"""Make long-tailed split lists (the official OLTR format) from any folder-per-class image tree.

    python data_lists/make_lt_split.py --root /data/flowers --prefix data_lists/Flowers_LT --imbalance 100
    python data_lists/make_lt_split.py --root /data/cub --prefix data_lists/CUB_LT --profile pareto --alpha 6

<root>/<class name>/<image> -> <prefix>_val.txt and <prefix>_test.txt (balanced: --val-per-class, default 20,
and --test-per-class, default 50, images of every class, as ImageNet-LT; 0 skips that list), drawn first, and
<prefix>_train.txt (long-tailed) from the images left, so the three lists never share an image. One
`relative/path label` per line, labels = index of the class name in sorted order. Which classes become head
or tail is a seeded shuffle, as is the choice of images (--seed). Profiles: "exp" gives
n_i = max * imbalance^(-i / (C - 1)) as in CIFAR-LT (Cui et al. 2019); "pareto" sorts C Pareto(alpha) draws
and maps them onto [min, max], after OLTR's ImageNet-LT (alpha = 6). The smallest class gets --min training
images, or max / --imbalance (give one of the two; default --min 5). Every class needs val + test + 1 images;
a class with fewer images than its training target keeps what it has (reported). Existing lists are not
overwritten without --force; each list is written to a temporary file and renamed into place, in the folder
of --prefix (created when it does not exist). User errors print one line `error: ...` and exit with status 2.
"""

import argparse
import math
import os
import random
import sys
import tempfile

EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
DEFAULT_MIN = 5
SHOW = 5  # names listed in a message before "first N of M"


class UserError(Exception):
    """A bad argument or input: printed as one `error: ...` line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line and status 2, like every other user error
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)" / "(default: False)"
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def get_args_parser():
    p = Parser(description=__doc__, formatter_class=Formatter)
    p.add_argument("--root", required=True, help="folder with one sub-folder of images per class")
    p.add_argument("--prefix", required=True, help="output lists: <prefix>_train.txt, _val.txt, _test.txt")
    p.add_argument("--profile", default="exp", choices=["exp", "pareto"],
                   help="shape of the class-size curve")
    p.add_argument("--imbalance", type=float, default=None,
                   help="max / min training images (>= 1); sets the smallest class instead of --min")
    p.add_argument("--alpha", type=float, default=6.0, help="pareto: shape parameter, 0.1 to 1000")
    p.add_argument("--max", type=int, default=500, help="training images of the largest class")
    p.add_argument("--min", type=int, default=None,
                   help=f"training images of the smallest class (default {DEFAULT_MIN}, or max / "
                   "--imbalance)")
    p.add_argument("--val-per-class", type=int, default=20,
                   help="balanced validation images per class, held out before training (0: no val list)")
    p.add_argument("--test-per-class", type=int, default=50,
                   help="balanced test images per class, held out before training (0: no test list)")
    p.add_argument("--seed", type=int, default=0, help="seed of the class shuffle and image choice")
    p.add_argument("--force", action="store_true", help="overwrite existing output lists")
    return p


def check_args(args):
    """Raise UserError for a value the split cannot be made with; fills in args.min."""
    for name in ("alpha", "imbalance"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise UserError(f"--{name} {value}: must be a finite number")
    if args.max < 1:
        raise UserError(f"--max {args.max}: must be >= 1")
    if args.min is not None and args.min < 1:
        raise UserError(f"--min {args.min}: must be >= 1")
    if args.imbalance is not None:
        if args.min is not None:
            raise UserError("--imbalance and --min both set the smallest class: give one of them")
        if args.imbalance < 1:
            raise UserError(f"--imbalance {args.imbalance:g}: must be >= 1 (max / min)")
        if args.max / args.imbalance < 1:
            raise UserError(f"--imbalance {args.imbalance:g} with --max {args.max}: the smallest class would "
                            f"get {args.max / args.imbalance:.2g} < 1 training images")
        args.min = max(1, round(args.max / args.imbalance))
    elif args.min is None:
        args.min = min(DEFAULT_MIN, args.max)
    if args.min > args.max:
        raise UserError(f"--min {args.min} > --max {args.max}")
    if not 0.1 <= args.alpha <= 1000:  # below 0.1 Pareto draws overflow a float
        raise UserError(f"--alpha {args.alpha:g}: must be in [0.1, 1000] (OLTR's lists use 6)")
    for name in ("val_per_class", "test_per_class"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 0 (0: no list)")
    if not os.path.basename(args.prefix):
        raise UserError(f"--prefix {args.prefix}: needs a file name part, e.g. "
                        f"{os.path.join(args.prefix, 'My_LT')}")
    out_dir = os.path.dirname(args.prefix)
    if out_dir and os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir}: not a folder (from --prefix {args.prefix})")


def target_counts(C, args, rng):
    """Training images per class rank (largest first) for --profile / --max / --min / --imbalance / --alpha:
    list of C ints in [min, max], first max."""
    max_n, min_n = args.max, args.min
    if C == 1:
        return [max_n]
    if args.profile == "exp":
        ratio = args.imbalance or max_n / min_n
        return [max(1, min_n, round(max_n * ratio ** (-i / (C - 1)))) for i in range(C)]
    draws = sorted((rng.paretovariate(args.alpha) for _ in range(C)), reverse=True)
    lo, hi = draws[-1], draws[0]
    return [round(min_n + (d - lo) / ((hi - lo) or 1) * (max_n - min_n)) for d in draws]


def names(items, show=SHOW):
    """'a; b; c' or 'first 5 of 8: a; ...': the count always agrees with what is listed."""
    head = "; ".join(items[:show])
    return head if len(items) <= show else f"first {show} of {len(items)}: {head}"


def usable(name):
    """A path the list format can hold: no whitespace (fields are whitespace-separated), valid UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not any(ch.isspace() for ch in name)


def scan(root):
    """Sorted class names and {class: sorted relative image paths}. Hidden files and folders are skipped."""
    if not os.path.exists(root):
        raise UserError(f"{root}: no such folder (--root)")
    if not os.path.isdir(root):
        raise UserError(f"{root}: not a folder (--root)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UserError(f"{root}: no class folders")
    images = {c: sorted(f"{c}/{e.name}" for e in os.scandir(os.path.join(root, c))
                        if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(EXTS))
              for c in classes}
    bad = [ascii(c) for c in classes if not usable(c)]  # a bad class name: its images are not listed again
    bad += [ascii(p) for c in classes if usable(c) for p in images[c] if not usable(p)]
    if bad:
        raise UserError(f"{root}: {len(bad)} class folder or image names hold whitespace or undecodable "
                        f"bytes, which a `path label` line cannot hold; rename them ({names(bad)})")
    return classes, images


def make_rows(args, classes, images):
    rng = random.Random(args.seed)
    held = args.val_per_class + args.test_per_class
    few = [f"{c} ({len(images[c])})" for c in classes if len(images[c]) < held + 1]
    if few:
        raise UserError(f"{args.root}: {len(few)} of {len(classes)} classes have fewer than {held + 1} "
                        f"images ({args.val_per_class} val + {args.test_per_class} test + 1 training; lower "
                        f"--val-per-class / --test-per-class): {names(few)}")
    targets = target_counts(len(classes), args, rng)
    ranks = list(range(len(classes)))
    rng.shuffle(ranks)  # ranks[label] = position of the class on the curve
    rows = {"train": [], "val": [], "test": []}
    short = []
    for label, c in enumerate(classes):
        files = images[c][:]
        rng.shuffle(files)
        rows["val"] += [(f, label) for f in files[:args.val_per_class]]
        rows["test"] += [(f, label) for f in files[args.val_per_class:held]]
        want = targets[ranks[label]]
        got = files[held:held + want]
        if len(got) < want:
            short.append(f"{c}: {len(got)} of {want}")
        rows["train"] += [(f, label) for f in got]
    return rows, short


def write_lists(outputs):
    """Write {path: rows} atomically: every list to a temporary file first, then all renamed into place."""
    umask = os.umask(0)
    os.umask(umask)
    temps = {}
    path = None
    try:
        for path, rows in outputs.items():
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.",
                                       suffix=".tmp")
            temps[path] = tmp
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
                f.writelines(f"{p} {y}\n" for p, y in rows)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a list is an ordinary file
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except OSError as e:  # name the list, not the temporary file
        raise UserError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)


def run(args):
    check_args(args)
    classes, images = scan(args.root)
    rows, short = make_rows(args, classes, images)
    outputs = {f"{args.prefix}_{split}.txt": r for split, r in rows.items() if r}
    stale = [f"{args.prefix}_{split}.txt" for split, r in rows.items() if not r]
    existing = [p for p in outputs if os.path.lexists(p)]
    if existing and not args.force:
        raise UserError(f"{', '.join(existing)}: already exist{'s' if len(existing) == 1 else ''}; "
                        f"pass --force to overwrite, or choose another --prefix")
    if any(os.path.isdir(p) for p in existing):
        raise UserError(f"{', '.join(p for p in existing if os.path.isdir(p))}: is a folder, not a list")
    if os.path.dirname(args.prefix):  # only now, with every input checked: a refused run leaves no folder
        os.makedirs(os.path.dirname(args.prefix), exist_ok=True)
    write_lists(outputs)
    for path, r in outputs.items():
        print(f"{path}: {len(r)} images")
    for path in stale:
        if os.path.exists(path):
            print(f"warning: {path} is from an earlier run and was left as it is (this run writes no such "
                  f"list); it may overlap the new training list: delete it", file=sys.stderr)
    counts = sorted((sum(1 for _, y in rows["train"] if y == k) for k in range(len(classes))), reverse=True)
    print(f"{len(classes)} classes, train images per class {counts[0]} ... {counts[-1]}")
    if short:
        print(f"{len(short)} of {len(classes)} classes have fewer images than their training target "
              f"({names(short)})")
    return 0


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unreadable folder, full disk, no permission to write: name the file, no traceback
        where = e.filename if e.filename is not None else args.prefix
        print(f"error: {where}: {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
