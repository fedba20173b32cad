#!/usr/bin/env python
"""The CIFAR-10-LT protocol in one command: four methods x three seeds with the cifar10_lt recipe, one table.

examples:
  python cifar_lt.py --data CIFAR10_LT_ROOT               # 4 methods x 3 seeds x 200 epochs (a GPU)
  python cifar_lt.py --data CIFAR10_LT_ROOT --epochs 7 --seeds 0 --parallel 2
                                    # the same 4 methods, 1 seed, 7 epochs: about an hour on 2 CPU cores
  python cifar_lt.py --data CIFAR10_LT_ROOT --table-only  # the table of the runs in --out

--data holds CIFAR10_LT_r100_train.txt and CIFAR10_test.txt (data_lists/make_cifar_lt.py writes them).
Each run is `python train.py --recipe cifar10_lt --method M --seed S ...` in <out>/<M>_s<S>/, its output in
<out>/<M>_s<S>.log; a finished run (test_metrics.json) is kept and a stopped one (last.pt) resumed, so the
same command again completes an interrupted protocol. The table: mean +- standard deviation over seeds of
the runs' own test_metrics.json (top-1, %), then the published ResNet-32 figures for CIFAR-10-LT ratio 100;
a file it cannot read is named, its cells left empty. Flags after `--` go to every train.py, except those
this script sets itself (--method, --seed, --out, --data, ...: use its own options). Exit status: 0, 1 when
a run failed (named, with its .log, after the table), 2 for a mistake in the command.
"""

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

import recipes
from recipes import METHODS

HERE = os.path.dirname(os.path.abspath(__file__))
CELLS = ("many", "medium", "few", "overall")
PUBLISHED = (("cross-entropy (Cao et al. 2019, the LDAM paper)", 70.4), ("LDAM-DRW (Cao et al. 2019)", 77.0),
             ("BBN (Zhou et al. 2020)", 79.8))  # ResNet-32, CIFAR-10-LT ratio 100: overall top-1 (%)
# train.py's options each run gets from this script -> its own option to use instead (None: it resumes)
OWNED = {"--method": "--methods", "--seed": "--seeds", "--resume": None,
         **{f: f for f in ("--out", "--recipe", "--data", "--split", "--test-split", "--epochs", "--device")}}
