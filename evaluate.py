#!/usr/bin/env python
"""Evaluate an ltaux checkpoint: overall / many / medium / few top-1, a per-class CSV and the paper's figures.

examples:
  python evaluate.py --checkpoint runs/in_r10/best.pt                  # the run's data root and test list
  python evaluate.py --checkpoint runs/in_r10_cbs_rrs/best.pt --compare runs/in_r10_rrs/best.pt \
runs/in_r10_cbs/best.pt

Shot groups come from the training-class counts stored in the checkpoint and the run's --many / --few.
Writes into --out (one folder per evaluation; its earlier outputs for the same checkpoint and list are
replaced, anything else only with --overwrite): metrics.json (with the paper's row for a recipe run),
per_class.csv, accuracy.png (per-class accuracy, classes sorted by training frequency, with the frequency
curve), weight_norms.png (Fig. 4 right: L2 norm of h's weight per class) and, with --compare (baseline runs
such as RRS-Only and CBS-Only, evaluated the same way): gain.png (Fig. 3: per-class accuracy gain over each
baseline) and tsne.png (Fig. 4: t-SNE of phi's test features of 18 classes, 6 per shot group).
"""

import argparse
import os
import sys

import recipes


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=recipes.HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="an ltaux checkpoint (best.pt or last.pt)")
    p.add_argument("--data", help="dataset root (None: the one the checkpoint was trained on)")
    p.add_argument("--split", help="evaluation list (None: the run's --test-split, else --val-split)")
    p.add_argument("--out", help="output folder (None: eval-<split name> next to the checkpoint)")
    p.add_argument("--compare", nargs="+", metavar="CKPT",
                   help="checkpoints of baseline runs (e.g. RRS-Only and CBS-Only) of the same training "
                        "list, evaluated on the same split with the same settings: gain.png and tsne.png")
    p.add_argument("--eval-batch-size", type=int, default=256, help="images per evaluation batch")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader worker processes")
    p.add_argument("--device", choices=["cuda", "cpu"], help="None: cuda when available")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"],
                   help="autocast precision (None: the run's --amp, else bf16 on CUDA and on CPUs that run "
                        "bf16 natively, off elsewhere)")
    p.add_argument("--many", type=int, help="many-shot classes: at least this many training images (None: "
                   "the run's --many, else 100; Decoupling's groups: --many 101 --few 19)")
    p.add_argument("--few", type=int, help="few-shot classes: at most this many training images (None: "
                   "the run's --few, else 20)")
    p.add_argument("--allow-unsafe-paths", action="store_true",
                   help="accept absolute paths and '..' in lists")
    p.add_argument("--overwrite", action="store_true", help="replace the files of another evaluation "
                   "(or files named like this one's outputs) in --out")
    return p


if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):
    get_args_parser().parse_args()  # prints the help and exits before torch is imported

import collections  # noqa: E402 - after the fast --help
import csv  # noqa: E402
import dataclasses  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

import bookkeeping  # noqa: E402
import ltaux  # noqa: E402
import pipeline  # noqa: E402
import runtime  # noqa: E402
from ltaux import LTauxError  # noqa: E402

GROUPS = ("many", "medium", "few")
OUTPUTS = ("metrics.json", "per_class.csv", "accuracy.png", "weight_norms.png", "gain.png", "tsne.png")
TSNE_CLASSES, TSNE_IMAGES = 6, 50  # Section 4.6: 6 classes per shot group, 50 test images per class


@dataclasses.dataclass
class Run:
    """One checkpoint to evaluate: the deployed model (phi + h, on the CPU until its turn) and its results."""
    path: str
    model: torch.nn.Module
    args: dict
    counts: torch.Tensor
    old_groups: bool  # written before ltaux counted many / few inclusively
    label: str = ""
    split_sha256: str = None  # the sha256 of its training list, as the checkpoint records it
    metrics: dict = None  # ltaux.shot_accuracy's dict
    norms: list = None  # (C,) L2 norm of each row of h's weight
    feats: torch.Tensor = None  # (n, D) phi's features of the t-SNE images
    tsne_labels: list = None  # (n,) their classes


