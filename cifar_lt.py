#!/usr/bin/env python
"""The CIFAR-10-LT protocol in one command: four methods x three seeds with the cifar10_lt recipe, one table.

examples:
  python cifar_lt.py --data CIFAR10_LT_ROOT               # 4 methods x 3 seeds x 200 epochs (a GPU)
  python cifar_lt.py --data CIFAR10_LT_ROOT --epochs 7 --seeds 0 --parallel 2
                                    # the same 4 methods, 1 seed, 7 epochs: about an hour on 2 CPU cores
  python cifar_lt.py --data CIFAR10_LT_ROOT --table-only  # the table of the runs in --out

--data holds CIFAR10_LT_r100_train.txt and CIFAR10_test.txt (data_lists/make_cifar_lt.py writes them).
Each run is `python train.py --recipe cifar10_lt --method M --seed S ...` in <out>/<M>_s<S>/ (its output
in <out>/<M>_s<S>.log); a run that finished (test_metrics.json) is kept, one with a last.pt is resumed,
so running the same command again completes an interrupted protocol. The table is computed from the
runs' own test_metrics.json: mean +- standard deviation over seeds of each cell (top-1, %), with the
published ResNet-32 figures for CIFAR-10-LT ratio 100 below it; a file it cannot read is named, its cells
left empty. Flags after `--` go to every train.py, except those this script sets for each run itself
(--method, --seed, --out, --data, ...: use its own options). Exit status: 0, 1 when a run failed (named,
with its .log, after the table), 2 for a mistake in the command.
"""

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time

import recipes
from recipes import METHODS

HERE = os.path.dirname(os.path.abspath(__file__))
CELLS = ("many", "medium", "few", "overall")
PUBLISHED = (  # ResNet-32, CIFAR-10-LT imbalance ratio 100, overall top-1 (%)
    ("cross-entropy (Cao et al. 2019, the LDAM paper)", 70.4),
    ("LDAM-DRW (Cao et al. 2019)", 77.0),
    ("BBN (Zhou et al. 2020)", 79.8),
)
# train.py options this script sets for every run (or that would make the runs overwrite or mislabel each
# other after `--`): the option of this script to use instead; None: the script does it itself
OWNED = {"--method": "--methods", "--seed": "--seeds", "--out": "--out", "--recipe": "--recipe",
         "--data": "--data", "--split": "--split", "--test-split": "--test-split", "--epochs": "--epochs",
         "--device": "--device", "--resume": None}
# exit statuses of a run asked to stop: saved (0), stopped before training (128 + signal), or killed by the
# signal before train.py had its handlers in place (-signal)
STOPPED = (0, 128 + signal.SIGTERM, -signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGINT)


class UserError(Exception):
    """A mistake in the command: main() prints it as one line `error: ...` and returns 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every other mistake (argparse's own adds the usage)
        raise UserError(f"{message} (see --help)")


def get_args_parser():
    p = _Parser(description=__doc__, formatter_class=recipes.HelpFormatter)
    p.add_argument("--data", required=True, help="CIFAR-10-LT root (images and the two lists)")
    p.add_argument("--split", default=None, help="training list (None: <data>/CIFAR10_LT_r100_train.txt)")
    p.add_argument("--test-split", default=None, help="test list (None: <data>/CIFAR10_test.txt)")
    p.add_argument("--recipe", default="cifar10_lt", help="train.py --recipe of every run "
                   "('none': no recipe)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                   help="train.py --method values")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="train.py --seed values")
    p.add_argument("--epochs", type=int, default=None, help="train.py --epochs (None: the recipe's, 200)")
    p.add_argument("--parallel", type=int, default=None, help="runs at once (None: all on CUDA, where one "
                   "run leaves the GPU mostly idle; 1 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run (None: cores / --parallel)")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="None: cuda when available")
    p.add_argument("--out", default=os.path.join("runs", "cifar10_lt"), help="folder of the runs")
    p.add_argument("--time-limit", type=float, default=0, help="seconds after which the runs still going are "
                   "stopped (they save last.pt; the same command resumes them); 0: none")
    p.add_argument("--table-only", action="store_true", help="print the table of the runs in --out, "
                   "train nothing")
    return p


# ----------------------------------------------------------------------------------------------
# the command: every mistake up front, before any run starts


def train_options():
    """train.py's long option strings, from its own parser (recipes.py, torch-free)."""
    return [s for a in recipes.training_parser()._actions for s in a.option_strings if s.startswith("--")]


def owned_flag(token, options):
    """The option of OWNED that train.py's argparse reads `token` as (--flag, --flag=value, or an
    unambiguous prefix: argparse's abbreviations), else None."""
    if not token.startswith("--") or token == "--":
        return None
    name = token.split("=", 1)[0]
    hits = [name] if name in options else [o for o in options if o.startswith(name)]
    return hits[0] if len(hits) == 1 and hits[0] in OWNED else None


