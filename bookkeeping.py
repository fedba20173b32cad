"""The run's books: what train.py, evaluate.py and cifar_lt.py keep on disk, and how a run stops. One
implementation of each, in four sections:

    files          atomic_write (every file the entry points write), atomic_folder, read_json
    output folder  check_out, FolderLock, OutputFolder (claim, refusals, --overwrite aside and its recovery)
    checkpoints    load_checkpoint, check_saved_args, load_weights, model_from_checkpoint, first_non_finite,
                   resume: check_resume, restore, carry_over, trim_log, data_fingerprint, check_same_data
    signals        StopFlag, Interrupted
"""

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time

import torch
import torch.distributed as dist

import ltaux
import recipes
from ltaux import LTauxError

CKPT_FORMAT, CKPT_VERSION = "ltaux-checkpoint-v2", 2  # v2: phi ends in Linear + ReLU (embed.0.*)
SHOT_RULE = "many >= --many, few <= --few"  # in checkpoints since the groups follow the paper (Section 4.2)
HOLDER = ".ltaux-lock"  # names the job that holds a folder's lock, for the refusal message of another one
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


# ----------------------------------------------------------------------------------------------
# files


def atomic_write(path, data):
    """Write `path` atomically: bytes or str as they are, a callable as data(f), anything else with
    torch.save. A temporary file in the same folder, fsync, rename: a kill at any moment leaves the old file
    or the new one, never a truncated one. A failed write (disk full, folder gone or read-only) raises
    LTauxError naming the path; the old file is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if isinstance(data, (bytes, str)):
                f.write(data.encode() if isinstance(data, str) else data)
            else:
                data(f) if callable(data) else torch.save(data, f)
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


@contextlib.contextmanager
def atomic_folder(path):
    """A folder written whole or not at all: yields a temporary sibling to fill, renamed to `path` at the end
    (removed if the block fails). `path` must not exist."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json(path, lines=False):
    """A JSON file (or, with lines=True, a list of the JSON lines that parse), or None where the file is
    missing, truncated or not JSON: the caller names the file and carries on."""
    try:
        with open(path, "rb") as f:
            if not lines:
                return json.load(f)
            rows = []
            for line in f:
                with contextlib.suppress(ValueError):
                    rows.append(json.loads(line))
            return rows
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------
# the output folder: claimed after every input was checked, locked for the job


def check_out(out):
    """--out must be a folder or a path that can become one: one line for a dangling link, a file on the
    way, or a folder that is not writable."""
    path = os.path.abspath(out)
    while True:
        if os.path.islink(path) and not os.path.exists(path):
            raise LTauxError(f"--out {out}: {path} is a symbolic link to {os.readlink(path)}, "
                             "which does not exist")
        if os.path.exists(path):
            if not os.path.isdir(path):
                raise LTauxError(f"--out {out}: {'is' if path == os.path.abspath(out) else path + ' is'} "
                                 "a file, not a folder")
            if not os.access(path, os.W_OK | os.X_OK):
                raise LTauxError(f"--out {out}: {path} is not writable")
            return
        path = os.path.dirname(path)


class FolderLock:
    """An exclusive OS lock (flock) on a folder itself, held until release() or the process's end: a second
    job on the same folder is refused at once. Being no file, the lock cannot be deleted, replaced by a link
    or left stale. A note beside it (HOLDER, never written or read through a link) tells the refused job which
    kind of job holds the folder. On a file system without flock it warns and locks nothing."""

    def __init__(self, folder, what="run"):
        import fcntl
        self.holder, self.noted = os.path.join(folder, HOLDER), False
        self.fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(self.fd)
                who = self.read_note() or {"what": what}
                pid = f" (pid {who['pid']})" if isinstance(who.get("pid"), int) else ""
                raise LTauxError(f"{folder}: in use by another {who['what']} that is still running{pid}; "
                                 "it holds the folder's lock: wait for it or choose another --out") from None
            import warnings
            warnings.warn(f"{folder}: this file system cannot lock folders ({e.strerror}): nothing stops a "
                          f"second {what} from writing here")
        with contextlib.suppress(OSError):
            if os.path.isfile(self.holder) and not os.path.islink(self.holder):
                os.remove(self.holder)  # left by a job that was killed
            fd = os.open(self.holder, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o644)
            with os.fdopen(fd, "w") as f:
                json.dump({"what": what, "pid": os.getpid()}, f)
            self.noted = True

    def read_note(self):
        with contextlib.suppress(OSError, ValueError):
            with os.fdopen(os.open(self.holder, os.O_RDONLY | NOFOLLOW)) as f:
                note = json.loads(f.read(1000))
            if isinstance(note, dict) and note.get("what") in ("training", "evaluation", "run"):
                return note
        return None

    def release(self):
        if self.noted:
            with contextlib.suppress(OSError):
                os.remove(self.holder)
        os.close(self.fd)


