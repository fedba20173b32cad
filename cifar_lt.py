#!/usr/bin/env python
"""The CIFAR-10-LT protocol in one command: four methods x three seeds with the cifar10_lt recipe, one table.

examples:
  python cifar_lt.py --data /cifar10_lt                          # 4 methods x 3 seeds x 200 epochs (a GPU)
  python cifar_lt.py --data /cifar10_lt --epochs 6 --parallel 2  # the same runs, a short budget (CPU)
  python cifar_lt.py --data /cifar10_lt --table-only             # the table of the runs in --out

--data holds CIFAR10_LT_r100_train.txt and CIFAR10_test.txt (data_lists/make_cifar_lt.py writes them).
Each run is `python train.py --recipe cifar10_lt --method M --seed S ...` in <out>/<M>_s<S>/ (its output
in <out>/<M>_s<S>.log); a run that finished (test_metrics.json) is kept, one with a last.pt is resumed,
so running the same command again completes an interrupted protocol. The table is computed from the
runs' own test_metrics.json: mean +- standard deviation over seeds of each cell (top-1, %), with the
published ResNet-32 figures for CIFAR-10-LT ratio 100 below it. Flags after `--` go to every train.py.
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


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=recipes.HelpFormatter)
    p.add_argument("--data", required=True, help="CIFAR-10-LT root (images and the two lists)")
    p.add_argument("--split", default=None, help="training list (None: <data>/CIFAR10_LT_r100_train.txt)")
    p.add_argument("--test-split", default=None, help="test list (None: <data>/CIFAR10_test.txt)")
    p.add_argument("--recipe", default="cifar10_lt", help="train.py --recipe of every run ('none': no recipe)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="train.py --method values")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="train.py --seed values")
    p.add_argument("--epochs", type=int, default=None, help="train.py --epochs (None: the recipe's, 200)")
    p.add_argument("--parallel", type=int, default=None, help="runs at once (None: all on CUDA, where one "
                   "run leaves the GPU mostly idle; 1 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run (None: cores / --parallel)")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="None: cuda when available")
    p.add_argument("--out", default=os.path.join("runs", "cifar10_lt"), help="folder of the runs")
    p.add_argument("--time-limit", type=float, default=0, help="seconds after which the runs still going are "
                   "stopped (they save last.pt; the same command resumes them); 0: none")
    p.add_argument("--table-only", action="store_true", help="print the table of the runs in --out, train nothing")
    return p


def run_name(method, seed):
    return f"{method}_s{seed}"


def train_command(args, method, seed, extra):
    out = os.path.join(args.out, run_name(method, seed))
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--workers", "0"]
    if os.path.exists(os.path.join(out, "last.pt")):  # stopped earlier: continue it
        cmd += ["--resume", os.path.join(out, "last.pt")]
    else:
        cmd += ["--data", args.data, "--split", args.split, "--test-split", args.test_split, "--method", method,
                "--seed", str(seed), "--out", out] + (["--recipe", args.recipe] if args.recipe != "none" else [])
    cmd += ["--epochs", str(args.epochs)] if args.epochs else []
    cmd += ["--device", args.device] if args.device else []
    return cmd + extra


def run_all(args, extra):
    """Start the runs that have no test_metrics.json, at most --parallel at once; stop them at --time-limit or
    at a SIGTERM / SIGINT of this script. Returns {run name: (exit status or None if stopped, wall seconds)}."""
    todo = [(m, s) for s in args.seeds for m in args.methods
            if not os.path.exists(os.path.join(args.out, run_name(m, s), "test_metrics.json"))]
    cost = lambda ms: (2 if METHODS[ms[0]].sampler == "cbs_rrs" else 1) * (2 if METHODS[ms[0]].rotation else 1)  # noqa
    todo.sort(key=cost, reverse=True)  # the longest runs first: fewer idle slots at the end
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    running, done, t0, stopping, signalled = {}, {}, time.time(), False, []
    os.makedirs(args.out, exist_ok=True)
    for s in (signal.SIGTERM, signal.SIGINT):  # stop the runs as at the time limit: they save, exit 0
        signal.signal(s, lambda signum, frame: signalled.append(signum))
    while todo or running:
        over = bool(signalled) or (args.time_limit and time.time() - t0 > args.time_limit)
        while todo and len(running) < args.parallel and not over:
            m, s = todo.pop(0)
            log = open(os.path.join(args.out, run_name(m, s) + ".log"), "a")
            running[run_name(m, s)] = (subprocess.Popen(train_command(args, m, s, extra), stdout=log,
                                                        stderr=subprocess.STDOUT, env=env), time.time(), log)
            print(f"started {run_name(m, s)} ({len(running)} running, {len(todo)} waiting)", flush=True)
        if over and not stopping:
            todo, stopping = [], True
            for p, _, _ in running.values():
                p.send_signal(signal.SIGTERM)  # once: train.py finishes its step, saves last.pt, exits 0
        for name, (p, start, log) in list(running.items()):
            if p.poll() is not None:
                log.close()
                done[name] = (None if over else p.returncode, time.time() - start)
                del running[name]
                print(f"{'stopped' if over else 'finished'} {name}: exit {p.returncode}, "
                      f"{time.time() - start:.0f}s", flush=True)
        time.sleep(0.5)
    return done


def read_results(args):
    """{method: [test_metrics of each finished seed]} and {run name: last logged epoch} of unfinished runs."""
    results, unfinished = {m: [] for m in args.methods}, {}
    for m in args.methods:
        for s in args.seeds:
            folder = os.path.join(args.out, run_name(m, s))
            path = os.path.join(folder, "test_metrics.json")
            if os.path.exists(path):
                with open(path) as f:
                    results[m].append(json.load(f))
            elif os.path.exists(os.path.join(folder, "log.jsonl")):
                with open(os.path.join(folder, "log.jsonl")) as f:
                    epochs = [json.loads(line).get("epoch", -1) for line in f if line.strip()]
                unfinished[run_name(m, s)] = max(epochs, default=-1) + 1
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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = get_args_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.split = args.split or os.path.join(args.data, "CIFAR10_LT_r100_train.txt")
    args.test_split = args.test_split or os.path.join(args.data, "CIFAR10_test.txt")
    for name in ("split", "test_split"):
        if not os.path.isfile(getattr(args, name)):
            print(f"error: --{name.replace('_', '-')} {getattr(args, name)}: no such list "
                  "(data_lists/make_cifar_lt.py writes the CIFAR-LT lists)", file=sys.stderr)
            return 2
    if not args.table_only:
        runs = len(args.methods) * len(args.seeds)
        cuda = args.device == "cuda" or (args.device is None and _cuda_available())
        args.parallel = max(1, args.parallel or (runs if cuda else 1))
        args.threads = max(1, args.threads or (os.cpu_count() or 1) // args.parallel)
        print(f"{runs} runs, {args.parallel} at once, {args.threads} CPU thread(s) each, in {args.out}", flush=True)
        t0 = time.time()
        done = run_all(args, extra)
        failed = [n for n, (rc, _) in done.items() if rc not in (0, None)]
        print(f"wall time {time.time() - t0:.0f}s" + (f"; failed: {', '.join(failed)} (see their .log)"
                                                     if failed else ""), flush=True)
    results, unfinished = read_results(args)
    print(f"\nCIFAR-10-LT: test top-1 (%) of best.pt, mean ± std over seeds {' '.join(map(str, args.seeds))}"
          f" ({args.out}):\n" + table(results, args.seeds))
    if unfinished:
        print("unfinished (resume with the same command): " + ", ".join(f"{n} at epoch {e}" for n, e in unfinished.items()))
    return 0


def _cuda_available():
    """torch.cuda.is_available() in a child process: this script itself does not import torch."""
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


if __name__ == "__main__":
    sys.exit(main())
