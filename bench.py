#!/usr/bin/env python
"""Benchmark the pieces of an ltaux training step; prints one JSON object and a short table.

examples:
  python bench.py                                   # CPU defaults, a few minutes on 2 cores
  python bench.py --images /imagenet/train/n01440764 --device cuda --arch resnet50 --image-size 224 \
--batch-size 64

figures (--figures; docs/benchmarks.md describes each): step (the sampler, and a cbs_rrs_ss step vs a plain
classifier step over the same 4S images: their ratio is the headline), cifar (the CIFAR recipe), modes
(train.py's step modes on one short CIFAR run), loader (the input pipelines).
"""

import argparse
import json
import math
import os
import platform
import random
import sys
import tempfile
import time

import recipes

STEP_MODES = {"eager": [], "graph": ["--cuda-graph"], "compile": ["--compile"]}  # train.py's flags
FIGURES = ("step", "cifar", "modes", "loader")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=recipes.HelpFormatter)
    add = p.add_argument
    add("--device", default=None, choices=["cuda", "cpu"], help="None: cuda when available")
    add("--arch", default="resnet10", choices=recipes.ARCHS, help="backbone")
    add("--image-size", type=int, default=112, help="square input size")
    add("--batch-size", type=int, default=32, help="S: a method step forwards 4S images")
    add("--num-classes", type=int, default=1000, help="width of the classifier heads")
    add("--steps", type=int, default=8, help="timed steps of each kind")
    add("--warmup", type=int, default=3, help="untimed steps of each kind first")
    add("--amp", default=None, choices=["bf16", "off"],
        help="autocast (None: bf16 on CUDA and on CPUs that run bf16 natively, off elsewhere)")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--loader-images", type=int, default=400, help="images decoded per pipeline for the loader figure")
    add("--images", default=None,
        help="folder of JPEG photographs for the loader figures (None: generated noise JPEGs, 500 x 375)")
    add("--labels", default=None, help="split list whose labels drive the sampler figure (None: a "
        "generated Places-LT-like profile, 62,500 images of 365 classes)")
    add("--loader-size", type=int, default=224, help="crop size of the loader figure")
    add("--target-rate", type=float, default=5000.0, help="decoded images/s the GPU needs (e.g. "
        "ResNet-10 at ~10,000 images/s through the network decodes half of them)")
    add("--loader-workers", type=int, default=min(16, os.cpu_count() or 1),
        help="worker processes of the end-to-end loader figure (0: skip it)")
    add("--loader-batches", type=int, default=10, help="timed batches of the end-to-end loader figure")
    add("--cifar-steps", type=int, default=4, help="timed steps of each kind in the CIFAR section")
    add("--cifar-batch-size", type=int, default=120, help="S of the CIFAR section (Z = 12, as the "
        "cifar10_lt recipe)")
    add("--cifar-images", type=int, default=720,
        help="JPEGs of the CIFAR-recipe epoch figure (one epoch = ceil(N / S) steps)")
    add("--cifar-workers", type=int, default=min(8, os.cpu_count() or 1),
        help="DataLoader workers of the epoch figure's worker path (train.py's default --workers)")
    add("--figures", nargs="+", choices=FIGURES, default=None, help="which figures to measure "
        "(step: the sampler too; modes: train.py's step modes, see --cifar-modes; None: all)")
    add("--cifar-modes", nargs="*", choices=list(STEP_MODES), default=None, help="train.py step modes "
        "compared on the same short cifar10_lt run: losses and images/s (None: eager and graph on CUDA, "
        "none on a CPU, where --cuda-graph runs eager steps)")
    add("--cifar-data", default=None, help="CIFAR-10-LT root for that comparison (CIFAR10_LT_r100_train.txt, "
        "CIFAR10_test.txt; None: --cifar-images generated 32 px JPEGs of the same class profile)")
    add("--cifar-epochs", type=int, default=3, help="epochs of each run of the comparison (images/s: the "
        "median of the epochs after the first, which holds the capture or the compilation)")
    return p


if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):
    get_args_parser().parse_args()  # prints the help and exits before torch is imported

