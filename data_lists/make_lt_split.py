#!/usr/bin/env python
"""Make long-tailed split lists (the official OLTR format) from any folder-per-class image tree.

    python data_lists/make_lt_split.py --root /data/flowers --prefix data_lists/Flowers_LT --imbalance 100
    python data_lists/make_lt_split.py --root /data/cub --prefix data_lists/CUB_LT --profile pareto --alpha 6

<root>/<class name>/<image> -> balanced <prefix>_val.txt and <prefix>_test.txt (as ImageNet-LT) drawn first,
and a long-tailed <prefix>_train.txt from the images left: no image is in two lists. One `relative/path label`
per line, label = index of the class name in sorted order. Profiles: "exp" gives
n_i = max * imbalance^(-i / (C - 1)) as in CIFAR-LT (Cui et al. 2019); "pareto" maps C sorted Pareto(alpha)
draws onto [min, max], after OLTR's ImageNet-LT (alpha 6). Every class needs val + test + 1 images; one short
of its training target keeps what it has (reported). Each list is written to a temporary file renamed into
place, in the folder of --prefix (made when missing). User errors print one line `error: ...`, exit status 2.
"""

import argparse
import math
import os
import random
import sys

EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
DEFAULT_MIN = 5


class UserError(Exception):
    """A bad argument or input: printed as one `error: ...` line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line and status 2, like every other user error
        self.exit(2, f"error: {message} (see --help)\n")


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)" / "(default: False)"
        hide = action.default is None or action.default is False
        return action.help if hide else super()._get_help_string(action)


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
    for flag, value in (("--alpha", args.alpha), ("--imbalance", args.imbalance)):
        if value is not None and not math.isfinite(value):
            raise UserError(f"{flag} {value}: must be a finite number")
    for flag, value in (("--max", args.max), ("--min", args.min)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be >= 1")
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
        raise UserError(f"--prefix {args.prefix}: needs a file name part, e.g. {args.prefix}My_LT")
    if os.path.exists(out_dir := os.path.dirname(args.prefix)) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir}: not a folder (from --prefix {args.prefix})")


def target_counts(C, args, rng):
    """Training images per class rank, largest first: C ints in [--min, --max] on --profile's curve."""
    if C == 1:
        return [args.max]
    if args.profile == "exp":
        ratio = args.imbalance or args.max / args.min
        return [max(1, args.min, round(args.max * ratio ** (-i / (C - 1)))) for i in range(C)]
    draws = sorted((rng.paretovariate(args.alpha) for _ in range(C)), reverse=True)
    lo, hi = draws[-1], draws[0]
    return [round(args.min + (d - lo) / ((hi - lo) or 1) * (args.max - args.min)) for d in draws]


def names(items, show=5):
    """'a; b; c' or 'first 5 of 8: a; ...': the count always agrees with what is listed."""
    head = "; ".join(items[:show])
    return head if len(items) <= show else f"first {show} of {len(items)}: {head}"


def usable(name):
    """A path a list can hold: no whitespace (the field separator) nor undecodable byte (a lone surrogate)."""
    return not any(ch.isspace() or "\ud800" <= ch <= "\udfff" for ch in name)


def scan(root):
    """Sorted class names and {class: sorted relative image paths}. Hidden files and folders are skipped."""
    if not os.path.isdir(root):
        raise UserError(f"{root}: {'not a folder' if os.path.exists(root) else 'no such folder'} (--root)")
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
    rng, held = random.Random(args.seed), args.val_per_class + args.test_per_class
    few = [f"{c} ({len(images[c])})" for c in classes if len(images[c]) < held + 1]
    if few:
        raise UserError(f"{args.root}: {len(few)} of {len(classes)} classes have fewer than {held + 1} "
                        f"images ({args.val_per_class} val + {args.test_per_class} test + 1 training; lower "
                        f"--val-per-class / --test-per-class): {names(few)}")
    targets = target_counts(len(classes), args, rng)
    ranks = list(range(len(classes)))
    rng.shuffle(ranks)  # ranks[label] = position of the class on the curve
    rows, short = {"train": [], "val": [], "test": []}, []
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
    temps = {p: os.path.join(os.path.dirname(p), f".{os.path.basename(p)}.{os.getpid()}.tmp")
             for p in outputs}  # beside each list: a rename within one file system
    try:
        for path, tmp in temps.items():
            with open(tmp, "x", encoding="utf-8", newline="\n") as f:  # "x": a new file, mode 0666 & ~umask
                f.writelines(f"{p} {y}\n" for p, y in outputs[path])
                f.flush()
                os.fsync(f.fileno())
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except OSError as e:  # name the list, not the temporary file
        raise UserError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        for tmp in filter(os.path.exists, temps.values()):
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
    for path in filter(os.path.exists, stale):
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
        print(f"error: {e.filename or args.prefix}: {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
