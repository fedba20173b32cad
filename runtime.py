"""What train.py, evaluate.py and bench.py share at run time, besides the method (ltaux.py) and the
input pipeline (pipeline.py), in four sections:

    user errors          report, check_thresholds, check_label_range, check_saved_args
    device, precision    choose_device, cpu_runs_bf16, amp_dtype, guard_narrow_convs
    files                atomic_save, FolderLock, and checkpoints: first_non_finite, load_checkpoint,
                         load_weights, model_from_checkpoint
    evaluation           predict, format_table, paper_lines
"""

import errno
import math
import os
import sys

import torch
import torch.distributed as dist

import ltaux
import pipeline
from ltaux import LTauxError

CKPT_FORMAT = "ltaux-checkpoint-v2"  # v2: phi ends in Linear + ReLU (embed.0.*); v1 files do not fit
SHOT_RULE = "many >= --many, few <= --few"  # in checkpoints since the groups follow the paper (Section 4.2)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


# ----------------------------------------------------------------------------------------------
# user errors: one line, exit status 2


def report(error):
    """Print a user error on one line (also one re-raised from a DataLoader worker); exit status 2."""
    msg = str(error).strip()
    if "Original Traceback" in msg:  # keep the worker's own message, not its traceback
        msg = msg.splitlines()[-1].replace("ltaux.LTauxError: ", "")
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return 2


def check_thresholds(many, few):
    """--many / --few of train.py and evaluate.py: 1 <= many, 0 <= few < many. Raises LTauxError."""
    if not (isinstance(many, int) and isinstance(few, int) and 0 <= few < many):
        raise LTauxError(f"--many {many} --few {few}: need whole numbers with 0 <= --few < --many (many-shot: at "
                         "least --many training images, few-shot: at most --few)")


def check_label_range(ds, num_classes, what):
    """Every label of an evaluation list must be a class 0..C-1 of `what`. Raises LTauxError."""
    for y, line in zip(ds.labels, ds.lines):
        if y >= num_classes:
            raise LTauxError(f"{ds.split_file}:{line}: label {y} is not a class of {what} (0..{num_classes - 1})")


def check_saved_args(saved, parser, path):
    """A checkpoint's saved arguments, re-checked as the command line would be (type, choices, length of
    lists): an edited or damaged checkpoint is refused in one line. Unknown keys are ignored."""
    for action in parser._actions:
        k = action.dest
        if k not in saved or k == "help":
            continue
        v, ok = saved[k], True
        if action.nargs is not None and action.nargs != 0 and not isinstance(action.nargs, str):
            ok = isinstance(v, list) and len(v) == action.nargs and all(_number(x) for x in v)
        elif action.const is True:  # store_true
            ok = isinstance(v, bool)
        elif v is not None:
            ok = {int: isinstance(v, int) and not isinstance(v, bool), float: _number(v)}.get(action.type, isinstance(
                v, str)) and (action.choices is None or v in action.choices)
        if not ok:
            raise LTauxError(f"{path}: its saved argument {k} = {v!r} is not a valid --{k.replace('_', '-')} (an "
                             "edited or damaged checkpoint)")


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ----------------------------------------------------------------------------------------------
# device and precision


