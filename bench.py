#!/usr/bin/env python
"""Benchmark the pieces of an ltaux training step; prints one JSON object and a short table.

examples:
  python bench.py                                   # CPU defaults, a few minutes on 2 cores
  python bench.py --images /imagenet/train/n01440764 --device cuda --arch resnet50 --image-size 224 \
--batch-size 64

sampler: batches/s and indices/s of AuxBatchSampler on a Places-LT-like label profile (--labels: a split
         list to use instead), and its cost per step.
step:    images/s of a cbs_rrs_ss step (all 4S images: B_cbs, B_rrs and their rotations) and of a
         plain classifier step (one head, cross-entropy, one batch of 4S images), same device, arch,
         size and precision, timed alternately after warm-up. Their ratio is the headline figure.
cifar:   the CIFAR recipe (ResNet-32, 32 px, S = 120): a step in fp32 with contiguous tensors (train.py
         before channels_last) vs the fast path (channels_last, --amp's default); the in-memory pipeline
         vs synthetic input; a whole epoch over generated 32 px JPEGs, workers + fp32 vs in memory.
loader:  images/s of one data-loader worker (one core) on JPEGs (--images: a folder of real photographs;
         without it, generated noise JPEGs of 500 x 375, which decode faster than photographs): the OLTR /
         Decoupling pipeline (PIL decode, RandomResizedCrop, flip, ColorJitter, ToTensor, Normalize)
         against ltaux's (decode_jpeg, the same crop and flip on the uint8 tensor; colour jitter and
         normalisation on the device) and against --decode gpu's worker share (file bytes, header, crop
         draw), with the workers --target-rate images/s would need; then the device's own share, timed on
         --device: colour jitter, and --decode gpu's decode + crop; last, end to end: train.py's training
         loader with --loader-workers processes over the same files, batches of 2S carried to the device
         and jittered (both --decode modes on CUDA).
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


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=recipes.HelpFormatter)
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="None: cuda when available")
    p.add_argument("--arch", default="resnet10", choices=recipes.ARCHS, help="backbone")
    p.add_argument("--image-size", type=int, default=112, help="square input size")
    p.add_argument("--batch-size", type=int, default=32, help="S: a method step forwards 4S images")
    p.add_argument("--num-classes", type=int, default=1000, help="width of the classifier heads")
    p.add_argument("--steps", type=int, default=8, help="timed steps of each kind")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each kind first")
    p.add_argument("--amp", default=None, choices=["bf16", "off"],
                   help="autocast (None: bf16 on CUDA and on CPUs that run bf16 "
                        "natively, off elsewhere)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--loader-images", type=int, default=400,
                   help="images decoded per pipeline for the loader figure")
    p.add_argument("--images", default=None, help="folder of JPEG photographs for the loader figures (None: "
                   "generated noise JPEGs, 500 x 375)")
    p.add_argument("--labels", default=None, help="split list whose labels drive the sampler figure (None: a "
                   "generated Places-LT-like profile, 62,500 images of 365 classes)")
    p.add_argument("--loader-size", type=int, default=224, help="crop size of the loader figure")
    p.add_argument("--target-rate", type=float, default=5000.0, help="decoded images/s the GPU needs (e.g. "
                   "ResNet-10 at ~10,000 images/s through the network decodes half of them)")
    p.add_argument("--loader-workers", type=int, default=min(16, os.cpu_count() or 1),
                   help="worker processes of the end-to-end loader figure (0: skip it)")
    p.add_argument("--loader-batches", type=int, default=10,
                   help="timed batches of the end-to-end loader figure")
    p.add_argument("--cifar-steps", type=int, default=4, help="timed steps of each kind in the CIFAR section")
    p.add_argument("--cifar-batch-size", type=int, default=120, help="S of the CIFAR section (Z = 12, as the "
                   "cifar10_lt recipe)")
    p.add_argument("--cifar-images", type=int, default=720, help="JPEGs of the CIFAR-recipe epoch figure "
                   "(one epoch = ceil(N / S) steps)")
    p.add_argument("--cifar-workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader workers of the epoch figure's worker path (train.py's default --workers)")
    return p


if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):
    get_args_parser().parse_args()  # prints the help and exits before torch is imported

import torch  # noqa: E402 - after the fast --help
import torch.nn.functional as F  # noqa: E402

import ltaux  # noqa: E402
import pipeline  # noqa: E402
import runtime  # noqa: E402


def sampler_labels(path):
    """The labels of a split list, or a generated Places-LT-like profile."""
    if path:
        return ltaux.read_split(path)[1], os.path.basename(path)
    rng = random.Random(0)  # 365 classes, 5..4980 images, Pareto(6) profile, 62,500 images in all
    draws = sorted((rng.paretovariate(6) for _ in range(365)), reverse=True)
    raw = [5 + (d - draws[-1]) / (draws[0] - draws[-1]) * 4975 for d in draws]
    scale = (62500 - 5 * 365) / (sum(raw) - 5 * 365)
    counts = [max(5, round(5 + (r - 5) * scale)) for r in raw]
    counts[0] += 62500 - sum(counts)
    return [c for c, n in enumerate(counts) for _ in range(n)], "generated Pareto profile"


def bench_sampler(S, path, Z=4, epochs=3):
    """AuxBatchSampler as train.py iterates it (with seeds), epochs after the first: the cycles carry over."""
    labels, source = sampler_labels(path)
    sampler = ltaux.AuxBatchSampler(labels, S, Z, with_seeds=True)
    sampler.set_epoch(0)
    sum(1 for _ in sampler)
    batches, t0 = 0, time.perf_counter()
    for e in range(1, epochs + 1):
        sampler.set_epoch(e)
        batches += sum(1 for _ in sampler)
    dt = time.perf_counter() - t0
    return dict(labels=source, images=len(labels), S=S, Z=Z, batches_per_s=batches / dt,
                indices_per_s=batches * 2 * S / dt, ms_per_batch=1000 * dt / batches,
                ms_per_epoch=1000 * dt / epochs)


def make_steps(args, device):
    model = ltaux.LTResNet(args.arch, args.num_classes).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9,
                          **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    fwd = torch.compile(model) if args.compile else model
    amp = runtime.amp_dtype(args.amp, device)[0] == "bf16"
    S, size = args.batch_size, args.image_size
    pin = device.type == "cuda"
    x2 = torch.randint(0, 256, (2 * S, 3, size, size), dtype=torch.uint8, pin_memory=pin)
    x4 = torch.randint(0, 256, (4 * S, 3, size, size), dtype=torch.uint8, pin_memory=pin)
    y2, y4 = torch.randint(0, args.num_classes, (2 * S,)), torch.randint(0, args.num_classes, (4 * S,))
    gen = torch.Generator(device=device)

    def method_step():  # the train.py step: [B_cbs; B_rrs] in, rotations made on the device
        x = pipeline.to_device(x2, device)
        y = y2.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = ltaux.aux_loss(fwd, (x[:S], y[:S]), (x[S:], y[S:]), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def plain_step():  # a standard classifier step over the same number of images
        x = pipeline.to_device(x4, device)
        y = y4.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(fwd(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return method_step, plain_step, amp


def bench_step(args, device):
    method_step, plain_step, amp = make_steps(args, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        method_step(), plain_step()
    sync()
    t = {"method": [], "plain": []}
    for _ in range(args.steps):  # alternate, so that drifts (clocks, other load) hit both alike
        for name, fn in (("method", method_step), ("plain", plain_step)):
            t0 = time.perf_counter()
            fn()
            sync()
            t[name].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in t.items()}  # medians: robust to a stray slow step
    n = 4 * args.batch_size
    return dict(images_per_step=n, method_images_per_s=n / med["method"], plain_images_per_s=n / med["plain"],
                ratio=med["plain"] / med["method"], method_ms_per_step=1000 * med["method"],
                plain_ms_per_step=1000 * med["plain"], amp="bf16" if amp else "off")


# ----------------------------------------------------------------------------------------------
# the CIFAR recipe: ResNet-32, 32 px, S = 120, Z = 12 (k = 10 classes), cbs_rrs_ss steps of 4S = 480 images


CIFAR_COUNTS = [int(5000 * 0.01 ** (c / 9)) for c in range(10)]  # CIFAR-10-LT ratio 100: 12,406 images


def cifar_model(device, fast, amp_name):
    """ResNet-32 + SGD as train.py builds them: fast = channels_last and --amp's default; else fp32,
    contiguous (what train.py ran on a CPU before: the "before" rows)."""
    model = ltaux.LTResNet("resnet32", 10).to(device)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9,
                          **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    amp = runtime.AMP_DTYPES[amp_name] if fast else None
    gen = torch.Generator(device=device)

    def step(x, y):  # x: normalised (2S, 3, 32, 32) [B_cbs; B_rrs]
        S = len(x) // 2
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss, _ = ltaux.aux_loss(model, (x[:S], y[:S]), (x[S:], y[S:]), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def normalise(x, device, fast):
    """uint8 batch -> what the step takes: train.py's to_device (fast) or the same, contiguous (before)."""
    x = pipeline.to_device(x, device)
    return x if fast else x.contiguous()