import torch  # noqa: E402 - after the fast --help
import torch.nn.functional as F  # noqa: E402
from torchvision.io import write_jpeg  # noqa: E402

import ltaux  # noqa: E402
import pipeline  # noqa: E402
import runtime  # noqa: E402


def bench_sampler(S, path, Z=4, epochs=3):
    """AuxBatchSampler as train.py iterates it (with seeds), epochs after the first: the cycles carry over."""
    if path:
        labels, source = ltaux.read_split(path)[1], os.path.basename(path)
    else:  # 365 classes, 5..4980 images, Pareto(6) profile, 62,500 images in all
        rng = random.Random(0)
        draws = sorted((rng.paretovariate(6) for _ in range(365)), reverse=True)
        raw = [5 + (d - draws[-1]) / (draws[0] - draws[-1]) * 4975 for d in draws]
        scale = (62500 - 5 * 365) / (sum(raw) - 5 * 365)
        counts = [max(5, round(5 + (r - 5) * scale)) for r in raw]
        counts[0] += 62500 - sum(counts)
        labels, source = [c for c, n in enumerate(counts) for _ in range(n)], "generated Pareto profile"
    sampler = ltaux.AuxBatchSampler(labels, S, Z, with_seeds=True)
    stamps = []
    for e in range(epochs + 1):  # epoch 0 untimed: the clock starts at its end
        sampler.set_epoch(e)
        sum(1 for _ in sampler)
        stamps.append(time.perf_counter())
    dt, batches = stamps[-1] - stamps[0], epochs * len(sampler)
    return dict(labels=source, images=len(labels), S=S, Z=Z, batches_per_s=batches / dt,
                indices_per_s=batches * 2 * S / dt, ms_per_batch=1000 * dt / batches,
                ms_per_epoch=1000 * dt / epochs)


def seconds(fn, device, reps=1):
    """Wall seconds of reps calls of fn(), the device's queued work waited for before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return time.perf_counter() - t0


def medians(kinds, warmup, steps, device):
    """{name: median seconds} of kinds {name: fn}, called in turn: drifts (clock, load) hit all alike."""
    t = {k: [] for k in kinds}
    for _ in range(warmup + steps):
        for k, fn in kinds.items():
            t[k].append(seconds(fn, device))
    return {k: sorted(v[warmup:])[steps // 2] for k, v in t.items()}  # medians: robust to a stray slow step


def make_step(model, device, amp, fwd=None):
    """SGD as train.py builds it -> step(x, y, plain=False): x normalised (2S, 3, s, s) [B_cbs; B_rrs],
    y (2S,); Eq. 2's loss (plain: one head's cross-entropy) under autocast (amp: a dtype; None: fp32)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9,
                          **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    fwd, gen = model if fwd is None else fwd, torch.Generator(device=device)

    def step(x, y, plain=False):
        S = len(x) // 2
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            if plain:
                loss = F.cross_entropy(fwd(x), y)
            else:
                loss = ltaux.aux_loss(fwd, (x[:S], y[:S]), (x[S:], y[S:]), generator=gen)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def bench_step(args, device):
    model = ltaux.LTResNet(args.arch, args.num_classes).to(device, memory_format=torch.channels_last)
    amp_name, amp = runtime.amp_dtype(args.amp, device)
    step = make_step(model, device, amp, torch.compile(model) if args.compile else model)
    S, size = args.batch_size, args.image_size
    x4 = torch.randint(0, 256, (4 * S, 3, size, size), dtype=torch.uint8, pin_memory=device.type == "cuda")
    y4 = torch.randint(0, args.num_classes, (4 * S,))

    def feed(n, plain=False):  # n images to the device, then a step (rotations are made on the device)
        step(pipeline.to_device(x4[:n], device), y4[:n].to(device, non_blocking=True), plain)

    # method: the train.py step over [B_cbs; B_rrs] (2S); plain: a classifier step over the same 4S images
    kinds = {"method": lambda: feed(2 * S), "plain": lambda: feed(4 * S, plain=True)}
    med = medians(kinds, args.warmup, args.steps, device)
    n = 4 * S
    return dict(images_per_step=n, method_images_per_s=n / med["method"], plain_images_per_s=n / med["plain"],
                ratio=med["plain"] / med["method"], method_ms_per_step=1000 * med["method"],
                plain_ms_per_step=1000 * med["plain"], amp=amp_name)