def load_run(path, reference=None):
    """A checkpoint as a Run; a --compare one must share the reference's classes and training counts."""
    if path.endswith(".json"):
        raise LTauxError(f"{path}: --compare takes the checkpoints (best.pt) of the baseline runs, "
                         "not metrics")
    model, ckpt = bookkeeping.model_from_checkpoint(path)
    data = ckpt.get("data")
    run = Run(path, model, ckpt["args"], ckpt["train_counts"].long(), "shot_rule" not in ckpt,
              split_sha256=data.get("list_sha256") if isinstance(data, dict) else None)
    if reference is not None:
        C, ref = len(run.counts), reference.counts
        if C != len(ref):
            raise LTauxError(f"{path}: --compare checkpoint has {C} classes, "
                             f"{reference.path} has {len(ref)}: compare runs trained on the same list")
        if not torch.equal(run.counts, ref):
            c = int(torch.nonzero(run.counts != ref)[0])
            raise LTauxError(f"{path}: --compare checkpoint was trained on other class counts than "
                             f"{reference.path} (class {c}: {int(run.counts[c])} vs {int(ref[c])} images): "
                             "compare runs trained on the same list")
    return run


def label_runs(runs):
    """'<method> (<run folder>)', e.g. 'RRS-Only (in_r10_rrs)'; '(<folder>/<file>)' where two clash."""
    names = []
    for r in runs:
        method = r.args.get("method")
        name = recipes.METHODS[method].name if method in recipes.METHODS else str(method)
        names.append((name + ("+rot.aug" if r.args.get("rotation_aug") else ""),
                      os.path.basename(os.path.dirname(os.path.abspath(r.path)))))
    clash, seen = collections.Counter(names), collections.Counter()
    for r, (name, folder) in zip(runs, names):
        where = f"{folder}/{os.path.basename(r.path)}" if clash[name, folder] > 1 else folder
        r.label = f"{name} ({where})"
        seen[r.label] += 1
        r.label += f" #{seen[r.label]}" if seen[r.label] > 1 else ""


def training_settings(args):
    """A run's saved arguments that shape its training as its method uses them (no --seed, --amp, --many,
    --few; lambdas: none for a baseline, 2 for cbs_rrs), e.g. {'epochs': 8, ..., 'lambdas': [0.5, 1.0]}."""
    method = recipes.METHODS.get(args.get("method"))
    values = {k: args.get(k) for k in recipes.PROTOCOL if k not in ("many", "few")}
    if method is not None and method.sampler == "rrs":
        del values["per_class"]  # no class-balanced batch
    if method is not None and not (method.rotation or args.get("rotation_aug")):
        del values["rotation"]  # no rotated images
    if method is not None and len(method.heads) > 1:  # the baselines train h alone with weight 1
        values["lambdas"] = [float(v) for v in args.get("lambdas") or ()][:len(method.heads)]
    return values


def settings_note(main, baselines):
    """One `note:` line naming the training settings in which the compared runs and the evaluated one
    differ, or None: a gain over a 1-epoch baseline is not the method's gain."""
    ours, theirs, keys = training_settings(main.args), [], []
    for b in baselines:
        other = training_settings(b.args)
        n = min(len(ours.get("lambdas", [])), len(other.get("lambdas", [])))  # the weights both losses use
        differ = [k for k in other if k in ours and (other[k][:n] != ours[k][:n] if k == "lambdas" else
                                                     other[k] != ours[k])]
        keys += [k for k in differ if k not in keys]
        if differ:
            theirs.append(f"{b.label} with {', '.join(recipes.flag(k, other[k]) for k in differ)}")
    if not theirs:
        return None
    return (f"note: the gains are not the methods' alone: {main.label} was trained with "
            f"{', '.join(recipes.flag(k, v) for k, v in ours.items() if k in keys)}, but {', '.join(theirs)}")


def settings(args, run, device):
    """Fill the None arguments from the run's own (data, split, amp, many, few) and pick --out; check them."""
    args.data = args.data or run.get("data")
    args.split = args.split or run.get("test_split") or run.get("val_split")
    if not args.split:
        raise LTauxError(f"{args.checkpoint}: its run had no test or validation list: pass --split LIST")
    if not args.data or not os.path.isdir(args.data):
        raise LTauxError(f"--data {args.data}: no such folder (the dataset root of {args.split})")
    args.amp = args.amp or run.get("amp")
    args.many = run.get("many", 100) if args.many is None else args.many
    args.few = run.get("few", 20) if args.few is None else args.few
    runtime.check_thresholds(args.many, args.few)
    if not 1 <= args.eval_batch_size <= 2**20 or not 0 <= args.workers <= 1024:
        raise LTauxError(f"--eval-batch-size {args.eval_batch_size} --workers {args.workers}: "
                         "need 1..2^20 and 0..1024")
    args.out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                        "eval-" + os.path.splitext(os.path.basename(args.split))[0])
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise LTauxError(f"--out {args.out}: exists and is not a folder")
    return runtime.amp_dtype(args.amp, device)