def bench_cifar(args, device):
    """Images/s of ResNet-32 cbs_rrs_ss steps (4S images, S = --cifar-batch-size): fp32 contiguous (before)
    vs the fast path (channels_last, --amp's default here), on synthetic input; and the fast path fed by the
    in-memory pipeline (pipeline.MemoryBatches over 12,406 random 32 px images of the CIFAR-10-LT profile:
    gather, cifar_augment, to_device) vs the same steps on a fixed synthetic batch (their ratio: the
    pipeline's share). Steps alternate after warm-up; medians."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    amp_name = runtime.amp_dtype(None, device)[0]
    labels = [c for c, n in enumerate(CIFAR_COUNTS) for _ in range(n)]
    S = args.cifar_batch_size
    sampler = ltaux.AuxBatchSampler(labels, S, 12, with_seeds=True)
    images = torch.randint(0, 256, (len(labels), 3, 32, 32), dtype=torch.uint8, device=device)
    batches = iter(pipeline.MemoryBatches(images, torch.tensor(labels, device=device), sampler))
    x0, y0 = next(batches)
    before, fast = cifar_model(device, False, amp_name), cifar_model(device, True, amp_name)
    x_before, x_fast = normalise(x0, device, False), normalise(x0, device, True)

    def memory():
        x, y = next(batches)
        fast(pipeline.to_device(x, device), y)
    kinds = {"before": lambda: before(x_before, y0), "fast": lambda: fast(x_fast, y0), "memory": memory}
    t = {k: [] for k in kinds}
    for i in range(args.warmup + args.cifar_steps):
        for k, fn in kinds.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= args.warmup:
                t[k].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in t.items()}
    n = 4 * S
    return dict(amp=amp_name, cpu_bf16=runtime.cpu_runs_bf16(), images_per_step=n, S=S,
                before_images_per_s=n / med["before"], fast_images_per_s=n / med["fast"],
                memory_images_per_s=n / med["memory"], fast_speedup=med["before"] / med["fast"],
                memory_vs_synthetic=med["fast"] / med["memory"])


def bench_cifar_epoch(args, device):
    """Seconds of one CIFAR-recipe epoch (ceil(N / S) cbs_rrs_ss steps, S = --cifar-batch-size) over N
    32 px JPEGs, loading included: DataLoader workers decoding and augmenting each image every epoch + fp32
    contiguous steps (before), against the in-memory path (decoded once: its one-time cost is reported
    apart) + the fast steps. The JPEGs are written to a temporary folder (CIFAR-sized noise, class of the
    profile)."""
    import torchvision.transforms.v2 as T2
    from torchvision.io import encode_jpeg
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    amp_name = runtime.amp_dtype(None, device)[0]
    n = args.cifar_images
    counts = [max(1, round(k * n / sum(CIFAR_COUNTS))) for k in CIFAR_COUNTS]  # the profile, about n images
    labels = [c for c, k in enumerate(counts) for _ in range(k)]
    g = torch.Generator().manual_seed(0)
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "train.txt"), "w") as f:
            for i, y in enumerate(labels):
                x = (torch.rand(3, 32, 32, generator=g) * 200 + y * 5).to(torch.uint8)
                with open(os.path.join(tmp, f"{i}.jpg"), "wb") as img:
                    img.write(bytes(encode_jpeg(x, quality=95).tolist()))
                f.write(f"{i}.jpg {y}\n")
        old = T2.Compose([T2.Resize(32, antialias=True), T2.CenterCrop(32), T2.RandomCrop(32, padding=4),
                          T2.RandomHorizontalFlip()])  # the workers' transform before --in-memory
        for path in ("before", "memory"):
            ds = ltaux.SplitDataset(tmp, os.path.join(tmp, "train.txt"),
                                    old if path == "before" else pipeline.build_transform(32, train=True),
                                    read=pipeline.read_image)
            sampler = ltaux.AuxBatchSampler(ds.labels, args.cifar_batch_size, 12, with_seeds=True)
            step = cifar_model(device, path == "memory", amp_name)
            t0 = time.perf_counter()
            if path == "memory":
                batches = pipeline.MemoryBatches(*pipeline.decode_all(ds, device), sampler)
                times["decode_once_s"] = time.perf_counter() - t0
            else:
                batches = torch.utils.data.DataLoader(ds, batch_sampler=sampler,
                                                      num_workers=args.cifar_workers,
                                                      pin_memory=device.type == "cuda")
            for epoch in range(2):  # the first warms up (worker start, allocator, cudnn); the second is timed
                sampler.set_epoch(epoch)
                sync()
                t0 = time.perf_counter()
                for x, y in batches:
                    step(normalise(x, device, path == "memory"), y.to(device))
                sync()
                times[f"{path}_epoch_s"] = time.perf_counter() - t0
            del batches
    return dict(times, images=len(labels), steps=sampler.num_batches, workers=args.cifar_workers,
                speedup=times["before_epoch_s"] / times["memory_epoch_s"])


def fail(msg):
    """A user error: one line, exit status 2."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def loader_files(args, tmp):
    """The loader figures' image files: the JPEGs of --images, each checked to decode (a bad one ends the
    benchmark with its name), or 64 generated noise JPEGs of 500 x 375 written to tmp."""
    if args.images is None:
        from torchvision.io import encode_jpeg
        g, files = torch.Generator().manual_seed(0), []
        for i in range(64):
            x = (torch.rand(1, 3, 8, 8, generator=g) * 255)
            x = F.interpolate(x, size=(375, 500), mode="bilinear")[0].round().to(torch.uint8)
            files.append(os.path.join(tmp, f"{i}.jpg"))
            with open(files[-1], "wb") as f:
                f.write(bytes(encode_jpeg(x, quality=90).tolist()))
        return files, "64 generated noise JPEGs, 500 x 375 (no --images: photographs decode slower)"
    if not os.path.isdir(args.images):
        fail(f"--images {args.images}: no such folder")
    files = sorted(os.path.join(args.images, f) for f in os.listdir(args.images)
                   if f.lower().endswith((".jpg", ".jpeg")))
    if not files:
        fail(f"--images {args.images}: holds no .jpg / .jpeg file")
    for path in files:
        try:
            pipeline.read_image(path)
        except (OSError, ValueError, SyntaxError) as e:
            fail(f"{path}: cannot read image ({type(e).__name__}: {e})")
    return files, f"{len(files)} JPEGs in {os.path.abspath(args.images)}"