CIFAR_COUNTS = [int(5000 * 0.01 ** (c / 9)) for c in range(10)]  # CIFAR-10-LT ratio 100: 12,406 images
CIFAR_LISTS = ("CIFAR10_LT_r100_train.txt", "CIFAR10_test.txt")  # what --cifar-data holds


def cifar_step(device, fast):
    """step(x, y) of the CIFAR recipe's ResNet-32: fast = channels_last and --amp's default; else fp32,
    contiguous (what train.py ran on a CPU before: the "before" rows)."""
    model = ltaux.LTResNet("resnet32", 10)
    model.to(device, memory_format=torch.channels_last if fast else torch.preserve_format)
    return make_step(model, device, runtime.amp_dtype(None, device)[1] if fast else None)


def bench_cifar(args, device):
    """Images/s of ResNet-32 steps: before vs fast on a fixed synthetic batch, and fast fed by MemoryBatches
    over random 32 px images of the CIFAR-10-LT profile (vs synthetic input: the pipeline's share)."""
    amp_name = runtime.amp_dtype(None, device)[0]
    labels = [c for c, n in enumerate(CIFAR_COUNTS) for _ in range(n)]
    S = args.cifar_batch_size
    sampler = ltaux.AuxBatchSampler(labels, S, 12, with_seeds=True)
    images = torch.randint(0, 256, (len(labels), 3, 32, 32), dtype=torch.uint8, device=device)
    batches = iter(pipeline.MemoryBatches(images, torch.tensor(labels, device=device), sampler))
    x0, y0 = next(batches)
    before, fast = cifar_step(device, False), cifar_step(device, True)
    x_fast = pipeline.to_device(x0, device)
    x_before = x_fast.contiguous()

    def memory():
        x, y = next(batches)
        fast(pipeline.to_device(x, device), y)
    kinds = {"before": lambda: before(x_before, y0), "fast": lambda: fast(x_fast, y0), "memory": memory}
    med = medians(kinds, args.warmup, args.cifar_steps, device)
    return dict(amp=amp_name, cpu_bf16=runtime.cpu_runs_bf16(), images_per_step=4 * S, S=S,
                **{f"{k}_images_per_s": 4 * S / t for k, t in med.items()},  # before, fast, memory
                fast_speedup=med["before"] / med["fast"], memory_vs_synthetic=med["fast"] / med["memory"])


def bench_cifar_epoch(args, device):
    """Seconds of one epoch of N 32 px JPEGs, loading included: workers + before steps vs in-memory + fast."""
    import torchvision.transforms.v2 as T2
    n, times = args.cifar_images, {}
    with tempfile.TemporaryDirectory() as tmp:
        split, labels = write_cifar_like(tmp, n)
        fixed = pipeline.build_transform(32, train=True)  # resize + centre crop; MemoryBatches adds the rest
        old = T2.Compose([fixed, T2.RandomCrop(32, padding=4), T2.RandomHorizontalFlip()])  # workers, before
        for path in ("before", "memory"):
            fast = path == "memory"
            ds = ltaux.SplitDataset(tmp, split, fixed if fast else old, read=pipeline.read_image)
            sampler = ltaux.AuxBatchSampler(ds.labels, args.cifar_batch_size, 12, with_seeds=True)
            step = cifar_step(device, fast)
            t0 = time.perf_counter()
            if fast:
                batches = pipeline.MemoryBatches(*pipeline.decode_all(ds, device), sampler)
                times["decode_once_s"] = time.perf_counter() - t0
            else:
                batches = torch.utils.data.DataLoader(ds, num_workers=args.cifar_workers,
                                                      batch_sampler=sampler, pin_memory=device.type == "cuda")

            def epoch():
                for x, y in batches:
                    x = pipeline.to_device(x, device)
                    step(x if fast else x.contiguous(), y.to(device))
            for e in range(2):  # the first warms up (worker start, allocator, cudnn); the second is timed
                sampler.set_epoch(e)
                times[f"{path}_epoch_s"] = seconds(epoch, device)
    return dict(times, images=len(labels), steps=sampler.num_batches, workers=args.cifar_workers,
                speedup=times["before_epoch_s"] / times["memory_epoch_s"])


