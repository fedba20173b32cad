"""The paper's methods (Section 4.3), presets of its settings (Section 4.4, recipes; each value's source in
docs/recipes.md) and numbers (Tables 1-5), and train.py's command line, which evaluate.py also reads. No
torch: the entry points read this before they import torch, so that --help is instant."""
import argparse
import collections
import hashlib
import os

# --method: the paper's name, the AuxBatchSampler mode, the heads trained (others frozen), the task h_s.
Method = collections.namedtuple("Method", "name sampler heads rotation")
METHODS = {
    "rrs": Method("RRS-Only", "rrs", ("fc",), False),  # the random batch trains phi + h
    "cbs": Method("CBS-Only", "cbs", ("fc",), False),  # the class-balanced batch trains phi + h
    "cbs_rrs": Method("CBS+RRS", "cbs_rrs", ("fc", "aux_fc"), False),  # h on B_cbs, h_a on B_rrs
    "cbs_rrs_ss": Method("CBS+RRS+SS", "cbs_rrs", ("fc", "aux_fc", "rot_fc"), True),  # plus h_s (Eq. 2)
}

_LT = dict(lr=0.1, weight_decay=5e-4, image_size=224)  # shared by the ImageNet-LT and Places-LT recipes
_CIFAR = dict(arch="resnet32", epochs=200, lr=0.1, weight_decay=2e-4, image_size=32)
RECIPES = {
    "imagenet_lt_r10": dict(_LT, arch="resnet10", epochs=60, batch_size=256),
    "imagenet_lt_r50": dict(_LT, arch="resnet50", epochs=60, batch_size=256),
    "places_lt_r152": dict(_LT, arch="resnet152", epochs=30, batch_size=128, backbone_lr_scale=0.01),
    "places_lt_r152_2019": dict(_LT, arch="resnet152", epochs=30, batch_size=256, backbone_lr_scale=0.1,
                                freeze_backbone=True),
    "places_lt_r50": dict(_LT, arch="resnet50", epochs=90, batch_size=256),
    "cifar10_lt": dict(_CIFAR, batch_size=120, per_class=12),
    "cifar100_lt": dict(_CIFAR, batch_size=128, per_class=4),
    # the embedded default (no --data): 30 synthetic classes of 32 px
    "demo": dict(_LT, arch="resnet10", epochs=8, batch_size=64, image_size=32, workers=1, print_freq=20),
}
SMALL_IMAGES = 64  # --image-size below: CIFAR augmentation, --in-memory; from it: ImageNet-LT's, --decode gpu
PRETRAINED = ("places_lt_r152", "places_lt_r152_2019")  # fine-tune ImageNet weights: refused without them