def tsne_indices(labels, counts, many, few):
    """Section 4.6's images: per shot group, 6 classes evenly spaced in training-frequency order (fewer where
    fewer have test images), their first 50 test images each. Returns (indices, [(class, group)] to plot)."""
    by_class = collections.defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    groups = ltaux.shot_groups(counts, many, few).tolist()
    order = sorted(by_class, key=lambda c: (-int(counts[c]), c))  # most frequent first
    picked = []
    for g in range(3):
        members = [c for c in order if groups[c] == g]
        k, n = min(TSNE_CLASSES, len(members)), len(members)
        picked += [(members[(2 * i + 1) * n // (2 * k)], g) for i in range(k)]  # the centres of k equal parts
    return [i for c, _ in picked for i in by_class[c][:TSNE_IMAGES]], picked


def class_names(lists, num_classes):
    """Each class's name: the folder of its first listed image (train/n01440764/x.JPEG -> n01440764),
    lengthened by parent folders where classes share it (apartment_building/outdoor). Lists (None: skipped)
    name in turn the classes still unnamed (a flat list like Places' val_256/ names none); else the index."""
    names = {}
    for paths, labels in filter(None, lists):
        dirs = {}
        for p, y in zip(paths, labels):
            dirs.setdefault(y, p.replace("\\", "/").split("/")[:-1])
        depth, grow = dict.fromkeys(dirs, 1), True
        while grow:
            name = {y: "/".join(d[-depth[y]:]) for y, d in dirs.items() if d}
            seen = collections.Counter(name.values())
            grow = [y for y, s in name.items() if seen[s] > 1 and depth[y] < len(dirs[y])]
            depth.update((y, depth[y] + 1) for y in grow)
        for y, s in name.items():
            if seen[s] == 1 and y < num_classes:
                names.setdefault(y, s)
    return [names.get(c, str(c)) for c in range(num_classes)]


def per_class_rows(main, names, many, few):
    groups = ltaux.shot_groups(main.counts, many, few).tolist()
    m = main.metrics
    return [dict(cls=c, name=names[c], train_count=int(main.counts[c]), shot_group=GROUPS[groups[c]],
                 test_count=m["counts"][c], accuracy=m["per_class"][c], weight_norm=main.norms[c])
            for c in range(len(names))]


def claim_out(args, files):
    """Create and lock --out: its own earlier outputs (same checkpoint and list) replaced, those not written
    now (gain.png without --compare) removed; others' (or same-named) files only with --overwrite."""
    earlier = bookkeeping.read_json(os.path.join(args.out, "metrics.json"))
    own = isinstance(earlier, dict) and earlier.get("checkpoint") == os.path.abspath(args.checkpoint) and \
        earlier.get("split") == os.path.abspath(args.split)
    folder = bookkeeping.OutputFolder(args.out, OUTPUTS, "evaluation", args.overwrite, own, replaced=files)
    for f in set(earlier.get("files", []) if own else []) & set(OUTPUTS) - set(files):
        if os.path.isfile(os.path.join(args.out, f)):
            os.remove(os.path.join(args.out, f))
    return folder


def write_tables(args, main, baselines, rows, files, paper):
    """metrics.json (this run, the paper's row, a 'compare' entry per baseline, its files), per_class.csv."""
    keys = ("overall", "mean_per_class", "many", "medium", "few")  # each run's summary
    meta = dict(checkpoint=os.path.abspath(main.path), split=os.path.abspath(args.split), data=args.data,
                method=main.args.get("method"), label=main.label, amp=args.amp_name,
                thresholds=dict(many=args.many, few=args.few), files=files)
    if paper:
        meta.update(paper=paper, paper_difference=recipes.paper_difference(main.metrics, paper))
    compare = [dict(checkpoint=os.path.abspath(b.path), method=b.args.get("method"), label=b.label,
                    **{k: b.metrics[k] for k in keys}, per_class=b.metrics["per_class"], weight_norms=b.norms)
               for b in baselines]
    bookkeeping.atomic_write(os.path.join(args.out, "metrics.json"), json.dumps(dict(
        {k: main.metrics[k] for k in keys}, per_class=main.metrics["per_class"],
        test_counts=main.metrics["counts"], train_counts=main.counts.tolist(), weight_norms=main.norms,
        class_names=[r["name"] for r in rows], **meta, compare=compare), indent=1))
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows([{**r, "accuracy": "" if r["accuracy"] is None else f"{r['accuracy']:.2f}",
                  "weight_norm": f"{r['weight_norm']:.4f}"} for r in rows])
    bookkeeping.atomic_write(os.path.join(args.out, "per_class.csv"), text.getvalue())


def result_table(main, baselines, paper):
    """This run (with the paper's row for a recipe run), each baseline, this run's gain over each (points)."""
    table = runtime.format_table({main.label: main.metrics}) + runtime.paper_lines(main.metrics, paper)
    for row in runtime.format_table({b.label: b.metrics for b in baselines}).splitlines()[2:]:
        table += "\n" + row  # the baselines' rows under this run's header
    for b in baselines:
        cells = ["-" if main.metrics[k] is None or b.metrics[k] is None
                 else f"{main.metrics[k] - b.metrics[k]:+.1f}"
                 for k in ("many", "medium", "few", "overall", "mean_per_class")]
        table += "\n| " + " | ".join([f"gain over {b.label}"] + cells) + " |"
    return table


GROUP_COLORS = ((31, 119, 180), (44, 160, 44), (148, 103, 189))  # many, medium, few bars: blue, green, purple
FREQ_COLOR = (255, 140, 0)  # the training-frequency curve (right axis), orange everywhere
RUN_COLORS = ((31, 119, 180), (214, 39, 40), (140, 86, 75), (23, 190, 207), (227, 119, 194), (188, 189, 34))
THIS_COLOR = (20, 20, 20)  # this run's series in weight_norms.png; the baselines take RUN_COLORS (as Fig. 3)
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 128), (128, 0, 0),
           (0, 128, 128), (255, 215, 0), (0, 0, 0), (154, 205, 50), (255, 105, 180), (160, 82, 45))  # t-SNE
SIZE = (1200, 560)  # accuracy.png, weight_norms.png, gain.png
TSNE_PANEL, TSNE_LEGEND = 440, 300  # tsne.png: a square panel per run, then the class legend


def font(size):
    try:
        return ImageFont.load_default(size=size)  # scalable with Pillow >= 10.1 and FreeType
    except TypeError:
        return ImageFont.load_default()


def ticks(lo, hi):
    """Round tick values from lo to hi: a step of 1, 2 or 5 x 10^k giving 4 to 10 ticks."""
    span = (hi - lo) or 1.0
    step = min(m * 10 ** e for e in range(math.floor(math.log10(span)) - 1, math.floor(math.log10(span)) + 1)
               for m in (1, 2, 5) if span / (m * 10 ** e) <= 10)
    return [k * step for k in range(math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9) + 1)]


