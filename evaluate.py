#!/usr/bin/env python
"""Evaluate an ltaux checkpoint: overall / many / medium / few top-1, per-class CSV and figures.

    python evaluate.py --data /imagenet --split data_lists/ImageNet_LT_test.txt --checkpoint runs/r10/best.pt
    python evaluate.py ... --compare runs/rrs/eval-ImageNet_LT_test/metrics.json   # Fig. 3's gain bars

Shot groups come from the training-class counts stored in the checkpoint. Writes into --out:
metrics.json, per_class.csv (class, train count, shot group, test count, accuracy, L2 norm of the
primary classifier weight), accuracy.png (Fig. 3: per-class accuracy, classes sorted by training
frequency, with the frequency curve), weight_norms.png (Fig. 4) and, with --compare, gain.png.
"""

import argparse
import csv
import json
import math
import os
import sys

import torch
from PIL import Image, ImageDraw, ImageFont

import ltaux
import train
from ltaux import LTauxError

GROUPS = ("many", "medium", "few")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="an ltaux checkpoint (best.pt or last.pt)")
    p.add_argument("--data", default=None, help="dataset root (None: the one the checkpoint was trained on)")
    p.add_argument("--split", default=None, help="evaluation list (None: the run's --test-split, else --val-split)")
    p.add_argument("--out", default=None, help="output folder (None: eval-<split name> next to the checkpoint)")
    p.add_argument("--compare", default=None, help="metrics.json of another run: draw the per-class accuracy gain")
    p.add_argument("--batch-size", type=int, default=256, help="images per evaluation batch")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader worker processes")
    p.add_argument("--device", default=None, help="cuda or cpu (None: cuda when available)")
    p.add_argument("--many", type=int, default=100, help="many-shot: more than this many train images")
    p.add_argument("--few", type=int, default=20, help="few-shot: fewer than this many train images")
    p.add_argument("--allow-unsafe-paths", action="store_true", help="accept absolute paths and '..' in lists")
    return p


def load_model(path, device):
    """The primary classifier phi + h of a checkpoint, its run arguments and training-class counts."""
    ckpt = train.load_checkpoint(path)
    run = ckpt["args"]
    model = ltaux.LTResNet(run["arch"], ckpt["model"]["fc.weight"].shape[0], run["embed_dim"])
    train.load_weights(model, ckpt, path)
    return model.to(device).eval(), run, ckpt["train_counts"]


def per_class_rows(metrics, counts, norms, many, few):
    groups = ltaux.shot_groups(counts, many, few).tolist()
    return [dict(cls=c, train_count=int(counts[c]), shot_group=GROUPS[groups[c]], test_count=metrics["counts"][c],
                 accuracy=metrics["per_class"][c], weight_norm=float(norms[c])) for c in range(len(counts))]


def write_outputs(out, metrics, rows, meta):
    os.makedirs(out, exist_ok=True)
    summary = {k: metrics[k] for k in ("overall", "mean_per_class", "many", "medium", "few")}
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(dict(summary, **meta, per_class=metrics["per_class"], test_counts=metrics["counts"],
                       train_counts=[r["train_count"] for r in rows],
                       weight_norms=[r["weight_norm"] for r in rows]), f, indent=1)
    with open(os.path.join(out, "per_class.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{**r, "accuracy": "" if r["accuracy"] is None else f"{r['accuracy']:.2f}",
                      "weight_norm": f"{r['weight_norm']:.4f}"} for r in rows])


# ----------------------------------------------------------------------------------------------
# figures, drawn with Pillow alone


def font(size):
    try:
        return ImageFont.load_default(size=size)  # scalable with Pillow >= 10.1 and FreeType
    except TypeError:
        return ImageFont.load_default()