def write_cifar_like(folder, n):
    """About n 32 px noise JPEGs (brighter with the class) of the CIFAR-10-LT class profile in folder, and
    their list: (list path, labels)."""
    counts = [max(1, round(k * n / sum(CIFAR_COUNTS))) for k in CIFAR_COUNTS]
    labels, g = [c for c, k in enumerate(counts) for _ in range(k)], torch.Generator().manual_seed(0)
    split = os.path.join(folder, "train.txt")
    with open(split, "w") as f:
        for i, y in enumerate(labels):
            x = (torch.rand(3, 32, 32, generator=g) * 200 + y * 5).to(torch.uint8)
            write_jpeg(x, os.path.join(folder, f"{i}.jpg"), quality=95)
            f.write(f"{i}.jpg {y}\n")
    return split, labels


def bench_cifar_modes(args, device):
    """train.py itself, once per step mode (STEP_MODES) on the same seed and data: --cifar-epochs of the
    cifar10_lt recipe in memory. {mode: losses per epoch, images/s (median of the epochs after the first:
    that one holds the warm-up, the capture, the compilation), what the run said of its mode}, and each
    mode's largest relative loss difference to eager's."""
    import contextlib
    import io
    import train
    modes, res = args.cifar_modes, {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.cifar_data:
            root = args.cifar_data
            split, test = (os.path.join(root, f) for f in CIFAR_LISTS)
        else:
            root, (split, _) = tmp, write_cifar_like(tmp, args.cifar_images)
            test = split
        for mode in modes:
            out, said = os.path.join(tmp, mode), io.StringIO()
            argv = ["--recipe", "cifar10_lt", "--data", root, "--split", split, "--test-split", test,
                    "--epochs", str(args.cifar_epochs), "--batch-size", str(args.cifar_batch_size),
                    "--out", out, "--device", device.type, "--workers", "0", "--print-freq", "100000"]
            with contextlib.redirect_stdout(said):
                rc = train.main(argv + STEP_MODES[mode])
            if rc != 0:
                tail = said.getvalue()[-500:]
                raise SystemExit(runtime.report(f"the {mode} run failed (exit {rc}): {tail}"))
            log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
            if len(log) < args.cifar_epochs:  # a stop signal (a timeout): train.py saved and returned 0
                raise SystemExit(runtime.report(f"the {mode} run stopped after {len(log)} of "
                                                f"{args.cifar_epochs} epochs (a stop signal): "
                                                "nothing compared"))
            rates = sorted(r["images_per_s"] for r in log[1:]) or [log[0]["images_per_s"]]
            res[mode] = dict(losses=[r["loss"] for r in log], images_per_s=rates[len(rates) // 2],
                             said=[line for line in said.getvalue().splitlines() if "--cuda-graph" in line
                                   or "--compile" in line])
    for mode, r in res.items():
        if "eager" in res:
            r["max_rel_loss_difference"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"],
                                                                                    res["eager"]["losses"]))
    return res


def loader_files(args, tmp):
    """The loader figures' files: the JPEGs of --images, each checked to decode, or 64 noise JPEGs in tmp."""
    if args.images is None:
        g, files = torch.Generator().manual_seed(0), [os.path.join(tmp, f"{i}.jpg") for i in range(64)]
        for path in files:
            x = F.interpolate(torch.rand(1, 3, 8, 8, generator=g) * 255, size=(375, 500), mode="bilinear")
            write_jpeg(x[0].round().to(torch.uint8), path, quality=90)
        return files, "64 generated noise JPEGs, 500 x 375 (no --images: photographs decode slower)"
    if not os.path.isdir(args.images):
        raise SystemExit(runtime.report(f"--images {args.images}: no such folder"))
    files = sorted(os.path.join(args.images, f) for f in os.listdir(args.images)
                   if f.lower().endswith((".jpg", ".jpeg")))
    if not files:
        raise SystemExit(runtime.report(f"--images {args.images}: holds no .jpg / .jpeg file"))
    for path in files:
        try:
            pipeline.read_image(path)
        except (OSError, ValueError, SyntaxError) as e:
            raise SystemExit(runtime.report(f"{path}: cannot read image ({type(e).__name__}: {e})"))
    return files, f"{len(files)} JPEGs in {os.path.abspath(args.images)}"


def loader_pipelines(size):
    """{name: path -> one training sample}: what a worker does per image in each pipeline."""
    import torchvision.transforms as T
    oltr = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4, 0.4),
                      T.ToTensor(), T.Normalize(pipeline.MEAN, pipeline.STD)])
    crop = pipeline.build_transform(size, train=True)

    def gpu_worker(path):  # DeviceDecodeDataset.__getitem__: bytes, header, crop draw
        data, is_jpeg, (h, w) = pipeline.read_encoded(path)
        p = crop.params(h, w)
        return data if is_jpeg else crop.apply(pipeline.read_image(path), p)

    return {"oltr": lambda f: oltr(ltaux.load_rgb(f)),  # OLTR / Decoupling, all on the CPU
            "ltaux": lambda f: crop(pipeline.read_image(f)),  # decode_jpeg, tensor crop; jitter on the device
            "gpu_worker": gpu_worker}  # --decode gpu: the worker's whole share