def time_pipeline(files, work, n):
    """Images/s of work(path) in this process, one thread, as one DataLoader worker runs it."""
    done, t0 = 0, time.perf_counter()
    while done < n:
        for f in files[: n - done]:
            work(f)
            done += 1
    return done / (time.perf_counter() - t0)


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
            # decode_jpeg + tensor crop; jitter on the device
            "ltaux": lambda f: crop(pipeline.read_image(f)),
            "gpu_worker": gpu_worker}  # --decode gpu: the worker's whole share


def device_rates(files, size, device, n=64):
    """Images/s on `device` in this process: colour jitter + normalisation of a uint8 batch (train.py's
    to_device), and --decode gpu's decode + crop + flip of n real JPEGs (DeviceDecodeDataset.decode)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    gen = torch.Generator(device=device)
    crop = pipeline.RandomResizedCropFlip(size)
    encoded = [pipeline.read_encoded(files[i % len(files)]) for i in range(n)]  # (bytes, is_jpeg, (H, W))
    data = [e[0] for e in encoded]
    params = [crop.params(*e[2]) for e in encoded]

    def decode():
        for d, p, x_ in zip(data, params, pipeline.decode_many(data, device)):
            crop.apply(x_ if x_ is not None else pipeline.read_image(files[0]).to(device), p)

    rates = {}
    for name, fn in (("jitter", lambda: pipeline.to_device(x, device, gen)), ("decode", decode)):
        fn()  # warm-up
        sync()
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        sync()
        rates[name] = 3 * n / (time.perf_counter() - t0)
    return rates


def bench_loader(args, device, files, source):
    work = loader_pipelines(args.loader_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # DataLoader workers run torch with one thread
    try:
        time_pipeline(files, work["oltr"], min(20, args.loader_images))  # warm-up: file cache, allocations
        rates = {k: time_pipeline(files, fn, args.loader_images) for k, fn in work.items()}
    finally:
        torch.set_num_threads(threads)
    dev = device_rates(files, args.loader_size, device)
    res = dict(source=source, size=args.loader_size, target_rate=args.target_rate,
               device_jitter_images_per_s=dev["jitter"], device_decode_images_per_s=dev["decode"],
               speedup=rates["ltaux"] / rates["oltr"],
               gpu_worker_cost_ratio=rates["gpu_worker"] / rates["oltr"])
    for k, r in rates.items():
        res[f"{k}_images_per_s_per_worker"] = r
        res[f"workers_{k}"] = math.ceil(args.target_rate / r)
    return res


def bench_workers(args, device, files):
    """Images/s out of train.py's own training loader (AuxBatchSampler, --loader-workers processes, 2S
    images a batch) over the --images files, to the device with colour jitter, as a step receives them:
    {decode mode: images/s}, --decode cpu, and gpu too on CUDA. Timed after the prefetched batches."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen, rates = torch.Generator(device=device), {}
    warm = 2 * max(1, args.loader_workers)  # what the workers prefetched while starting
    with tempfile.TemporaryDirectory() as tmp:
        split = os.path.join(tmp, "bench.txt")
        with open(split, "w") as f:  # one class per image: the sampler's k = S/Z classes always exist
            for i, path in enumerate(files):  # links named i.jpg: any file name works in a list
                os.symlink(os.path.abspath(path), os.path.join(tmp, f"{i}.jpg"))
                f.write(f"{i}.jpg {i}\n")
        ds = ltaux.SplitDataset(tmp, split, pipeline.build_transform(args.loader_size, train=True),
                                read=pipeline.read_image)
        for mode in ("cpu", "gpu") if device.type == "cuda" else ("cpu",):
            sampler = ltaux.AuxBatchSampler(ds.labels, args.batch_size, 4,
                                            num_batches=warm + args.loader_batches, with_seeds=True)
            loader = pipeline.training_loader(ds, sampler, device, args.loader_workers, mode,
                                              args.loader_size)
            batches = iter(loader)
            for k in range(warm + args.loader_batches):
                if k == warm:
                    sync()
                    t0 = time.perf_counter()
                batch = next(batches)
                images, _ = loader.dataset.decode(batch, device) if mode == "gpu" else batch
                pipeline.to_device(images, device, gen)
            sync()
            rates[mode] = args.loader_batches * 2 * args.batch_size / (time.perf_counter() - t0)
            del batches, loader
    return rates


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "image_size", "num_classes", "loader_images", "loader_batches",
                 "cifar_steps"):
        if not 1 <= getattr(args, name) <= 2**20:
            parser.error(f"--{name.replace('_', '-')} must be in 1..2^20")
    if not (0 <= args.warmup <= 1000 and 0 <= args.loader_workers <= 1024
            and 0 <= args.cifar_workers <= 1024):
        parser.error("--warmup, --loader-workers and --cifar-workers must be >= 0 (and at most 1000 / 1024)")
    if (not 12 * 10 <= args.cifar_images <= 10**6 or args.cifar_batch_size % 12
            or not 12 <= args.cifar_batch_size <= 120):
        parser.error("--cifar-images must be in 120..10^6 and --cifar-batch-size a multiple of Z = 12 "
                     "up to 120 (k = S / Z classes must exist)")
    if not recipes.SMALL_IMAGES <= args.loader_size <= 4096:
        parser.error(f"--loader-size must be in {recipes.SMALL_IMAGES}..4096 (the loader figures are the "
                     "ImageNet-LT recipe's pipeline)")
    if not (math.isfinite(args.target_rate) and args.target_rate > 0):
        parser.error("--target-rate must be a positive number")
    if args.batch_size % 4:
        parser.error("--batch-size (S) must be a multiple of Z = 4 for the sampler figure")
    if args.steps < 5 or args.warmup < 2:
        print(f"warning: --steps {args.steps} --warmup {args.warmup}: too few steps for a stable ratio "
              "(use at least --steps 5 --warmup 2)", file=sys.stderr)
    try:
        device = runtime.choose_device(args.device)
    except ltaux.LTauxError as e:
        parser.error(str(e))
    tmp = tempfile.TemporaryDirectory()
    files, source = loader_files(args, tmp.name)  # a bad --images ends the benchmark before any timing
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} x {torch.get_num_threads()} threads"
    res = dict(device=str(device), device_name=name, torch=torch.__version__, arch=args.arch,
               image_size=args.image_size, batch_size=args.batch_size)
    res["sampler"] = bench_sampler(args.batch_size, args.labels)
    res["step"] = bench_step(args, device)
    res["sampler"]["fraction_of_step"] = res["sampler"]["ms_per_batch"] / res["step"]["method_ms_per_step"]
    res["cifar"] = bench_cifar(args, device)
    res["cifar"]["epoch"] = bench_cifar_epoch(args, device)
    with tmp:
        res["loader"] = bench_loader(args, device, files, source)
        if args.loader_workers > 0:
            res["loader"]["workers"] = args.loader_workers
            res["loader"]["end_to_end_images_per_s"] = bench_workers(args, device, files)
    print(json.dumps(res, indent=1))
    print_table(res, args)
    return res