class Chart:
    """n class slots on x (most frequent first), a linear left axis over `ylim`, the training frequency on a
    log right axis, shot groups (dashed, named above the plot), a legend row. Draw series, then save(). The
    frequency curve goes over the bars and under the lines: bars are wide and hide it, lines are thin."""
    L, R, T, B = 70, 70, 100, 50  # margins; the band [T - 22, T) holds the group names
    W, H = SIZE[0] - L - R, SIZE[1] - T - B  # the plot

    def __init__(self, title, ylabel, ylim, counts, groups):
        self.img = Image.new("RGB", SIZE, "white")
        self.d, self.f, self.fs = ImageDraw.Draw(self.img), font(16), font(13)
        self.n, self.lo, self.hi, self.groups, self.counts = len(counts), ylim[0], ylim[1], groups, counts
        self.legend, self.lines = [("training images per class (right axis)", FREQ_COLOR)], []
        lo, hi = math.log10(max(1, min(counts))), math.log10(max(1, max(counts)))
        self.log_lo, self.log_hi = min(lo, hi - 1) - 0.05, hi + 0.05  # >= a decade, ends clear of the frame
        self.d.text((SIZE[0] / 2, 8), title, fill="black", font=self.f, anchor="ma")
        self.d.text((self.L, self.T - 28), ylabel, fill="black", font=self.fs, anchor="ls")
        for t in ticks(self.lo, self.hi):
            self.d.line([(self.L, self.y(t)), (SIZE[0] - self.R, self.y(t))], fill=(228, 228, 228))
            self.d.text((self.L - 6, self.y(t)), f"{t:g}", fill="black", font=self.fs, anchor="rm")

    def x(self, i):
        """Left edge of class slot i (fractional i: inside the slot)."""
        return self.L + self.W * i / self.n

    def y(self, v):
        return self.T + self.H * (self.hi - min(max(v, self.lo), self.hi)) / (self.hi - self.lo)

    def cy(self, count):
        """The height of `count` training images on the log right axis."""
        return self.T + self.H * (self.log_hi - math.log10(max(count, 1))) / (self.log_hi - self.log_lo)

    def bars(self, series, mark_zero=False):
        """series: [(values, colour or per-slot colours, legend label or None)], None = no bar. Side by side
        where a slot holds >= 3 px per series, else overlaid, the largest |value| first so each stays visible.
        mark_zero: a triangle on the zero line marks 0 (an unseen 0-height bar looks like no test images)."""
        slot, y0 = self.W / self.n, self.y(0)
        wide, r = slot >= 3 * len(series), min(4.0, max(2.0, 0.4 * self.W / self.n))
        for i in range(self.n):
            drawn = [(v[i], c if isinstance(c[0], int) else c[i], k) for k, (v, c, _) in enumerate(series)
                     if v[i] is not None]
            for v, color, k in (drawn if wide else sorted(drawn, key=lambda t: -abs(t[0]))):
                x0 = self.x(i) + (slot * (0.1 + 0.8 * k / len(series)) if wide else 0)
                x1 = x0 + max((slot * 0.8 / len(series) if wide else slot) - 1, 0)
                self.d.rectangle([x0, min(self.y(v), y0), x1, max(self.y(v), y0)], fill=color)
                if mark_zero and v == 0:
                    xm, ym = (x0 + x1) / 2, y0 - 1
                    self.d.polygon([(xm - r, ym), (xm + r, ym), (xm, ym - 6)], fill=color)
        self.legend += [(label, c) for _, c, label in series if label]

    def line(self, values, color, label):
        self.lines.append((values, color))
        self.legend.append((label, color))

    def polyline(self, ys, **kw):
        """Through the slot centres at heights ys (one point drawn twice: Pillow draws no 1-point line)."""
        self.d.line([(self.x(i + 0.5), y) for i, y in enumerate(ys)] * (1 + (self.n == 1)), **kw)

    def save(self):
        d, L, T, right, bottom = self.d, self.L, self.T, SIZE[0] - self.R, SIZE[1] - self.B
        self.polyline([self.cy(c) for c in self.counts], fill=FREQ_COLOR, width=3)
        for c in (m * 10 ** e for e in range(0, 8) for m in (1, 2, 5)):
            if self.log_lo <= math.log10(c) <= self.log_hi:
                d.text((right + 6, self.cy(c)), f"{c:g}", fill=(200, 100, 0), font=self.fs, anchor="lm")
        d.text((right, T - 28), "training images per class (log)", fill=(200, 100, 0), font=self.fs,
               anchor="rs")
        for values, color in self.lines:
            self.polyline([self.y(v) for v in values], fill=color, width=2 if self.n > 200 else 3)
        d.line([(L, self.y(0)), (right, self.y(0))], fill="black")
        d.rectangle([L, T, right, bottom], outline="black")
        for g, name in enumerate(GROUPS):
            idx = [i for i, x in enumerate(self.groups) if x == g]
            if idx:
                if idx[0] > 0:
                    for y in range(T - 22, bottom, 8):
                        d.line([(self.x(idx[0]), y), (self.x(idx[0]), y + 4)], fill=(110, 110, 110), width=2)
                d.text((self.x(idx[0] + len(idx) / 2), T - 12), f"{name}-shot ({len(idx)})",
                       fill=(90, 90, 90), font=self.fs, anchor="mm")
        for t in ticks(1, self.n):
            if t == int(t) and 1 <= t <= self.n:
                d.text((self.x(t - 0.5), bottom + 4), f"{int(t)}", fill="black", font=self.fs, anchor="ma")
        d.text((L + (right - L) / 2, bottom + 24),
               f"classes sorted by training frequency (most first, 1 ... {self.n})",
               fill="black", font=self.f, anchor="ma")
        x = L
        for label, color in self.legend:  # one row under the title
            d.rectangle([x, 34, x + 12, 46], fill=color)
            d.text((x + 18, 40), label, fill="black", font=self.fs, anchor="lm")
            x += 40 + (self.fs.getlength(label) if hasattr(self.fs, "getlength") else 7 * len(label))
        return self.img