def choose_device(name=None, local_rank=0):
    """torch.device for --device (None: cuda when available); LTauxError if CUDA is asked but absent."""
    kind = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind not in ("cpu", "cuda"):
        raise LTauxError(f"--device {kind}: choose cpu or cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        raise LTauxError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return torch.device(f"cuda:{local_rank}" if kind == "cuda" else "cpu")


def cpu_runs_bf16():
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX, as torch's oneDNN reports it). Where
    it does not, oneDNN emulates bf16 and a ResNet step runs more than 10x slower than in fp32."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the query
        return False


def amp_dtype(amp, device):
    """--amp bf16 | fp16 | off | None -> (name, autocast dtype or None). None: bf16 on CUDA and on a CPU
    that runs bf16 natively (cpu_runs_bf16), else off (fp32)."""
    amp = amp or ("bf16" if device.type == "cuda" or cpu_runs_bf16() else "off")
    return amp, AMP_DTYPES[amp]


class NarrowInputConv2d(torch.nn.Conv2d):
    """A Conv2d that runs in fp32, its autocast suspended, when it is strided, the input is on the CPU under
    autocast and narrower or lower than the stride (W < stride or H < stride): there oneDNN's bf16
    weight-gradient kernel reads uninitialised memory for the taps that see only padding (NaN or wrong
    weight gradients; docs/implementation.md). Such inputs are tiny (e.g. (B, 256, 1, 1)), so fp32 costs
    nothing. Elsewhere, and on CUDA, it is nn.Conv2d. Input (B, C_in, H, W) -> (B, C_out, H', W')."""

    def forward(self, x):
        if x.is_cpu and (x.shape[-1] < self.stride[1] or x.shape[-2] < self.stride[0]) \
                and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def guard_narrow_convs(model, device):
    """For training on a CPU (device): make every strided nn.Conv2d of model a NarrowInputConv2d, in place
    (the same parameters, so the same state_dict keys; DistributedDataParallel and torch.compile work as
    before). On CUDA the model is left as it is. Returns model."""
    if device.type != "cpu":
        return model
    for m in model.modules():
        if type(m) is torch.nn.Conv2d and max(m.stride) > 1:
            m.__class__ = NarrowInputConv2d
    return model


# ----------------------------------------------------------------------------------------------
# files: atomic writes, folder locks, checkpoints


def atomic_save(obj, path, write=None):
    """Write a file atomically: to a temporary file in the same folder, fsync, rename. A kill at any
    moment leaves the old file or the new one, never a truncated one, and no temporary file unless the
    process is killed outright. write(obj, f) (default: torch.save) fills the file. A write that fails
    (disk full, folder gone or read-only) raises LTauxError naming the path; the old file is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            (write or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)  # make the rename itself durable
        finally:
            os.close(fd)
    except (OSError, RuntimeError) as e:
        if isinstance(e, OSError):
            reason = e.strerror or str(e)
        elif "unexpected pos" in str(e) or "StreamWriter" in str(e):  # how torch.save reports a short write
            reason = "written short: the disk is full or a file-size limit was reached"
        else:
            raise
        raise LTauxError(f"{path}: cannot write it ({reason})") from None
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


class FolderLock:
    """An exclusive OS lock (flock) on a folder itself, held until release() or the process's end: a second
    run or evaluation on the same folder is refused at once. Being no file, it cannot be deleted, replaced by
    a link or left stale. On a file system without flock (some network mounts) it warns and locks nothing."""

    def __init__(self, folder, what="run"):
        import fcntl
        self.fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(self.fd)
                raise LTauxError(f"{folder}: in use by another {what} that is still running (it holds the "
                                 "folder's lock); wait for it or choose another --out") from None
            import warnings
            warnings.warn(f"{folder}: this file system cannot lock folders ({e.strerror}): nothing stops a "
                          f"second {what} from writing here")

    def release(self):
        os.close(self.fd)


def first_non_finite(state):
    """The name of the first floating tensor of a state dict holding nan or inf, or None (one host sync)."""
    names = [k for k, v in state.items() if isinstance(v, torch.Tensor) and torch.is_floating_point(v)]
    if not names:
        return None
    ok = torch.stack([state[k].isfinite().all() for k in names]).cpu()
    return None if bool(ok.all()) else names[int((~ok).nonzero()[0])]


CKPT_KEYS = {"args": dict, "model": dict, "optimizer": dict, "scaler": dict, "train_counts": torch.Tensor,
             "epoch": int, "step_in_epoch": int, "global_step": int, "best_acc": float, "rng_cpu": torch.Tensor}


def load_checkpoint(path):
    """Load an ltaux checkpoint safely (weights_only=True: a file carrying pickled code is refused)
    and check that it holds what train.py writes, with finite weights. Raises LTauxError naming the file."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise LTauxError(f"{path}: not a regular file")
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
        old = isinstance(ckpt, dict) and str(ckpt.get("format", "")).startswith("ltaux-checkpoint")
        raise LTauxError(f"{path}: " + (f"written by an older ltaux ({ckpt['format']}, this is {CKPT_FORMAT})"
                                        if old else f"not an ltaux checkpoint (no '{CKPT_FORMAT}' marker)"))
    bad = [k for k, t in CKPT_KEYS.items() if not isinstance(ckpt.get(k), t) or isinstance(ckpt.get(k), bool)]
    bad += [k for k in ("epoch", "step_in_epoch", "global_step") if k not in bad and ckpt[k] < 0]
    run = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    if not bad and (run.get("arch") not in ltaux.LTResNet.ARCHS or not isinstance(ckpt["model"].get("fc.weight"),
                                                                                    torch.Tensor)):
        bad = ["args.arch" if run.get("arch") not in ltaux.LTResNet.ARCHS else "model.fc.weight"]
    if bad:
        raise LTauxError(f"{path}: damaged ltaux checkpoint ({bad[0]} missing, negative or of the wrong type)")
    bad = first_non_finite(ckpt["model"])
    if bad:
        raise LTauxError(f"{path}: holds non-finite weights ({bad}): not a usable checkpoint")
    return ckpt


def load_weights(model, ckpt, path, prefixes=None):
    """Copy a checkpoint's weights (those starting with `prefixes`, default all) into model, after
    checking that arch, class count and every shape match. Raises LTauxError."""
    c_arch, c_classes = ckpt["args"]["arch"], ckpt["model"]["fc.weight"].shape[0]
    if c_arch != model.arch or c_classes != model.num_classes:
        raise LTauxError(f"{path}: checkpoint is {c_arch} with {c_classes} classes, this run is "
                         f"{model.arch} with {model.num_classes} classes")
    own = model.state_dict()
    state = {k: v for k, v in ckpt["model"].items() if prefixes is None or k.startswith(prefixes)}
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in own if k not in state and (prefixes is None or k.startswith(prefixes))]
    if bad or missing:
        raise LTauxError(f"{path}: weights do not fit this model (e.g. {(bad or missing)[0]}; "
                         f"check --embed-dim and --arch)")
    model.load_state_dict(state, strict=prefixes is None)