def check_args(args, extra):
    """Raise UserError for a command that would train nothing useful, or label runs wrongly."""
    options = train_options()
    for token in extra:
        flag, name = owned_flag(token, options), token.split("=", 1)[0]
        if flag:
            said = name if name == flag else f"{name} (train.py's {flag})"
            use = (f"use cifar_lt.py's own {OWNED[flag]}" if OWNED[flag] else
                   "run the same cifar_lt.py command again: it resumes every stopped run from its last.pt")
            raise UserError(f"`-- {said}`: cifar_lt.py sets train.py's {flag} of each run itself; {use}")
    for flag, values in (("--methods", args.methods), ("--seeds", args.seeds)):
        twice = [v for i, v in enumerate(values) if v in values[:i]]
        if twice:
            raise UserError(f"{flag} {' '.join(map(str, values))}: {twice[0]} is given twice; each run is "
                            "named by its method and seed, so list each once")
    if args.recipe != "none" and args.recipe not in recipes.RECIPES:
        raise UserError(f"--recipe {args.recipe}: not a train.py recipe ({', '.join(recipes.RECIPES)}) "
                        "nor 'none'")
    for flag in ("--epochs", "--parallel", "--threads"):
        value = getattr(args, flag[2:])
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be >= 1" + (" (unset: the recipe's)" if flag == "--epochs"
                                                               else " (unset: chosen for this machine)"))
    if not args.time_limit >= 0:  # also NaN
        raise UserError(f"--time-limit {args.time_limit:g}: must be >= 0 seconds (0: no limit)")
    for name in ("split", "test_split"):
        if not os.path.isfile(getattr(args, name)):
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: no such list "
                            "(data_lists/make_cifar_lt.py writes the CIFAR-LT lists)")


# ----------------------------------------------------------------------------------------------
# the runs


def run_name(method, seed):
    return f"{method}_s{seed}"


def train_command(args, method, seed, extra):
    out = os.path.join(args.out, run_name(method, seed))
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--workers", "0"]
    if os.path.exists(os.path.join(out, "last.pt")):  # stopped earlier: continue it
        cmd += ["--resume", os.path.join(out, "last.pt")]
    else:
        cmd += ["--data", args.data, "--split", args.split, "--test-split", args.test_split,
                "--method", method, "--seed", str(seed), "--out", out]
        cmd += ["--recipe", args.recipe] if args.recipe != "none" else []
    cmd += ["--epochs", str(args.epochs)] if args.epochs else []
    cmd += ["--device", args.device] if args.device else []
    return cmd + extra


