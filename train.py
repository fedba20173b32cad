#!/usr/bin/env python
"""Train a long-tailed classifier with auxiliary learning (Zhang et al., arXiv:1912.04486).

examples:
  python train.py                                    # the demo: synthetic long-tailed data, a few minutes on CPU
  python train.py --recipe imagenet_lt_r10 --data /imagenet --split data_lists/ImageNet_LT_train.txt
  torchrun --nproc_per_node=8 train.py --recipe imagenet_lt_r50 --data /imagenet --split data_lists/ImageNet_LT_train.txt
  python train.py --resume runs/<date>-<time>-cbs_rrs_ss/last.pt            # continue where it stopped

Every epoch: validation (overall / many / medium / few top-1), <out>/best.pt, <out>/last.pt and one JSON line
in <out>/log.jsonl; at the end, best.pt on the test list. The method itself lives in ltaux.py.
"""

import argparse
import math
import os
import sys

import recipes
from recipes import ARCHS, METHODS, PRETRAINED, RECIPES  # noqa: F401 - ARCHS: train.ARCHS

NOT_RESUMED = ("resume", "out", "overwrite", "allow_unsafe_paths", "workers", "device", "check_files", "decode",
               "in_memory", "demo_dir")  # this machine's or this command's: never taken from a checkpoint
FIXED_ON_RESUME = ("method", "arch", "embed_dim", "batch_size", "per_class", "seed", "image_size", "rotation",
                   "rotation_aug", "freeze_backbone")  # a resume continues the same run
INT_RANGE = dict(epochs=(1, 10**5), batch_size=(1, 2**20), per_class=(1, 2**20), image_size=(8, 4096), workers=(0, 1024),
                 print_freq=(1, 2**31), eval_freq=(1, 2**31), seed=(0, 2**63 - 1), embed_dim=(0, 2**16))
FLOAT_RANGE = dict(lr=(0, 1e30), momentum=(0, 1), weight_decay=(0, 1e30), backbone_lr_scale=(0, 1e6))  # SGD: fp32
DECODE_DEVICES = ("cuda",)  # where --decode gpu may run
MEMORY_BUDGET = 2 * 2**30  # --in-memory auto: decoded training + evaluation images up to 2 GiB
RUN_FILES = ("last.pt", "best.pt", "log.jsonl", "test_metrics.json")  # what a run writes in --out


def get_args_parser():
    return recipes.training_parser(__doc__)


if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):
    get_args_parser().parse_args()  # prints the help and exits before torch is imported (seconds)

import contextlib  # noqa: E402 - after the fast --help
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import ltaux  # noqa: E402
import pipeline  # noqa: E402
import runtime  # noqa: E402
from ltaux import LTauxError  # noqa: E402


# ----------------------------------------------------------------------------------------------
# arguments


def parse_args(argv=None):
    """Defaults < recipe (the demo when --data is unset) < the checkpoint's settings < explicit flags.
    Returns (args, checkpoint or None)."""
    parser = get_args_parser()
    first = parser.parse_known_args(argv)[0]
    ckpt = runtime.load_checkpoint(first.resume) if first.resume else None
    saved = ckpt["args"] if ckpt else {}
    runtime.check_saved_args(saved, parser, first.resume)
    recipe = first.recipe or saved.get("recipe") or ("demo" if first.data is None and not ckpt else None)
    parser.set_defaults(**RECIPES.get(recipe, {}))
    parser.set_defaults(**{k: v for k, v in saved.items() if k not in NOT_RESUMED and k != "recipe"})
    args = parser.parse_args(argv)
    args.recipe = recipe
    check_args(args, saved)
    return args, ckpt


def check_args(args, saved):
    """Every argument mistake, up front, as one LTauxError line."""
    for name, (lo, hi) in INT_RANGE.items():
        v = getattr(args, name)
        if v is not None and not lo <= v <= hi:
            raise LTauxError(f"--{name.replace('_', '-')} {v}: must be in {lo}..{hi}")
    for name, (lo, hi) in dict(FLOAT_RANGE, warmup_epochs=(0, args.epochs)).items():
        v = getattr(args, name)
        if not (math.isfinite(v) and lo <= v <= hi):
            raise LTauxError(f"--{name.replace('_', '-')} {v}: must be a finite number in [{lo}, {hi:g}]")
    runtime.check_thresholds(args.many, args.few)
    method, (l1, l2, l3) = METHODS[args.method], args.lambdas
    if not all(v >= 0 and math.isfinite(v) for v in args.lambdas):
        raise LTauxError(f"--lambdas {l1:g} {l2:g} {l3:g}: weights must be finite and >= 0")
    if args.recipe in PRETRAINED and not (args.pretrained or args.init or args.resume):
        raise LTauxError(f"--recipe {args.recipe} fine-tunes ImageNet-pretrained ResNet-152 weights: pass --pretrained "
                         "~/.cache/torch/hub/checkpoints/resnet152-394f9c45.pth (torchvision's "
                         "ResNet152_Weights.IMAGENET1K_V1 state dict, which python -c \"import torchvision; "
                         "torchvision.models.resnet152(weights='IMAGENET1K_V1')\" downloads there)")
    if args.in_memory == "on" and args.image_size >= 64:
        raise LTauxError(f"--in-memory on is for the CIFAR recipe's small images (--image-size < 64, here "
                         f"{args.image_size}): use --in-memory off or auto")
    if args.decode == "gpu" and args.image_size < 64:
        raise LTauxError(f"--decode gpu is for the ImageNet-LT recipe (--image-size >= 64, here {args.image_size}): "
                         "use --decode cpu")
    if args.rotation_aug and args.method != "cbs_rrs":
        raise LTauxError("--rotation-aug is the augmentation baseline of Table 5: use it with --method cbs_rrs")
    if len(method.heads) > 1:  # Table 4's endpoints are the baselines: run those, not a head that never learns
        if l1 == 0:
            raise LTauxError(f"--lambdas {l1:g} {l2:g} {l3:g} leaves h untrained: CBS:RRS = 0:1 is RRS-Only "
                             "(Table 4), run it with --method rrs")
        if l2 == 0:
            raise LTauxError(f"--lambdas {l1:g} {l2:g} {l3:g} leaves h_a untrained: CBS:RRS = 1:0 is CBS-Only "
                             "(Table 4), run it with --method cbs")
        if method.rotation and l3 == 0:
            raise LTauxError(f"--lambdas {l1:g} {l2:g} 0 turns the rotation task off: use --method cbs_rrs")
    changed = [k for k in FIXED_ON_RESUME if k in saved and saved[k] != getattr(args, k)]
    if changed:
        k = changed[0]
        raise LTauxError(f"--{k.replace('_', '-')} {getattr(args, k)}: the resumed run has {saved[k]}; a resume "
                         "continues the same run (start a new one with --init to change it)")


