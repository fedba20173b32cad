#!/usr/bin/env python
"""Train a long-tailed classifier with auxiliary learning (Zhang et al., arXiv:1912.04486).

    python train.py                                    # demo: synthetic long-tailed data, CPU, ~2 min
    python train.py --data /imagenet --split data_lists/ImageNet_LT_train.txt --recipe imagenet_lt_r10
    torchrun --nproc_per_node=8 train.py --data ... --split ...          # several GPUs / nodes
    python train.py --resume runs/r10/last.pt                            # continue where it stopped

Every epoch: validation (overall / many / medium / few top-1), <out>/best.pt, <out>/last.pt and one
JSON line in <out>/log.jsonl. The method itself lives in ltaux.py; this file wires it up.
"""

import argparse
import collections
import datetime
import functools
import hashlib
import json
import math
import os
import signal
import socket
import sys
import threading
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ARCHS = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet32")  # ltaux.LTResNet.ARCHS

# --method: the sampler's mode, the heads it trains (the others stay frozen), and the rotation task h_s.
Method = collections.namedtuple("Method", "sampler heads rotation")
METHODS = {
    "rrs": Method("rrs", ("fc",), False),  # RRS-Only: the random batch trains h (Section 4.3)
    "cbs": Method("cbs", ("fc",), False),  # CBS-Only: the class-balanced batch trains h
    "cbs_rrs": Method("cbs_rrs", ("fc", "aux_fc"), False),  # CBS+RRS: h on B_cbs, h_a on B_rrs
    "cbs_rrs_ss": Method("cbs_rrs", ("fc", "aux_fc", "rot_fc"), True),  # CBS+RRS+SS: plus h_s (Eq. 2)
}

# Presets. The paper (Section 4.4) gives Z = 4, lambdas 0.5:1:1 and SGD with a cosine schedule, and says
# that lr, epochs and batch size follow OLTR [19] "and cross-validated"; it gives no numbers. Each value's
# source is in README ("Recipes: where each value comes from"). `paper`: CBS+RRS+SS row of Tables 1-2.
RECIPES = {
    "imagenet_lt_r10": dict(arch="resnet10", epochs=60, batch_size=256, lr=0.1, weight_decay=5e-4,
                            image_size=224, paper=(52.4, 39.5, 21.0, 41.9)),
    "imagenet_lt_r50": dict(arch="resnet50", epochs=60, batch_size=256, lr=0.1, weight_decay=5e-4,
                            image_size=224, paper=(60.2, 44.0, 23.1, 47.3)),
    "places_lt_r152": dict(arch="resnet152", epochs=30, batch_size=128, lr=0.1, weight_decay=5e-4,
                           image_size=224, backbone_lr_scale=0.01, paper=(42.5, 40.6, 32.6, 39.6)),
    "places_lt_r50": dict(arch="resnet50", epochs=90, batch_size=256, lr=0.1, weight_decay=5e-4,
                          image_size=224, paper=(35.8, 31.0, 12.7, 28.9)),
    "cifar10_lt": dict(arch="resnet32", epochs=200, batch_size=120, per_class=12, lr=0.1, weight_decay=2e-4,
                       image_size=32, paper=None),
    "cifar100_lt": dict(arch="resnet32", epochs=200, batch_size=128, per_class=4, lr=0.1, weight_decay=2e-4,
                        image_size=32, paper=None),
    # the embedded default (no --data): 30 synthetic classes, 32 px, about 2 minutes on 2 CPU cores
    "demo": dict(arch="resnet10", epochs=8, batch_size=64, lr=0.1, weight_decay=5e-4, image_size=32,
                 workers=1, print_freq=20, paper=None),
}
NOT_RESUMED = ("resume", "out", "overwrite", "allow_unsafe_paths", "workers", "device", "check_files", "decode",
               "in_memory")