def print_table(res, args):
    s, st, ld, name = res["sampler"], res["step"], res["loader"], res["device_name"]
    print(f"\n| what | figure |\n|---|---|\n"
          f"| sampler ({s['labels']}, S={s['S']}, Z={s['Z']}) | {s['batches_per_s']:.0f} batches/s, "
          f"{s['indices_per_s'] / 1e6:.2f} M indices/s, {s['ms_per_epoch']:.0f} ms per epoch, "
          f"{100 * s['fraction_of_step']:.3f}% of a step |\n"
          f"| cbs_rrs_ss step ({args.arch}, {args.image_size} px, 4S={st['images_per_step']}, "
          f"{st['amp']}, {name}) | {st['method_images_per_s']:.0f} images/s |\n"
          f"| plain classifier step, same images | {st['plain_images_per_s']:.0f} images/s |\n"
          f"| ratio method / plain | {st['ratio']:.3f} |\n"
          f"| loader: one worker ({ld['source']}, {ld['size']} px) | images/s per worker, workers for "
          f"{ld['target_rate']:.0f} images/s |\n"
          + "".join(f"| {label} | {ld[k + '_images_per_s_per_worker']:.0f} "
                    f"({ld[k + '_images_per_s_per_worker'] / ld['oltr_images_per_s_per_worker']:.2f}x), "
                    f"{ld['workers_' + k]} workers |\n" for k, label in LOADER_ROWS)
          + cifar_rows(res["cifar"], name)
          + f"| colour jitter + normalisation on {res['device']} | "
          f"{ld['device_jitter_images_per_s']:.0f} images/s |\n"
          f"| --decode gpu's decode + crop + flip on {res['device']} (main process) | "
          f"{ld['device_decode_images_per_s']:.0f} images/s |"
          + "".join(f"\n| train.py's loader, {ld['workers']} workers, --decode {m}, to {res['device']} "
                    f"with jitter (2S={2 * args.batch_size}) | {r:.0f} images/s |"
                    for m, r in ld.get("end_to_end_images_per_s", {}).items()))