# a run asked to stop exits 0 (saved), 128 + signal (before training) or -signal (before its handlers)
STOPPED = (0, 128 + signal.SIGTERM, -signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGINT)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every other mistake (argparse's own adds the usage)
        raise ValueError(f"{message} (see --help)")


def get_args_parser():
    p = _Parser(description=__doc__, formatter_class=recipes.HelpFormatter)
    p.add_argument("--data", required=True, help="CIFAR-10-LT root (images and the two lists)")
    p.add_argument("--split", default=None, help="training list (None: <data>/CIFAR10_LT_r100_train.txt)")
    p.add_argument("--test-split", default=None, help="test list (None: <data>/CIFAR10_test.txt)")
    p.add_argument("--recipe", default="cifar10_lt", help="train.py --recipe of the runs ('none': no recipe)")
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
    p.add_argument("--table-only", action="store_true", help="only print the table of the runs in --out")
    return p


def parse(argv):
    """(args, flags after `--`); raises ValueError for every mistake in the command, before any run starts."""
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = get_args_parser().parse_args(argv[:cut]), argv[cut + 1:]
    args.split = args.split or os.path.join(args.data, "CIFAR10_LT_r100_train.txt")
    args.test_split = args.test_split or os.path.join(args.data, "CIFAR10_test.txt")
    options = [s for a in recipes.training_parser()._actions for s in a.option_strings if s.startswith("--")]
    for token in extra:
        name = token.split("=", 1)[0]  # train.py's argparse reads --flag=value and unambiguous prefixes too
        hits = [name] if name in options else [o for o in options if o.startswith(name)]
        if token.startswith("--") and len(hits) == 1 and hits[0] in OWNED:
            said = name if name == hits[0] else f"{name} (train.py's {hits[0]})"
            use = (f"use cifar_lt.py's own {OWNED[hits[0]]}" if OWNED[hits[0]] else
                   "run the same cifar_lt.py command again: it resumes every stopped run from its last.pt")
            raise ValueError(f"`-- {said}`: cifar_lt.py sets train.py's {hits[0]} of each run itself; {use}")
    for flag, values in (("--methods", args.methods), ("--seeds", args.seeds)):
        twice = [v for i, v in enumerate(values) if v in values[:i]]
        if twice:
            raise ValueError(f"{flag} {' '.join(map(str, values))}: {twice[0]} is given twice; each run is "
                             "named by its method and seed, so list each once")
    if args.recipe != "none" and args.recipe not in recipes.RECIPES:
        raise ValueError(f"--recipe {args.recipe}: not a train.py recipe ({', '.join(recipes.RECIPES)}) "
                         "nor 'none'")
    for flag in ("--epochs", "--parallel", "--threads"):
        value = getattr(args, flag[2:])
        if value is not None and value < 1:
            unset = "the recipe's" if flag == "--epochs" else "chosen for this machine"
            raise ValueError(f"{flag} {value}: must be >= 1 (unset: {unset})")
    if not args.time_limit >= 0:  # also NaN
        raise ValueError(f"--time-limit {args.time_limit:g}: must be >= 0 seconds (0: no limit)")
    for name in ("split", "test_split"):
        if not os.path.isfile(getattr(args, name)):
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: no such list "
                             "(data_lists/make_cifar_lt.py writes the CIFAR-LT lists)")
    return args, extra


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
    at a SIGTERM / SIGINT of this script. Returns {run name: exit status, None if stopped}."""
    todo = [(m, s) for s in args.seeds for m in args.methods
            if not os.path.exists(os.path.join(args.out, run_name(m, s), "test_metrics.json"))]
    # the longest runs first (two batches a step, then rotated copies too): fewer idle slots at the end
    todo.sort(key=lambda ms: (METHODS[ms[0]].sampler == "cbs_rrs", METHODS[ms[0]].rotation), reverse=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    running, done, t0, stopping, signalled = {}, {}, time.time(), False, []
    os.makedirs(args.out, exist_ok=True)
    # a SIGTERM / SIGINT stops the runs as the time limit does (they save, exit 0); previous: the old handlers
    previous = {s: signal.signal(s, lambda *_: signalled.append(1)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while todo or running:
            over = bool(signalled) or (args.time_limit and time.time() - t0 > args.time_limit)
            while todo and len(running) < args.parallel and not over:
                m, s = todo.pop(0)
                with open(os.path.join(args.out, run_name(m, s) + ".log"), "a") as log:  # the run has a copy
                    p = subprocess.Popen(train_command(args, m, s, extra), stdout=log,
                                         stderr=subprocess.STDOUT, env=env)
                running[run_name(m, s)] = (p, time.time())
                print(f"started {run_name(m, s)} ({len(running)} running, {len(todo)} waiting)", flush=True)
            if over and not stopping:
                todo, stopping = [], True
                for p, _ in running.values():
                    p.send_signal(signal.SIGTERM)  # once: train.py finishes its step, saves last.pt, exits 0
            for name, (p, start) in list(running.items()):
                if p.poll() is not None:
                    stopped = over and p.returncode in STOPPED  # one that failed while stopping still failed
                    done[name] = None if stopped else p.returncode
                    del running[name]
                    print(f"{'stopped' if stopped else 'finished'} {name}: exit {p.returncode}, "
                          f"{time.time() - start:.0f}s", flush=True)
            time.sleep(0.5)
    finally:  # this script's callers (a test, a notebook) get their own handlers back
        for s, h in previous.items():
            signal.signal(s, h)
    print(f"wall time {time.time() - t0:.0f}s", flush=True)
    return done


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
    # finite ints or floats, not bools; null is train.py's own value for a group without classes
    cells = {k: metrics.get(k) for k in CELLS}
    cells = {k: v if type(v) in (int, float) and math.isfinite(v) else None for k, v in cells.items()}
    bad = [k for k in CELLS if k not in metrics or (metrics[k] is not None and cells[k] is None)]
    if bad:
        warn(path, f"{', '.join(bad)}: missing or not a number, left empty")
    return cells


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
            continue
        if isinstance(row, dict) and type(row.get("epoch")) is int:  # not a bool
            epochs.append(row["epoch"])
    if len(epochs) < len(lines):
        warn(path, f"{len(lines) - len(epochs)} of {len(lines)} lines are not train.py's (no integer epoch): "
             "skipped")
    return max(epochs, default=-1) + 1


def warn(path, msg):
    print(f"warning: {path}: {msg}", file=sys.stderr, flush=True)


def report(args):
    """Print the table of the runs in --out (mean ± sample std of finished seeds), then unfinished runs."""
    lines = ["| method | many | medium | few | overall | runs |", "|---|---:|---:|---:|---:|---:|"]
    unfinished = {}
    for m in args.methods:
        runs = []
        for s in args.seeds:
            folder = os.path.join(args.out, run_name(m, s))
            if os.path.exists(os.path.join(folder, "test_metrics.json")):
                runs.append(read_metrics(os.path.join(folder, "test_metrics.json")))
            elif os.path.exists(os.path.join(folder, "log.jsonl")):
                unfinished[run_name(m, s)] = last_epoch(os.path.join(folder, "log.jsonl"))
        runs, cells = [r for r in runs if r is not None], []
        for values in ([r[k] for r in runs if r[k] is not None] for k in CELLS):
            std = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.1f}{std}" if values else "-")
        lines.append(f"| {METHODS[m].name} (`{m}`) | {' | '.join(cells)} | {len(runs)}/{len(args.seeds)} |")
    lines += [f"| published: {name} | | | | {overall:.1f} | |" for name, overall in PUBLISHED]
    print(f"\nCIFAR-10-LT: test top-1 (%) of best.pt, mean ± std over seeds {' '.join(map(str, args.seeds))}"
          f" ({args.out}):\n" + "\n".join(lines), flush=True)
    if unfinished:
        print("unfinished (resume with the same command): "
              + ", ".join(f"{n} at epoch {e}" for n, e in unfinished.items()), flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, extra = parse(argv)
    except ValueError as e:  # a mistake in the command, as recipes.check_args reports one
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
        failed = [n for n, rc in run_all(args, extra).items() if rc not in (0, None)]
    report(args)
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