MEMORY_BUDGET = 2 * 2**30  # --in-memory auto: decoded training + evaluation images up to 2 GiB
DECODE_DEVICES = ("cuda",)  # where --decode gpu may run
FIXED_ON_RESUME = ("method", "arch", "embed_dim", "batch_size", "per_class", "seed", "image_size", "rotation",
                   "rotation_aug")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="dataset root; split paths are relative to it "
                   "(unset: run the demo on synthetic data written to --demo-dir)")
    g.add_argument("--split", default=None, help="training split list, 'relative/path label' per line")
    g.add_argument("--val-split", default=None, help="validation list (None: the sibling *_val.txt of --split)")
    g.add_argument("--test-split", default=None, help="test list, evaluated with best.pt after training "
                   "(None: the sibling *_test.txt of --split)")
    g.add_argument("--demo-dir", default=os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser(
        "~/.cache")), "ltaux", "demo"), help="where the demo writes its synthetic dataset")
    g.add_argument("--check-files", action="store_true", help="open every listed image before training "
                   "and report all unreadable ones at once")
    g.add_argument("--allow-unsafe-paths", action="store_true", help="accept absolute paths and '..' in lists")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader worker processes per GPU")
    g.add_argument("--decode", default="cpu", choices=["cpu", "gpu"], help="where training JPEGs are "
                   "decoded: cpu (in the workers) or gpu (workers send the file bytes; decode_jpeg, crop, "
                   "flip and jitter on the CUDA device; ImageNet-LT recipe only)")
    g.add_argument("--in-memory", default="auto", choices=["auto", "on", "off"], help="decode every image "
                   "once into one uint8 tensor on the training device and augment batches there, no worker "
                   "processes (auto: below 64 px when the images fit 2 GiB; the CIFAR recipe's augmentation)")
    g.add_argument("--image-size", type=int, default=224, help="training crop; >= 64 uses the ImageNet-LT "
                   "augmentation, smaller the CIFAR one (pad 4 + random crop)")
    g = p.add_argument_group("method")
    g.add_argument("--method", default="cbs_rrs_ss", choices=list(METHODS), help="rrs: RRS-Only, cbs: CBS-Only, "
                   "cbs_rrs: CBS+RRS (auxiliary head h_a), cbs_rrs_ss: CBS+RRS+SS (plus rotation head h_s)")
    g.add_argument("--recipe", default=None, choices=[r for r in RECIPES if r != "demo"],
                   help="preset of the paper's settings (see README); explicit flags override it")
    g.add_argument("--lambdas", type=float, nargs=3, default=[0.5, 1.0, 1.0], metavar=("L1", "L2", "L3"),
                   help="weights of the CBS, RRS and rotation losses (Eq. 2)")
    g.add_argument("--batch-size", type=int, default=256, help="S: images per sampler part of the global "
                   "batch (B_cbs and B_rrs each hold S), so a cbs_rrs_ss step forwards 4S images")
    g.add_argument("--per-class", type=int, default=4, help="Z: images per class in B_cbs (k = S/Z classes)")
    g.add_argument("--rotation", default="random", choices=["random", "all"],
                   help="rotation task h_s: one random angle per image, or all four (Table 5)")
    g.add_argument("--rotation-aug", action="store_true", help="Table 5's baseline with cbs_rrs: the "
                   "rotated copies (as --rotation) as plain augmentation, no h_s")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet10", choices=ARCHS, help="backbone of phi")
    g.add_argument("--embed-dim", type=int, default=None, help="Linear + ReLU after pooling, 0 for none "
                   "(None: 512 for the ImageNet ResNets as OLTR, 0 for resnet32)")
    g.add_argument("--pretrained", default=None, help="torchvision-format backbone weights (local .pth)")
    g.add_argument("--init", default=None, help="initialise phi (backbone + embed) from an ltaux "
                   "checkpoint, heads fresh: ftRRS+CBS of Table 3")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=90, help="one epoch = M = ceil(N / S) steps")
    g.add_argument("--lr", type=float, default=0.1, help="peak learning rate (the recipes use 0.1 for "
                   "S = 256; if you change S, scale --lr yourself: lr = 0.1 * S / 256)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay, on every parameter as OLTR")
    g.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up before the cosine decay")
    g.add_argument("--backbone-lr-scale", type=float, default=1.0, help="lr of phi (backbone and embed) = "
                   "scale * lr, e.g. 0.01 to fine-tune pretrained weights")
    g.add_argument("--amp", default=None, choices=["bf16", "fp16", "off"], help="autocast precision "
                   "(None: bf16 on CUDA, off on CPU); fp16 adds a gradient scaler")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs: one all-reduce "
                   "per BN layer per step; matters when per-GPU batches are small")
    add_run_args(p.add_argument_group("run"))
    return p


def add_run_args(g):
    g.add_argument("--out", default=None, help="output folder (None: runs/<date>-<method>; with --resume "
                   "the checkpoint's folder)")
    g.add_argument("--resume", default=None, help="continue from a last.pt (model, optimiser, "
                   "schedule, sampler position, RNG); its settings are the defaults")
    g.add_argument("--overwrite", action="store_true", help="replace the run held in --out")
    g.add_argument("--seed", type=int, default=0, help="seed of sampling, augmentation and init")
    g.add_argument("--device", default=None, choices=["cuda", "cpu"], help="None: cuda when available")
    g.add_argument("--print-freq", type=int, default=50, help="steps between progress lines")
    g.add_argument("--eval-freq", type=int, default=1, help="epochs between validations")
    g.add_argument("--many", type=int, default=100, help="many-shot classes: at least this many training images "
                   "(the paper's >= 100; Decoupling's code counts > 100 and < 20: --many 101 --few 19)")
    g.add_argument("--few", type=int, default=20, help="few-shot classes: at most this many training images "
                   "(the paper's <= 20)")


