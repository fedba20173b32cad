#!/usr/bin/env python
"""Train a long-tailed classifier with auxiliary learning (Zhang et al., arXiv:1912.04486).

examples:
  python train.py                                    # the demo: synthetic long-tailed data, no dataset needed
  python train.py --recipe imagenet_lt_r10 --data /imagenet --split data_lists/ImageNet_LT_train.txt
  torchrun --nproc_per_node=8 train.py --recipe imagenet_lt_r50 --data /imagenet --split ...   # on 8 GPUs
  python train.py --resume runs/<date>-<time>-cbs_rrs_ss/last.pt            # continue where it stopped

The defaults below are the ImageNet-LT ones. Without --data the demo recipe replaces them (ResNet-10,
8 epochs, S = 64, 32 px); --recipe sets a setting of the paper (docs/recipes.md); explicit flags override
both. Every epoch: validation (overall / many / medium / few top-1), <out>/best.pt, <out>/last.pt and one JSON
line in <out>/log.jsonl; at the end, best.pt on the test list. The method itself lives in ltaux.py.
"""

import argparse
import math
import os
import signal
import sys

import recipes
from recipes import METHODS, RECIPES

RUN_FILES = ("last.pt", "best.pt", "log.jsonl", "test_metrics.json")  # what a run writes in --out
DECODE_DEVICES = ("cuda",)  # where --decode gpu may run (the tests add the CPU: the same code, checked there)


def get_args_parser():
    return recipes.training_parser(__doc__)


if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):
    get_args_parser().parse_args()  # prints the help and exits before torch is imported (seconds)


def stopped_early(signum):
    """A stop request before training: one line; returns the exit status, 128 + signal."""
    print(f"error: {signal.Signals(signum).name} before training started: stopped, nothing was written",
          file=sys.stderr, flush=True)
    return 128 + signum


if __name__ == "__main__":  # while torch loads too: one line, not a KeyboardInterrupt traceback
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda signum, frame: sys.exit(stopped_early(signum)))

import dataclasses  # noqa: E402 - after the fast --help
import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import bookkeeping  # noqa: E402
import ltaux  # noqa: E402
import pipeline  # noqa: E402
import runtime  # noqa: E402
from ltaux import LTauxError  # noqa: E402