# The paper's rows: many, medium, few, overall top-1 (%) on the official test list, thresholds 100 / 20.
PAPER = {  # recipe: {row key: (table, values)}; row keys: see paper_key()
    "imagenet_lt_r10": {
        "rrs": ("Table 1", (53.4, 23.5, 4.3, 32.4)), "cbs": ("Table 1", (35.4, 31.5, 18.6, 31.2)),
        "cbs_rrs": ("Table 1", (51.0, 38.5, 21.0, 40.9)), "cbs_rrs_ss": ("Table 1", (52.4, 39.5, 21.0, 41.9)),
        "ft_cbs": ("Table 3", (48.3, 35.2, 16.4, 37.6)), "cbs_rrs 1:1": ("Table 4", (49.4, 37.7, 19.8, 39.6)),
        "cbs_rrs 1:0.5": ("Table 4", (46.0, 35.5, 17.8, 37.0)),
        "rotation_aug": ("Table 5", (50.5, 39.1, 22.1, 41.0)),
    },
    "places_lt_r152": {
        "rrs": ("Table 1", (47.4, 27.1, 10.5, 31.0)), "cbs": ("Table 1", (46.9, 34.9, 18.1, 35.7)),
        "cbs_rrs": ("Table 1", (42.5, 40.3, 32.2, 39.4)), "cbs_rrs_ss": ("Table 1", (42.5, 40.6, 32.6, 39.6)),
    },
    "imagenet_lt_r50": {
        "rrs": ("Table 2", (61.3, 32.2, 7.2, 39.9)), "cbs": ("Table 2", (51.1, 38.2, 16.7, 40.1)),
        "cbs_rrs": ("Table 2", (59.0, 43.5, 22.8, 46.5)), "cbs_rrs_ss": ("Table 2", (60.2, 44.0, 23.1, 47.3)),
    },
    "places_lt_r50": {
        "rrs": ("Table 2", (39.1, 12.0, 0.3, 19.3)), "cbs": ("Table 2", (32.1, 22.9, 4.6, 22.4)),
        "cbs_rrs": ("Table 2", (35.6, 29.3, 11.3, 27.8)), "cbs_rrs_ss": ("Table 2", (35.8, 31.0, 12.7, 28.9)),
        "ft_cbs": ("Table 3", (29.3, 27.6, 10.3, 24.6)), "cbs_rrs 1:1": ("Table 4", (37.8, 27.6, 7.8, 27.1)),
        "cbs_rrs 1:0.5": ("Table 4", (34.9, 26.9, 6.9, 25.6)),
        "rotation_aug": ("Table 5", (35.3, 28.2, 11.4, 27.2)),
    },
}
PAPER["places_lt_r152_2019"] = PAPER["places_lt_r152"]
_DATASET = {r: "ImageNet-LT" if r.startswith("imagenet") else "Places-LT" for r in RECIPES if r in PAPER}
SETTING = {r: f"{d}, ResNet-{RECIPES[r]['arch'][len('resnet'):]}" for r, d in _DATASET.items()}
TEST_LISTS = {r: f"{d.replace('-', '_')}_test.txt" for r, d in _DATASET.items()}
TRAIN_LISTS = {r: f"{d.replace('-', '_')}_train.txt" for r, d in _DATASET.items()}
# A recipe's flags that make a run the paper's protocol; not --amp: the paper states no precision (recipes.md)
PROTOCOL = ("arch", "embed_dim", "batch_size", "per_class", "epochs", "lr", "weight_decay", "momentum",
            "warmup_epochs", "backbone_lr_scale", "freeze_backbone", "image_size", "rotation", "many", "few")
NAMES = {**{k: m.name for k, m in METHODS.items()}, "ft_cbs": "ftRRS+CBS", "cbs_rrs 1:1": "CBS:RRS 1:1",
         "cbs_rrs 1:0.5": "CBS:RRS 1:0.5", "rotation_aug": "Rotation Augmentation"}
CELLS = ("many", "medium", "few", "overall")  # a paper row's values, in the tables' column order


def paper_key(run):
    """PAPER's row key for a run's train.py arguments, or None: Tables 1-2's methods at lambdas 0.5 : 1 (: 1),
    ftRRS+CBS (Table 3: cbs with --init), CBS:RRS 1:1 and 1:0.5 (Table 4), rotation_aug (Table 5)."""
    method, lambdas = run.get("method"), tuple(float(v) for v in run.get("lambdas") or (0.5, 1.0, 1.0))
    if method == "cbs" and run.get("init"):
        return "ft_cbs"
    if method == "cbs_rrs" and run.get("rotation_aug"):
        return "rotation_aug" if lambdas[:2] == (0.5, 1.0) else None
    if method == "cbs_rrs":
        return {(0.5, 1.0): method, (1.0, 1.0): "cbs_rrs 1:1", (1.0, 0.5): "cbs_rrs 1:0.5"}.get(lambdas[:2])
    return None if method == "cbs_rrs_ss" and lambdas != (0.5, 1.0, 1.0) else method


def paper_row(run, defaults, split=None):
    """The paper's row for a run (its arguments; defaults: train.py's), or None: dict(name, source, many,
    medium, few, overall, differs: what makes the run's protocol differ, lists run["split"], split too)."""
    recipe, key = run.get("recipe"), paper_key(run)
    if key not in PAPER.get(recipe, {}):
        return None
    table, values = PAPER[recipe][key]
    want = {k: RECIPES[recipe].get(k, defaults.get(k)) for k in PROTOCOL}
    free = {"ft_cbs": ("epochs", "backbone_lr_scale"),  # the paper gives no settings for its fine-tuning
            "rotation_aug": ("rotation",)}.get(key, ())  # "four versions of rotated images": one or all four
    differs = [flag(k, run.get(k)) for k in PROTOCOL if k not in free and run.get(k) != want[k]]
    if run.get("pretrained") and recipe not in PRETRAINED:  # Table 2 and ResNet-10 train from scratch
        differs.append(flag("pretrained", run["pretrained"]))
    if run.get("init") and key != "ft_cbs":  # only Table 3's second stage starts from a trained phi
        differs.append(flag("init", run["init"]))
    differs += list_differs("trained on", run.get("split"), TRAIN_LISTS[recipe], run.get("split_sha256"))
    if split is not None:
        differs += list_differs("evaluated on", split, TEST_LISTS[recipe])
    return dict(name=f"paper: {NAMES[key]}, {table} ({SETTING[recipe]})", source=f"arXiv:1912.04486 {table}",
                **dict(zip(CELLS, values)), differs=differs)