def draw_figures(main, baselines, rows, split, picked):
    """{file name: image}: accuracy.png, weight_norms.png and, with baselines, gain.png and tsne.png."""
    order = sorted(range(len(rows)), key=lambda c: (-rows[c]["train_count"], c))  # most frequent first
    groups = [GROUPS.index(rows[c]["shot_group"]) for c in order]
    counts = [rows[c]["train_count"] for c in order]
    where = f"{main.label} on {os.path.basename(split)}"
    chart = Chart(f"Per-class top-1 accuracy: {where}", "top-1 accuracy (%; a triangle on the axis: 0 %)",
                  (0, 100), counts, groups)
    accuracy = [rows[c]["accuracy"] for c in order]
    chart.bars([(accuracy, [GROUP_COLORS[g] for g in groups], None)], mark_zero=True)
    chart.legend += [(f"{GROUPS[g]}-shot classes", GROUP_COLORS[g]) for g in sorted(set(groups))]
    figures = {"accuracy.png": chart.save()}
    runs = [(main, THIS_COLOR)] + [(b, RUN_COLORS[k % len(RUN_COLORS)]) for k, b in enumerate(baselines)]
    top = ticks(0, max(max(r.norms) for r, _ in runs) or 1.0)[-1]
    chart = Chart(f"L2 norm of the classifier h's weight per class (Fig. 4): {main.label}", "||w_c||",
                  (0, top), counts, groups)  # the weights alone: no test list in the title
    for r, color in runs:
        chart.line([r.norms[c] for c in order], color, r.label)
    figures["weight_norms.png"] = chart.save()
    if not baselines:
        return figures
    ours = main.metrics["per_class"]
    gains = [[None if ours[c] is None or b.metrics["per_class"][c] is None else
              ours[c] - b.metrics["per_class"][c] for c in order] for b in baselines]
    vals = [v for g in gains for v in g if v is not None] or [0.0]
    span = ticks(min(0.0, min(vals)), max(0.0, max(vals)) or 1.0)
    chart = Chart(f"Per-class accuracy gain (Fig. 3) of {where}", "accuracy gain (points)",
                  (span[0], span[-1]), counts, groups)
    chart.bars([(g, color, f"over {b.label}") for g, (b, color) in zip(gains, runs[1:])])
    figures["gain.png"] = chart.save()
    figures["tsne.png"] = draw_tsne([main] + baselines, rows, picked, split)
    return figures