def linked_dataset(files, tmp, size):
    """A training SplitDataset of the files, linked into tmp as i.jpg (any file name works in a list), one
    class per image: the sampler's k = S/Z classes always exist."""
    split = os.path.join(tmp, "bench.txt")
    with open(split, "w") as f:
        for i, path in enumerate(files):
            os.symlink(os.path.abspath(path), os.path.join(tmp, f"{i}.jpg"))
            f.write(f"{i}.jpg {i}\n")
    transform = pipeline.build_transform(size, train=True)
    return ltaux.SplitDataset(tmp, split, transform, read=pipeline.read_image)


def device_decode_batch(files, tmp, size, n):
    """--decode gpu's main-process input as train.py's loader hands it over: (a DeviceDecodeDataset over
    the files, and a collated batch of n seeded items)."""
    dd = pipeline.DeviceDecodeDataset(linked_dataset(files, tmp, size), size)
    return dd, dd.collate([dd[(k % len(files), k)] for k in range(n)])


def bench_device_decode(args, device, files):
    """{name: images/s} of --decode gpu's main-process share on a batch of 2S images: decode_jpeg of the
    JPEG list alone (nvJPEG on CUDA), crop_batch alone on those images, and both as train.py runs them
    (DeviceDecodeDataset.decode). Each timed over 3 calls after one, the device waited for."""
    with tempfile.TemporaryDirectory() as tmp:
        dd, batch = device_decode_batch(files, tmp, args.loader_size, 2 * args.batch_size)
        data, params, _ = batch
        jpeg = [d for d in data if d.dim() == 1]
        decoded = iter(pipeline.decode_many(jpeg, device))
        images = [next(decoded) if d.dim() == 1 else None for d in data]  # None: not cropped on the device
        kinds = {"decode_jpeg": (lambda: pipeline.decode_many(jpeg, device), len(jpeg)),
                 "crop": (lambda: pipeline.crop_batch(images, params[:, 1:], dd.crop.size, device),
                          sum(x is not None for x in images)),
                 "decode": (lambda: dd.decode(batch, device), len(data))}
        rates = {}
        for name, (fn, k) in kinds.items():
            fn()  # warm-up
            rates[name] = 3 * k / seconds(fn, device, 3)
    return rates