def cifar_rows(c, name):
    e = c["epoch"]
    return (f"| CIFAR recipe: resnet32 cbs_rrs_ss step, 4S={c['images_per_step']}, fp32 contiguous, "
            f"synthetic input (before; {name}) | "
            f"{c['before_images_per_s']:.0f} images/s |\n"
            f"| same, channels_last + amp {c['amp']} (cpu bf16 native: {c['cpu_bf16']}) | "
            f"{c['fast_images_per_s']:.0f} images/s ({c['fast_speedup']:.2f}x) |\n"
            f"| same, fed by the in-memory pipeline (gather + cifar_augment + to_device) | "
            f"{c['memory_images_per_s']:.0f} images/s "
            f"(ratio to synthetic input {c['memory_vs_synthetic']:.3f}) |\n"
            f"| CIFAR-recipe epoch, {e['images']} JPEGs ({e['steps']} steps): {e['workers']} workers + fp32 "
            f"(before) | {e['before_epoch_s']:.1f} s |\n"
            f"| same epoch in memory + fast path (decoded once in {e['decode_once_s']:.1f} s) | "
            f"{e['memory_epoch_s']:.1f} s ({e['speedup']:.2f}x) |\n")


LOADER_ROWS = [("oltr", "OLTR / Decoupling: PIL decode, crop, flip, ColorJitter, ToTensor, Normalize"),
               ("ltaux", "ltaux --decode cpu: decode_jpeg, tensor crop + flip, uint8 out"),
               ("gpu_worker", "ltaux --decode gpu, the worker's share: read bytes, header, crop draw")]

if __name__ == "__main__":
    main()