def marker(d, x, y, group, color, r=4):
    """many: circle, medium: square, few: triangle; a thin dark outline keeps light colours visible."""
    if group == 2:
        d.polygon([(x, y - r - 1), (x - r - 1, y + r), (x + r + 1, y + r)], fill=color, outline=(60, 60, 60))
    else:
        (d.rectangle if group else d.ellipse)([x - r, y - r, x + r, y + r], fill=color, outline=(60, 60, 60))


def class_colors(n):
    """n distinct colours, one per t-SNE class: PALETTE's, then (more classes than Section 4.6's 18) colours
    of a 6-level RGB grid, spread through it, none near white or the grey of the marker outlines."""
    grid = [(r, g, b) for r in range(0, 256, 51) for g in range(0, 256, 51) for b in range(0, 256, 51)
            if r + g + b < 600 and (r, g, b) not in PALETTE and len({r, g, b}) > 1]  # > 1: no greys
    colors = list(PALETTE) + sorted(grid, key=lambda c: grid.index(c) * 97 % len(grid))  # neighbours apart
    if n > len(colors):
        raise ValueError(f"{n} t-SNE classes: at most {len(colors)} distinct colours")
    return colors[:n]


def draw_tsne(runs, rows, picked, split):
    """Fig. 4: a t-SNE panel of phi's features per run, coloured by class, shaped by shot group; a legend."""
    P, head = TSNE_PANEL, 60
    img = Image.new("RGB", (P * len(runs) + TSNE_LEGEND, P + head + 10), "white")
    d, f, fs = ImageDraw.Draw(img), font(16), font(13)
    drawn = collections.Counter(runs[0].tsne_labels).values()  # images per picked class actually drawn
    per = f"{min(drawn)}" if min(drawn) == max(drawn) else f"{min(drawn)}-{max(drawn)}"
    d.text((img.width / 2, 8), f"t-SNE of phi's test features (Fig. 4): {len(picked)} classes, "
           f"{per} test images each ({os.path.basename(split)})", fill="black", font=f, anchor="ma")
    color_of, group_of = dict(zip([c for c, _ in picked], class_colors(len(picked)))), dict(picked)
    for k, run in enumerate(runs):
        x0 = P * k
        d.text((x0 + P / 2, 36), run.label, fill="black", font=f, anchor="ma")
        d.rectangle([x0 + 10, head, x0 + P - 10, head + P - 20], outline=(180, 180, 180))
        if run.feats is None or len(run.feats) == 0:
            continue
        y = tsne(run.feats, seed=0)  # (n, 2)
        lo, hi = y.min(0).values, y.max(0).values
        scale = float((hi - lo).max().clamp(min=1e-9))
        for (px, py), c in zip(y.tolist(), run.tsne_labels):
            sx = x0 + 30 + (P - 60) * ((px - float(lo[0])) / scale + (1 - float(hi[0] - lo[0]) / scale) / 2)
            sy = head + 20 + (P - 60) * ((py - float(lo[1])) / scale + (1 - float(hi[1] - lo[1]) / scale) / 2)
            marker(d, sx, sy, group_of[c], color_of[c])
    yy, x = head, P * len(runs) + 10
    for g, name in enumerate(GROUPS):
        members = [c for c, gg in picked if gg == g]
        if members:
            d.text((x, yy), f"{name}-shot", fill="black", font=f)
            yy += 22
            for c in members:
                marker(d, x + 8, yy + 8, g, color_of[c], r=5)
                d.text((x + 22, yy + 8), f"{rows[c]['name']} ({rows[c]['train_count']} train)"[:34],
                       fill="black", font=fs, anchor="lm")
                yy += 19
            yy += 8
    return img


