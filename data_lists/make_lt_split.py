#!/usr/bin/env python
"""Make long-tailed split lists (the official OLTR format) from any folder-per-class image tree.

    python data_lists/make_lt_split.py --root /data/flowers --prefix data_lists/Flowers_LT --profile exp --imbalance 100
    python data_lists/make_lt_split.py --root /data/birds --prefix data_lists/Birds_LT --profile pareto --alpha 6

<root>/<class name>/<image> -> <prefix>_train.txt (long-tailed), <prefix>_val.txt and <prefix>_test.txt
(balanced, drawn first so they never overlap the training images), one `relative/path label` per line,
labels = index of the class name in sorted order. Which classes become head or tail is a seeded
shuffle. Profiles: "exp" gives n_i = max * imbalance^(-i / (C - 1)) as in CIFAR-LT (Cui et al. 2019);
"pareto" sorts C Pareto(alpha) draws and maps them onto [min, max], after OLTR's ImageNet-LT (alpha = 6).
A class with fewer images than its target keeps what it has (reported).
"""

import argparse
import os
import random
import sys

EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--root", required=True, help="folder with one sub-folder of images per class")
    p.add_argument("--prefix", required=True, help="output lists: <prefix>_train.txt, _val.txt, _test.txt")
    p.add_argument("--profile", default="exp", choices=["exp", "pareto"], help="shape of the class-size curve")
    p.add_argument("--imbalance", type=float, default=None, help="exp: max / min (None: --max / --min)")
    p.add_argument("--alpha", type=float, default=6.0, help="pareto: shape parameter")
    p.add_argument("--max", type=int, default=500, help="training images of the largest class")
    p.add_argument("--min", type=int, default=5, help="training images of the smallest class")
    p.add_argument("--val-per-class", type=int, default=0, help="balanced validation images per class")
    p.add_argument("--test-per-class", type=int, default=50, help="balanced test images per class")
    p.add_argument("--seed", type=int, default=0, help="seed of the class shuffle and image choice")
    return p


def target_counts(C, profile, max_n, min_n, imbalance=None, alpha=6.0, rng=None):
    """Training images per class rank (largest first): list of C ints in [min_n, max_n]."""
    if C == 1:
        return [max_n]
    if profile == "exp":
        ratio = imbalance or max_n / min_n
        return [max(min_n, round(max_n * ratio ** (-i / (C - 1)))) for i in range(C)]
    draws = sorted((rng.paretovariate(alpha) for _ in range(C)), reverse=True)
    lo, hi = draws[-1], draws[0]
    return [round(min_n + (d - lo) / ((hi - lo) or 1) * (max_n - min_n)) for d in draws]


def scan(root):
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        sys.exit(f"error: {root}: no class folders")
    images = {c: sorted(f"{c}/{e.name}" for e in os.scandir(os.path.join(root, c))
                        if e.is_file() and e.name.lower().endswith(EXTS)) for c in classes}
    return classes, images


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    rng = random.Random(args.seed)
    classes, images = scan(args.root)
    targets = target_counts(len(classes), args.profile, args.max, args.min, args.imbalance, args.alpha, rng)
    ranks = list(range(len(classes)))
    rng.shuffle(ranks)  # ranks[label] = position of the class on the curve
    rows = {"train": [], "val": [], "test": []}
    short = []
    for label, c in enumerate(classes):
        files = images[c][:]
        rng.shuffle(files)
        held = args.val_per_class + args.test_per_class
        if len(files) < held + 1:
            sys.exit(f"error: {args.root}/{c}: {len(files)} images, need {held} held out + 1 for training")
        rows["val"] += [(f, label) for f in files[:args.val_per_class]]
        rows["test"] += [(f, label) for f in files[args.val_per_class:held]]
        want = targets[ranks[label]]
        got = files[held:held + want]
        if len(got) < want:
            short.append(f"{c}: {len(got)} of {want}")
        rows["train"] += [(f, label) for f in got]
    for split, r in rows.items():
        if r:
            with open(f"{args.prefix}_{split}.txt", "w") as f:
                f.writelines(f"{p} {y}\n" for p, y in r)
            print(f"{args.prefix}_{split}.txt: {len(r)} images")
    counts = sorted((sum(1 for _, y in rows["train"] if y == k) for k in range(len(classes))), reverse=True)
    print(f"{len(classes)} classes, train images per class {counts[0]} ... {counts[-1]}")
    if short:
        print(f"{len(short)} classes have fewer images than their target: " + "; ".join(short[:5]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