def paper_difference(metrics, paper):
    """Run (ltaux.shot_accuracy's dict) minus paper row, in points, per CELLS; None where the run has none."""
    return {k: None if metrics[k] is None else metrics[k] - paper[k] for k in CELLS}


def official_sums():
    """{sha256: name} of the official split lists, from data_lists/SHA256SUMS ({} without the file)."""
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_lists", "SHA256SUMS")) as f:
            return dict(line.strip().split(None, 1) for line in f if line.strip() and line[0] != "#")
    except OSError:
        return {}


def file_sha256(path):
    """The file's sha256 (hex), or None where it cannot be read."""
    try:
        with open(path, "rb") as f:  # lists are a few MB (hashlib.file_digest needs Python 3.11)
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def official_name(path, digest=None):
    """The name in data_lists/SHA256SUMS (e.g. 'places365_data256_layout/Places_LT_val.txt') of the official
    list that the file at `path` (or with sha256 `digest`, then not read) is byte for byte, else None."""
    return official_sums().get(digest or (file_sha256(path) if path else None))


def list_differs(verb, path, want, digest=None):
    """[] if the list at `path` (or with sha256 `digest`) is the official `want`, else its `differs` entry."""
    if os.path.basename(official_name(path, digest) or "") == want:
        return []
    if digest is None and path and not os.path.isfile(path):
        return [f"{verb} {path} (not found here: not checked against {want})"]
    return [f"{verb} {'(unset)' if path is None else path}, not {want}"]


def flag(key, value):
    """An argument as typed, e.g. '--batch-size 64', '--lambdas 0.5 1 1', '--init (unset)' for None."""
    values = value if isinstance(value, (list, tuple)) else ["(unset)" if value is None else value]
    text = " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
    return f"--{key.replace('_', '-')} {text}"


# ----------------------------------------------------------------------------------------------
# train.py's command line