def nice_ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi]."""
    step = (hi - lo) / n or 1.0
    mag = 10 ** math.floor(math.log10(step))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= step), default=10 * mag)
    ticks = [math.floor(lo / step) * step]
    while ticks[-1] < hi - 1e-9:  # up to the first tick at or above hi
        ticks.append(ticks[-1] + step)
    return ticks


def bar_figure(path, values, title, ylabel, groups, curve=None, curve_label=None, colors=None):
    """Bars of `values` (classes already sorted by training frequency, most first), dashed lines at
    the many/medium/few boundaries, optional second series `curve` on a right-hand log axis."""
    W, H, L, R, Tm, B = 1200, 560, 90, 100 if curve else 30, 50, 70
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    f, fs = font(16), font(13)
    vals = [0.0 if v is None else v for v in values]
    lo, hi = min(0.0, min(vals)), max(vals) or 1.0
    ticks = nice_ticks(lo, hi)
    lo, hi = min(lo, ticks[0]), max(hi, ticks[-1])
    y_of = lambda v: Tm + (H - Tm - B) * (hi - v) / (hi - lo)
    n, pw = len(vals), W - L - R
    for t in ticks:
        d.line([(L - 5, y_of(t)), (W - R, y_of(t))], fill=(225, 225, 225))
        d.text((L - 8, y_of(t)), f"{t:g}", fill="black", font=fs, anchor="rm")
    for i, v in enumerate(vals):
        x0, x1 = L + pw * i / n, L + pw * (i + 1) / n
        color = (colors or {}).get(groups[i], (70, 110, 180)) if v >= 0 else (200, 70, 60)
        d.rectangle([x0, min(y_of(v), y_of(0)), max(x0, x1 - (1 if n < 200 else 0)), max(y_of(v), y_of(0))], fill=color)
    d.line([(L, y_of(0)), (W - R, y_of(0))], fill="black")
    d.line([(L, Tm), (L, H - B)], fill="black")
    for g in range(1, 3):  # shot-group boundaries
        i = next((j for j, x in enumerate(groups) if x >= g), n)
        x = L + pw * i / n
        for y in range(Tm, H - B, 8):
            d.line([(x, y), (x, y + 4)], fill=(120, 120, 120))
    for g, name in enumerate(GROUPS):
        idx = [j for j, x in enumerate(groups) if x == g]
        if idx:
            d.text((L + pw * (idx[0] + len(idx) / 2) / n, Tm - 8), f"{name}-shot", fill="black", font=fs, anchor="md")
    if curve:
        c_lo, c_hi = math.log10(max(1, min(curve))), math.log10(max(curve)) + 1e-9
        cy = lambda c: Tm + (H - Tm - B) * (c_hi - math.log10(max(c, 1))) / max(c_hi - c_lo, 1e-9)
        d.line([(L + pw * (i + 0.5) / n, cy(c)) for i, c in enumerate(curve)], fill=(230, 120, 0), width=3)
        d.line([(W - R, Tm), (W - R, H - B)], fill="black")
        for e in range(math.floor(c_lo), math.ceil(c_hi) + 1):
            for m in (1, 2, 5):
                c = m * 10 ** e
                if c_lo - 1e-9 <= math.log10(c) <= c_hi + 1e-9:
                    d.text((W - R + 8, cy(c)), f"{c:g}", fill=(200, 100, 0), font=fs, anchor="lm")
        label = Image.new("RGB", (H - Tm - B, 24), "white")
        ImageDraw.Draw(label).text(((H - Tm - B) / 2, 12), curve_label, fill=(200, 100, 0), font=f, anchor="mm")
        img.paste(label.rotate(-90, expand=True), (W - 30, Tm))
    label = Image.new("RGB", (H - Tm - B, 24), "white")
    ImageDraw.Draw(label).text(((H - Tm - B) / 2, 12), ylabel, fill="black", font=f, anchor="mm")
    img.paste(label.rotate(90, expand=True), (8, Tm))
    d.text((L + pw / 2, H - B + 12), f"classes sorted by training frequency (1 ... {n})", fill="black", font=f, anchor="ma")
    d.text((W / 2, 10), title, fill="black", font=f, anchor="ma")
    img.save(path)


def draw_figures(out, rows, compare=None):
    order = sorted(range(len(rows)), key=lambda c: -rows[c]["train_count"])
    groups = [GROUPS.index(rows[c]["shot_group"]) for c in order]
    curve = [rows[c]["train_count"] for c in order]
    tint = {0: (70, 110, 180), 1: (90, 160, 90), 2: (200, 140, 40)}
    bar_figure(os.path.join(out, "accuracy.png"), [rows[c]["accuracy"] for c in order],
               "Per-class top-1 accuracy (Fig. 3)", "top-1 accuracy (%)", groups, curve,
               "training images per class (log)", tint)
    bar_figure(os.path.join(out, "weight_norms.png"), [rows[c]["weight_norm"] for c in order],
               "L2 norm of the primary classifier weight per class (Fig. 4)", "||w_c||", groups, curve,
               "training images per class (log)", tint)
    if compare is not None:
        other = compare["per_class"]
        if len(other) != len(rows):
            raise LTauxError(f"--compare metrics have {len(other)} classes, this checkpoint {len(rows)}")
        gain = [None if rows[c]["accuracy"] is None or other[c] is None else rows[c]["accuracy"] - other[c]
                for c in order]
        bar_figure(os.path.join(out, "gain.png"), gain, f"Per-class accuracy gain over {compare.get('checkpoint')}",
                   "accuracy gain (points)", groups, curve, "training images per class (log)")


# ----------------------------------------------------------------------------------------------


def run(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, run_args, counts = load_model(args.checkpoint, device)
    data = args.data or run_args["data"]
    split = args.split or run_args.get("test_split") or run_args.get("val_split")
    if not split:
        raise LTauxError("--split is required (the checkpoint's run had no test or validation list)")
    compare = None
    if args.compare:
        try:
            compare = json.load(open(args.compare))
        except (OSError, ValueError) as e:
            raise LTauxError(f"{args.compare}: cannot read metrics ({e})") from None
    ds = ltaux.SplitDataset(data, split, train.build_transform(run_args["image_size"], train=False),
                            allow_unsafe_paths=args.allow_unsafe_paths)
    for y, line in zip(ds.labels, ds.lines):
        if y >= len(counts):
            raise LTauxError(f"{split}:{line}: label {y} is not a class of the checkpoint ({len(counts)} classes)")
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers,
                                         pin_memory=device.type == "cuda")
    amp = torch.bfloat16 if device.type == "cuda" else None
    pred, target = train.predict(model, loader, device, amp)
    metrics = ltaux.shot_accuracy(pred, target, counts, args.many, args.few)
    norms = model.fc.weight.detach().norm(dim=1).cpu()
    rows = per_class_rows(metrics, counts, norms, args.many, args.few)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                   "eval-" + os.path.splitext(os.path.basename(split))[0])
    write_outputs(out, metrics, rows, dict(checkpoint=os.path.abspath(args.checkpoint), split=split,
                                          method=run_args["method"], many_threshold=args.many, few_threshold=args.few))
    draw_figures(out, rows, compare)
    balanced = len(set(metrics["counts"]) - {0}) == 1
    print(f"{args.checkpoint} on {split} ({len(ds)} images{'' if balanced else ', unbalanced'}):")
    print(train.format_table({run_args["method"]: metrics}))
    print(f"wrote {out}/: metrics.json per_class.csv accuracy.png weight_norms.png" + (" gain.png" if compare else ""))
    return 0


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        return run(args)
    except LTauxError as e:
        return train.report(e)


if __name__ == "__main__":
    sys.exit(main())