class OutputFolder:
    """--out for one job (a training, an evaluation): made if missing, checked, locked. It refuses a folder
    that holds another job's `files` unless `own` (the run resumed here, the same evaluation again) or
    `overwrite`; with overwrite those it will write (`replaced`, default all) wait in .replaced-by-<pid>/
    until the new job has written its first file (commit()), and come back if it fails first
    (close(failed=True)). A .replaced-by-* left by a killed job is put back, or named when that job had
    already written files of its own."""

    def __init__(self, path, files, what, overwrite=False, own=False, replaced=None):
        check_out(path)
        self.path, self.files, self.created, self.aside = path, files, not os.path.exists(path), None
        os.makedirs(path, exist_ok=True)
        self.lock = FolderLock(path, what)
        try:
            self.recover()
            for f in os.listdir(path):  # temporary files of a job killed outright while writing
                if f.startswith(".") and ".tmp" in f and f.rsplit(".tmp", 1)[1].isdigit():
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(path, f))
            taken = self.taken()
            if taken and not own and not overwrite:
                last = os.path.join(path, "last.pt")
                hint = f"pass --resume {last} to continue it, " if "last.pt" in taken else "pass "
                raise LTauxError(f"{path}: holds another {what} ({', '.join(taken)}); {hint}--overwrite to "
                                 "replace it, or another --out")
            taken = [f for f in taken if replaced is None or f in replaced]
            if taken and not own:
                self.aside = os.path.join(path, f".replaced-by-{os.getpid()}")
                os.mkdir(self.aside)
                for f in taken:
                    os.replace(os.path.join(path, f), os.path.join(self.aside, f))
        except BaseException:
            self.close(failed=True)
            raise

    def taken(self):
        """The job files present, and a run's eval-* folders (they belong to the run beside them)."""
        names = sorted(os.listdir(self.path))
        run = any(f in names for f in self.files)
        return [f for f in names if f in self.files or (run and f.startswith("eval-") and "last.pt" in names)]

    def recover(self):
        """A job killed during --overwrite left the replaced one aside: put it back if the killed job wrote
        nothing of its own, else refuse, naming where it is."""
        for d in sorted(f for f in os.listdir(self.path) if f.startswith(".replaced-by-")):
            aside = os.path.join(self.path, d)
            if self.taken():
                raise LTauxError(f"{aside}: holds the files that an interrupted --overwrite was replacing, "
                                 f"and {self.path} holds that job's own ({', '.join(self.taken())}): "
                                 "move one of them away, then run again")
            self.put_back(aside)
            print(f"note: {self.path}: put back the files that an interrupted --overwrite had moved to {d}",
                  file=sys.stderr, flush=True)

    def put_back(self, aside):
        for f in os.listdir(aside):
            os.replace(os.path.join(aside, f), os.path.join(self.path, f))
        os.rmdir(aside)

    def commit(self):
        """The new job has written its first file: the replaced one goes."""
        if self.aside:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None

    def close(self, failed):
        """Put a replaced job back if this one failed before commit(), remove a folder this job made and left
        empty, release the lock."""
        try:
            if failed and self.aside and os.path.isdir(self.aside):
                for f in self.files:
                    if os.path.exists(os.path.join(self.path, f)):
                        os.remove(os.path.join(self.path, f))
                self.put_back(self.aside)
                print(f"note: the files that --overwrite was replacing are back in {self.path}",
                      file=sys.stderr, flush=True)
        except OSError:  # the folder was deleted, renamed or made read-only under the job: leave it as it is
            pass
        finally:
            self.lock.release()
            with contextlib.suppress(OSError):
                if self.created and not os.listdir(self.path):
                    os.rmdir(self.path)