if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):
    get_args_parser().parse_args()  # prints the help and exits before torch is imported (seconds)

import torch  # noqa: E402 - after the fast --help
import torch.distributed as dist  # noqa: E402

import ltaux  # noqa: E402
import runtime  # noqa: E402
from ltaux import LTauxError  # noqa: E402


def parse_args(argv=None):
    """Defaults < recipe (the demo when --data is unset) < the checkpoint's settings < explicit flags.
    Returns (args, checkpoint or None)."""
    parser = get_args_parser()
    first = parser.parse_known_args(argv)[0]
    ckpt = runtime.load_checkpoint(first.resume) if first.resume else None
    saved = ckpt["args"] if ckpt else {}
    recipe = first.recipe or saved.get("recipe") or ("demo" if first.data is None and not ckpt else None)
    parser.set_defaults(**{k: v for k, v in RECIPES.get(recipe, {}).items() if k != "paper"})
    parser.set_defaults(**{k: v for k, v in saved.items() if k not in NOT_RESUMED and k != "recipe"})
    args = parser.parse_args(argv)
    args.recipe = recipe
    check_args(args, saved)
    return args, ckpt


def check_args(args, saved):
    """Every argument mistake, up front, as one LTauxError line."""
    positive = dict(epochs=args.epochs, batch_size=args.batch_size, per_class=args.per_class,
                    print_freq=args.print_freq, eval_freq=args.eval_freq, image_size=args.image_size)
    for name, v in positive.items():
        if v < 1:
            raise LTauxError(f"--{name.replace('_', '-')} {v}: must be at least 1")
    for name in ("lr", "momentum", "weight_decay", "warmup_epochs", "backbone_lr_scale", "workers"):
        if not getattr(args, name) >= 0:  # also catches nan
            raise LTauxError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 0")
    if args.embed_dim is not None and args.embed_dim < 0:
        raise LTauxError(f"--embed-dim {args.embed_dim}: must be >= 0")
    method, (l1, l2, l3) = METHODS[args.method], args.lambdas
    if not all(v >= 0 and math.isfinite(v) for v in args.lambdas):
        raise LTauxError(f"--lambdas {l1:g} {l2:g} {l3:g}: weights must be finite and >= 0")
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


# ----------------------------------------------------------------------------------------------
# data


def make_demo_data(root, seed=0, classes=30, head=500, tail=5, val=10, test=40, size=32):
    """Write a small synthetic long-tailed image dataset (PNG files + split lists) under root.

    Class c is a low-frequency colour pattern P_c = base + 0.6 * own_c; an image is P_c under a
    random shift, brightness change and strong low-frequency noise, so classes overlap and a
    classifier needs many images to separate them: tail classes (5 training images) are
    learnable but hard. Train counts decay exponentially from `head` to `tail` (many/medium/few
    groups 11/10/9 with thresholds 100/20); val and test are balanced. Written to a temporary
    folder and renamed, so an interrupted run never leaves half a dataset. Returns the list paths.
    """
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


def resolve_lists(args, rank, world_size):
    """The demo's data (written by rank 0) or the user's: fills --data/--split and the sibling
    *_val.txt / *_test.txt of a *_train.txt when those are not given."""
    if args.data is None:
        if rank == 0:
            make_demo_data(args.demo_dir, seed=args.seed)
        if world_size > 1:
            dist.barrier()  # the other ranks wait for rank 0's dataset
        lists = make_demo_data(args.demo_dir, seed=args.seed)
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
    return ltaux.SplitDataset(args.data, path, runtime.build_transform(args.image_size, train),
                              allow_unsafe_paths=args.allow_unsafe_paths, read=runtime.read_image)


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
    sums = os.path.join(HERE, "data_lists", "SHA256SUMS")
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


def check_files(datasets, log, out_dir, shown=20):
    """Open every listed image (rank 0 only); report all failures at once (the first `shown` inline,
    every one in <out>/unreadable.txt when there are more)."""
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
    if not failures:
        return
    more = ""
    if len(failures) > shown:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "unreadable.txt"), "w") as f:
            f.write("\n".join(failures) + "\n")
        more = f"\n  ... and {len(failures) - shown} more: all are listed in {out_dir}/unreadable.txt"
    raise LTauxError(f"{len(failures)} unreadable images:\n  " + "\n  ".join(failures[:shown]) + more)