def parse_args(argv=None):
    """Defaults < recipe (the demo when --data is unset) < the checkpoint's settings < explicit flags.
    Returns (args, checkpoint or None)."""
    parser = get_args_parser()
    first = parser.parse_known_args(argv)[0]
    ckpt = bookkeeping.load_checkpoint(first.resume) if first.resume else None
    saved = ckpt["args"] if ckpt else {}
    bookkeeping.check_saved_args(saved, parser, first.resume)
    recipe = first.recipe or saved.get("recipe") or ("demo" if first.data is None and not ckpt else None)
    parser.set_defaults(**RECIPES.get(recipe, {}))
    parser.set_defaults(**{k: v for k, v in saved.items() if k not in recipes.NOT_RESUMED and k != "recipe"})
    args = parser.parse_args(argv)
    args.recipe = recipe
    try:
        recipes.check_args(args, saved)
    except ValueError as e:
        raise LTauxError(str(e)) from None
    runtime.check_thresholds(args.many, args.few)
    for k in ("init", "pretrained", "demo_dir"):  # checkpoints keep absolute paths: valid from any folder
        setattr(args, k, getattr(args, k) and os.path.abspath(getattr(args, k)))
    args.out = args.out or (os.path.dirname(os.path.abspath(args.resume)) if args.resume else os.path.join(
        "runs", f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{args.method}"))
    bookkeeping.check_out(args.out)  # a file or a dangling link as --out: said now, not after the inputs
    return args, ckpt


def plain_args(args):
    """The run's arguments as saved in checkpoints (rank and world size belong to the process)."""
    return {k: v for k, v in vars(args).items() if k not in ("rank", "world_size")}


def build_model(args, num_classes, device):
    """LTResNet with the heads --method does not train frozen (DDP must not wait for their gradients);
    --freeze-backbone freezes the backbone's weights too (it stays in train mode: BatchNorm keeps updating
    its running statistics, as OLTR's frozen stage does)."""
    model = ltaux.LTResNet(args.arch, num_classes, args.embed_dim, args.pretrained)
    if args.init:  # the whole of phi (backbone + embed), heads fresh: ftRRS+CBS (Table 3)
        bookkeeping.load_weights(model, bookkeeping.load_checkpoint(args.init), args.init,
                                 ("backbone.", "embed."))
    for head in {"fc", "aux_fc", "rot_fc"} - set(METHODS[args.method].heads):
        getattr(model, head).requires_grad_(False)
    if args.freeze_backbone:
        model.backbone.requires_grad_(False)
    if args.sync_bn and args.world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return runtime.guard_narrow_convs(model, device).to(device, memory_format=torch.channels_last)


def build_optimizer(model, args, device):
    """SGD with momentum and weight decay on every trained parameter (as OLTR); phi at lr * scale."""
    is_phi = {n: n.startswith(("backbone.", "embed.")) for n, _ in model.named_parameters()}
    phi = [p for n, p in model.named_parameters() if is_phi[n] and p.requires_grad]
    heads = [p for n, p in model.named_parameters() if not is_phi[n]]
    groups = [dict(params=phi, lr_scale=args.backbone_lr_scale), dict(params=heads, lr_scale=1.0)]
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                           **({"fused": True} if device.type == "cuda" else {"foreach": True}))


def lr_factor(step, total, warmup):
    """Linear warm-up for `warmup` steps, then cosine decay to 0 at `total` (per step)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def images_per_step(args):
    """Images through the backbone per global step (S per part, rotated copies included)."""
    n = args.batch_size * (2 if METHODS[args.method].sampler == "cbs_rrs" else 1)
    if METHODS[args.method].rotation or args.rotation_aug:
        n += n * (4 if args.rotation == "all" else 1)
    return n


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
    fingerprint: dict  # bookkeeping.data_fingerprint of the training data
    folder: bookkeeping.OutputFolder
    stop: bookkeeping.StopFlag
    log: callable
    gen: torch.Generator = None  # the steps' random numbers (rotations, jitter), on the device
    graph: runtime.StepGraph = None  # --cuda-graph: update() captured in a CUDA graph; None: eager steps


# ----------------------------------------------------------------------------------------------
# one step, one epoch


def train_step(run, images, labels, step):
    """One SGD step of Eq. 2 at global step `step`: images uint8 (parts * S / W, 3, H, W) as the sampler lays
    them out, [B_cbs; B_rrs] (one part for a baseline), labels (parts * S / W,). Rotation angles and colour
    jitter come from run.gen, seeded by (seed, step, rank): a resume repeats them. Returns the loss parts
    (detached, on the device: no host sync)."""
    args, steps = run.args, run.batches.batch_sampler.num_batches
    # the schedule is per step, so a mid-epoch resume continues it exactly
    for g in run.optimizer.param_groups:
        g["lr"] = args.lr * g["lr_scale"] * lr_factor(step, steps * args.epochs,
                                                      round(args.warmup_epochs * steps))
    run.gen.manual_seed(ltaux.AuxBatchSampler.derive_seed(args.seed, "rotation", step, args.rank))
    return run.graph(images, labels) if run.graph else update(run, images, labels)


def update(run, images, labels):
    """The device's part of a step: Eq. 2's loss on the batch, its gradients and the SGD update."""
    args, gen = run.args, run.gen
    jitter = gen if pipeline.jitter_on_device(args.image_size, train=True) else None
    x, y = pipeline.to_device(images, run.device, jitter), labels.to(run.device, non_blocking=True)
    method, s = METHODS[args.method], args.batch_size // args.world_size
    if method.sampler != "cbs_rrs":  # a baseline: its one part trains h alone
        cbs, rrs = ((x, y), None) if method.sampler == "cbs" else (None, (x, y))
    elif args.rotation_aug:  # Table 5: the same images through phi as CBS+RRS+SS, all as classification
        cbs, rrs = (ltaux.rotation_augment(x[:s], y[:s], args.rotation, gen),
                    ltaux.rotation_augment(x[s:], y[s:], args.rotation, gen))
    else:
        cbs, rrs = (x[:s], y[:s]), (x[s:], y[s:])  # S / W rows of B_cbs, then S / W of B_rrs
    # no cast cache: a CUDA graph cannot hold one, and each weight is cast once a step anyway
    with torch.autocast(run.device.type, dtype=run.amp or torch.float32, enabled=run.amp is not None,
                        cache_enabled=False):
        loss, parts = ltaux.aux_loss(run.net, cbs, rrs, args.lambdas,
                                     args.rotation if method.rotation else "off", gen)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return dict(parts, loss=loss.detach())


def make_graph(run, log):
    """run.graph: with --cuda-graph, update() in a runtime.StepGraph where the run allows one; else None."""
    why = runtime.why_no_graph(run.device, run.args.world_size, run.scaler, run.args.compile)
    if run.args.cuda_graph and why:
        log(f"--cuda-graph: eager steps ({why})")
    if run.args.cuda_graph and not why:  # a CUDA process alone (no torchrun): its cycle with run is harmless
        return runtime.StepGraph(functools.partial(update, run), run.optimizer, run.gen)
    return None


def train_one_epoch(run, epoch, first_step, partial):
    """Train from batch `first_step` of `epoch` to its end, or until a stop is agreed. Returns (metrics,
    partial): mean loss and parts over the whole epoch (a resumed part included), lr, images/s (this
    session), epoch_time_s, steps (done in this epoch so far), stopped; partial carries an interrupted
    epoch's sums into its checkpoint."""
    run.model.train()
    steps = run.batches.batch_sampler.num_batches  # M
    sums = {k: torch.tensor(v, device=run.device) for k, v in partial.get("sums", {}).items()}
    done, seen, t0, i = partial.get("steps", 0), 0, time.time(), first_step
    for batch in run.batches:
        images, labels = run.batches.dataset.decode(batch, run.device) if run.args.decode == "gpu" else batch
        for k, v in train_step(run, images, labels, epoch * steps + i).items():
            sums[k] = sums.get(k, 0.0) + v.float()  # running sums stay on the device: no sync
        done, seen, i = done + 1, seen + images_per_step(run.args), i + 1
        if i % run.args.print_freq == 0 or i == steps:
            means = check_finite(sums, done, epoch, i)  # the only host sync: every --print-freq steps
            eta = datetime.timedelta(seconds=round((steps * (run.args.epochs - epoch) - i)
                                                   * (time.time() - t0) / (i - first_step)))
            run.log(f"epoch {epoch} [{i:>{len(str(steps))}}/{steps}] " + " ".join(f"{k} {v:.4f}" for k, v in
                    means.items()) + f" lr {run.optimizer.param_groups[-1]['lr']:.5f} img/s "
                    f"{seen / (time.time() - t0):.0f} eta {eta}")
        if run.stop.agreed():
            break
    means = check_finite(sums, done, epoch, i)
    elapsed = partial.get("time", 0.0) + time.time() - t0
    out = {f"loss_{k}" if k != "loss" else k: v for k, v in means.items()}
    out.update(lr=run.optimizer.param_groups[-1]["lr"], images_per_s=seen / max(time.time() - t0, 1e-9),
               epoch_time_s=elapsed, steps=i, stopped=i < steps)
    return out, dict(sums={k: float(v) for k, v in sums.items()}, steps=done, time=elapsed)


class RunError(LTauxError):
    """An error during training (non-finite loss or weights, a failed write, a dead worker): its message gets
    where the run can be resumed from."""


def check_finite(sums, n, epoch, step_in_epoch):
    """Mean loss parts since the epoch began ({name: float}; one host sync). A non-finite one ends the
    run before anything is saved."""
    means = {k: float(v) / max(n, 1) for k, v in sums.items()}
    if not all(math.isfinite(v) for v in means.values()):
        parts = ", ".join(f"{k} {v:.4g}" for k, v in means.items())
        raise RunError(f"non-finite loss at step {step_in_epoch} of epoch {epoch} or before it ({parts}): "
                       "nothing saved; lower --lr or check the data")
    return means


def validate(run, batches, stop=None):
    """Overall / many / medium / few top-1 (percent) of phi + h on evaluation batches."""
    pred, target = runtime.predict(run.model, batches, run.device, run.amp, stop=stop)
    return ltaux.shot_accuracy(pred, target, run.counts, run.args.many, run.args.few)


# ----------------------------------------------------------------------------------------------
# the epochs, their files, the final test


def run_epochs(run, ckpt, has_val):
    """The epochs (train, validate, write best.pt / log.jsonl / last.pt), then the final test. Returns None
    when the run is complete, else where it stopped (a signal)."""
    args, log = run.args, run.log
    epoch, first_step, best_acc, partial = resume(run, ckpt) if ckpt else (0, 0, -1.0, {})
    force_best = ckpt is not None and not os.path.exists(os.path.join(args.out, "best.pt"))
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
        improved = force_best or not has_val or m.get("val_overall", -1.0) > best_acc
        best_acc, force_best = max(best_acc, m.get("val_overall", best_acc)), False
        # best.pt, then the log line, then last.pt: last.pt never records a best.pt not there
        if args.rank == 0:
            if improved:
                save_checkpoint(run, "best.pt", epoch + 1, 0, best_acc)
            write(run, "log.jsonl", json.dumps(m) + "\n", append=True)
            save_checkpoint(run, "last.pt", epoch + 1, 0, best_acc)
        log(f"epoch {epoch} done in {m['epoch_time_s']:.0f}s: loss {m['loss']:.4f}" + "".join(
            f", val {k} {m['val_' + k]:.2f}" for k in ("overall", "many", "medium", "few")
            if m.get("val_" + k) is not None))
        if run.stop.agreed():
            log(f"stopped after epoch {epoch}: saved {args.out}/last.pt; continue with python train.py "
                f"--resume {args.out}/last.pt")
            return epoch
    if force_best and "test" in run.evals and args.rank == 0:  # resumed elsewhere after its last epoch
        log("the resumed run's best.pt was not beside its checkpoint: testing the resumed weights "
            "(now best.pt)")
        save_checkpoint(run, "best.pt", args.epochs, 0, best_acc)
    return final_test(run) if "test" in run.evals else None


def resume(run, ckpt):
    """Load a --resume checkpoint into the run and log the optimisation flags changed since
    (applied from now). Returns (epoch, step_in_epoch, best_acc, partial epoch metrics)."""
    args, steps = run.args, run.batches.batch_sampler.num_batches
    bookkeeping.restore(ckpt, args.resume, run.model, run.optimizer, run.scaler)
    for g in run.optimizer.param_groups:  # load_state_dict brought the old values back
        g.update(momentum=args.momentum, weight_decay=args.weight_decay)
    run.optimizer.param_groups[0]["lr_scale"] = args.backbone_lr_scale
    for k in ("lr", "momentum", "weight_decay", "backbone_lr_scale", "epochs", "warmup_epochs", "lambdas"):
        if ckpt["args"].get(k) != getattr(args, k):
            run.log(f"resume: --{k.replace('_', '-')} {getattr(args, k)} (the checkpoint's run had "
                    f"{ckpt['args'].get(k)}); " + (
                        "the cosine schedule is recomputed over the new length from the current step"
                        if "epochs" in k else "applied from now"))
    if ckpt["step_in_epoch"] >= steps:
        raise LTauxError(f"{args.resume}: step {ckpt['step_in_epoch']} of an epoch of {steps} steps "
                         "(a damaged checkpoint)")
    if args.rank == 0:
        bookkeeping.trim_log(args.out, ckpt["epoch"])
    run.log(f"resumed from {args.resume}: epoch {ckpt['epoch']}, step {ckpt['step_in_epoch']} of {steps} "
            f"(global step {ckpt['global_step']} of {steps * args.epochs})")
    return ckpt["epoch"], ckpt["step_in_epoch"], ckpt["best_acc"], ckpt.get("partial") or {}


def save_checkpoint(run, name, epoch, step_in_epoch, best_acc, partial=None):
    """<out>/<name>: everything needed to resume, as tensors and plain types. Weights are checked first (one
    host sync per save): no checkpoint ever holds non-finite weights."""
    bad = bookkeeping.first_non_finite(run.model.state_dict())
    if bad:
        at = (f"at the end of epoch {epoch - 1}" if step_in_epoch == 0
              else f"after step {step_in_epoch} of epoch {epoch}")
        raise RunError(f"non-finite weights ({bad}) {at} (the update diverged): nothing saved; lower --lr or "
                       "check the data")
    steps = run.batches.batch_sampler.num_batches
    write(run, name, dict(
        format=bookkeeping.CKPT_FORMAT, args=plain_args(run.args), model=run.model.state_dict(),
        optimizer=run.optimizer.state_dict(), scaler=run.scaler.state_dict(), train_counts=run.counts,
        epoch=epoch, step_in_epoch=step_in_epoch, global_step=epoch * steps + step_in_epoch,
        best_acc=float(best_acc), shot_rule=bookkeeping.SHOT_RULE, data=run.fingerprint,
        partial=partial or {}, rng_cpu=torch.get_rng_state(),
        rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []))
    run.folder.commit()


def write(run, name, data, append=False):
    """<out>/<name> written whole (a checkpoint, text), or a line appended; never cut by a second signal. A
    failed write (disk full, folder gone or read-only) is a RunError."""
    path = os.path.join(run.args.out, name)
    try:
        with run.stop.saving():
            if not append:
                return bookkeeping.atomic_write(path, data)
            with open(path, "a") as f:
                f.write(data)
    except OSError as e:
        raise RunError(f"{path}: cannot write it ({e.strerror})") from None
    except LTauxError as e:
        raise RunError(str(e)) from None


def final_test(run):
    """Evaluate best.pt on the test list, print the many / medium / few table (with the paper's row for a
    recipe run) and write test_metrics.json. Returns None, or "test" when a stop signal ended it early."""
    args, best = run.args, os.path.join(run.args.out, "best.pt")
    if args.rank == 0:
        bookkeeping.load_weights(run.model, bookkeeping.load_checkpoint(best), best)
    if args.world_size > 1:  # rank 0's weights to every rank: no shared file system needed
        for tensor in run.model.state_dict().values():
            dist.broadcast(tensor, src=0)
    try:
        acc = validate(run, run.evals["test"], stop=run.stop.raise_if_agreed)
    except bookkeeping.Interrupted:
        run.log(f"stopped during the final test: training is complete ({args.out}/best.pt, last.pt); "
                f"python train.py --resume {args.out}/last.pt runs the test")
        return "test"
    paper = recipes.paper_row(plain_args(args), vars(get_args_parser().parse_args([])), args.test_split)
    run.log(f"\ntest ({args.test_split}) with {best}:\n"
            + runtime.format_table({f"{args.method} (best.pt)": acc}) + runtime.paper_lines(acc, paper))
    if args.rank == 0:
        metrics = {k: acc[k] for k in ("overall", "mean_per_class", "many", "medium", "few")}
        if paper:
            metrics.update(paper=paper, paper_difference=recipes.paper_difference(acc, paper))
        write(run, "test_metrics.json", json.dumps(metrics))
    return None


# ----------------------------------------------------------------------------------------------
# the run


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


def make_sampler(train_set, args):
    """AuxBatchSampler of the method's mode; its argument errors (S vs Z, k vs C, S vs W) name the flags."""
    try:
        return ltaux.AuxBatchSampler(train_set.labels, args.batch_size, args.per_class,
                                     METHODS[args.method].sampler, seed=args.seed, rank=args.rank,
                                     world_size=args.world_size, with_seeds=True)
    except ValueError as e:
        raise LTauxError(f"--batch-size {args.batch_size} --per-class {args.per_class} with {args.split}: "
                         f"{e}") from None


def claim_out(args, ckpt):
    """Rank 0 makes and locks --out (bookkeeping.OutputFolder); resuming into another folder brings the
    resumed run's best.pt and log along (bookkeeping.carry_over)."""
    here = bool(ckpt) and os.path.isdir(args.out) and os.path.samefile(os.path.dirname(os.path.abspath(
        args.resume)), args.out)
    folder = bookkeeping.OutputFolder(args.out, RUN_FILES, "training", args.overwrite, own=here)
    try:
        if ckpt and not here:
            bookkeeping.carry_over(args.resume, args.out, ckpt["epoch"])
    except BaseException:
        folder.close(failed=True)
        raise
    return folder


def run_header(run):
    args, n, steps = run.args, len(run.batches.batch_sampler.labels), run.batches.batch_sampler.num_batches
    defaults = vars(get_args_parser().parse_args([]))
    changed = {k: v for k, v in plain_args(args).items() if k in defaults and defaults[k] != v}
    run.log("args not at their defaults (all are saved in every checkpoint): "
            + json.dumps(changed, sort_keys=True))
    run.log(f"device: {run.device}, {args.world_size} process{'es' if args.world_size > 1 else ''}, amp "
            f"{runtime.amp_dtype(args.amp, run.device)[0]}; {n} train images, {len(run.counts)} classes, "
            f"{steps} steps/epoch of {images_per_step(args)} images; writing to {args.out}")
    groups = torch.bincount(ltaux.shot_groups(run.counts, args.many, args.few), minlength=3).tolist()
    run.log(f"shot groups: {groups[0]} many-shot (>= {args.many} training images), {groups[1]} medium, "
            f"{groups[2]} few-shot (<= {args.few}) classes")
    if "val" not in run.evals:
        run.log("no validation list: best.pt is the last epoch's weights "
                "(--val-split selects by validation accuracy)")


def train(args, ckpt):
    """The whole run: inputs first (nothing is written until all are checked), then the epochs, then the
    test."""
    t_start, device = time.time(), setup_processes(args)
    log = functools.partial(print, flush=True) if args.rank == 0 else (lambda msg: None)  # rank 0 speaks
    amp = runtime.amp_dtype(args.amp, device)[1]
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    stop = bookkeeping.StopFlag(device, args.world_size)
    try:
        train_set, evals, counts = pipeline.open_inputs(args, log,
                                                        dist.barrier if args.world_size > 1 else None)
        sampler = make_sampler(train_set, args)
        model = build_model(args, train_set.num_classes, device)
        optimizer = build_optimizer(model, args, device)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        fingerprint = bookkeeping.data_fingerprint(train_set)
        if ckpt:
            bookkeeping.check_same_data(ckpt, args.resume, train_set, counts, fingerprint)
            bookkeeping.check_resume(args.resume, ckpt, args.out, args.epochs)
        if args.check_files and args.rank == 0:
            pipeline.check_files([train_set] + list(evals.values()), stop.before_training, log)
        try:
            batches, eval_batches = pipeline.make_batches(train_set, evals, sampler, args, device, log,
                                                              stop.before_training)
        except LTauxError:
            if args.rank > 0:  # --in-memory: every rank decodes the same files, rank 0 alone prints the error
                raise SystemExit(2) from None
            raise
        stop.before_training()
        folder = claim_out(args, ckpt) if args.rank == 0 else None  # the output folder, claimed only now
        failed = True
        try:
            args.out = bookkeeping.share_out(args, folder)
            net = torch.nn.parallel.DistributedDataParallel(model) if args.world_size > 1 else model
            run = Run(args, device, amp, model, torch.compile(net) if args.compile else net, optimizer,
                      scaler, batches, eval_batches, counts, fingerprint, folder, stop, log,
                      torch.Generator(device=device))
            run.graph = make_graph(run, log)
            run_header(run)
            stopped = run_epochs(run, ckpt, "val" in evals)
            failed = False
        except RunError as e:
            raise LTauxError(f"{e}; {bookkeeping.last_good(args.out)}") from None
        except (RuntimeError, ConnectionError) as e:
            raise bookkeeping.dead_worker(e, args.out) or e
        finally:
            if folder:
                folder.close(failed)
    finally:
        stop.restore()
    if stopped is None:
        log(f"\ndone in {datetime.timedelta(seconds=round(time.time() - t_start))}; "
            f"best.pt: {args.out}/best.pt\nnext: python evaluate.py --checkpoint {args.out}/best.pt"
            + (f" --split {args.test_split}" if args.test_split else " --split LIST"))
    return 0


def main(argv=None):
    plain_format = warnings.formatwarning
    warnings.formatwarning = lambda message, *rest, **kw: f"warning: {message}\n"  # one line
    args = None
    try:
        args, ckpt = parse_args(argv)
        return train(args, ckpt)
    except LTauxError as e:
        return runtime.report(e)
    except bookkeeping.Interrupted as e:
        return stopped_early(e.args[0])
    except RuntimeError as e:
        dead = args is not None and bookkeeping.dead_worker(e, args.out)  # PyTorch's check, while closing
        if dead:
            return runtime.report(dead)
        # a collective broke because a peer failed first and printed its one error line:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1 and (
                isinstance(e, dist.DistError) or "closed by peer" in str(e)):
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