# ----------------------------------------------------------------------------------------------
# checkpoints


def first_non_finite(state):
    """The name of the first floating tensor of a state dict holding nan or inf, or None (one host sync)."""
    names = [k for k, v in state.items() if isinstance(v, torch.Tensor) and torch.is_floating_point(v)]
    if not names:
        return None
    ok = torch.stack([state[k].isfinite().all() for k in names]).cpu()
    return None if bool(ok.all()) else names[int((~ok).nonzero()[0])]


CKPT_KEYS = {"args": dict, "model": dict, "optimizer": dict, "scaler": dict, "train_counts": torch.Tensor,
             "epoch": int, "step_in_epoch": int, "global_step": int, "best_acc": float,
             "rng_cpu": torch.Tensor}


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
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt != CKPT_FORMAT:
        version = str(fmt).rpartition("-v")[2] if str(fmt).startswith("ltaux-checkpoint-v") else ""
        if not version.isdigit():
            raise LTauxError(f"{path}: not an ltaux checkpoint (no '{CKPT_FORMAT}' marker)")
        age = "a newer ltaux: update ltaux to read it" if int(version) > CKPT_VERSION else "an older ltaux"
        raise LTauxError(f"{path}: written by {age} ({fmt}; this ltaux reads {CKPT_FORMAT})")
    bad = [k for k, t in CKPT_KEYS.items() if not isinstance(ckpt.get(k), t) or isinstance(ckpt.get(k), bool)]
    bad += [k for k in ("epoch", "step_in_epoch", "global_step") if k not in bad and ckpt[k] < 0]
    run = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    if not bad and (run.get("arch") not in ltaux.LTResNet.ARCHS
                    or not isinstance(ckpt["model"].get("fc.weight"), torch.Tensor)):
        bad = ["args.arch" if run.get("arch") not in ltaux.LTResNet.ARCHS else "model.fc.weight"]
    if bad:
        raise LTauxError(f"{path}: damaged ltaux checkpoint ({bad[0]} missing, negative or of the wrong "
                         "type)")
    bad = first_non_finite(ckpt["model"])
    if bad:
        raise LTauxError(f"{path}: holds non-finite weights ({bad}): not a usable checkpoint")
    return ckpt