def bench_loader(args, device, files, source, n=64):
    """One worker's images/s per pipeline (one thread), then the device's: to_device and --decode gpu."""
    work = loader_pipelines(args.loader_size)

    def rate(fn, k):  # images/s of fn(path) over k of the files in turn
        paths = (files[i % len(files)] for i in range(k))
        return k / seconds(lambda: fn(next(paths)), torch.device("cpu"), k)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # DataLoader workers run torch with one thread
    try:
        rate(work["oltr"], min(20, args.loader_images))  # warm-up: file cache, allocations
        rates = {k: rate(fn, args.loader_images) for k, fn in work.items()}
    finally:
        torch.set_num_threads(threads)
    x = torch.randint(0, 256, (n, 3, args.loader_size, args.loader_size), dtype=torch.uint8)
    gen = torch.Generator(device=device)
    res = dict(source=source, size=args.loader_size, target_rate=args.target_rate)
    pipeline.to_device(x, device, gen)  # warm-up
    res["device_jitter_images_per_s"] = 3 * n / seconds(lambda: pipeline.to_device(x, device, gen), device, 3)
    res.update({f"device_{k}_images_per_s": r for k, r in bench_device_decode(args, device, files).items()})
    res.update(speedup=rates["ltaux"] / rates["oltr"],
               gpu_worker_cost_ratio=rates["gpu_worker"] / rates["oltr"])
    for k, r in rates.items():
        res.update({f"{k}_images_per_s_per_worker": r, f"workers_{k}": math.ceil(args.target_rate / r)})
    return res


def bench_workers(args, device, files):
    """{decode mode: images/s} of train.py's training loader over the loader files, jittered on the device."""
    gen, rates = torch.Generator(device=device), {}
    warm = 2 * max(1, args.loader_workers)  # what the workers prefetched while starting
    with tempfile.TemporaryDirectory() as tmp:
        ds = linked_dataset(files, tmp, args.loader_size)
        for mode in ("cpu", "gpu") if device.type == "cuda" else ("cpu",):
            sampler = ltaux.AuxBatchSampler(ds.labels, args.batch_size, 4,
                                            num_batches=warm + args.loader_batches, with_seeds=True)
            loader = pipeline.training_loader(ds, sampler, device, args.loader_workers, mode,
                                              args.loader_size)
            batches = iter(loader)

            def carry():
                batch = next(batches)
                images, _ = loader.dataset.decode(batch, device) if mode == "gpu" else batch
                pipeline.to_device(images, device, gen)
            seconds(carry, device, warm)
            dt = seconds(carry, device, args.loader_batches)
            rates[mode] = args.loader_batches * 2 * args.batch_size / dt
            del batches, loader
    return rates