ARCHS = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet32")  # LTResNet's


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every default shown, and the examples at the top kept as written."""


def training_parser(description=None):
    """train.py's command line, also the schema evaluate.py checks a checkpoint's saved arguments against."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", help="dataset root; split paths are relative to it "
                   "(unset: run the demo on synthetic data written to --demo-dir)")
    g.add_argument("--split", help="training split list, 'relative/path label' per line")
    g.add_argument("--val-split", help="validation list (None: the sibling *_val.txt of --split)")
    g.add_argument("--test-split", help="test list, evaluated with best.pt after training "
                   "(None: the sibling *_test.txt of --split)")
    g.add_argument("--demo-dir", default=os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser(
        "~/.cache")), "ltaux", "demo"), help="where the demo writes its synthetic dataset (20 MB, once)")
    g.add_argument("--check-files", action="store_true", help="open every listed image before training "
                   "and report all unreadable ones at once")
    g.add_argument("--allow-unsafe-paths", action="store_true",
                   help="accept absolute paths and '..' in lists")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader worker processes per GPU")
    g.add_argument("--decode", default="cpu", choices=["cpu", "gpu"], help="where training JPEGs are "
                   "decoded: cpu (in the workers) or gpu (workers send the file bytes; decode_jpeg, crop, "
                   "flip and jitter on the CUDA device; ImageNet-LT recipe only)")
    g.add_argument("--in-memory", default="auto", choices=["auto", "on", "off"], help="decode every image "
                   "once into one uint8 tensor on the training device and augment batches there, no worker "
                   "processes (auto: below 64 px when the images fit the device's free memory less a "
                   "margin; the CIFAR recipe's augmentation)")
    g.add_argument("--image-size", type=int, default=224, help="training crop; >= 64 uses the ImageNet-LT "
                   "augmentation, smaller the CIFAR one (pad 4 + random crop)")
    g = p.add_argument_group("method")
    g.add_argument("--method", default="cbs_rrs_ss", choices=list(METHODS), help="rrs: RRS-Only, "
                   "cbs: CBS-Only, cbs_rrs: CBS+RRS (auxiliary head h_a), cbs_rrs_ss: CBS+RRS+SS (plus "
                   "rotation head h_s)")
    g.add_argument("--recipe", choices=list(RECIPES), help="preset of the paper's settings "
                   "(docs/recipes.md; demo: the one without --data); explicit flags override it")
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
    g.add_argument("--embed-dim", type=int, help="Linear + ReLU after pooling, 0 for none "
                   "(None: 512 for the ImageNet ResNets as OLTR, 0 for resnet32)")
    g.add_argument("--pretrained", help="torchvision-format backbone weights (local .pth)")
    g.add_argument("--freeze-backbone", action="store_true", help="train only phi's 512-d layer and the "
                   "heads: the backbone's weights stay fixed, its BatchNorm statistics keep updating "
                   "(OLTR's Places-LT stage 1 before 2020-02-11)")
    g.add_argument("--init", help="initialise phi (backbone + embed) from an ltaux checkpoint, heads fresh: "
                   "ftRRS+CBS of Table 3")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=90, help="one epoch = M = ceil(N / S) steps")
    g.add_argument("--lr", type=float, default=0.1, help="peak learning rate (the recipes use 0.1 for "
                   "S = 256; if you change S, scale --lr yourself: lr = 0.1 * S / 256)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=5e-4,
                   help="SGD weight decay, on every parameter as OLTR")
    g.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up before the cosine decay")
    g.add_argument("--backbone-lr-scale", type=float, default=1.0, help="lr of phi (backbone and embed) = "
                   "scale * lr, e.g. 0.01 to fine-tune pretrained weights")
    g.add_argument("--amp", choices=["bf16", "fp16", "off"], help="autocast precision (None: bf16 on CUDA "
                   "and on CPUs that run bf16 natively, else off = fp32); fp16 adds a gradient scaler")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--cuda-graph", action="store_true", help="capture the whole training step (forward, "
                   "backward, SGD update) once in a CUDA graph and replay it: one launch per step instead of "
                   "hundreds, for small models whose eager steps are launch-bound (the CIFAR recipes); CUDA, "
                   "one process, bf16 or fp32, without --compile; elsewhere eager steps, said in the log; "
                   "this command's only: --resume does not take it from the checkpoint")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs: one all-reduce "
                   "per BN layer per step; matters when per-GPU batches are small")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="output folder (None: runs/<date>-<time>-<method>; with --resume the "
                   "checkpoint's folder)")
    g.add_argument("--resume", help="continue from a last.pt (model, optimiser, schedule, sampler position, "
                   "RNG); its settings are the defaults")
    g.add_argument("--overwrite", action="store_true", help="replace the run held in --out (kept aside until "
                   "the new run's first checkpoint)")
    g.add_argument("--seed", type=int, default=0, help="seed of sampling, augmentation and init")
    g.add_argument("--device", choices=["cuda", "cpu"], help="None: cuda when available")
    g.add_argument("--print-freq", type=int, default=50, help="steps between progress lines")
    g.add_argument("--eval-freq", type=int, default=1, help="epochs between validations")
    g.add_argument("--many", type=int, default=100, help="many-shot classes: at least this many training "
                   "images (the paper's >= 100; Decoupling's code counts > 100, < 20: --many 101 --few 19)")
    g.add_argument("--few", type=int, default=20, help="few-shot classes: at most this many training images "
                   "(the paper's <= 20)")
    return p


# ----------------------------------------------------------------------------------------------
# train.py's arguments, checked

# this machine's or this command's: not a checkpoint's (--cuda-graph computes eager's numbers; a resume
# elsewhere, or after a failed capture, must be able to drop it)
NOT_RESUMED = ("resume", "out", "overwrite", "allow_unsafe_paths", "workers", "device", "check_files",
               "decode", "in_memory", "demo_dir", "cuda_graph")