def check_saved_args(saved, parser, path):
    """A checkpoint's saved arguments, re-checked as the command line would be (type, choices, length of
    lists): an edited or damaged checkpoint is refused in one line. Unknown keys are ignored."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for action in parser._actions:
        k = action.dest
        if k not in saved or k == "help":
            continue
        v, ok = saved[k], True
        if action.nargs is not None and action.nargs != 0 and not isinstance(action.nargs, str):
            ok = isinstance(v, list) and len(v) == action.nargs and all(number(x) for x in v)
        elif action.const is True:  # store_true
            ok = isinstance(v, bool)
        elif v is not None:
            ok = {int: isinstance(v, int) and not isinstance(v, bool), float: number(v)}.get(
                action.type, isinstance(v, str)) and (action.choices is None or v in action.choices)
        if not ok:
            raise LTauxError(f"{path}: its saved argument {k} = {v!r} is not a valid --{k.replace('_', '-')} "
                             "(an edited or damaged checkpoint)")


def load_weights(model, ckpt, path, prefixes=None):
    """Copy a checkpoint's weights (those starting with `prefixes`, default all) into model; load_state_dict's
    own report of missing, unexpected and mis-shaped keys becomes one LTauxError line."""
    c_arch, c_classes = ckpt["args"]["arch"], ckpt["model"]["fc.weight"].shape[0]
    if c_arch != model.arch or c_classes != model.num_classes:
        raise LTauxError(f"{path}: checkpoint is {c_arch} with {c_classes} classes, this run is "
                         f"{model.arch} with {model.num_classes} classes")
    state = {k: v for k, v in ckpt["model"].items() if prefixes is None or k.startswith(prefixes)}
    try:
        report = model.load_state_dict(state, strict=prefixes is None)
        missing = [k for k in report.missing_keys if k.startswith(prefixes or "")] + report.unexpected_keys
        if missing:
            raise RuntimeError(f"Missing or unexpected key(s): {missing[0]}")
    except RuntimeError as e:
        detail = [line.strip() for line in str(e).splitlines()[1:] if line.strip()] or [str(e)]
        raise LTauxError(f"{path}: weights do not fit this model ({detail[0][:160]}; check --embed-dim and "
                         "--arch)") from None


def model_from_checkpoint(path):
    """(the deployed classifier of a checkpoint: phi + h in eval mode, on the CPU; the checkpoint), its saved
    arguments checked as train.py's command line would check them."""
    ckpt = load_checkpoint(path)
    check_saved_args(ckpt["args"], recipes.training_parser(), path)
    run = ckpt["args"]
    model = ltaux.LTResNet(run["arch"], ckpt["model"]["fc.weight"].shape[0], run.get("embed_dim"))
    load_weights(model, ckpt, path)
    return model.eval(), ckpt


def check_resume(path, ckpt, out, epochs):
    """A resume continues a run, it never rewinds one: --epochs below what the checkpoint has done, or a
    checkpoint behind the last.pt of the folder it would continue in (a best.pt, an older copy), is
    refused."""
    done, part = ckpt["epoch"], ckpt["step_in_epoch"] > 0
    if epochs < done + part:
        raise LTauxError(f"--epochs {epochs}: the resumed run {path} has trained {done} epoch"
                         f"{'s' * (done != 1)}{' and part of the next' * part} (pass --epochs {done + part} "
                         "or more)")
    last = os.path.join(out, "last.pt")
    if not os.path.isfile(last) or os.path.samefile(last, path) or not os.path.samefile(os.path.dirname(
            os.path.abspath(path)), out):
        return  # into another folder, the resumed run stays as it is
    try:
        later = torch.load(last, map_location="cpu", weights_only=True, mmap=True)["global_step"]
    except Exception:  # noqa: BLE001 - a damaged last.pt holds nothing to lose
        return
    if isinstance(later, int) and later > ckpt["global_step"]:
        raise LTauxError(f"--resume {path}: {last} is further on (global step {later}, this checkpoint "
                         f"{ckpt['global_step']}) and resuming here would cut the run back: resume {last}, "
                         f"or pass --out NEW_FOLDER to continue from {path} there")


