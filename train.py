#!/usr/bin/env python
"""Train a long-tailed classifier with auxiliary learning (Zhang et al., arXiv:1912.04486).

    python train.py                                    # demo: synthetic long-tailed data, CPU, ~2 min
    python train.py --data /imagenet --split data_lists/ImageNet_LT_train.txt --recipe imagenet_lt_r10
    torchrun --nproc_per_node=8 train.py --data ... --split ...          # several GPUs / nodes
    python train.py --resume runs/r10/last.pt                            # continue where it stopped

Every epoch: validation (overall / many / medium / few top-1), <out>/last.pt, <out>/best.pt and one
JSON line in <out>/log.jsonl. The method itself lives in ltaux.py; this file only wires it up.
"""

import argparse
import datetime
import functools
import hashlib
import json
import math
import os
import signal
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torchvision.transforms as T

import ltaux
from ltaux import LTauxError

METHODS = ("rrs", "cbs", "cbs_rrs", "cbs_rrs_ss")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, applied on the device
CKPT_FORMAT = "ltaux-checkpoint-v1"
HERE = os.path.dirname(os.path.abspath(__file__))

# Presets for the paper's settings. The paper (Section 4.4) gives Z = 4, lambdas 0.5:1:1, SGD with a
# cosine schedule, and says learning rates, epochs and batch sizes follow OLTR [19]; it gives no
# numbers. Values below: batch 256, lr 0.1, momentum 0.9, weight decay 5e-4 from OLTR's configs;
# 90 epochs from scratch as in Decoupling (Kang et al. 2020, cosine schedule); ImageNet-pretrained
# ResNet-152 on Places-LT fine-tuned for 30 epochs with the backbone at 0.1x the lr, as in OLTR's
# Places-LT stage 1. `paper` is the CBS+RRS+SS row of Tables 1-2 (many / medium / few / overall).
RECIPES = {
    "imagenet_lt_r10": dict(arch="resnet10", epochs=90, batch_size=256, lr=0.1, weight_decay=5e-4,
                            image_size=224, paper=(52.4, 39.5, 21.0, 41.9)),
    "imagenet_lt_r50": dict(arch="resnet50", epochs=90, batch_size=256, lr=0.1, weight_decay=5e-4,
                            image_size=224, paper=(60.2, 44.0, 23.1, 47.3)),
    "places_lt_r152": dict(arch="resnet152", epochs=30, batch_size=256, lr=0.1, weight_decay=5e-4,
                           image_size=224, backbone_lr_scale=0.1, paper=(42.5, 40.6, 32.6, 39.6)),
    "places_lt_r50": dict(arch="resnet50", epochs=90, batch_size=256, lr=0.1, weight_decay=5e-4,
                          image_size=224, paper=(35.8, 31.0, 12.7, 28.9)),
    # the embedded default (no --data): 30 synthetic classes, 32 px, ~2 minutes on 2 CPU cores
    "demo": dict(arch="resnet10", epochs=12, batch_size=64, lr=0.1, weight_decay=5e-4, image_size=32,
                 embed_dim=128, workers=1, print_freq=20, paper=None),
}


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="dataset root; split paths are relative to it "
                   "(unset: run the demo on synthetic data written to --demo-dir)")
    g.add_argument("--split", default=None, help="training split list, 'relative/path label' per line")
    g.add_argument("--val-split", default=None, help="validation list (None: the sibling *_val.txt of --split)")
    g.add_argument("--test-split", default=None, help="test list, evaluated with best.pt after training")
    g.add_argument("--demo-dir", default=os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser(
        "~/.cache")), "ltaux", "demo"), help="where the demo writes its synthetic dataset")
    g.add_argument("--check-files", action="store_true", help="open every listed image before training "
                   "and report all unreadable ones at once")
    g.add_argument("--allow-unsafe-paths", action="store_true", help="accept absolute paths and '..' in lists")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader worker processes per GPU")
    g.add_argument("--image-size", type=int, default=224, help="training crop; >= 64 uses the ImageNet-LT "
                   "augmentation, smaller the CIFAR one (pad 4 + random crop)")
    g = p.add_argument_group("method")
    g.add_argument("--method", default="cbs_rrs_ss", choices=METHODS, help="rrs: RRS-Only, cbs: CBS-Only, "
                   "cbs_rrs: CBS+RRS (aux head h_a), cbs_rrs_ss: CBS+RRS+SS (plus rotation head h_s)")
    g.add_argument("--recipe", default=None, choices=[r for r in RECIPES if r != "demo"],
                   help="preset of the paper's settings (see README); explicit flags override it")
    g.add_argument("--lambdas", type=float, nargs=3, default=[0.5, 1.0, 1.0], metavar=("L1", "L2", "L3"),
                   help="weights of the CBS, RRS and rotation losses (Eq. 2)")
    g.add_argument("--batch-size", type=int, default=256, help="S: global images per sampler part, "
                   "so a cbs_rrs_ss step forwards 4S images")
    g.add_argument("--per-class", type=int, default=4, help="Z: images per class in the balanced batch")
    g.add_argument("--rotation", default="random", choices=["random", "all"],
                   help="rotation task: one random angle per image, or all four (Table 5)")
    g.add_argument("--rotation-aug", action="store_true", help="Table 5: feed the four rotated copies "
                   "to cbs_rrs as plain augmentation (no h_s)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet10", choices=ltaux.LTResNet.ARCHS, help="backbone phi")
    g.add_argument("--embed-dim", type=int, default=512, help="linear layer after pooling, 0 for none")
    g.add_argument("--pretrained", default=None, help="torchvision-format backbone weights (local .pth)")
    g.add_argument("--init", default=None, help="initialise phi (backbone + embed) from an ltaux "
                   "checkpoint, heads fresh: ftRRS+CBS of Table 3")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=90, help="one epoch = ceil(N / S) steps")
    g.add_argument("--lr", type=float, default=0.1, help="peak learning rate for S = 256; scale it "
                   "linearly with S (lr = 0.1 * S / 256)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    g.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up before the cosine decay")
    g.add_argument("--backbone-lr-scale", type=float, default=1.0, help="backbone lr = scale * lr "
                   "(e.g. 0.1 to fine-tune pretrained weights)")
    g.add_argument("--amp", default=None, choices=["bf16", "fp16", "off"], help="autocast precision "
                   "(None: bf16 on CUDA, off on CPU); fp16 adds a gradient scaler")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs: one all-reduce "
                   "per BN layer per step; matters when per-GPU batches are small")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="output folder (None: runs/<date>-<method>)")
    g.add_argument("--resume", default=None, help="continue from <out>/last.pt (model, optimiser, "
                   "schedule, sampler position, RNG)")
    g.add_argument("--overwrite", action="store_true", help="reuse an --out that holds another run")
    g.add_argument("--seed", type=int, default=0, help="seed of sampling, augmentation and init")
    g.add_argument("--device", default=None, help="cuda or cpu (None: cuda when available)")
    g.add_argument("--print-freq", type=int, default=50, help="steps between progress lines")
    g.add_argument("--eval-freq", type=int, default=1, help="epochs between validations")
    g.add_argument("--many", type=int, default=100, help="many-shot: more than this many train images")
    g.add_argument("--few", type=int, default=20, help="few-shot: fewer than this many train images")
    g.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)  # tests: a fake SIGTERM
    return p