def pairwise_sq(x):
    """Squared Euclidean distances (N, N) of the rows of x (N, D), each from the coordinate differences:
    not |a|^2 + |b|^2 - 2 a.b, which cancels to noise for points close together far from the origin."""
    return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").square()


def affinities(x, perplexity):
    """The symmetrised input affinities P (N, N): per point, a Gaussian whose width is found by binary
    search so that the conditional distribution has the given perplexity; then (P + P^T) / 2N."""
    n, d = len(x), pairwise_sq(x)
    if bool((d > 0).any()):
        d = d / d[d > 0].mean()  # scale-free: beta starts near the right range
    d.fill_diagonal_(float("inf"))  # p_ii = 0
    d = d - d.min(1, keepdim=True).values  # the nearest neighbour at 0: exp(-d beta) cannot all underflow
    target = math.log(perplexity)  # the entropy H(P_i) of perplexity 2^H, in nats
    beta = torch.ones(n, 1, dtype=x.dtype)  # 1 / (2 sigma_i^2)
    lo, hi = torch.zeros_like(beta), torch.full_like(beta, float("inf"))
    for _ in range(64):
        p = torch.exp(-d * beta)
        s = p.sum(1, keepdim=True)
        h = torch.log(s) + beta * (d.nan_to_num(posinf=0.0) * p).sum(1, keepdim=True) / s
        flat = h > target  # too wide a Gaussian: raise beta
        lo, hi = torch.where(flat, beta, lo), torch.where(flat, hi, beta)
        beta = torch.where(torch.isinf(hi), beta * 2, (lo + hi) / 2)
    p = p / s
    return ((p + p.T) / (2 * n)).clamp(min=1e-12)