def plain_args(args):
    """The run's arguments as saved in checkpoints (rank and world size belong to the process)."""
    return {k: v for k, v in vars(args).items() if k not in ("rank", "world_size")}


# ----------------------------------------------------------------------------------------------
# data: the demo's, the lists and their images


def make_demo_data(root, classes=30, train=(500, 5), val=10, test=40, size=32):
    """Write a small synthetic long-tailed image dataset (PNG files + split lists) under root.

    Class c is a low-frequency colour pattern P_c = base + 0.6 * own_c; an image is P_c under a
    random shift, brightness change and strong low-frequency noise, so classes overlap and a
    classifier needs many images to separate them: tail classes (5 training images) are
    learnable but hard. Train counts decay exponentially from train[0] (head) to train[1] (tail)
    (many/medium/few groups 11/10/9 with thresholds 100/20); val and test are balanced (images per
    class). Written to a temporary folder and renamed, so an interrupted run never leaves half a
    dataset. Always the same data (seed 0). Returns the list paths.
    """
    (head, tail), seed = train, 0
    lists = {s: os.path.join(root, f"demo_{s}.txt") for s in ("train", "val", "test")}
    if all(os.path.exists(p) for p in lists.values()):
        return lists
    if os.path.exists(root):  # never write into (or delete) a folder we did not make
        raise LTauxError(f"{root}: exists but holds no demo lists; remove it or pass another --demo-dir")
    tmp = f"{root}.tmp{os.getpid()}"
    g = torch.Generator().manual_seed(seed)
    base = upsample(torch.randn(1, 3, 4, 4, generator=g), size)
    protos = base + 0.6 * upsample(torch.randn(classes, 3, 4, 4, generator=g), size)
    counts = [round(head * (tail / head) ** (c / (classes - 1))) for c in range(classes)]
    for split, per_class in (("train", counts), ("val", [val] * classes), ("test", [test] * classes)):
        rows = []
        for c, n in enumerate(per_class):
            noise = upsample(torch.randn(n, 3, 8, 8, generator=g), size) * 0.9
            noise += torch.randn(n, 3, size, size, generator=g) * 0.2
            x = protos[c] * (0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)) + noise
            shifts = torch.randint(-4, 5, (n, 2), generator=g).tolist()
            imgs = ((x.tanh() + 1) * 127.5).round().to(torch.uint8)
            os.makedirs(os.path.join(tmp, split, f"class{c:02d}"), exist_ok=True)
            for i in range(n):
                rel = f"{split}/class{c:02d}/{i:04d}.png"
                save_png(torch.roll(imgs[i], shifts[i], dims=(1, 2)), os.path.join(tmp, rel))
                rows.append(f"{rel} {c}\n")
        with open(os.path.join(tmp, f"demo_{split}.txt"), "w") as f:
            f.writelines(rows)
    os.makedirs(os.path.dirname(root) or ".", exist_ok=True)
    os.replace(tmp, root)
    return lists


def upsample(x, size):
    """(B, 3, h, w) -> (B, 3, size, size), bilinear: smooth, low-frequency patterns for the demo."""
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)


def save_png(x, path):
    """uint8 tensor (3, H, W) -> PNG file, with Pillow alone."""
    from PIL import Image
    Image.frombytes("RGB", (x.shape[2], x.shape[1]), bytes(x.permute(1, 2, 0).flatten().tolist())).save(path)


def resolve_lists(args, log):
    """The demo's data (written once by rank 0; the dataset is always that of seed 0) or the user's: fills
    --data / --split and the sibling *_val.txt / *_test.txt of a *_train.txt when those are not given."""
    if args.data is None:
        if args.rank == 0 and not os.path.exists(os.path.join(args.demo_dir, "demo_test.txt")):
            log(f"demo: writing its synthetic dataset (30 classes, 4,876 PNGs, about 20 MB) to {args.demo_dir} "
                "(--demo-dir), once")
            make_demo_data(args.demo_dir)
        if args.world_size > 1:
            dist.barrier()  # the other ranks wait for rank 0's dataset
        lists = make_demo_data(args.demo_dir)
        args.data, args.split = args.demo_dir, lists["train"]
        args.val_split, args.test_split = args.val_split or lists["val"], args.test_split or lists["test"]
    if args.split is None:
        raise LTauxError("--split is required with --data (e.g. data_lists/ImageNet_LT_train.txt)")
    for name in ("val", "test"):
        if getattr(args, f"{name}_split") is None and args.split.endswith("_train.txt"):
            sibling = args.split[: -len("_train.txt")] + f"_{name}.txt"
            setattr(args, f"{name}_split", sibling if os.path.exists(sibling) else None)


def open_list(args, path, train):
    """A SplitDataset with the run's transform; a missing list says where the official ones come from."""
    if not os.path.exists(path):
        raise LTauxError(f"{path}: split list not found (the official lists: see data_lists/README.md, "
                         "then check them with: cd data_lists && sha256sum -c SHA256SUMS --ignore-missing)")
    return ltaux.SplitDataset(args.data, path, pipeline.build_transform(args.image_size, train),
                              allow_unsafe_paths=args.allow_unsafe_paths, read=pipeline.read_image)