def explicit_dests(argv):
    """Names of the options given on the command line (to let them override a recipe or checkpoint)."""
    quiet = get_args_parser()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(quiet.parse_known_args(argv)[0]))


def parse_args(argv=None):
    """Defaults < recipe (or the demo when --data is unset) < explicit flags."""
    argv = sys.argv[1:] if argv is None else argv
    parser = get_args_parser()
    args = parser.parse_args(argv)
    given = explicit_dests(argv)
    recipe = args.recipe or ("demo" if args.data is None and not args.resume else None)
    for k, v in RECIPES.get(recipe, {}).items():
        if k not in given and k != "paper":
            setattr(args, k, v)
    args.recipe, args.given = recipe, sorted(given)
    return args


# ----------------------------------------------------------------------------------------------
# distributed


def setup_distributed(args):
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; NCCL on CUDA, gloo on CPU. Returns device."""
    args.rank, args.world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    kind = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(f"cuda:{local}" if kind == "cuda" else kind)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    return device


def is_main(args):
    return args.rank == 0


def log(args, msg):
    if is_main(args):
        print(msg, flush=True)


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
    os.makedirs(tmp, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    up = lambda t: torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)
    base = up(torch.randn(1, 3, 4, 4, generator=g))
    protos = base + 0.6 * up(torch.randn(classes, 3, 4, 4, generator=g))
    counts = [round(head * (tail / head) ** (c / (classes - 1))) for c in range(classes)]
    for split, per_class in (("train", counts), ("val", [val] * classes), ("test", [test] * classes)):
        rows = []
        for c, n in enumerate(per_class):
            noise = up(torch.randn(n, 3, 8, 8, generator=g)) * 0.9 + torch.randn(n, 3, size, size, generator=g) * 0.2
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


def save_png(x, path):
    """uint8 tensor (3, H, W) -> PNG file, with Pillow alone."""
    from PIL import Image
    Image.frombytes("RGB", (x.shape[2], x.shape[1]), bytes(x.permute(1, 2, 0).flatten().tolist())).save(path)


def build_transform(size, train):
    """PIL image -> uint8 tensor (3, size, size); float conversion and normalisation happen on the device."""
    if size >= 64:  # the ImageNet-LT recipe (OLTR / Decoupling)
        aug = ([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4, 0.4)] if train
               else [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)])
    else:  # the CIFAR recipe
        aug = [T.Resize(size), T.CenterCrop(size)] + ([T.RandomCrop(size, padding=4),
                                                         T.RandomHorizontalFlip()] if train else [])
    return T.Compose(aug + [T.PILToTensor()])


def official_lists():
    """sha256 -> file name of the official split lists (data_lists/SHA256SUMS)."""
    known = {}
    path = os.path.join(HERE, "data_lists", "SHA256SUMS")
    if os.path.exists(path):
        for line in open(path):
            if line.strip() and not line.startswith("#"):
                digest, name = line.split(None, 1)
                known[digest] = name.strip()
    return known


def describe_list(path, known):
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return f"{path}: " + (f"official {known[digest]} (sha256 ok)" if digest in known
                          else "not an official list (checksum unknown)")


def check_labels(train, others, num_classes):
    """Train labels must cover 0..C-1 without gaps; val/test labels must be < C. Raises LTauxError."""
    counts = ltaux.class_counts(train.labels, num_classes)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise LTauxError(f"{train.split_file}: classes {empty[:10]}{'...' if len(empty) > 10 else ''} have no "
                         f"training image (labels must be 0..C-1 without gaps)")
    for ds in others:
        for y, line in zip(ds.labels, ds.lines):
            if y >= num_classes:
                raise LTauxError(f"{ds.split_file}:{line}: label {y} is not a class of the training list "
                                 f"{train.split_file} (0..{num_classes - 1})")
    return counts


def check_files(datasets, args):
    """Open every listed image (rank 0 only) and report all failures at once."""
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
                log(args, f"check-files: {done}/{total} images, {len(failures)} unreadable")
    if failures:
        raise LTauxError(f"{len(failures)} unreadable images:\n  " + "\n  ".join(failures))


def build_data(args):
    """Datasets, train sampler and loaders; returns a dict."""
    if args.data is None:
        if is_main(args):
            make_demo_data(args.demo_dir, seed=args.seed)
        if args.world_size > 1:
            dist.barrier()  # the other ranks wait for rank 0's dataset
        lists = make_demo_data(args.demo_dir, seed=args.seed)
        args.data, args.split = args.demo_dir, lists["train"]
        args.val_split, args.test_split = args.val_split or lists["val"], args.test_split or lists["test"]
    if args.split is None:
        raise LTauxError("--split is required with --data")
    if args.val_split is None and args.split.endswith("_train.txt"):
        sibling = args.split[: -len("_train.txt")] + "_val.txt"
        args.val_split = sibling if os.path.exists(sibling) else None
    mk = lambda f, train: ltaux.SplitDataset(args.data, f, build_transform(args.image_size, train),
                                             allow_unsafe_paths=args.allow_unsafe_paths)
    train = mk(args.split, True)
    evals = {k: mk(f, False) for k, f in (("val", args.val_split), ("test", args.test_split)) if f}
    counts = check_labels(train, evals.values(), train.num_classes)
    known = official_lists()
    for f in [args.split] + [d.split_file for d in evals.values()]:
        log(args, describe_list(f, known))
    if args.check_files and is_main(args):
        check_files([train] + list(evals.values()), args)
    mode = {"rrs": "rrs", "cbs": "cbs"}.get(args.method, "cbs_rrs")
    try:
        sampler = ltaux.AuxBatchSampler(train.labels, args.batch_size, args.per_class, mode, seed=args.seed,
                                        rank=args.rank, world_size=args.world_size, with_seeds=True)
    except ValueError as e:  # S vs Z, k vs C, S vs world size: the user's arguments
        raise LTauxError(f"{args.split}: {e}") from None
    cuda = args.device_type == "cuda"
    loader = torch.utils.data.DataLoader(train, batch_sampler=sampler, num_workers=args.workers,
                                         pin_memory=cuda, persistent_workers=args.workers > 0)
    return dict(train=train, sampler=sampler, loader=loader, counts=counts,
                eval_loaders={k: eval_loader(d, args) for k, d in evals.items()})


def eval_loader(ds, args):
    """This rank's shard (indices rank::world) of an evaluation list, without padding."""
    shard = torch.utils.data.Subset(ds, range(args.rank, len(ds), args.world_size))
    return torch.utils.data.DataLoader(shard, batch_size=max(1, args.batch_size // args.world_size),
                                       num_workers=args.workers, pin_memory=args.device_type == "cuda")


@functools.lru_cache(maxsize=None)
def mean_std(device):
    """ImageNet mean and std for uint8 pixels, made once per device (a per-step copy would sync)."""
    return (torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255)


def to_device(x, device, channels_last=False):
    """uint8 images (B, 3, H, W) -> normalised float on the device (non_blocking from pinned memory)."""
    x = x.to(device, non_blocking=True)
    mean, std = mean_std(device)
    x = (x.float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# ----------------------------------------------------------------------------------------------
# model, optimiser, schedule, checkpoints


def build_model(args, num_classes, device):
    model = ltaux.LTResNet(args.arch, num_classes, args.embed_dim, args.pretrained)
    if args.init:  # phi only (backbone + embed), heads fresh
        load_weights(model, load_checkpoint(args.init), args.init, prefixes=("backbone.", "embed."))
    used = {"fc"} | ({"aux_fc"} if args.method in ("cbs_rrs", "cbs_rrs_ss") else set()) | (
        {"rot_fc"} if args.method == "cbs_rrs_ss" and args.lambdas[2] else set())
    for head in {"fc", "aux_fc", "rot_fc"} - used:
        getattr(model, head).requires_grad_(False)  # never trained by this method: DDP must not wait for it
    if args.sync_bn and args.world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(model, args):
    """SGD with momentum; weight decay on weights only; the backbone at backbone_lr_scale * lr."""
    groups = {}
    for name, p in model.named_parameters():
        scale = args.backbone_lr_scale if name.startswith("backbone.") else 1.0
        decay = args.weight_decay if p.ndim > 1 else 0.0
        groups.setdefault((scale, decay), []).append(p)
    params = [dict(params=ps, lr=args.lr * s, weight_decay=d, lr_scale=s) for (s, d), ps in groups.items()]
    fused = {"fused": True} if args.device_type == "cuda" else {"foreach": True}
    return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, **fused)


def lr_factor(step, total, warmup):
    """Linear warm-up for `warmup` steps, then cosine decay to 0 at `total` (per step)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, fsync, rename: a kill at any moment
    leaves either the old file or the new one, never a truncated one."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def load_checkpoint(path):
    """Load an ltaux checkpoint safely: weights_only=True, so a file carrying pickled code is refused."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LTauxError(f"{path}: checkpoint not found") from None
    except Exception as e:  # noqa: BLE001 - pickled objects, truncated or foreign files
        what = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]  # the unpickler's refusal
        if what:
            raise LTauxError(f"{path}: refused: it holds pickled Python objects, not only tensors and plain "
                             f"types ({what[0]}); nothing in it was run (weights_only=True)") from None
        raise LTauxError(f"{path}: not a readable checkpoint (corrupt, truncated or not written by "
                         f"torch.save; {type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise LTauxError(f"{path}: not an ltaux checkpoint (no '{CKPT_FORMAT}' marker)")
    return ckpt


def load_weights(model, ckpt, path, prefixes=None):
    """Copy a checkpoint's weights (those starting with `prefixes`, default all) into model,
    after checking that arch, class count and every shape match. Raises LTauxError."""
    c_arch, c_classes = ckpt["args"]["arch"], ckpt["model"]["fc.weight"].shape[0]
    if c_arch != model.arch or c_classes != model.num_classes:
        raise LTauxError(f"{path}: checkpoint is {c_arch} with {c_classes} classes, this run is "
                         f"{model.arch} with {model.num_classes} classes")
    own = model.state_dict()
    state = {k: v for k, v in ckpt["model"].items() if prefixes is None or k.startswith(prefixes)}
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in own if prefixes is None and k not in state]
    if bad or missing:
        raise LTauxError(f"{path}: weights do not fit this model (e.g. {(bad or missing)[0]}; "
                         f"check --embed-dim and --arch)")
    model.load_state_dict(state, strict=prefixes is None)