def check_args(parser, args):
    """Refuse a bad argument in one line; warn of too few steps; the device."""
    for name in ("steps", "batch_size", "image_size", "num_classes", "loader_images", "loader_batches",
                 "cifar_steps", "cifar_epochs"):
        if not 1 <= getattr(args, name) <= 2**20:
            parser.error(f"--{name.replace('_', '-')} must be in 1..2^20")
    for ok, msg in [  # in this order: the first one broken is the one reported
            (0 <= args.warmup <= 1000 and 0 <= args.loader_workers <= 1024
             and 0 <= args.cifar_workers <= 1024,
             "--warmup, --loader-workers and --cifar-workers must be >= 0 (and at most 1000 / 1024)"),
            (120 <= args.cifar_images <= 10**6 and args.cifar_batch_size % 12 == 0
             and 12 <= args.cifar_batch_size <= 120, "--cifar-images must be in 120..10^6 and "
             "--cifar-batch-size a multiple of Z = 12 up to 120 (k = S / Z classes must exist)"),
            (recipes.SMALL_IMAGES <= args.loader_size <= 4096, f"--loader-size must be in "
             f"{recipes.SMALL_IMAGES}..4096 (the loader figures are the ImageNet-LT recipe's pipeline)"),
            (0 < args.target_rate < math.inf, "--target-rate must be a positive number"),  # nan fails too
            (args.batch_size % 4 == 0,
             "--batch-size (S) must be a multiple of Z = 4 for the sampler figure"),
            (args.cifar_data is None
             or all(os.path.isfile(os.path.join(args.cifar_data, f)) for f in CIFAR_LISTS),
             f"--cifar-data {args.cifar_data}: needs {' and '.join(CIFAR_LISTS)} "
             "(data_lists/make_cifar_lt.py writes them)")]:
        if not ok:
            parser.error(msg)
    if args.steps < 5 or args.warmup < 2:
        print(f"warning: --steps {args.steps} --warmup {args.warmup}: too few steps for a stable ratio "
              "(use at least --steps 5 --warmup 2)", file=sys.stderr)
    try:
        device = runtime.choose_device(args.device)
    except ltaux.LTauxError as e:
        parser.error(str(e))
    if args.cifar_modes is None:
        args.cifar_modes = ["eager", "graph"] if device.type == "cuda" else []
    if args.figures is not None and "modes" in args.figures and not args.cifar_modes:  # an empty table else
        parser.error(f"--figures modes: no step mode to compare on {device.type} (--cifar-modes names none; "
                     "e.g. --cifar-modes eager graph)")
    args.figures = args.figures or [f for f in FIGURES if f != "modes" or args.cifar_modes]
    return device


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    device = check_args(parser, args)
    tmp = tempfile.TemporaryDirectory()
    if "loader" in args.figures:  # a bad --images ends the benchmark before any timing
        files, source = loader_files(args, tmp.name)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} x {torch.get_num_threads()} threads"
    res = dict(device=str(device), device_name=name, torch=torch.__version__, arch=args.arch,
               image_size=args.image_size, batch_size=args.batch_size)
    if "step" in args.figures:
        res.update(sampler=bench_sampler(args.batch_size, args.labels), step=bench_step(args, device))
        res["sampler"]["fraction_of_step"] = res["sampler"]["ms_per_batch"] / res["step"][
            "method_ms_per_step"]
    if "cifar" in args.figures:
        res["cifar"] = dict(bench_cifar(args, device), epoch=bench_cifar_epoch(args, device))
    if "modes" in args.figures:
        res["modes"] = bench_cifar_modes(args, device)
    with tmp:
        if "loader" in args.figures:
            res["loader"] = bench_loader(args, device, files, source)
            if args.loader_workers > 0:
                res["loader"]["workers"] = args.loader_workers
                res["loader"]["end_to_end_images_per_s"] = bench_workers(args, device, files)
            if "step" in res:  # a cbs_rrs_ss step decodes 2S of the 4S images it forwards
                res["loader"]["step_need_images_per_s"] = res["step"]["method_images_per_s"] / 2
    print(json.dumps(res, indent=1))
    print("\n| what | figure |\n|---|---|\n" + "".join(
        TABLES[k](res, args) for k in ("step", "cifar", "modes", "loader") if k in res).rstrip("\n"))
    return res


def step_rows(res, args):
    s, st = res["sampler"], res["step"]
    return (f"| sampler ({s['labels']}, S={s['S']}, Z={s['Z']}) | {s['batches_per_s']:.0f} batches/s, "
            f"{s['indices_per_s'] / 1e6:.2f} M indices/s, {s['ms_per_epoch']:.0f} ms per epoch, "
            f"{100 * s['fraction_of_step']:.3f}% of a step |\n"
            f"| cbs_rrs_ss step ({args.arch}, {args.image_size} px, 4S={st['images_per_step']}, "
            f"{st['amp']}, {res['device_name']}) | {st['method_images_per_s']:.0f} images/s |\n"
            f"| plain classifier step, same images | {st['plain_images_per_s']:.0f} images/s |\n"
            f"| ratio method / plain | {st['ratio']:.3f} |\n")