def ignore_stop_signals(_worker_id):
    """DataLoader workers ignore SIGINT, and SIGTERM unless the main process sends it (the DataLoader's
    own terminate()): a signal sent to the whole process group (Slurm, systemd, kill -TERM -PGID,
    Ctrl-C) then reaches the main process, which finishes the step and saves while workers keep serving.
    A watcher thread reads each SIGTERM's sender (sigwaitinfo; where that is missing, e.g. macOS,
    SIGTERM keeps its default action). Workers still exit when the main process dies (PyTorch's watchdog)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # delivered to the watcher alone

    def watch():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass  # from the process group or another process: ignored
        os._exit(0)  # the main process terminates this worker

    threading.Thread(target=watch, daemon=True).start()


def make_loader(ds, args, device, sampler=None, rank=0, world_size=1):
    """The training loader (batch_sampler = AuxBatchSampler; with --decode gpu its batches are file
    bytes, finished by loader.dataset.decode; below 64 px each sample gets cifar_augment from its seed)
    or this rank's shard (rank::W) of an evaluation list, S / W images per batch."""
    kw = dict(num_workers=args.workers, pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)
    if sampler is not None:
        if args.decode == "gpu":
            ds = runtime.DeviceDecodeDataset(ds, args.image_size)
            kw["collate_fn"] = ds.collate
        elif args.image_size < 64:
            ds = runtime.SeededCifar(ds)
        return torch.utils.data.DataLoader(ds, batch_sampler=sampler, persistent_workers=args.workers > 0, **kw)
    shard = torch.utils.data.Subset(ds, range(rank, len(ds), world_size))
    return torch.utils.data.DataLoader(shard, batch_size=max(1, args.batch_size // world_size), **kw)


def in_memory(args, datasets):
    """Whether --in-memory holds these datasets' decoded images in one tensor each (see its help)."""
    if args.in_memory == "off" or args.image_size >= 64:
        return False
    size = sum(len(d) for d in datasets) * 3 * args.image_size ** 2
    return args.in_memory == "on" or size <= MEMORY_BUDGET


def make_data(train_set, evals, sampler, args, device, log):
    """The training batches and {name: evaluation batches}: in memory (runtime.MemoryBatches, decoded
    once here) or DataLoaders (make_loader)."""
    if not in_memory(args, [train_set] + list(evals.values())):
        return make_loader(train_set, args, device, sampler), {
            k: make_loader(d, args, device, None, args.rank, args.world_size) for k, d in evals.items()}
    t0, n = time.time(), len(train_set) + sum(len(d) for d in evals.values())
    try:
        decoded = {k: runtime.decode_all(d, device, args.workers) for k, d in dict(evals, train=train_set).items()}
    except LTauxError:
        if args.rank > 0:  # every rank reads the same files: rank 0 alone prints the error line
            raise QuietExit(2) from None
        raise
    batches = runtime.MemoryBatches(*decoded.pop("train"), sampler)
    evals = {k: runtime.MemoryEval(*d, max(1, args.batch_size // args.world_size), args.rank, args.world_size)
             for k, d in decoded.items()}
    log(f"in memory: {n} images decoded once ({n * 3 * args.image_size ** 2 / 2**20:.0f} MiB on {device}, "
        f"{time.time() - t0:.1f}s); batches gathered and augmented on {device}, no loader workers")
    return batches, evals


# ----------------------------------------------------------------------------------------------
# model, optimiser, schedule


def build_model(args, num_classes, device, world_size):
    """LTResNet with the heads --method does not train frozen (DDP must not wait for their gradients)."""
    model = ltaux.LTResNet(args.arch, num_classes, args.embed_dim, args.pretrained)
    if args.init:  # the whole of phi (backbone + embed), heads fresh: ftRRS+CBS (Table 3)
        runtime.load_weights(model, runtime.load_checkpoint(args.init), args.init, prefixes=("backbone.", "embed."))
    for head in {"fc", "aux_fc", "rot_fc"} - set(METHODS[args.method].heads):
        getattr(model, head).requires_grad_(False)
    if args.sync_bn and world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device, memory_format=torch.channels_last)


def build_optimizer(model, args, device):
    """SGD with momentum and weight decay on every parameter (as OLTR); phi at backbone_lr_scale * lr."""
    phi = [p for n, p in model.named_parameters() if n.startswith(("backbone.", "embed."))]
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
# the output folder and checkpoints


def claim_out(args, ckpt_path):
    """Choose --out and lock it for this run (an OS lock: a crashed run leaves no stale lock). Refuses
    a folder that holds another run unless it is the one resumed or --overwrite is given."""
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise LTauxError(f"--out {out}: is a file, not a folder")
    parent = os.path.dirname(os.path.abspath(out))
    probe = out if os.path.isdir(out) else next(p for p in _ancestors(parent) if os.path.exists(p))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise LTauxError(f"--out {out}: {probe} is not writable")
    resumed_here = bool(ckpt_path) and os.path.isdir(out) and os.path.samefile(os.path.dirname(
        os.path.abspath(ckpt_path)), out)
    taken = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if taken and not resumed_here and not args.overwrite:
        hint = f"pass --resume {os.path.join(out, 'last.pt')} to continue it, " if "last.pt" in taken else ""
        raise LTauxError(f"{out}: holds another run ({', '.join(taken)}); {hint}--overwrite to replace it, "
                         "or another --out")
    created = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    lock = RunLock(out, created)
    if taken and not resumed_here:  # --overwrite, now that every input was checked and the folder is ours
        for f in taken:
            os.remove(os.path.join(out, f))
    return out, lock


RUN_FILES = ("last.pt", "best.pt", "log.jsonl", "test_metrics.json")


def _ancestors(path):
    while True:
        yield path
        if os.path.dirname(path) == path:
            return
        path = os.path.dirname(path)


class RunLock:
    """An exclusive OS lock on <out>/.lock (with pid and host inside) held for the whole run: a second
    run on the same folder is refused at once; the OS drops the lock when the process dies."""

    def __init__(self, out, created):
        import fcntl
        self.out, self.created = out, created
        self.path = os.path.join(out, ".lock")
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            who = self.file.read().strip() or "another process"
            self.file.close()
            raise LTauxError(f"{out}: in use by a running training ({who}); choose another --out") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()

    def release(self):
        """Unlock; a folder this run created and left empty (it failed before writing) is removed."""
        os.remove(self.path)
        self.file.close()
        if self.created and not os.listdir(self.out):
            os.rmdir(self.out)


def save_checkpoint(path, args, model, optimizer, scaler, counts, steps_per_epoch, epoch, step_in_epoch, best_acc,
                    partial=None):
    """Write one checkpoint atomically: everything needed to resume, as tensors and plain types. Weights
    are checked first (one reduction, one host sync per save): a non-finite one raises NonFiniteLoss and
    nothing is written, so no checkpoint ever holds non-finite weights."""
    bad = runtime.first_non_finite(model.state_dict())
    if bad:
        where = f"at the end of epoch {epoch - 1}" if step_in_epoch == 0 else f"after step {step_in_epoch} of epoch {epoch}"
        raise NonFiniteLoss(f"non-finite weights ({bad}) {where} (the update diverged); lower --lr or check the "
                            "data, then --resume the last good checkpoint")
    ckpt = dict(format=runtime.CKPT_FORMAT, args=plain_args(args), model=model.state_dict(),
                optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), train_counts=counts, epoch=epoch,
                step_in_epoch=step_in_epoch, global_step=epoch * steps_per_epoch + step_in_epoch,
                shot_rule=runtime.SHOT_RULE,
                best_acc=float(best_acc),
                rng_cpu=torch.get_rng_state(), partial=partial or {},
                rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    runtime.atomic_save(ckpt, path)


def plain_args(args):
    """The run's arguments as saved in checkpoints (rank and world size belong to the process)."""
    return {k: v for k, v in vars(args).items() if k not in ("rank", "world_size")}


def restore(ckpt, path, model, optimizer, scaler, args, log):
    """Load a --resume checkpoint; apply the optimisation flags given now (logged). Returns
    (epoch, step_in_epoch, best_acc, partial epoch metrics)."""
    runtime.load_weights(model, ckpt, path)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng_cpu"])
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise LTauxError(f"{path}: damaged optimiser or RNG state ({type(e).__name__})") from None
    if ckpt.get("rng_cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
    for g in optimizer.param_groups:  # load_state_dict brought the old values back
        g.update(momentum=args.momentum, weight_decay=args.weight_decay)
    optimizer.param_groups[0]["lr_scale"] = args.backbone_lr_scale
    old = ckpt["args"]
    for k in ("lr", "momentum", "weight_decay", "backbone_lr_scale", "epochs", "warmup_epochs", "lambdas"):
        if old.get(k) != getattr(args, k):
            log(f"resume: --{k.replace('_', '-')} {getattr(args, k)} (the checkpoint's run had {old.get(k)}); "
                + ("the cosine schedule is recomputed over the new length from the current step"
                   if k in ("epochs", "warmup_epochs") else "applied from the next step"))
    return ckpt["epoch"], ckpt["step_in_epoch"], ckpt["best_acc"], ckpt.get("partial") or {}


# ----------------------------------------------------------------------------------------------
# one epoch


def step_inputs(images, labels, args, device, gen):
    """A loader batch [B_cbs; B_rrs] (uint8, this rank's S/W + S/W rows) -> aux_loss's four inputs."""
    jitter = gen if runtime.jitter_on_device(args.image_size, train=True) else None
    x, y = runtime.to_device(images, device, jitter), labels.to(device, non_blocking=True)
    mode = METHODS[args.method].sampler
    if mode == "rrs":
        return None, None, x, y
    if mode == "cbs":
        return x, y, None, None
    s = args.batch_size // args.world_size
    x_cbs, y_cbs, x_rrs, y_rrs = x[:s], y[:s], x[s:], y[s:]
    if args.rotation_aug:  # Table 5: the same images through phi as CBS+RRS+SS, all as classification
        x_cbs, y_cbs = ltaux.rotation_augment(x_cbs, y_cbs, args.rotation, gen)
        x_rrs, y_rrs = ltaux.rotation_augment(x_rrs, y_rrs, args.rotation, gen)
    return x_cbs, y_cbs, x_rrs, y_rrs


def images_per_step(args):
    """Images through the backbone per global step (S per part, rotated copies included)."""
    n = args.batch_size * (1 if METHODS[args.method].sampler != "cbs_rrs" else 2)
    if METHODS[args.method].rotation or args.rotation_aug:
        n += n * (4 if args.rotation == "all" else 1)
    return n


def train_one_epoch(model, loader, optimizer, scaler, stop, epoch, first_step, partial, args, device, amp, log):
    """Train from batch `first_step` of `epoch` to its end, or until a stop is agreed. Returns a metrics
    dict: mean loss and parts over the whole epoch (a resumed part included), lr, images/s (this
    session), epoch_time_s, steps (done in this epoch so far), stopped."""
    model.train()
    steps = loader.batch_sampler.num_batches  # M
    total, warmup = steps * args.epochs, round(args.warmup_epochs * steps)
    sums = {k: torch.tensor(v, device=device) for k, v in partial.get("sums", {}).items()}
    done, seen, t0 = partial.get("steps", 0), 0, time.time()
    gen = torch.Generator(device=device)
    method = METHODS[args.method]
    lambdas = list(args.lambdas) if method.rotation else [args.lambdas[0], args.lambdas[1], 0.0]
    rotation = args.rotation if method.rotation else "off"
    step_in_epoch = first_step
    for batch in loader:
        images, labels = loader.dataset.decode(batch, device) if args.decode == "gpu" else batch
        step = epoch * steps + step_in_epoch
        for g in optimizer.param_groups:
            g["lr"] = args.lr * g["lr_scale"] * lr_factor(step, total, warmup)
        gen.manual_seed(ltaux.AuxBatchSampler.derive_seed(args.seed, "rotation", step, args.rank))
        x_cbs, y_cbs, x_rrs, y_rrs = step_inputs(images, labels, args, device, gen)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss, parts = ltaux.aux_loss(model, x_cbs, y_cbs, x_rrs, y_rrs, lambdas, rotation, gen)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        for k, v in dict(parts, loss=loss.detach()).items():  # running sums stay on the device: no sync
            sums[k] = sums.get(k, 0.0) + v.float()
        done, seen, step_in_epoch = done + 1, seen + images_per_step(args), step_in_epoch + 1
        if step_in_epoch % args.print_freq == 0 or step_in_epoch == steps:
            means = check_finite(sums, done, epoch, step_in_epoch)
            rate = seen / (time.time() - t0)
            eta = datetime.timedelta(seconds=round((total - step - 1) * (time.time() - t0) / (done - partial.get(
                "steps", 0))))
            log(f"epoch {epoch} [{step_in_epoch:>{len(str(steps))}}/{steps}] "
                + " ".join(f"{k} {v:.4f}" for k, v in means.items())
                + f" lr {optimizer.param_groups[-1]['lr']:.5f} img/s {rate:.0f} eta {eta}")
        if stop.agreed():
            break
    means = check_finite(sums, done, epoch, step_in_epoch)
    elapsed = partial.get("time", 0.0) + time.time() - t0
    out = {f"loss_{k}" if k != "loss" else k: v for k, v in means.items()}
    out.update(lr=optimizer.param_groups[-1]["lr"], images_per_s=seen / max(time.time() - t0, 1e-9),
               epoch_time_s=elapsed, steps=step_in_epoch, stopped=step_in_epoch < steps)
    partial = dict(sums={k: float(v) for k, v in sums.items()}, steps=done, time=elapsed)
    return out, partial


class QuietExit(Exception):
    """End the process with this status and no message (another rank prints the error line)."""


class NonFiniteLoss(LTauxError):
    """The loss became nan or inf; train() adds the path of the last good checkpoint."""


def check_finite(sums, n, epoch, step_in_epoch):
    """Mean loss parts since the epoch began ({name: float}; one host sync). A non-finite one ends the
    run before anything is saved, so no checkpoint ever holds non-finite weights."""
    means = {k: float(v) / max(n, 1) for k, v in sums.items()}
    if not all(math.isfinite(v) for v in means.values()):
        parts = ", ".join(f"{k} {v:.4g}" for k, v in means.items())
        raise NonFiniteLoss(f"non-finite loss at step {step_in_epoch} of epoch {epoch} or before it ({parts}); "
                            "lower --lr or check the data, then --resume the last good checkpoint")
    return means


class StopFlag:
    """SIGTERM / SIGINT set a flag: the run finishes its step, saves last.pt and exits 0. A second
    signal more than a second later exits at once (status 128 + signal); one within the second is the
    same request delivered twice (Slurm signals every process, torchrun forwards it again). With W
    processes the flag is all-reduced every step, read one step later (no stall of the GPU queue),
    so every rank stops after the same step."""

    def __init__(self, device, world_size):
        self.signum, self.device, self.world_size, self.pending = None, device, world_size, None
        self.first_at = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if self.signum is None:
            self.signum, self.first_at = signum, time.monotonic()
        elif time.monotonic() - self.first_at > 1.0:
            print(f"second {signal.Signals(signum).name}: exiting now, without saving", file=sys.stderr, flush=True)
            os._exit(128 + signum)

    def agreed(self):
        if self.world_size == 1:
            return self.signum is not None
        flag = torch.full((), float(self.signum is not None), device=self.device)
        dist.all_reduce(flag)  # queued; read at the next step
        previous, self.pending = self.pending, flag
        return previous is not None and bool(previous > 0)

    def restore(self):
        for s, h in self.previous.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------------------------
# validation, the end of an epoch, the final test


def validate(model, loader, counts, args, device, amp):
    """Overall / many / medium / few top-1 (percent) of phi + h on an evaluation loader."""
    pred, target = runtime.predict(model, loader, device, amp, args.world_size)
    return ltaux.shot_accuracy(pred, target, counts, args.many, args.few)


def end_epoch(out, metrics, improved, save):
    """Write best.pt (if improved), then the log line, then last.pt: after a crash at any point,
    last.pt never records a best accuracy that best.pt does not hold, and a resume rewrites the rest."""
    if improved:
        save(os.path.join(out, "best.pt"))
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write(json.dumps(metrics) + "\n")
    save(os.path.join(out, "last.pt"))


def trim_log(out, epoch):
    """On resume: keep the log lines of the epochs before `epoch` (a crash may have left one more)."""
    path = os.path.join(out, "log.jsonl")
    if os.path.exists(path):
        keep = []
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line).get("epoch", -1) < epoch:
                        keep.append(line)
                except ValueError:  # a line cut short by a crash
                    pass
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)


def final_test(model, loader, out, counts, args, device, amp, log):
    """Evaluate best.pt on the test list, print the many / medium / few table, write test_metrics.json."""
    best = os.path.join(out, "best.pt")
    if args.rank == 0:
        runtime.load_weights(model, runtime.load_checkpoint(best), best)
    if args.world_size > 1:  # rank 0's weights to every rank: no shared file system needed
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    acc = validate(model, loader, counts, args, device, amp)
    log(f"\ntest ({args.test_split}) with {best}:\n" + runtime.format_table({f"{args.method} (best.pt)": acc}))
    if args.rank == 0:
        with open(os.path.join(out, "test_metrics.json"), "w") as f:
            json.dump({k: acc[k] for k in ("overall", "mean_per_class", "many", "medium", "few")}, f)


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


def open_inputs(args, log):
    """Every list, the image root and the labels, checked: (train set, {"val"/"test": set}, counts (C,))."""
    resolve_lists(args, args.rank, args.world_size)
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


def run_header(args, device, amp_name, train_set, steps, out, has_val, log):
    defaults = vars(get_args_parser().parse_args([]))
    changed = {k: v for k, v in plain_args(args).items() if k in defaults and defaults[k] != v}
    log("args not at their defaults (all are saved in every checkpoint): " + json.dumps(changed, sort_keys=True))
    log(f"device: {device}, {args.world_size} process{'es' if args.world_size > 1 else ''}, amp {amp_name}; "
        f"{len(train_set)} train images, {train_set.num_classes} classes, {steps} steps/epoch of "
        f"{images_per_step(args)} images; writing to {out}")
    if not has_val:
        log("no validation list: best.pt is the last epoch's weights (--val-split selects by validation accuracy)")


def train(args, ckpt):
    """The whole run: inputs first (nothing is written until all are checked), then the epochs."""
    t_start = time.time()
    device = setup_processes(args)
    log = functools.partial(print_rank0, args.rank)
    amp_name, amp = runtime.amp_dtype(args.amp, device)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = device.type == "cuda"

    # inputs: lists, images root, arguments, checkpoints (--resume, --init, --pretrained)
    train_set, evals, counts = open_inputs(args, log)
    try:
        sampler = ltaux.AuxBatchSampler(train_set.labels, args.batch_size, args.per_class,
                                        METHODS[args.method].sampler, seed=args.seed, rank=args.rank,
                                        world_size=args.world_size, with_seeds=True)
    except ValueError as e:  # S vs Z, k vs C, S vs W: the user's arguments
        raise LTauxError(f"{args.split}: {e}") from None
    model = build_model(args, train_set.num_classes, device, args.world_size)
    optimizer = build_optimizer(model, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_name == "fp16")
    if ckpt and not torch.equal(ckpt["train_counts"], counts):
        raise LTauxError(f"{args.split}: not the training list of the resumed run (other class counts)")
    args.out = args.out or (os.path.dirname(os.path.abspath(args.resume)) if args.resume else
                            os.path.join("runs", f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{args.method}"))
    if args.check_files and args.rank == 0:
        check_files([train_set] + list(evals.values()), log, args.out)

    # the output folder: claimed only now
    out, lock = claim_out(args, args.resume) if args.rank == 0 else (None, None)
    if args.world_size > 1:
        box = [out]
        dist.broadcast_object_list(box, src=0)
        out = box[0]
    args.out = out
    try:
        epoch, first_step, best_acc, partial = 0, 0, -1.0, {}
        if ckpt:
            epoch, first_step, best_acc, partial = restore(ckpt, args.resume, model, optimizer, scaler, args, log)
            if args.rank == 0:
                trim_log(out, epoch)
        net = torch.nn.parallel.DistributedDataParallel(model) if args.world_size > 1 else model
        net = torch.compile(net) if args.compile else net
        loader, eval_loaders = make_data(train_set, evals, sampler, args, device, log)
        run_header(args, device, amp_name, train_set, sampler.num_batches, out, "val" in evals, log)
        stopped = run_epochs(net, model, loader, eval_loaders, optimizer, scaler, counts, epoch, first_step,
                             best_acc, partial, args, device, amp, log)
        if not stopped and "test" in eval_loaders:
            final_test(model, eval_loaders["test"], out, counts, args, device, amp, log)
    except NonFiniteLoss as e:
        last = os.path.join(out, "last.pt")
        raise LTauxError(f"{e}: {last if os.path.exists(last) else 'none yet'}") from None
    finally:
        if lock:
            lock.release()
    if not stopped:
        log(f"\ndone in {datetime.timedelta(seconds=round(time.time() - t_start))}; best.pt: {out}/best.pt\n"
            f"next: python evaluate.py --checkpoint {out}/best.pt" + (f" --split {args.test_split}" if
                                                                       args.test_split else " --split LIST"))
    return 0


def run_epochs(net, model, loader, eval_loaders, optimizer, scaler, counts, epoch, first_step, best_acc,
               partial, args, device, amp, log):
    """The epoch loop: train, validate, write best.pt / log.jsonl / last.pt. Returns True if stopped."""
    sampler, stop = loader.batch_sampler, StopFlag(device, args.world_size)
    save = functools.partial(save_checkpoint, args=args, model=model, optimizer=optimizer, scaler=scaler,
                             counts=counts, steps_per_epoch=sampler.num_batches)
    try:
        for epoch in range(epoch, args.epochs):
            sampler.set_epoch(epoch, first_step)
            m, partial = train_one_epoch(net, loader, optimizer, scaler, stop, epoch, first_step, partial,
                                         args, device, amp, log)
            if m.pop("stopped"):
                if args.rank == 0:
                    save(os.path.join(args.out, "last.pt"), epoch=epoch, step_in_epoch=m["steps"],
                         best_acc=best_acc, partial=partial)
                log(f"stopped at epoch {epoch} step {m['steps']}: saved {args.out}/last.pt; continue with "
                    f"python train.py --resume {args.out}/last.pt")
                return True
            first_step, partial, m["epoch"] = 0, {}, epoch
            if "val" in eval_loaders and ((epoch + 1) % args.eval_freq == 0 or epoch + 1 == args.epochs):
                acc = validate(model, eval_loaders["val"], counts, args, device, amp)
                m.update({f"val_{k}": acc[k] for k in ("overall", "many", "medium", "few", "mean_per_class")})
            improved = "val" not in eval_loaders or m.get("val_overall", -1.0) > best_acc
            best_acc = max(best_acc, m.get("val_overall", best_acc))
            if args.rank == 0:
                end_epoch(args.out, m, improved, functools.partial(save, epoch=epoch + 1, step_in_epoch=0,
                                                                   best_acc=best_acc))
            log(f"epoch {epoch} done in {m['epoch_time_s']:.0f}s: loss {m['loss']:.4f}" + "".join(
                f", val {k} {m['val_' + k]:.2f}" for k in ("overall", "many", "medium", "few")
                if m.get("val_" + k) is not None))
    finally:
        stop.restore()
    return False


def one_line_warning(message, category, filename, lineno, file=None, line=None):
    return f"warning: {message}\n"


def main(argv=None):
    plain_format, warnings.formatwarning = warnings.formatwarning, one_line_warning
    try:
        args, ckpt = parse_args(argv)
        return train(args, ckpt)
    except LTauxError as e:
        return runtime.report(e)
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
    sys.exit(main())