FIXED_ON_RESUME = ("method", "arch", "embed_dim", "batch_size", "per_class", "seed", "image_size", "rotation",
                   "rotation_aug", "freeze_backbone")  # a resume continues the same run
INT_RANGE = dict(epochs=(1, 10**5), batch_size=(1, 2**20), per_class=(1, 2**20), image_size=(8, 4096),
                 workers=(0, 1024), print_freq=(1, 2**31), eval_freq=(1, 2**31), seed=(0, 2**63 - 1),
                 embed_dim=(0, 2**16))
# SGD: fp32
FLOAT_RANGE = dict(lr=(0, 1e30), momentum=(0, 1), weight_decay=(0, 1e30), backbone_lr_scale=(0, 1e6))


def check_args(args, saved):
    """Every mistake in train.py's arguments that needs no data, as a one-line ValueError (saved: {} or a
    resumed checkpoint's arguments)."""
    for name, (lo, hi) in INT_RANGE.items():
        if (v := getattr(args, name)) is not None and not lo <= v <= hi:
            raise ValueError(f"--{name.replace('_', '-')} {v}: must be in {lo}..{hi}")
    for name, (lo, hi) in dict(FLOAT_RANGE, warmup_epochs=(0, args.epochs)).items():
        if not lo <= (v := getattr(args, name)) <= hi:  # finite bounds: nan and inf fail too
            raise ValueError(f"--{name.replace('_', '-')} {v}: must be a finite number in [{lo}, {hi:g}]")
    method, (l1, l2, l3) = METHODS[args.method], args.lambdas
    if not all(v >= 0 and abs(v) != float("inf") for v in args.lambdas):
        raise ValueError(f"--lambdas {l1:g} {l2:g} {l3:g}: weights must be finite and >= 0")
    if args.init and args.resume:
        raise ValueError(f"--init {args.init} with --resume {args.resume}: a resume continues its own "
                         "weights; --init starts a new run from another run's phi (pass one of them)")
    if args.recipe in PRETRAINED and not (args.pretrained or args.init or args.resume):
        raise ValueError(f"--recipe {args.recipe} fine-tunes ImageNet-pretrained ResNet-152 weights: pass "
                         "--pretrained ~/.cache/torch/hub/checkpoints/resnet152-394f9c45.pth (torchvision's "
                         "ResNet152_Weights.IMAGENET1K_V1 state dict, which python -c \"import torchvision; "
                         "torchvision.models.resnet152(weights='IMAGENET1K_V1')\" downloads there)")
    if args.in_memory == "on" and args.image_size >= SMALL_IMAGES:
        raise ValueError(f"--in-memory on is for the CIFAR recipe's small images (--image-size < "
                         f"{SMALL_IMAGES}, here {args.image_size}): use --in-memory off or auto")
    if args.decode == "gpu" and args.image_size < SMALL_IMAGES:
        raise ValueError(f"--decode gpu is for the ImageNet-LT recipe (--image-size >= {SMALL_IMAGES}, here "
                         f"{args.image_size}): use --decode cpu")
    if args.rotation_aug and args.method != "cbs_rrs":
        raise ValueError("--rotation-aug is the augmentation baseline of Table 5: use it with "
                         "--method cbs_rrs")
    if len(method.heads) > 1 and (l1 == 0 or l2 == 0):
        head, base = ("h", "0:1 is RRS-Only") if l1 == 0 else ("h_a", "1:0 is CBS-Only")
        raise ValueError(f"--lambdas {l1:g} {l2:g} {l3:g} leaves {head} untrained: CBS:RRS = {base} "
                         f"(Table 4), run it with --method {'rrs' if l1 == 0 else 'cbs'}")
    if method.rotation and l3 == 0:
        raise ValueError(f"--lambdas {l1:g} {l2:g} 0 turns the rotation task off: use --method cbs_rrs")
    k = next((k for k in FIXED_ON_RESUME if k in saved and saved[k] != getattr(args, k)), None)
    if k is not None:
        raise ValueError(f"--{k.replace('_', '-')} {getattr(args, k)}: the resumed run has {saved[k]}; "
                         "a resume continues the same run (start a new one with --init to change it)")