def model_from_checkpoint(path, device):
    """The deployed classifier (phi + h) of a checkpoint, in eval mode, with its run arguments and
    training-class counts: (model, run_args, train_counts (C,))."""
    ckpt = load_checkpoint(path)
    run = ckpt["args"]
    model = ltaux.LTResNet(run["arch"], ckpt["model"]["fc.weight"].shape[0], run.get("embed_dim"))
    load_weights(model, ckpt, path)
    return model.to(device).eval(), run, ckpt["train_counts"]


# ----------------------------------------------------------------------------------------------
# evaluation


class Interrupted(Exception):
    """A stop signal arrived (args[0]: the signal number) where the work cannot be saved half done."""


@torch.inference_mode()
def predict(model, loader, device, amp=None, features=False, stop=None):
    """Predictions and labels of an evaluation loader, gathered in list order: (N,), (N,); under torchrun
    each rank holds its shard (items rank::W) and all ranks get the whole list. With features=True also
    returns phi's features (N, D) (single process only). stop(): a callable asked after every batch (all
    ranks together); a true answer raises Interrupted."""
    model.eval()
    preds, targets, feats = [], [], []
    for images, labels in loader:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            f = model.features(pipeline.to_device(images, device))  # (B, D)
            logits = model.fc(f)  # (B, C): phi and h, the deployed model
        preds.append(logits.argmax(1))
        targets.append(labels.to(device))
        if features:
            feats.append(f.float().cpu())
        if stop is not None and stop():
            raise Interrupted()
    pred, target = torch.cat(preds), torch.cat(targets)
    if dist.is_initialized() and dist.get_world_size() > 1:
        pred, target = gather_interleaved(pred, target, dist.get_world_size())
    return (pred.cpu(), target.cpu()) + ((torch.cat(feats),) if features else ())


def gather_interleaved(pred, target, world_size):
    """Shard r holds items r::W of the list: gather the (padded) shards of all ranks and interleave."""
    n = torch.tensor([len(pred)], device=pred.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size)]
    dist.all_gather(sizes, n)
    size = max(int(s) for s in sizes)
    both = torch.stack([pred, target])
    both = torch.cat([both, both.new_full((2, size - len(pred)), -1)], 1)
    gathered = [torch.empty_like(both) for _ in range(world_size)]
    dist.all_gather(gathered, both)
    out = both.new_empty((2, sum(int(s) for s in sizes)))
    for r, (g, s) in enumerate(zip(gathered, sizes)):
        out[:, r::world_size] = g[:, :int(s)]
    return out[0], out[1]


def format_table(rows, baseline=None):
    """rows: {run name: metrics} -> a Markdown table of many / medium / few / overall / mean per class
    (percent). With baseline = a row name, the other rows also show their difference to it."""
    def cell(name, key):
        v = rows[name][key]
        if v is None:
            return "-"
        ref = rows[baseline][key] if baseline and name != baseline else None
        return f"{v:.1f}" + ("" if ref is None else f" ({v - ref:+.1f})")

    keys = ("many", "medium", "few", "overall", "mean_per_class")
    lines = ["| run | many | medium | few | overall | mean per class |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join([name] + [cell(name, k) for k in keys]) + " |" for name in rows]
    return "\n".join(lines)


def paper_lines(acc, paper):
    """Two more rows for format_table's table: the paper's row (recipes.paper_row) and the run's difference
    to it, marked when the run's protocol differs from the recipe's."""
    if paper is None:
        return ""
    note = f" (a different protocol: {', '.join(paper['differs'])})" if paper["differs"] else ""
    cells = [f"{paper[k]:.1f}" for k in ("many", "medium", "few", "overall")]
    diff = ["-" if acc[k] is None else f"{acc[k] - paper[k]:+.1f}" for k in ("many", "medium", "few", "overall")]
    return (f"\n| {paper['name']}{note} | " + " | ".join(cells) + " | - |"
            f"\n| difference (run - paper) | " + " | ".join(diff) + " | - |")