def cifar_rows(res, args):
    c, e = res["cifar"], res["cifar"]["epoch"]
    return (f"| CIFAR recipe: resnet32 cbs_rrs_ss step, 4S={c['images_per_step']}, fp32 contiguous, "
            f"synthetic input (before; {res['device_name']}) | {c['before_images_per_s']:.0f} images/s |\n"
            f"| same, channels_last + amp {c['amp']} (cpu bf16 native: {c['cpu_bf16']}) | "
            f"{c['fast_images_per_s']:.0f} images/s ({c['fast_speedup']:.2f}x) |\n"
            f"| same, fed by the in-memory pipeline (gather + cifar_augment + to_device) | "
            f"{c['memory_images_per_s']:.0f} images/s "
            f"(ratio to synthetic input {c['memory_vs_synthetic']:.3f}) |\n"
            f"| CIFAR-recipe epoch, {e['images']} JPEGs ({e['steps']} steps): {e['workers']} workers + fp32 "
            f"(before) | {e['before_epoch_s']:.1f} s |\n"
            f"| same epoch in memory + fast path (decoded once in {e['decode_once_s']:.1f} s) | "
            f"{e['memory_epoch_s']:.1f} s ({e['speedup']:.2f}x) |\n")


def mode_rows(res, args):
    # what a run said of its mode (--cuda-graph on a CPU: eager steps) is in its row, not in the JSON alone
    return "".join(f"| train.py cifar10_lt, {len(m['losses'])} epochs, S={args.cifar_batch_size}, step mode "
                   f"{k}{''.join(f' ({said})' for said in m['said'])} | {m['images_per_s']:.0f} images/s"
                   f"{' (its only epoch: warm-up, capture, compilation in)' * (len(m['losses']) == 1)}, "
                   f"loss per epoch {' '.join(f'{v:.4f}' for v in m['losses'])} "
                   + (f"(largest difference to eager {100 * m['max_rel_loss_difference']:.2f}%) |\n"
                      if "max_rel_loss_difference" in m else "(no eager run to compare with) |\n")
                   for k, m in res["modes"].items())


def loader_rows(res, args):
    ld = res["loader"]
    pipelines = [("oltr", "OLTR / Decoupling: PIL decode, crop, flip, ColorJitter, ToTensor, Normalize"),
                 ("ltaux", "ltaux --decode cpu: decode_jpeg, tensor crop + flip, uint8 out"),
                 ("gpu_worker", "ltaux --decode gpu, the worker's share: read bytes, header, crop draw")]
    return (f"| loader: one worker ({ld['source']}, {ld['size']} px) | images/s per worker, workers for "
            f"{ld['target_rate']:.0f} images/s |\n"
            + "".join(f"| {label} | {ld[k + '_images_per_s_per_worker']:.0f} "
                      f"({ld[k + '_images_per_s_per_worker'] / ld['oltr_images_per_s_per_worker']:.2f}x), "
                      f"{ld['workers_' + k]} workers |\n" for k, label in pipelines)
            + f"| colour jitter + normalisation on {res['device']} | "
            f"{ld['device_jitter_images_per_s']:.0f} images/s |\n"
            f"| --decode gpu, main process, 2S={2 * args.batch_size} images a batch on {res['device']}: "
            f"decode_jpeg of the JPEG list alone | {ld['device_decode_jpeg_images_per_s']:.0f} images/s |\n"
            f"| same batch, crop_batch alone (crop, resize, round, flip) | "
            f"{ld['device_crop_images_per_s']:.0f} images/s |\n"
            f"| same batch, --decode gpu's decode + crop + flip (DeviceDecodeDataset.decode, as train.py) | "
            f"{ld['device_decode_images_per_s']:.0f} images/s |\n"
            + "".join(f"| train.py's loader, {ld['workers']} workers, --decode {m}, to {res['device']} "
                      f"with jitter (2S={2 * args.batch_size}) | {r:.0f} images/s |\n"
                      for m, r in ld.get("end_to_end_images_per_s", {}).items())
            + (f"| what the cbs_rrs_ss step above decodes (2S of its 4S images) | "
               f"{ld['step_need_images_per_s']:.0f} images/s |\n" if "step_need_images_per_s" in ld else ""))


TABLES = {"step": step_rows, "cifar": cifar_rows, "modes": mode_rows, "loader": loader_rows}


if __name__ == "__main__":
    main()