def plain_args(args):
    return {k: v for k, v in vars(args).items() if k not in ("rank", "world_size", "device_type")}


def save_state(args, model, optimizer, scaler, state, counts, best_acc, name="last.pt"):
    """Write <out>/<name> (rank 0): everything needed to resume, as tensors and plain types."""
    if not is_main(args):
        return
    ckpt = dict(format=CKPT_FORMAT, args=plain_args(args), model=model.state_dict(),
                optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), train_counts=counts,
                epoch=state["epoch"], step_in_epoch=state["step_in_epoch"], global_step=state["global_step"],
                best_acc=best_acc, rng_cpu=torch.get_rng_state(),
                rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    atomic_save(ckpt, os.path.join(args.out, name))


# ----------------------------------------------------------------------------------------------
# training and evaluation


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop finishes its step, saves last.pt and exits."""

    def __init__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        self.signum = signum

    def restore(self):
        for s, h in self.previous.items():
            signal.signal(s, h)


def step_inputs(images, labels, args, device):
    """Split a loader batch [B_cbs; B_rrs] (uint8) into device tensors for aux_loss."""
    x = to_device(images, device, channels_last=device.type == "cuda")
    y = labels.to(device, non_blocking=True)
    s = args.batch_size // args.world_size
    if args.method == "rrs":
        x_cbs, y_cbs, x_rrs, y_rrs = None, None, x, y
    elif args.method == "cbs":
        x_cbs, y_cbs, x_rrs, y_rrs = x, y, None, None
    else:
        x_cbs, y_cbs, x_rrs, y_rrs = x[:s], y[:s], x[s:], y[s:]
    if args.rotation_aug:  # Table 5: all four rotations as augmentation, labels repeated
        if x_cbs is not None:
            x_cbs, y_cbs = ltaux.rotate_batch(x_cbs, "all")[0], y_cbs.repeat(4)
        if x_rrs is not None:
            x_rrs, y_rrs = ltaux.rotate_batch(x_rrs, "all")[0], y_rrs.repeat(4)
    return x_cbs, y_cbs, x_rrs, y_rrs


def train_one_epoch(model, loader, optimizer, scaler, state, ctx, args):
    """One epoch from state['step_in_epoch']; returns a metrics dict (mean loss parts, images/s...).
    Stops early (metrics['stopped'] = True) when a stop was requested."""
    model.train()
    device, amp = ctx["device"], ctx["amp_dtype"]
    sums, n, seen, t0 = {}, 0, 0, time.time()
    steps, total = ctx["steps_per_epoch"], ctx["total_steps"]
    gen = torch.Generator(device=device)
    lambdas = list(args.lambdas) if args.method == "cbs_rrs_ss" else [args.lambdas[0], args.lambdas[1], 0.0]
    for images, labels in loader:
        step = state["global_step"]
        factor = lr_factor(step, total, ctx["warmup_steps"])
        for g in optimizer.param_groups:
            g["lr"] = args.lr * g["lr_scale"] * factor
        gen.manual_seed(args.seed * 1_000_003 + step * 64 + args.rank)  # rotation draw of this step
        inputs = step_inputs(images, labels, args, device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss, parts = ltaux.aux_loss(model, *inputs, lambdas=lambdas, rotation=args.rotation, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        parts["loss"] = loss.detach()
        ctx["guard"].update(step, parts)  # device-side: first non-finite step, no host sync
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v.float()
        n += 1
        seen += ctx["images_per_step"]
        state["global_step"] += 1
        state["step_in_epoch"] += 1
        if state["step_in_epoch"] % args.print_freq == 0 or state["step_in_epoch"] == steps:
            ctx["guard"].check(args)
            rate = seen * args.world_size / (time.time() - t0)
            eta = datetime.timedelta(seconds=round((total - state["global_step"]) * (time.time() - t0) / n))
            log(args, f"epoch {state['epoch']} [{state['step_in_epoch']:>{len(str(steps))}}/{steps}] "
                + " ".join(f"{k} {float(v) / n:.4f}" for k, v in sums.items())
                + f" lr {args.lr * factor:.5f} img/s {rate:.0f} eta {eta}")
        if ctx["stop"].requested(state, args):
            break
    ctx["guard"].check(args)
    out = {f"loss_{k}" if k != "loss" else k: float(v) / max(n, 1) for k, v in sums.items()}
    out.update(lr=args.lr * lr_factor(state["global_step"] - 1, total, ctx["warmup_steps"]),
               images_per_s=seen * args.world_size / (time.time() - t0), epoch_time_s=time.time() - t0,
               stopped=state["step_in_epoch"] < steps)
    return out


class NonFiniteGuard:
    """Remembers, on the device, the first step whose loss was not finite and its loss parts."""

    def __init__(self, device, last_good):
        self.bad_step = torch.full((), -1, device=device, dtype=torch.long)
        self.parts, self.last_good = None, last_good

    def update(self, step, parts):
        bad = ~torch.isfinite(parts["loss"]) & (self.bad_step < 0)
        self.bad_step = torch.where(bad, torch.full_like(self.bad_step, step), self.bad_step)
        stacked = torch.stack([v.float() for v in parts.values()])
        self.parts = stacked if self.parts is None else torch.where(bad, stacked, self.parts)
        self.names = list(parts)

    def check(self, args):
        step = int(self.bad_step)
        if step >= 0:
            parts = ", ".join(f"{k} {v:.4g}" for k, v in zip(self.names, self.parts.tolist()))
            raise LTauxError(f"non-finite loss at step {step} ({parts}); last good checkpoint: "
                             f"{self.last_good()} (lower --lr or check the data, then --resume it)")


class StopCheck:
    """Combines the signal flag, the test hook --stop-after-steps, and (DDP) agreement across ranks."""

    def __init__(self, device):
        self.signal, self.device = StopRequest(), device

    def requested(self, state, args):
        want = self.signal.signum is not None or (
            args.stop_after_steps is not None and state["global_step"] >= args.stop_after_steps)
        if args.world_size > 1:  # every rank must stop after the same step
            if state["global_step"] % args.print_freq:
                return False
            flag = torch.tensor(float(want), device=self.device)
            dist.all_reduce(flag)
            want = bool(flag > 0)
        return want


@torch.inference_mode()
def predict(model, loader, device, amp, world_size=1):
    """Predictions and labels of a (sharded) evaluation loader, gathered in list order: (N,), (N,)."""
    model.eval()
    preds, targets = [], []
    for images, labels in loader:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(to_device(images, device, channels_last=device.type == "cuda"))
        preds.append(logits.argmax(1))
        targets.append(labels.to(device))
    pred, target = torch.cat(preds), torch.cat(targets)
    if world_size > 1:  # shard r holds items r::W; gather the padded shards and interleave
        n = torch.tensor([len(pred)], device=device)
        sizes = [torch.zeros_like(n) for _ in range(world_size)]
        dist.all_gather(sizes, n)
        size = max(int(s) for s in sizes)
        both = torch.stack([pred, target])
        both = torch.cat([both, both.new_full((2, size - len(pred)), -1)], 1)
        gathered = [torch.empty_like(both) for _ in range(world_size)]
        dist.all_gather(gathered, both)
        total = sum(int(s) for s in sizes)
        out = both.new_empty((2, total))
        for r, (g, s) in enumerate(zip(gathered, sizes)):
            out[:, r::world_size] = g[:, :int(s)]
        pred, target = out[0], out[1]
    return pred.cpu(), target.cpu()


def evaluate(model, loader, device, counts, args, amp=None):
    """Overall / many / medium / few top-1 (percent) on an evaluation loader."""
    pred, target = predict(model, loader, device, amp, args.world_size)
    return ltaux.shot_accuracy(pred, target, counts, args.many, args.few)


def format_table(rows):
    """rows: {name: metrics} -> a Markdown table of many / medium / few / overall (percent)."""
    f = lambda v: "-" if v is None else f"{v:.1f}"
    lines = ["| split | many | medium | few | overall | mean per class |", "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {f(m['many'])} | {f(m['medium'])} | {f(m['few'])} | {f(m['overall'])} | "
              f"{f(m['mean_per_class'])} |" for k, m in rows.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# main


def prepare_out(args):
    """Choose and check the output folder: refuse to mix two runs unless --resume or --overwrite."""
    if args.out is None:
        args.out = (os.path.dirname(os.path.abspath(args.resume)) if args.resume else
                    os.path.join("runs", f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{args.method}"))
    taken = [f for f in ("last.pt", "best.pt", "log.jsonl") if os.path.exists(os.path.join(args.out, f))]
    if taken and not args.resume:
        if not args.overwrite:
            raise LTauxError(f"{args.out}: holds another run ({', '.join(taken)}); pass --resume "
                             f"{os.path.join(args.out, 'last.pt')} to continue it or --overwrite to replace it")
        if is_main(args):
            for f in taken:
                os.remove(os.path.join(args.out, f))
    if is_main(args):
        os.makedirs(args.out, exist_ok=True)


def resume_args(args):
    """With --resume, take the run's settings from the checkpoint; explicit flags still win."""
    ckpt = load_checkpoint(args.resume)
    keep = set(args.given) | {"given", "resume", "rank", "world_size", "device", "out", "workers", "stop_after_steps"}
    for k, v in ckpt["args"].items():
        if k not in keep:
            setattr(args, k, v)
    return ckpt