def run_all(args, extra):
    """Start the runs that have no test_metrics.json, at most --parallel at once; stop them at --time-limit or
    at a SIGTERM / SIGINT of this script. Returns {run name: (exit status or None if stopped, wall
    seconds)}."""
    todo = [(m, s) for s in args.seeds for m in args.methods
            if not os.path.exists(os.path.join(args.out, run_name(m, s), "test_metrics.json"))]
    # the longest runs first (two batches a step, then rotated copies too): fewer idle slots at the end
    todo.sort(key=lambda ms: (METHODS[ms[0]].sampler == "cbs_rrs", METHODS[ms[0]].rotation), reverse=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    running, done, t0, stopping, signalled = {}, {}, time.time(), False, []
    os.makedirs(args.out, exist_ok=True)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:  # stop the runs as at the time limit: they save, exit 0
        signal.signal(s, lambda signum, frame: signalled.append(signum))
    try:
        while todo or running:
            over = bool(signalled) or (args.time_limit and time.time() - t0 > args.time_limit)
            while todo and len(running) < args.parallel and not over:
                m, s = todo.pop(0)
                log = open(os.path.join(args.out, run_name(m, s) + ".log"), "a")
                p = subprocess.Popen(train_command(args, m, s, extra), stdout=log, stderr=subprocess.STDOUT,
                                     env=env)
                running[run_name(m, s)] = (p, time.time(), log)
                print(f"started {run_name(m, s)} ({len(running)} running, {len(todo)} waiting)", flush=True)
            if over and not stopping:
                todo, stopping = [], True
                for p, _, _ in running.values():
                    p.send_signal(signal.SIGTERM)  # once: train.py finishes its step, saves last.pt, exits 0
            for name, (p, start, log) in list(running.items()):
                if p.poll() is not None:
                    log.close()
                    stopped = over and p.returncode in STOPPED  # one that failed while stopping still failed
                    done[name] = (None if stopped else p.returncode, time.time() - start)
                    del running[name]
                    print(f"{'stopped' if stopped else 'finished'} {name}: exit {p.returncode}, "
                          f"{time.time() - start:.0f}s", flush=True)
            time.sleep(0.5)
    finally:  # this script's callers (a test, a notebook) get their own handlers back
        for s, h in previous.items():
            signal.signal(s, h)
    return done


# ----------------------------------------------------------------------------------------------
# the table, from the runs' own files


def number(value):
    """A cell's value: a finite int or float (not a bool), else None."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok else None


def read_metrics(path):
    """A run's test_metrics.json as {cell: number or None}, or None when it is not a JSON object; a file
    that is not train.py's (unreadable, not JSON, cells missing or not numbers) is named on stderr, once."""
    try:
        with open(path, "rb") as f:
            metrics = json.loads(f.read())
    except OSError as e:
        return warn(path, f"not readable ({e.strerror or e}): its cells left empty")
    except (ValueError, RecursionError):  # ValueError: not JSON, cut short, not UTF-8
        return warn(path, "not JSON (cut short, or not train.py's): its cells left empty")
    if not isinstance(metrics, dict):
        return warn(path, f"a JSON {type(metrics).__name__}, not train.py's metrics: its cells left empty")
    # null is train.py's own value for a group without classes (CIFAR-10-LT has no few-shot class)
    bad = [k for k in CELLS if k not in metrics or (metrics[k] is not None and number(metrics[k]) is None)]
    if bad:
        warn(path, f"{', '.join(bad)}: missing or not a number, left empty")
    return {k: number(metrics.get(k)) for k in CELLS}


def last_epoch(path):
    """Epochs logged in a run's log.jsonl (the highest 0-based `epoch` + 1, 0 for none); lines that are not
    train.py's (cut short by a crash, not JSON, no integer epoch) are skipped and named on stderr, once."""
    try:
        with open(path, "rb") as f:
            lines = [line for line in f if line.strip()]
    except OSError as e:
        warn(path, f"not readable ({e.strerror or e})")
        return 0
    epochs = []
    for line in lines:
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # ValueError: not JSON, cut short, not UTF-8
            row = None
        epoch = row.get("epoch") if isinstance(row, dict) else None
        if isinstance(epoch, int) and not isinstance(epoch, bool):
            epochs.append(epoch)
    if len(epochs) < len(lines):
        warn(path, f"{len(lines) - len(epochs)} of {len(lines)} lines are not train.py's (no integer epoch): "
             "skipped")
    return max(epochs, default=-1) + 1


def warn(path, msg):
    print(f"warning: {path}: {msg}", file=sys.stderr, flush=True)


def read_results(args):
    """{method: [cells of each finished seed's run]} and {run name: epochs logged} of the unfinished runs."""
    results, unfinished = {m: [] for m in args.methods}, {}
    for m in args.methods:
        for s in args.seeds:
            folder = os.path.join(args.out, run_name(m, s))
            path = os.path.join(folder, "test_metrics.json")
            if os.path.exists(path):
                cells = read_metrics(path)
                if cells is not None:
                    results[m].append(cells)
            elif os.path.exists(os.path.join(folder, "log.jsonl")):
                unfinished[run_name(m, s)] = last_epoch(os.path.join(folder, "log.jsonl"))
    return results, unfinished


def mean_std(values):
    """'mean +- std' (sample standard deviation over the runs), 'mean' for one run, '-' for none."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.1f} ± {std:.1f}"


def table(results, seeds):
    """Markdown table: one row per method (mean +- std over its finished seeds), then the published rows."""
    lines = ["| method | many | medium | few | overall | runs |", "|---|---:|---:|---:|---:|---:|"]
    for m, runs in results.items():
        cells = [mean_std([r.get(k) for r in runs]) for k in CELLS]
        lines.append(f"| {METHODS[m].name} (`{m}`) | " + " | ".join(cells) + f" | {len(runs)}/{len(seeds)} |")
    for name, overall in PUBLISHED:
        lines.append(f"| published: {name} | | | | {overall:.1f} | |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def parse(argv):
    """(args, flags after `--`); raises UserError."""
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = get_args_parser().parse_args(argv[:cut]), argv[cut + 1:]
    args.split = args.split or os.path.join(args.data, "CIFAR10_LT_r100_train.txt")
    args.test_split = args.test_split or os.path.join(args.data, "CIFAR10_test.txt")
    check_args(args, extra)
    return args, extra


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, extra = parse(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = []
    if not args.table_only:
        runs = len(args.methods) * len(args.seeds)
        cuda = args.device == "cuda" or (args.device is None and _cuda_available())
        args.parallel = args.parallel or (runs if cuda else 1)
        args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
        print(f"{runs} runs, {args.parallel} at once, {args.threads} CPU thread(s) each, in {args.out}",
              flush=True)
        t0 = time.time()
        done = run_all(args, extra)
        failed = [n for n, (rc, _) in done.items() if rc not in (0, None)]
        print(f"wall time {time.time() - t0:.0f}s", flush=True)
    results, unfinished = read_results(args)
    print(f"\nCIFAR-10-LT: test top-1 (%) of best.pt, mean ± std over seeds {' '.join(map(str, args.seeds))}"
          f" ({args.out}):\n" + table(results, args.seeds), flush=True)
    if unfinished:
        print("unfinished (resume with the same command): "
              + ", ".join(f"{n} at epoch {e}" for n, e in unfinished.items()), flush=True)
    if failed:
        logs = ", ".join(f"{n} ({os.path.join(args.out, n + '.log')})" for n in failed)
        print(f"error: {len(failed)} run(s) failed: {logs}", file=sys.stderr)
        return 1
    return 0


def _cuda_available():
    """torch.cuda.is_available() in a child process: this script itself does not import torch."""
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


if __name__ == "__main__":
    sys.exit(main())