def open_inputs(args, log):
    """Every list, the image root and the labels, checked: (train set, {"val"/"test": set}, counts (C,))."""
    resolve_lists(args, log)
    train_set = open_list(args, args.split, train=True)
    evals = {k: open_list(args, f, train=False) for k, f in (("val", args.val_split), ("test", args.test_split)) if f}
    check_root(train_set)
    counts = ltaux.class_counts(train_set.labels, train_set.num_classes)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise LTauxError(f"{args.split}: classes {empty[:10]}{'...' if len(empty) > 10 else ''} have no "
                         f"training image (labels must be 0..C-1 without gaps)")
    for ds in evals.values():
        runtime.check_label_range(ds, train_set.num_classes, f"the training list {args.split}")
    for line in describe_lists([args.split] + [d.split_file for d in evals.values()]):
        log(line)
    return train_set, evals, counts


def check_root(ds, probe=8):
    """Fail early on a wrong --data: the root must exist and hold at least one of the first listed images."""
    if not os.path.isdir(ds.root):
        raise LTauxError(f"--data {ds.root}: no such folder")
    shown = [os.path.join(ds.root, p) for p in ds.paths[:probe]]
    if not any(os.path.exists(p) for p in shown):
        raise LTauxError(f"--data {ds.root}: none of the first {len(shown)} images of {ds.split_file} exist "
                         f"under it (e.g. {shown[0]}): the root is probably wrong")


def describe_lists(paths):
    """One line per official list (sha256 matches data_lists/SHA256SUMS); a warning for a list named
    like an official one whose checksum differs; nothing for the user's own lists."""
    known, lines = {}, []
    sums = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_lists", "SHA256SUMS")
    if os.path.exists(sums):
        with open(sums) as f:
            known = dict(line.split(None, 1) for line in f if line.strip() and not line.startswith("#"))
    known = {d: n.strip() for d, n in known.items()}
    for path in paths:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest in known:
            lines.append(f"{path}: official {known[digest]} (sha256 ok)")
        elif os.path.basename(path) in {os.path.basename(n) for n in known.values()}:
            warnings.warn(f"{path}: named like an official list, but its sha256 differs from data_lists/SHA256SUMS")
    return lines