def restore(ckpt, model, optimizer, scaler, state, path):
    load_weights(model, ckpt, path)
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    state.update(epoch=ckpt["epoch"], step_in_epoch=ckpt["step_in_epoch"], global_step=ckpt["global_step"])
    torch.set_rng_state(ckpt["rng_cpu"])
    if ckpt["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
    return ckpt["best_acc"]


def run_epochs(model, raw, data, optimizer, scaler, state, ctx, args):
    """The epoch loop: train, validate, checkpoint, log. Returns True if stopped early."""
    best = ctx["best_acc"]
    while state["epoch"] < args.epochs:
        data["sampler"].set_epoch(state["epoch"], state["step_in_epoch"])
        m = train_one_epoch(model, data["loader"], optimizer, scaler, state, ctx, args)
        if m.pop("stopped"):
            save_state(args, raw, optimizer, scaler, state, data["counts"], best)
            log(args, f"stopped at epoch {state['epoch']} step {state['step_in_epoch']}: saved "
                      f"{args.out}/last.pt; continue with --resume {args.out}/last.pt")
            return True
        m["epoch"] = state["epoch"]
        state.update(epoch=state["epoch"] + 1, step_in_epoch=0)
        val = data["eval_loaders"].get("val")
        if val is not None and (state["epoch"] % args.eval_freq == 0 or state["epoch"] == args.epochs):
            acc = evaluate(raw, val, ctx["device"], data["counts"], args, ctx["amp_dtype"])
            m.update({f"val_{k}": acc[k] for k in ("overall", "many", "medium", "few", "mean_per_class")})
        improved = val is None or m.get("val_overall", -1) > best
        best = max(best, m.get("val_overall", best))
        save_state(args, raw, optimizer, scaler, state, data["counts"], best)
        if improved and is_main(args):
            save_state(args, raw, optimizer, scaler, state, data["counts"], best, name="best.pt")
        if is_main(args):
            with open(os.path.join(args.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(m) + "\n")
        log(args, f"epoch {m['epoch']} done in {m['epoch_time_s']:.0f}s: loss {m['loss']:.4f}" + "".join(
            f", val {k} {m['val_' + k]:.2f}" for k in ("overall", "many", "medium", "few")
            if m.get("val_" + k) is not None))
    return False


def final_test(raw, data, ctx, args):
    """Evaluate best.pt on --test-split (if given) and print the many / medium / few table."""
    test = data["eval_loaders"].get("test")
    if test is None:
        return
    best = os.path.join(args.out, "best.pt")
    if is_main(args):
        load_weights(raw, load_checkpoint(best), best)
    if args.world_size > 1:  # rank 0's weights to every rank: no shared file system needed
        for tensor in raw.state_dict().values():
            dist.broadcast(tensor, src=0)
    acc = evaluate(raw, test, ctx["device"], data["counts"], args, ctx["amp_dtype"])
    log(args, f"\ntest ({args.test_split}) with {best}:\n" + format_table({args.method: acc}))
    if is_main(args):
        with open(os.path.join(args.out, "test_metrics.json"), "w") as f:
            json.dump({k: acc[k] for k in ("overall", "mean_per_class", "many", "medium", "few")}, f)


def report(error):
    """Print a user error on one line (also one re-raised from a DataLoader worker); exit status 2."""
    msg = str(error).strip()
    if "Original Traceback" in msg:  # keep the worker's own message, not its traceback
        msg = msg.splitlines()[-1].replace("ltaux.LTauxError: ", "")
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return 2


def main(argv=None):
    args = parse_args(argv)
    device = setup_distributed(args)
    args.device_type = device.type
    plain_format, warnings.formatwarning = warnings.formatwarning, lambda msg, *_, **__: f"warning: {msg}\n"
    try:
        return train(args, device)
    except LTauxError as e:
        return report(e)
    finally:
        warnings.formatwarning = plain_format  # user warnings print as one line while main() runs
        if dist.is_initialized():
            dist.destroy_process_group()


def images_per_step(args):
    """Images through the backbone per global step: S per part, x4 with --rotation-aug,
    plus the rotated copies of cbs_rrs_ss (x1 for one random angle, x4 for all)."""
    n = args.batch_size * (1 if args.method in ("rrs", "cbs") else 2) * (4 if args.rotation_aug else 1)
    if args.method == "cbs_rrs_ss" and args.lambdas[2]:
        n += n * (4 if args.rotation == "all" else 1)
    return n


def train(args, device):
    if args.rotation_aug and args.method == "cbs_rrs_ss":
        raise LTauxError("--rotation-aug is the augmentation baseline of Table 5: use it with cbs_rrs, not cbs_rrs_ss")
    ckpt = resume_args(args) if args.resume else None
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    prepare_out(args)
    data = build_data(args)
    raw = build_model(args, data["train"].num_classes, device)
    model = torch.nn.parallel.DistributedDataParallel(raw) if args.world_size > 1 else raw
    model = torch.compile(model) if args.compile else model
    optimizer = build_optimizer(raw, args)
    amp = args.amp or ("bf16" if device.type == "cuda" else "off")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    state = dict(epoch=0, step_in_epoch=0, global_step=0)
    best_acc = restore(ckpt, raw, optimizer, scaler, state, args.resume) if ckpt else -1.0
    steps = data["sampler"].num_batches
    last = os.path.join(args.out, "last.pt")
    ctx = dict(device=device, amp_dtype=amp_dtype, steps_per_epoch=steps, total_steps=steps * args.epochs,
               warmup_steps=round(args.warmup_epochs * steps), best_acc=best_acc,
               images_per_step=images_per_step(args) // args.world_size, stop=StopCheck(device),
               guard=NonFiniteGuard(device, lambda: last if os.path.exists(last) else "none yet"))
    log(args, "args: " + json.dumps(plain_args(args), sort_keys=True))
    log(args, f"device: {device} x {args.world_size}, amp {amp}, {len(data['train'])} train images, "
              f"{data['train'].num_classes} classes, {steps} steps/epoch, out {args.out}")
    try:
        if not run_epochs(model, raw, data, optimizer, scaler, state, ctx, args):
            final_test(raw, data, ctx, args)
    finally:
        ctx["stop"].signal.restore()
    return 0


if __name__ == "__main__":
    sys.exit(main())