def tsne(x, dims=2, perplexity=30.0, iters=500, seed=0):
    """Exact t-SNE (van der Maaten & Hinton 2008; Fig. 4 only, not the method) of x (N, D) -> (N, dims):
    early exaggeration 12 and momentum 0.5 for the first quarter of the iterations (at most 250), then
    momentum 0.8; gradient descent with per-coordinate gains and a Student-t Q. Deterministic for a seed;
    O(N^2) memory, about 2 s for N = 900 on one CPU core."""
    x = torch.as_tensor(x, dtype=torch.float64).cpu().flatten(1)
    n = len(x)
    if n < 3:
        return torch.zeros(n, dims)
    p = affinities(x, min(perplexity, (n - 1) / 3)).float()  # the search in float64, the descent in float32
    y = torch.randn(n, dims, generator=torch.Generator().manual_seed(seed)) * 1e-4
    step, gains = torch.zeros_like(y), torch.ones_like(y)
    lr, early, p_early = max(n / 48, 50.0), min(250, iters // 4), 12 * p  # lr: N / (4 * exaggeration), >= 50
    for it in range(iters):
        num = torch.cdist(y, y).square_().add_(1).reciprocal_()  # Student-t kernel 1 / (1 + |y_i - y_j|^2)
        num.fill_diagonal_(0)
        w = ((p_early if it < early else p) - num / num.sum()).mul_(num)  # (p_ij - q_ij) num_ij, (N, N)
        grad = 4 * (w.sum(1, keepdim=True) * y - w @ y)  # dC/dy_i = 4 sum_j (p_ij - q_ij) num_ij (y_i - y_j)
        gains = torch.where((grad > 0) != (step > 0), gains + 0.2, gains * 0.8).clamp_(min=0.01)
        step = (0.5 if it < early else 0.8) * step - lr * gains * grad
        y = y + step
        y = y - y.mean(0)
    return y


def run(args):
    device = runtime.choose_device(args.device)
    main = load_run(args.checkpoint)
    args.amp_name, amp = settings(args, main.args, device)
    baselines = [load_run(p, main) for p in args.compare or []]  # every checkpoint checked before any work
    label_runs([main] + baselines)
    note = settings_note(main, baselines)
    if note:
        print(note)
    old = [r.path for r in [main] + baselines if r.old_groups]
    if old:
        print(f"note: {', '.join(old)} {'was' if len(old) == 1 else 'were'} written before ltaux counted "
              f"many / few inclusively (>= --many, <= --few: the paper's rule); evaluated with that rule now "
              f"(the run's own table used > / <: --many {args.many + 1} --few {args.few - 1} "
              "gives those groups)")
    ds = ltaux.SplitDataset(args.data, args.split, allow_unsafe_paths=args.allow_unsafe_paths,
                            read=pipeline.read_image)
    pipeline.check_label_range(ds, len(main.counts), f"the checkpoint {args.checkpoint}")
    subset, picked = tsne_indices(ds.labels, main.counts, args.many, args.few) if baselines else ([], [])
    files = list(OUTPUTS if baselines else OUTPUTS[:4])
    folder, failed = claim_out(args, files), True
    kw = dict(batch_size=args.eval_batch_size, num_workers=args.workers, pin_memory=device.type == "cuda")
    try:
        for r in [main] + baselines:  # each in its own transform, then back to the CPU to free the device
            ds.transform = pipeline.build_transform(r.args["image_size"], train=False)
            model = r.model.to(device)
            pred, target = runtime.predict(model, torch.utils.data.DataLoader(ds, **kw), device, amp)
            r.metrics = ltaux.shot_accuracy(pred, target, r.counts, args.many, args.few)
            r.norms = model.fc.weight.detach().float().norm(dim=1).cpu().tolist()  # Fig. 4 right: ||w_c||
            if subset:
                loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, subset), **kw)
                r.feats = runtime.predict(model, loader, device, amp, features=True)[2]  # (n, D) of phi
            r.tsne_labels = [ds.labels[i] for i in subset]
            r.model = model.cpu()
        try:  # the training list names classes a flat test list does not; skipped where not readable here
            train = main.args.get("split") and ltaux.read_split(main.args["split"], args.allow_unsafe_paths)
        except LTauxError:
            train = None
        lists = [(ds.paths, ds.labels), train]
        rows = per_class_rows(main, class_names(lists, len(main.counts)), args.many, args.few)
        run_args = dict(main.args, many=args.many, few=args.few, split_sha256=main.split_sha256)
        paper = recipes.paper_row(run_args, vars(recipes.training_parser().parse_args([])), args.split)
        write_tables(args, main, baselines, rows, files, paper)
        for name, image in draw_figures(main, baselines, rows, args.split, picked).items():
            bookkeeping.atomic_write(os.path.join(args.out, name), lambda f, im=image: im.save(f, "PNG"))
        folder.commit()
        failed = False
    finally:
        folder.close(failed)
    balanced = len(set(main.metrics["counts"]) - {0}) == 1
    print(f"{args.checkpoint} on {args.split} ({len(ds)} images{'' if balanced else ', unbalanced'}; "
          f"amp {args.amp_name}; many >= {args.many}, few <= {args.few} train images):")
    print(result_table(main, baselines, paper))
    print("wrote:\n" + "\n".join(f"  {os.path.join(args.out, n)}" for n in files))
    return 0


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        return run(args)
    except LTauxError as e:
        return runtime.report(e)


if __name__ == "__main__":
    sys.exit(main())