def restore(ckpt, path, model, optimizer, scaler):
    """Load a --resume checkpoint's weights, optimiser, scaler and RNG state. Raises LTauxError."""
    load_weights(model, ckpt, path)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if ckpt.get("rng_cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise LTauxError(f"{path}: damaged optimiser or RNG state ({type(e).__name__})") from None


def carry_over(resume, out, epoch):
    """Resuming into another folder: copy the resumed run's best.pt and its log lines before `epoch`, so the
    new folder holds the whole run. Without a best.pt beside the checkpoint, the first epoch writes one."""
    src = os.path.dirname(os.path.abspath(resume))
    if os.path.isfile(os.path.join(src, "best.pt")):
        with open(os.path.join(src, "best.pt"), "rb") as f:
            atomic_write(os.path.join(out, "best.pt"), lambda dst: shutil.copyfileobj(f, dst))
    if os.path.isfile(os.path.join(src, "log.jsonl")):
        with open(os.path.join(src, "log.jsonl"), "rb") as f:
            atomic_write(os.path.join(out, "log.jsonl"), f.read())
        trim_log(out, epoch)


def trim_log(out, epoch):
    """On resume: keep the log lines of the epochs before `epoch` (a crash may have left one more, or a
    damaged line: dropped)."""
    rows = read_json(os.path.join(out, "log.jsonl"), lines=True)
    if rows is not None:
        keep = [r for r in rows
                if isinstance(r, dict) and isinstance(r.get("epoch"), int) and r["epoch"] < epoch]
        atomic_write(os.path.join(out, "log.jsonl"), "".join(json.dumps(r) + "\n" for r in keep))


def data_fingerprint(ds, samples=8):
    """The training data in brief, stored in checkpoints: the list's sha256 (its content and order) and, for
    `samples` images spread evenly through it, the file size and the sha256 of its first 64 KiB."""
    digest, files = recipes.file_sha256(ds.split_file), []
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
        raise LTauxError(f"{ds.split_file}: not the training list of the resumed run {path} (its lines or "
                         f"their order differ: sha256 {now['list_sha256'][:12]}, the run's "
                         f"{str(saved.get('list_sha256'))[:12]}); start a new run with --init to train on "
                         "other data")
    for old, new in zip(saved.get("files", []), now["files"]):
        if list(old) != new:
            raise LTauxError(f"--data {ds.root}: {new[0]} is not the image the resumed run {path} was "
                             f"trained on ({new[1]} bytes, the run's {old[1]}"
                             f"{', other content' if old[1] == new[1] else ''}); "
                             "a resume continues on the same data (start a new run with --init)")


# ----------------------------------------------------------------------------------------------
# signals


class Interrupted(Exception):
    """A stop signal arrived (args[0]: the signal number) where the work cannot be saved half done."""


class StopFlag:
    """SIGTERM / SIGINT ask the run to stop: before training at once (Interrupted), in training after the
    step (last.pt is saved), in the final test at the next batch. A signal within a second of the last is the
    same request again (Slurm, torchrun and supervisors repeat it); a later one exits at once, 128 + signal,
    but never mid-write. With W processes the flag is all-reduced every step and read one step later (no
    GPU stall), so every rank stops after the same step."""

    def __init__(self, device, world_size):
        self.signum, self.last, self.device, self.world_size, self.pending = (
            None, 0.0, device, world_size, None)
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
        print(f"second {signal.Signals(signum).name}: exiting now, without saving", file=sys.stderr,
              flush=True)
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
            raise Interrupted(self.signum)

    def agreed(self):
        if self.world_size == 1:
            return self.signum is not None
        flag = torch.full((), float(self.signum is not None), device=self.device)
        dist.all_reduce(flag)  # queued; read at the next step
        previous, self.pending = self.pending, flag
        return previous is not None and bool(previous > 0)

    def raise_if_agreed(self):
        if self.agreed():
            raise Interrupted(self.signum)

    def restore(self):
        """The handlers from before the run; after a stop request ours stay until the process ends, so that a
        repeated request (a supervisor sending SIGTERM every second) does not kill it while it exits."""
        if self.signum is None:
            for s, h in self.previous.items():
                signal.signal(s, h)


def share_out(args, folder):
    """Rank 0's output folder (an OutputFolder, None on other ranks), told to every rank: its path."""
    box = [folder.path if folder else None]
    if args.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def dead_worker(e, out):
    """The error for a DataLoader worker that died (killed, out of memory), however it was noticed: its
    queue cut (ConnectionError) or PyTorch's SIGCHLD check (RuntimeError, possibly later); else None."""
    if not (isinstance(e, ConnectionError) or "DataLoader worker" in str(e)):
        return None
    what = str(e).splitlines()[0] if str(e) else type(e).__name__
    return LTauxError(f"a data-loader worker died ({what}); lower --workers if memory is short; "
                      + last_good(out))


def last_good(out):
    """Where a failed run can be resumed from, for its error line."""
    last = os.path.join(out, "last.pt")
    if os.path.exists(last):
        return f"resume from the last good checkpoint, {last} (intact)"
    return "no checkpoint was written yet" if os.path.isdir(out) else f"{out} is gone (deleted or renamed)"