def data_fingerprint(ds, samples=8):
    """The training data in brief, stored in checkpoints: the list's sha256 (its content and order) and, for
    `samples` images spread evenly through it, the file size and the sha256 of its first 64 KiB."""
    with open(ds.split_file, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    files = []
    for i in sorted({k * len(ds) // samples for k in range(samples)}):
        path, size, head = os.path.join(ds.root, ds.paths[i]), -1, b""
        if os.path.isfile(path):
            with open(path, "rb") as f:
                size, head = os.fstat(f.fileno()).st_size, f.read(65536)
        files.append([ds.paths[i], size, hashlib.sha256(head).hexdigest()[:16]])
    return dict(list_sha256=digest, files=files)


def check_same_data(ckpt, path, ds, counts, now):
    """A resume must see the data it was trained on: the same class counts, list (now: data_fingerprint of
    the data given) and sampled images."""
    if not torch.equal(ckpt["train_counts"], counts):
        raise LTauxError(f"{ds.split_file}: not the training list of the resumed run (other class counts)")
    saved = ckpt.get("data")
    if not isinstance(saved, dict):  # written before ltaux kept a fingerprint: counts are all it can compare
        return
    if saved.get("list_sha256") != now["list_sha256"]:
        raise LTauxError(f"{ds.split_file}: not the training list of the resumed run {path} (its lines or their "
                         f"order differ: sha256 {now['list_sha256'][:12]}, the run's {str(saved.get('list_sha256'))[:12]}); "
                         "start a new run with --init to train on other data")
    for old, new in zip(saved.get("files", []), now["files"]):
        if list(old) != new:
            raise LTauxError(f"--data {ds.root}: {new[0]} is not the image the resumed run {path} was trained on "
                             f"({new[1]} bytes, the run's {old[1]}{', other content' if old[1] == new[1] else ''}); "
                             "a resume continues on the same data (start a new run with --init)")


def check_files(datasets, stop, log, shown=20):
    """Open every listed image (rank 0 only); report all failures at once (the first `shown` inline, every
    one in a file of the system's temporary folder when there are more: --out is not touched before the
    inputs are known good). A stop signal ends it (runtime.Interrupted)."""
    failures, done = [], 0
    total = sum(len(d) for d in datasets)
    for ds in datasets:
        for i in range(len(ds)):
            try:
                ds.load(i)
            except LTauxError as e:
                failures.append(str(e))
            done += 1
            if done % 5000 == 0 or done == total:
                log(f"check-files: {done}/{total} images, {len(failures)} unreadable")
            stop.before_training()
    if not failures:
        return
    more = ""
    if len(failures) > shown:
        fd, path = tempfile.mkstemp(prefix="ltaux-unreadable-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(failures) + "\n")
        more = f"\n  ... and {len(failures) - shown} more: all are listed in {path}"
    raise LTauxError(f"{len(failures)} unreadable images:\n  " + "\n  ".join(failures[:shown]) + more)


def make_batches(train_set, evals, sampler, args, device, log):
    """The training batches and {name: evaluation batches}: in memory (pipeline.MemoryBatches, decoded
    once here; see --in-memory) or DataLoader workers."""
    size = sum(len(d) for d in [train_set, *evals.values()]) * 3 * args.image_size ** 2
    if args.in_memory == "off" or args.image_size >= 64 or (args.in_memory == "auto" and size > MEMORY_BUDGET):
        per_rank = max(1, args.batch_size // args.world_size)
        return (pipeline.training_loader(train_set, sampler, device, args.workers, args.decode, args.image_size),
                {k: pipeline.eval_loader(d, per_rank, device, args.workers, args.rank, args.world_size)
                 for k, d in evals.items()})
    t0 = time.time()
    try:
        decoded = {k: pipeline.decode_all(d, device, args.workers) for k, d in dict(evals, train=train_set).items()}
    except LTauxError:
        if args.rank > 0:  # every rank reads the same files: rank 0 alone prints the error line
            raise QuietExit(2) from None
        raise
    log(f"in memory: {len(train_set) + sum(len(d) for d in evals.values())} images decoded once ({size / 2**20:.0f} "
        f"MiB on {device}, {time.time() - t0:.1f}s); batches gathered and augmented on {device}, no loader workers")
    evals = {k: pipeline.MemoryEval(*d, max(1, args.batch_size // args.world_size), args.rank, args.world_size)
             for k, d in decoded.items() if k != "train"}
    return pipeline.MemoryBatches(*decoded["train"], sampler), evals


# ----------------------------------------------------------------------------------------------
# model, optimiser, schedule


def build_model(args, num_classes, device):
    """LTResNet with the heads --method does not train frozen (DDP must not wait for their gradients);
    --freeze-backbone freezes the backbone's weights too (it stays in train mode: BatchNorm keeps updating
    its running statistics, as OLTR's frozen stage does)."""
    model = ltaux.LTResNet(args.arch, num_classes, args.embed_dim, args.pretrained)
    if args.init:  # the whole of phi (backbone + embed), heads fresh: ftRRS+CBS (Table 3)
        runtime.load_weights(model, runtime.load_checkpoint(args.init), args.init, prefixes=("backbone.", "embed."))
    for head in {"fc", "aux_fc", "rot_fc"} - set(METHODS[args.method].heads):
        getattr(model, head).requires_grad_(False)
    if args.freeze_backbone:
        model.backbone.requires_grad_(False)
    if args.sync_bn and args.world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return runtime.guard_narrow_convs(model, device).to(device, memory_format=torch.channels_last)


def build_optimizer(model, args, device):
    """SGD with momentum and weight decay on every trained parameter (as OLTR); phi at backbone_lr_scale * lr."""
    phi = [p for n, p in model.named_parameters() if n.startswith(("backbone.", "embed.")) and p.requires_grad]
    heads = [p for n, p in model.named_parameters() if not n.startswith(("backbone.", "embed."))]
    groups = [dict(params=phi, lr_scale=args.backbone_lr_scale), dict(params=heads, lr_scale=1.0)]
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, **fused)


def lr_factor(step, total, warmup):
    """Linear warm-up for `warmup` steps, then cosine decay to 0 at `total` (per step)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ----------------------------------------------------------------------------------------------
# the output folder: claimed after every input was checked, locked for the run


@dataclasses.dataclass
class Folder:
    """--out for this run: its path, the lock the run holds on it, whether the run made it, and the folder
    where --overwrite keeps the replaced run until this run's first checkpoint (None once none is kept)."""
    path: str
    lock: runtime.FolderLock
    created: bool
    aside: str = None

    def first_checkpoint_written(self):
        if self.aside:  # the new run has proved itself: the replaced one goes
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None

    def close(self, failed):
        """At the end of the run: put a replaced run back if this one failed before its first checkpoint,
        remove a folder this run made and left empty, release the lock."""
        try:
            if failed and self.aside and os.path.isdir(self.aside):
                for f in RUN_FILES:
                    if os.path.exists(os.path.join(self.path, f)):
                        os.remove(os.path.join(self.path, f))
                for f in os.listdir(self.aside):
                    os.replace(os.path.join(self.aside, f), os.path.join(self.path, f))
                os.rmdir(self.aside)
                print(f"note: the run that --overwrite was replacing is back in {self.path}", file=sys.stderr, flush=True)
            if self.created and os.path.isdir(self.path) and not os.listdir(self.path):
                os.rmdir(self.path)
        except OSError:  # the folder was deleted, renamed or made read-only under the run: leave it as it is
            pass
        finally:
            self.lock.release()


def claim_out(args, ckpt):
    """Make and lock --out. Refuses a folder that holds another run unless it is the one resumed or
    --overwrite is given; --overwrite moves that run (its files and eval-* folders) aside. Resuming into
    another folder brings the resumed run's best.pt and log along (see carry_over)."""
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise LTauxError(f"--out {out}: is a file, not a folder")
    probe = out if os.path.isdir(out) else next(p for p in _ancestors(os.path.abspath(out)) if os.path.exists(p))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise LTauxError(f"--out {out}: {probe} is not writable")
    created = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    folder = Folder(out, runtime.FolderLock(out, "training"), created)
    try:
        for f in os.listdir(out):  # temporary files of a run killed outright (SIGKILL) while saving
            if f.startswith((".last.pt.tmp", ".best.pt.tmp", ".log.jsonl.tmp")) and os.path.isfile(os.path.join(out, f)):
                os.remove(os.path.join(out, f))
        here = bool(args.resume) and os.path.samefile(os.path.dirname(os.path.abspath(args.resume)), out)
        taken = [f for f in sorted(os.listdir(out)) if f in RUN_FILES or (f.startswith("eval-") and "last.pt" in
                                                                           os.listdir(out))]
        if taken and not here and not args.overwrite:
            hint = f"pass --resume {os.path.join(out, 'last.pt')} to continue it, " if "last.pt" in taken else ""
            raise LTauxError(f"{out}: holds another run ({', '.join(taken)}); {hint}--overwrite to replace it, "
                             "or another --out")
        if taken and not here:  # --overwrite: the old run waits aside until the new one has a checkpoint
            folder.aside = os.path.join(out, f".replaced-by-{os.getpid()}")
            os.mkdir(folder.aside)
            for f in taken:
                os.replace(os.path.join(out, f), os.path.join(folder.aside, f))
        if ckpt and not here:
            carry_over(args.resume, out, ckpt["epoch"])
    except BaseException:
        folder.close(failed=True)
        raise
    return folder


def _ancestors(path):
    while True:
        yield path
        if os.path.dirname(path) == path:
            return
        path = os.path.dirname(path)


def carry_over(resume, out, epoch):
    """Resuming into another folder: copy the resumed run's best.pt and its log lines before `epoch`, so the
    new folder holds the whole run. Without a best.pt beside the checkpoint, the first epoch writes one."""
    src = os.path.dirname(os.path.abspath(resume))
    if os.path.isfile(os.path.join(src, "best.pt")):
        with open(os.path.join(src, "best.pt"), "rb") as f:
            runtime.atomic_save(f, os.path.join(out, "best.pt"), write=lambda src_file, dst: shutil.copyfileobj(src_file, dst))
    if os.path.isfile(os.path.join(src, "log.jsonl")):
        shutil.copyfile(os.path.join(src, "log.jsonl"), os.path.join(out, "log.jsonl"))
        trim_log(out, epoch)


def trim_log(out, epoch):
    """On resume: keep the log lines of the epochs before `epoch` (a crash may have left one more, or a
    damaged line: dropped)."""
    path = os.path.join(out, "log.jsonl")
    if os.path.exists(path):
        keep = []
        with open(path, "rb") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    if isinstance(row, dict) and isinstance(row.get("epoch"), int) and row["epoch"] < epoch:
                        keep.append(json.dumps(row) + "\n")
                except ValueError:  # a line cut short by a crash, or not JSON
                    pass
        runtime.atomic_save("".join(keep).encode(), path, write=lambda data, f: f.write(data))


# ----------------------------------------------------------------------------------------------
# checkpoints


@dataclasses.dataclass
class Run:
    """What every step and every epoch of a run needs, fixed for the run."""
    args: argparse.Namespace
    device: torch.device
    amp: torch.dtype  # the autocast dtype, None for fp32
    model: torch.nn.Module  # the LTResNet: saved and evaluated
    net: torch.nn.Module  # what a step calls: the model, wrapped by DDP and torch.compile where asked
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    batches: object  # training batches: a DataLoader or pipeline.MemoryBatches, with .batch_sampler
    evals: dict  # {"val" / "test": evaluation batches}
    counts: torch.Tensor  # (C,) training images per class
    fingerprint: dict  # data_fingerprint of the training data
    folder: Folder
    stop: "StopFlag"
    log: callable


def save_checkpoint(run, name, epoch, step_in_epoch, best_acc, partial=None):
    """Write <out>/<name> atomically: everything needed to resume, as tensors and plain types. Weights are
    checked first (one reduction, one host sync per save): non-finite ones raise RunError and nothing is
    written, so no checkpoint ever holds non-finite weights. A failed write raises RunError too."""
    bad = runtime.first_non_finite(run.model.state_dict())
    if bad:
        where = f"at the end of epoch {epoch - 1}" if step_in_epoch == 0 else f"after step {step_in_epoch} of epoch {epoch}"
        raise RunError(f"non-finite weights ({bad}) {where} (the update diverged): nothing saved; lower --lr or "
                       "check the data, then --resume the last good checkpoint")
    steps = run.batches.batch_sampler.num_batches
    ckpt = dict(format=runtime.CKPT_FORMAT, args=plain_args(run.args), model=run.model.state_dict(),
                optimizer=run.optimizer.state_dict(), scaler=run.scaler.state_dict(), train_counts=run.counts,
                epoch=epoch, step_in_epoch=step_in_epoch, global_step=epoch * steps + step_in_epoch,
                best_acc=float(best_acc), shot_rule=runtime.SHOT_RULE, data=run.fingerprint,
                rng_cpu=torch.get_rng_state(), partial=partial or {},
                rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    write_file(run, name, ckpt)
    run.folder.first_checkpoint_written()


def write_file(run, name, obj):
    """<out>/<name> written atomically (a checkpoint, or bytes), never cut by a second signal; a failed write
    (disk full, folder gone or read-only) raises RunError."""
    write = None if isinstance(obj, dict) else (lambda data, f: f.write(data))
    try:
        with run.stop.saving():
            runtime.atomic_save(obj, os.path.join(run.args.out, name), write)
    except LTauxError as e:
        raise RunError(str(e)) from None


def restore(ckpt, run):
    """Load a --resume checkpoint into the run; apply the optimisation flags given now (logged). Returns
    (epoch, step_in_epoch, best_acc, partial epoch metrics)."""
    args, path = run.args, run.args.resume
    runtime.load_weights(run.model, ckpt, path)
    try:
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if ckpt.get("rng_cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise LTauxError(f"{path}: damaged optimiser or RNG state ({type(e).__name__})") from None
    for g in run.optimizer.param_groups:  # load_state_dict brought the old values back
        g.update(momentum=args.momentum, weight_decay=args.weight_decay)
    run.optimizer.param_groups[0]["lr_scale"] = args.backbone_lr_scale
    old = ckpt["args"]
    for k in ("lr", "momentum", "weight_decay", "backbone_lr_scale", "epochs", "warmup_epochs", "lambdas"):
        if old.get(k) != getattr(args, k):
            run.log(f"resume: --{k.replace('_', '-')} {getattr(args, k)} (the checkpoint's run had {old.get(k)}); "
                    + ("the cosine schedule is recomputed over the new length from the current step"
                       if k in ("epochs", "warmup_epochs") else "applied from the next step"))
    steps = run.batches.batch_sampler.num_batches
    if ckpt["step_in_epoch"] >= steps:
        raise LTauxError(f"{path}: step {ckpt['step_in_epoch']} of an epoch of {steps} steps (a damaged checkpoint)")
    run.log(f"resumed from {path}: epoch {ckpt['epoch']}, step {ckpt['step_in_epoch']} of {steps} "
            f"(global step {ckpt['global_step']} of {steps * args.epochs})")
    return ckpt["epoch"], ckpt["step_in_epoch"], ckpt["best_acc"], ckpt.get("partial") or {}


# ----------------------------------------------------------------------------------------------
# one epoch


def loss_settings(args):
    """aux_loss's (lambdas, rotation) for the method: the rotation task only where the method has it."""
    if METHODS[args.method].rotation:
        return list(args.lambdas), args.rotation
    return [args.lambdas[0], args.lambdas[1], 0.0], "off"


def images_per_step(args):
    """Images through the backbone per global step (S per part, rotated copies included)."""
    method = METHODS[args.method]
    n = args.batch_size * (2 if method.sampler == "cbs_rrs" else 1)
    if method.rotation or args.rotation_aug:
        n += n * (4 if args.rotation == "all" else 1)
    return n


def step_inputs(images, labels, run, gen):
    """A batch of the sampler's parts (uint8, this rank's S/W rows per part) -> aux_loss's B_cbs and B_rrs,
    each (images, labels) or None for a part the method has not."""
    args = run.args
    jitter = gen if pipeline.jitter_on_device(args.image_size, train=True) else None
    x, y = pipeline.to_device(images, run.device, jitter), labels.to(run.device, non_blocking=True)
    mode = METHODS[args.method].sampler
    if mode != "cbs_rrs":
        return ((x, y), None) if mode == "cbs" else (None, (x, y))
    s = args.batch_size // args.world_size
    x_cbs, y_cbs, x_rrs, y_rrs = x[:s], y[:s], x[s:], y[s:]
    if args.rotation_aug:  # Table 5: the same images through phi as CBS+RRS+SS, all as classification
        x_cbs, y_cbs = ltaux.rotation_augment(x_cbs, y_cbs, args.rotation, gen)
        x_rrs, y_rrs = ltaux.rotation_augment(x_rrs, y_rrs, args.rotation, gen)
    return (x_cbs, y_cbs), (x_rrs, y_rrs)


def train_step(run, images, labels, step, gen):
    """One SGD step on Eq. 2 at global step `step`: its learning rate, the loss, backward, the update.
    Rotation angles and colour jitter come from `gen` (a generator on the device), seeded here by (seed,
    step, rank): a resume repeats them. Returns the loss parts (detached, on the device)."""
    args, total = run.args, run.batches.batch_sampler.num_batches * run.args.epochs
    warmup = round(args.warmup_epochs * run.batches.batch_sampler.num_batches)
    for g in run.optimizer.param_groups:
        g["lr"] = args.lr * g["lr_scale"] * lr_factor(step, total, warmup)
    gen.manual_seed(ltaux.AuxBatchSampler.derive_seed(args.seed, "rotation", step, args.rank))
    lambdas, rotation = loss_settings(args)
    with torch.autocast(run.device.type, dtype=run.amp or torch.float32, enabled=run.amp is not None):
        loss, parts = ltaux.aux_loss(run.net, *step_inputs(images, labels, run, gen), lambdas, rotation, gen)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return dict(parts, loss=loss.detach())


def train_one_epoch(run, epoch, first_step, partial):
    """Train from batch `first_step` of `epoch` to its end, or until a stop is agreed. Returns (metrics,
    partial): mean loss and parts over the whole epoch (a resumed part included), lr, images/s (this
    session), epoch_time_s, steps (done in this epoch so far), stopped; partial carries an interrupted
    epoch's sums into its checkpoint."""
    run.model.train()
    steps = run.batches.batch_sampler.num_batches  # M
    sums = {k: torch.tensor(v, device=run.device) for k, v in partial.get("sums", {}).items()}
    done, seen, t0, step_in_epoch = partial.get("steps", 0), 0, time.time(), first_step
    gen = torch.Generator(device=run.device)
    for batch in run.batches:
        images, labels = run.batches.dataset.decode(batch, run.device) if run.args.decode == "gpu" else batch
        for k, v in train_step(run, images, labels, epoch * steps + step_in_epoch, gen).items():
            sums[k] = sums.get(k, 0.0) + v.float()  # running sums stay on the device: no sync
        done, seen, step_in_epoch = done + 1, seen + images_per_step(run.args), step_in_epoch + 1
        if step_in_epoch % run.args.print_freq == 0 or step_in_epoch == steps:
            means = check_finite(sums, done, epoch, step_in_epoch)
            left = steps * run.args.epochs - epoch * steps - step_in_epoch  # steps still to run
            eta = datetime.timedelta(seconds=round(left * (time.time() - t0) / (step_in_epoch - first_step)))
            run.log(f"epoch {epoch} [{step_in_epoch:>{len(str(steps))}}/{steps}] "
                    + " ".join(f"{k} {v:.4f}" for k, v in means.items())
                    + f" lr {run.optimizer.param_groups[-1]['lr']:.5f} img/s {seen / (time.time() - t0):.0f} eta {eta}")
        if run.stop.agreed():
            break
    means = check_finite(sums, done, epoch, step_in_epoch)
    elapsed = partial.get("time", 0.0) + time.time() - t0
    out = {f"loss_{k}" if k != "loss" else k: v for k, v in means.items()}
    out.update(lr=run.optimizer.param_groups[-1]["lr"], images_per_s=seen / max(time.time() - t0, 1e-9),
               epoch_time_s=elapsed, steps=step_in_epoch, stopped=step_in_epoch < steps)
    return out, dict(sums={k: float(v) for k, v in sums.items()}, steps=done, time=elapsed)


class RunError(LTauxError):
    """An error during training (non-finite loss or weights, a failed write, a dead worker); train() adds
    the last good checkpoint to its message."""


class QuietExit(Exception):
    """End the process with this status and no message (another rank prints the error line)."""


def check_finite(sums, n, epoch, step_in_epoch):
    """Mean loss parts since the epoch began ({name: float}; one host sync). A non-finite one ends the
    run before anything is saved."""
    means = {k: float(v) / max(n, 1) for k, v in sums.items()}
    if not all(math.isfinite(v) for v in means.values()):
        parts = ", ".join(f"{k} {v:.4g}" for k, v in means.items())
        raise RunError(f"non-finite loss at step {step_in_epoch} of epoch {epoch} or before it ({parts}): nothing "
                       "saved; lower --lr or check the data, then --resume the last good checkpoint")
    return means


class StopFlag:
    """SIGTERM / SIGINT ask the run to stop: before training it ends at once (runtime.Interrupted), during
    training after the current step (last.pt is saved), during the final test at the next batch. A signal
    within a second of the previous one is the same request delivered again (Slurm signals every process,
    torchrun forwards it, supervisors repeat it); one more than a second after the previous exits at once
    with status 128 + signal, without saving, but never in the middle of writing a file. With W processes
    the flag is all-reduced every step, read one step later (no stall of the GPU queue), so every rank
    stops after the same step."""

    def __init__(self, device, world_size):
        self.signum, self.last, self.device, self.world_size, self.pending = None, 0.0, device, world_size, None
        self.writing, self.exit_after_write = False, None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        now = time.monotonic()
        if self.signum is None or now - self.last <= 1.0:  # the first request, or the same one again
            self.signum = self.signum or signum
        elif self.writing:
            self.exit_after_write = signum  # once the file being written is whole
        else:
            self.exit_now(signum)
        self.last = now

    def exit_now(self, signum):
        print(f"second {signal.Signals(signum).name}: exiting now, without saving", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    @contextlib.contextmanager
    def saving(self):
        self.writing = True
        try:
            yield
        finally:
            self.writing = False
            if self.exit_after_write:
                self.exit_now(self.exit_after_write)

    def before_training(self):
        if self.signum is not None:
            raise runtime.Interrupted(self.signum)

    def agreed(self):
        if self.world_size == 1:
            return self.signum is not None
        flag = torch.full((), float(self.signum is not None), device=self.device)
        dist.all_reduce(flag)  # queued; read at the next step
        previous, self.pending = self.pending, flag
        return previous is not None and bool(previous > 0)

    def restore(self):
        """The handlers from before the run; after a stop request ours stay until the process ends, so that a
        repeated request (a supervisor sending SIGTERM every second) does not kill it while it exits."""
        if self.signum is None:
            for s, h in self.previous.items():
                signal.signal(s, h)


# ----------------------------------------------------------------------------------------------
# validation, the end of an epoch, the final test


def validate(run, batches, stop=None):
    """Overall / many / medium / few top-1 (percent) of phi + h on evaluation batches."""
    pred, target = runtime.predict(run.model, batches, run.device, run.amp, stop=stop)
    return ltaux.shot_accuracy(pred, target, run.counts, run.args.many, run.args.few)


def end_epoch(run, metrics, improved, best_acc):
    """Write best.pt (if improved), then the log line, then last.pt: after a crash at any point, last.pt
    never records a best accuracy that best.pt does not hold, and a resume rewrites the rest."""
    epoch = metrics["epoch"] + 1
    if improved:
        save_checkpoint(run, "best.pt", epoch, 0, best_acc)
    try:
        with run.stop.saving(), open(os.path.join(run.args.out, "log.jsonl"), "a") as f:
            f.write(json.dumps(metrics) + "\n")
    except OSError as e:
        raise RunError(f"{os.path.join(run.args.out, 'log.jsonl')}: cannot write it ({e.strerror})") from None
    save_checkpoint(run, "last.pt", epoch, 0, best_acc)


def final_test(run):
    """Evaluate best.pt on the test list, print the many / medium / few table (with the paper's row for a
    recipe run) and write test_metrics.json. A stop signal ends it early (runtime.Interrupted)."""
    args, best = run.args, os.path.join(run.args.out, "best.pt")
    if args.rank == 0:
        runtime.load_weights(run.model, runtime.load_checkpoint(best), best)
    if args.world_size > 1:  # rank 0's weights to every rank: no shared file system needed
        for tensor in run.model.state_dict().values():
            dist.broadcast(tensor, src=0)
    acc = validate(run, run.evals["test"], stop=run.stop.agreed)
    paper = recipes.paper_row(plain_args(args), vars(get_args_parser().parse_args([])), args.test_split)
    run.log(f"\ntest ({args.test_split}) with {best}:\n" + runtime.format_table({f"{args.method} (best.pt)": acc})
            + runtime.paper_lines(acc, paper))
    if args.rank == 0:
        metrics = {k: acc[k] for k in ("overall", "mean_per_class", "many", "medium", "few")}
        if paper:
            metrics.update(paper=paper, paper_difference={k: None if acc[k] is None else acc[k] - paper[k]
                                                          for k in ("many", "medium", "few", "overall")})
        write_file(run, "test_metrics.json", json.dumps(metrics).encode())


# ----------------------------------------------------------------------------------------------
# the run


def print_rank0(rank, msg):
    if rank == 0:
        print(msg, flush=True)


def setup_processes(args):
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK (1 process without torchrun); NCCL on CUDA, gloo on CPU."""
    args.rank, args.world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = runtime.choose_device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
    if args.decode == "gpu" and device.type not in DECODE_DEVICES:
        raise LTauxError(f"--decode gpu needs a CUDA device (this run is on {device.type}): use --decode cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return device


def run_header(run, has_val):
    args, n = run.args, len(run.batches.batch_sampler.labels)
    defaults = vars(get_args_parser().parse_args([]))
    changed = {k: v for k, v in plain_args(args).items() if k in defaults and defaults[k] != v}
    run.log("args not at their defaults (all are saved in every checkpoint): " + json.dumps(changed, sort_keys=True))
    run.log(f"device: {run.device}, {args.world_size} process{'es' if args.world_size > 1 else ''}, amp "
            f"{runtime.amp_dtype(args.amp, run.device)[0]}; {n} train images, {len(run.counts)} classes, "
            f"{run.batches.batch_sampler.num_batches} steps/epoch of {images_per_step(args)} images; writing to {args.out}")
    groups = torch.bincount(ltaux.shot_groups(run.counts, args.many, args.few), minlength=3).tolist()
    run.log(f"shot groups: {groups[0]} many-shot (>= {args.many} training images), {groups[1]} medium, {groups[2]} "
            f"few-shot (<= {args.few}) classes")
    if not has_val:
        run.log("no validation list: best.pt is the last epoch's weights (--val-split selects by validation accuracy)")


def train(args, ckpt):
    """The whole run: inputs first (nothing is written until all are checked), then the epochs, then the test."""
    t_start = time.time()
    device = setup_processes(args)
    log = functools.partial(print_rank0, args.rank)
    amp = runtime.amp_dtype(args.amp, device)[1]
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    stop = StopFlag(device, args.world_size)
    try:
        # inputs: lists, images root, arguments, checkpoints (--resume, --init, --pretrained)
        train_set, evals, counts = open_inputs(args, log)
        sampler = make_sampler(train_set, args)
        model = build_model(args, train_set.num_classes, device)
        optimizer = build_optimizer(model, args, device)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        fingerprint = data_fingerprint(train_set)
        if ckpt:
            check_same_data(ckpt, args.resume, train_set, counts, fingerprint)
        args.out = args.out or (os.path.dirname(os.path.abspath(args.resume)) if args.resume else
                                os.path.join("runs", f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{args.method}"))
        if args.check_files and args.rank == 0:
            check_files([train_set] + list(evals.values()), stop, log)
        batches, eval_batches = make_batches(train_set, evals, sampler, args, device, log)  # --in-memory: decoded now
        stop.before_training()

        # the output folder, claimed only now
        folder = claim_out(args, ckpt) if args.rank == 0 else None
        failed = True
        try:
            args.out = share_out(args, folder)
            net = torch.nn.parallel.DistributedDataParallel(model) if args.world_size > 1 else model
            run = Run(args, device, amp, model, torch.compile(net) if args.compile else net, optimizer, scaler,
                      batches, eval_batches, counts, fingerprint, folder, stop, log)
            stopped = run_epochs(run, ckpt, "val" in evals)
            failed = False
        finally:
            if folder:
                folder.close(failed)
    finally:
        stop.restore()
    if stopped is None:
        log(f"\ndone in {datetime.timedelta(seconds=round(time.time() - t_start))}; best.pt: {args.out}/best.pt\n"
            f"next: python evaluate.py --checkpoint {args.out}/best.pt" + (f" --split {args.test_split}" if
                                                                          args.test_split else " --split LIST"))
    return 0


def make_sampler(train_set, args):
    """AuxBatchSampler of the method's mode; its argument errors (S vs Z, k vs C, S vs W) are the user's."""
    try:
        return ltaux.AuxBatchSampler(train_set.labels, args.batch_size, args.per_class, METHODS[args.method].sampler,
                                     seed=args.seed, rank=args.rank, world_size=args.world_size, with_seeds=True)
    except ValueError as e:
        raise LTauxError(f"{args.split}: {e}") from None


def share_out(args, folder):
    """Rank 0's output folder, told to every rank."""
    box = [folder.path if folder else None]
    if args.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def run_epochs(run, ckpt, has_val):
    """The epochs (train, validate, write best.pt / log.jsonl / last.pt), then the final test. Returns None
    when the run is complete, else where it stopped (a signal)."""
    args, log = run.args, run.log
    epoch, first_step, best_acc, partial = restore(ckpt, run) if ckpt else (0, 0, -1.0, {})
    if ckpt and args.rank == 0:
        trim_log(args.out, epoch)
    force_best = ckpt is not None and not os.path.exists(os.path.join(args.out, "best.pt"))
    run_header(run, has_val)
    try:
        for epoch in range(epoch, args.epochs):
            run.batches.batch_sampler.set_epoch(epoch, first_step)
            m, partial = train_one_epoch(run, epoch, first_step, partial)
            if m.pop("stopped"):
                if args.rank == 0:
                    save_checkpoint(run, "last.pt", epoch, m["steps"], best_acc, partial)
                log(f"stopped at epoch {epoch} step {m['steps']}: saved {args.out}/last.pt; continue with "
                    f"python train.py --resume {args.out}/last.pt")
                return epoch
            first_step, partial, m["epoch"] = 0, {}, epoch
            if "val" in run.evals and ((epoch + 1) % args.eval_freq == 0 or epoch + 1 == args.epochs):
                acc = validate(run, run.evals["val"])
                m.update({f"val_{k}": acc[k] for k in ("overall", "many", "medium", "few", "mean_per_class")})
            improved = force_best or "val" not in run.evals or m.get("val_overall", -1.0) > best_acc
            best_acc, force_best = max(best_acc, m.get("val_overall", best_acc)), False
            if args.rank == 0:
                end_epoch(run, m, improved, best_acc)
            log(f"epoch {epoch} done in {m['epoch_time_s']:.0f}s: loss {m['loss']:.4f}" + "".join(
                f", val {k} {m['val_' + k]:.2f}" for k in ("overall", "many", "medium", "few")
                if m.get("val_" + k) is not None))
            if run.stop.agreed():
                log(f"stopped after epoch {epoch}: saved {args.out}/last.pt; continue with python train.py --resume "
                    f"{args.out}/last.pt")
                return epoch
        return test_at_the_end(run, force_best, best_acc)
    except RuntimeError as e:  # a DataLoader worker that died (killed, out of memory), noticed anywhere
        if "DataLoader worker" not in str(e):
            raise
        raise LTauxError(f"a data-loader worker died ({str(e).splitlines()[0]}); lower --workers if memory is short; "
                         + last_good(args.out)) from None
    except RunError as e:
        raise LTauxError(f"{e}; {last_good(args.out)}") from None


def last_good(out):
    """Where a failed run can be resumed from, for its error line."""
    last = os.path.join(out, "last.pt")
    if os.path.exists(last):
        return f"the last good checkpoint is {last} (intact)"
    return "no checkpoint yet" if os.path.isdir(out) else f"{out} is gone (deleted or renamed)"


def test_at_the_end(run, force_best, best_acc):
    """The final test of a complete run (a resume of a finished run lands here directly). Returns None, or
    "test" when a stop signal ended it early."""
    if "test" not in run.evals:
        return None
    if force_best and run.args.rank == 0:  # resumed into a new folder after the last epoch, no best.pt beside
        run.log("the resumed run's best.pt was not beside its checkpoint: testing the resumed weights (now best.pt)")
        save_checkpoint(run, "best.pt", run.args.epochs, 0, best_acc)
    try:
        final_test(run)
    except runtime.Interrupted:
        run.log(f"stopped during the final test: training is complete ({run.args.out}/best.pt, last.pt); "
                f"python train.py --resume {run.args.out}/last.pt runs the test")
        return "test"
    return None


def one_line_warning(message, category, filename, lineno, file=None, line=None):
    return f"warning: {message}\n"


def main(argv=None):
    plain_format, warnings.formatwarning = warnings.formatwarning, one_line_warning
    try:
        args, ckpt = parse_args(argv)
        return train(args, ckpt)
    except LTauxError as e:
        return runtime.report(e)
    except runtime.Interrupted as e:
        name = signal.Signals(e.args[0]).name
        print(f"error: {name} before training started: stopped, nothing was written", file=sys.stderr, flush=True)
        return 128 + e.args[0]
    except QuietExit as e:
        return e.args[0]
    except RuntimeError as e:  # a collective broke because a peer failed first and printed its one error line:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1 and (isinstance(e, dist.DistError) or "closed by peer" in str(e)):
            return 2  # no collective traceback from the ranks it left waiting
        raise
    finally:
        warnings.formatwarning = plain_format  # user warnings print as one line while main() runs
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    status = main()
    for s in (signal.SIGTERM, signal.SIGINT):  # the run is over: a repeated stop request must not turn the
        signal.signal(s, signal.SIG_IGN)  # interpreter's exit (it resets Python's handlers) into a kill
    sys.exit(status)
