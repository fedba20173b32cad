"""The input pipeline: image files -> uint8 tensors (workers read and crop) -> normalised batches on the
training device (with the ImageNet-LT recipe's colour jitter). Three ways to feed a step, all giving a
sample the same pixels for the same (seed, epoch, position):
    training_loader            DataLoader workers (ImageNet-LT recipe; the CIFAR recipe with --in-memory off)
    DeviceDecodeDataset        --decode gpu: workers send file bytes; decode_jpeg and the crop on the GPU
    MemoryBatches              --in-memory: small images decoded once into one tensor on the device
"""

import functools
import io
import os
import signal
import tempfile
import threading
import time
import warnings

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F1
import torchvision.transforms.v2 as T2
import torchvision.transforms.v2.functional as F2
from PIL import Image

try:  # deprecated in torchvision 0.29 for TorchCodec; without it, Pillow decodes every image
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:
    ImageReadMode = decode_jpeg = None

import bookkeeping
import ltaux
import recipes
from recipes import SMALL_IMAGES

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, applied on the device


# ----------------------------------------------------------------------------------------------
# reading images: JPEGs by torchvision.io.decode_jpeg (in the workers, or on the GPU), the rest by Pillow


def read_encoded(path, max_aspect=50, raw=False):
    """An image file's bytes and header -> (data uint8 (N,), is_jpeg, (H, W)). Only the header is
    parsed (Pillow: format, size, its decompression-bomb check, and load_rgb's aspect limit). raw: the
    bytes as a bytearray (read_image hands them to Pillow without a copy)."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    try:
        img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:  # Pillow's own text names the BytesIO object, not the file
        raise Image.UnidentifiedImageError("not an image format Pillow can identify") from None
    with img:
        w, h = img.size
        if max(w, h) > max_aspect * max(1, min(w, h)):
            raise ValueError(f"aspect ratio {w}x{h} exceeds {max_aspect}:1")
        # for these modes decode_jpeg(mode=RGB) gives Pillow's convert("RGB") pixels
        is_jpeg = img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK") and decode_jpeg is not None
    return data if raw else torch.frombuffer(data, dtype=torch.uint8), is_jpeg, (h, w)


def read_image(path):
    """An image file, read once -> uint8 RGB (3, H, W). JPEGs by decode_jpeg (libjpeg-turbo: Pillow's
    pixels, bit for bit); other files, and JPEGs it rejects, by ltaux.load_rgb, whose error says why."""
    data, is_jpeg, _ = read_encoded(path, raw=True)
    if is_jpeg:
        try:
            return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # truncated or damaged: Pillow reads it again and raises an OSError that says why
    return F2.pil_to_tensor(ltaux.load_rgb(io.BytesIO(data)))


# ----------------------------------------------------------------------------------------------
# the recipes' transforms: what a worker does to one image (uint8 in, uint8 out)


def build_transform(size, train):
    """uint8 image tensor (3, H, W) -> uint8 (3, size, size), in the workers. Antialiased bilinear resizing
    on tensors: within one grey level of PIL's, and faster (docs/implementation.md). Below SMALL_IMAGES
    (the CIFAR recipe) it is fixed for training too: cifar_augment adds the random part."""
    if size >= SMALL_IMAGES:  # OLTR's ImageNet-LT recipe: RandomResizedCrop, flip (+ device ColorJitter 0.4)
        if train:
            return RandomResizedCropFlip(size)
        return T2.Compose([T2.Resize(round(size * 256 / 224), antialias=True), T2.CenterCrop(size)])
    return T2.Compose([T2.Resize(size, antialias=True), T2.CenterCrop(size)])


class RandomResizedCropFlip:
    """torchvision's RandomResizedCrop(size, scale, ratio) then RandomHorizontalFlip() on uint8 tensors, the
    draw (params: torchvision's own, from torch's global RNG) apart from the pixel work (apply): --decode
    gpu draws in the workers and applies on the device, the same crop for a seeded sample."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, scale, ratio

    def params(self, height, width):
        """(top, left, crop height, crop width, flip 0/1) for an image of height x width."""
        shape_only = torch.zeros(1).expand(1, height, width)  # get_params reads the size alone: no pixels
        top, left, h, w = T.RandomResizedCrop.get_params(shape_only, list(self.scale), list(self.ratio))
        return top, left, h, w, int(torch.rand(1) < 0.5)

    def apply(self, x, p):
        """uint8 (3, H, W) on any device + params -> uint8 (3, size, size) on that device."""
        top, left, h, w, flip = (int(v) for v in p)
        x = F2.resized_crop(x, top, left, h, w, [self.size, self.size], antialias=True)
        return x.flip(-1) if flip else x

    def __call__(self, x):
        return self.apply(x, self.params(*x.shape[-2:]))


def cifar_augment(x, seeds, pad=4):
    """The CIFAR recipe's zero pad, random crop and flip: uint8 x (B, 3, H, W), seeds (B,) int64 >= 0 uniform
    (AuxBatchSampler.epoch_seeds) -> uint8 (B, 3, H, W), a channels-last view. The crop and flip are digits
    of the seed (top, left, flip = seed mod 9, div 9 mod 9, div 81 mod 2): alone or batched, same pixels."""
    B, _, H, W = x.shape
    n, dev = 2 * pad + 1, x.device
    seeds = seeds.to(dev)
    top, left, flip = seeds % n, seeds // n % n, (seeds // (n * n) % 2).bool()  # (B,) each
    rows = top[:, None] + torch.arange(H, device=dev)  # (B, H) rows of the padded image
    cols = left[:, None] + torch.arange(W, device=dev)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))  # (B, 3, H + 2 pad, W + 2 pad)
    batch = torch.arange(B, device=dev)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # from (B, H, W, 3)


class SeededCifar(torch.utils.data.Dataset):
    """The workers' CIFAR recipe: dataset[(i, seed)] is a training SplitDataset's item i, cifar_augment-ed."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, item):
        i, seed = item
        x, y = self.dataset[i]
        return cifar_augment(x[None], torch.tensor([seed]))[0].contiguous(), y


# ----------------------------------------------------------------------------------------------
# on the device: uint8 batch -> (jittered) normalised float, channels_last


def jitter_on_device(size, train):
    """Whether training images of this size get color_jitter on the device (the ImageNet-LT recipe)."""
    return train and size >= SMALL_IMAGES


def color_jitter(x, generator=None, brightness=0.4, contrast=0.4, saturation=0.4):
    """torchvision's ColorJitter(brightness, contrast, saturation), batched: float x (B, 3, H, W) in
    [0, 255] -> float (B, 3, H, W) in [0, 255], drawn from `generator` (on x.device; default: global RNG).
    Per-image factors uniform in [1 - s, 1 + s], torchvision's tensor operations, but in a fixed order
    (torchvision draws one per image) and in float (PIL rounds to 8 bits after each operation)."""
    f = 2 * torch.rand(3, x.shape[0], 1, 1, 1, device=x.device, generator=generator) - 1
    for row, strength in zip(f, (brightness, contrast, saturation)):  # scalars: no host-to-device copy,
        row.mul_(strength).add_(1)  # which a CUDA graph (--cuda-graph) could not hold
    x = (x * f[0]).clamp_(0, 255)  # brightness: (B, 3, H, W), the one new batch; the rest in place
    mean = grey(x).mean(dim=(2, 3), keepdim=True)  # (B, 1, 1, 1)
    x.mul_(f[1]).add_((1 - f[1]) * mean).clamp_(0, 255)  # contrast
    g = grey(x)  # (B, 1, H, W)
    return x.mul_(f[2]).add_((1 - f[2]) * g).clamp_(0, 255)  # saturation


def grey(x):
    """ITU-R 601 luma: (B, 3, H, W) uint8 or float -> float (B, 1, H, W) (uint8 is not truncated), by the
    rgb_to_grayscale adjust_saturation uses (transforms.v2's sums in another order: 1-2 ulp apart)."""
    return F1.rgb_to_grayscale(x if x.is_floating_point() else x.float())


@functools.lru_cache(maxsize=None)
def mean_std(device):
    """ImageNet mean and std for uint8 pixels, made once per device (a per-step copy would sync)."""
    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) * 255 for v in (MEAN, STD))


def to_device(x, device, jitter=None):
    """uint8 images (B, 3, H, W) -> normalised float (B, 3, H, W) on the device, after color_jitter with a
    `jitter` generator; channels_last: faster on CUDA and CPUs alike (1.30-1.36x a ResNet-32 CPU step)."""
    x = x.to(device, non_blocking=True).float()
    if jitter is not None:
        x = color_jitter(x, jitter)
    mean, std = mean_std(device)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------
# feeding the step: DataLoader workers, --decode gpu, --in-memory


def ignore_stop_signals(_worker_id):
    """DataLoader workers ignore SIGINT, and SIGTERM unless the main process sends it (its terminate()), so
    the main process finishes the step and saves on a signal to the process group (Slurm, Ctrl-C). Without
    sigwaitinfo (macOS), SIGTERM keeps its default action."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # delivered to the watcher alone

    def watch():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass  # from the process group or another process: ignored
        os._exit(0)  # the main process terminates this worker

    threading.Thread(target=watch, daemon=True).start()


def training_loader(ds, sampler, device, workers, decode="cpu", size=224):
    """DataLoader workers over a training SplitDataset and an AuxBatchSampler: uint8 batches [B_cbs; B_rrs];
    with decode "gpu", file bytes and crops for loader.dataset.decode (DeviceDecodeDataset)."""
    kw = dict(num_workers=workers, pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals,
              persistent_workers=workers > 0)
    if decode == "gpu":
        ds = DeviceDecodeDataset(ds, size)
        kw["collate_fn"] = ds.collate
    elif size < SMALL_IMAGES:
        ds = SeededCifar(ds)
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, **kw)


def eval_loader(ds, batch_size, device, workers, rank=0, world_size=1):
    """DataLoader workers over this rank's shard (items rank::W, in list order) of an evaluation list."""
    shard = torch.utils.data.Subset(ds, range(rank, len(ds), world_size))
    return torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=workers,
                                       pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)


class DeviceDecodeDataset(torch.utils.data.Dataset):
    """--decode gpu, the workers' half: dataset[(i, seed)] -> (data, params (6,) int64: i, top, left, h, w,
    flip; label), data being a JPEG file's bytes (N,), any other file's finished uint8 image (3, size, size),
    the seed drawing the crop the SplitDataset's transform would. collate: (list of data, params, labels)."""

    def __init__(self, dataset, size):
        self.dataset, self.crop = dataset, RandomResizedCropFlip(size)

    def __getitem__(self, item):
        i, seed = item
        data, is_jpeg, (h, w) = self.dataset.load(i, read=read_encoded)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            p = self.crop.params(h, w)
        if not is_jpeg:  # PNG and the rest: the CPU path, here in the worker
            data = self.crop.apply(self.dataset.load(i, read=read_image), p)
        return data, torch.tensor((i,) + p), self.dataset.labels[i]

    @staticmethod
    def collate(items):
        data, params, labels = zip(*items)
        return list(data), torch.stack(params), torch.tensor(labels)

    def decode(self, batch, device):
        """A collated batch -> (uint8 images (B, 3, size, size) on the device, labels (B,)). JPEGs the
        device rejects are read on the CPU, whose LTauxError names the file and split line."""
        data, params, labels = batch
        jpeg = [b for b, d in enumerate(data) if d.dim() == 1]
        images = [None] * len(data)  # the JPEGs, decoded on the device, for crop_batch
        for b, x in zip(jpeg, decode_many([data[b] for b in jpeg], device)):
            if x is None:  # the device decoder said no: the CPU path, with its error messages
                x = self.dataset.load(int(params[b, 0]), read=read_image).to(device, non_blocking=True)
            images[b] = x
        out = crop_batch(images, params[:, 1:], self.crop.size, device)
        for b, d in enumerate(data):
            if d.dim() == 3:  # finished by the worker (PNG and the rest): its row is written last
                out[b] = d.to(device, non_blocking=True)
        return out, labels


# device types whose antialiased bilinear interpolate takes uint8: torch's fixed-point CPU kernel, the one
# the workers' resized_crop runs on x86 (AVX2, AVX-512) and ARM; CUDA's takes float only
UINT8_RESIZE = ("cpu",)


def crop_batch(images, params, size, device):
    """RandomResizedCropFlip.apply over a batch: images [uint8 (3, H_b, W_b) on `device`, or None], params
    (B, 5) int64 on the host (top, left, h, w, flip) -> uint8 (B, 3, size, size) on `device`, the rows of
    None unspecified (the caller's). Per image: a crop view and one resize into the batch (on CUDA, of
    a float copy of the crop); rounding, uint8 conversion and flip: once for the batch. No host sync:
    the params are read on the host, the rows to flip reach the device as one index tensor."""
    uint8 = device.type in UINT8_RESIZE
    dtype = torch.uint8 if uint8 else torch.float32
    out = torch.empty(len(images), 3, size, size, dtype=dtype, device=device)
    rows = params.tolist()  # one conversion of a host tensor: no sync, no tensor read per image
    for b, x in enumerate(images):
        if x is not None:
            top, left, h, w = rows[b][:4]
            x = x[None, :, top:top + h, left:left + w]  # (1, 3, h, w), a view
            # torchvision's resize (a crop already size x size: torchvision returns it as is, and so
            # does this resize)
            out[b] = torch.nn.functional.interpolate(x if uint8 else x.float(), (size, size), mode="bilinear",
                                                     align_corners=False, antialias=True)[0]
    if not uint8:  # rounded as the CPU kernel rounds its fixed point: half up; to(uint8) truncates
        out = out.clamp_(0, 255).add_(0.5).to(torch.uint8)
    flipped = params[:, 4].nonzero().flatten()  # (F,) the rows to flip, found on the host
    if device.type == "cuda":  # pinned: a copy from pageable memory may wait for the queued steps
        flipped = flipped.pin_memory()
    flipped = flipped.to(device, non_blocking=True)  # (torch.where over the batch: far slower on a CPU)
    return out.index_copy_(0, flipped, out.index_select(0, flipped).flip(-1))


def decode_many(data, device):
    """JPEG bytes [(N_i,)] -> [uint8 (3, H_i, W_i) on the device, or None where decoding failed]."""
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device) if data else []
    except RuntimeError:  # one bad image fails the whole batch
        return [None] if len(data) == 1 else [x for part in data for x in decode_many([part], device)]


DECODE_BATCH = 32  # images between two asks of decode_all's `stop`: a few ms each, so several asks a second


def decode_all(dataset, device, workers=0, batch_size=DECODE_BATCH, stop=None):
    """Every image of a SplitDataset through its (fixed) transform, once, each batch straight into one
    tensor on `device` (no second copy on the host): (uint8 (N, 3, s, s), labels (N,)). stop: asked after
    every batch; true ends decoding and returns None, and an exception it raises ends it too."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         worker_init_fn=ignore_stop_signals)
    images, done, batches = None, 0, iter(loader)
    try:
        for x, _ in batches:  # x: uint8 (b, 3, s, s)
            if images is None:
                images = torch.empty((len(dataset),) + tuple(x.shape[1:]), dtype=torch.uint8, device=device)
            images[done:done + len(x)] = x
            done += len(x)
            if stop is not None and stop():
                return None
    finally:
        del batches  # a stop or an error: the workers are shut down now, not when the traceback is freed
    return images, torch.tensor(dataset.labels, device=device)


# ----------------------------------------------------------------------------------------------
# --in-memory: whether the decoded images fit the memory there is


GiB = 2**30
MARGIN_MIN, MARGIN_FRACTION = 1 * GiB, 4  # kept free: the larger of 1 GiB and a quarter of the free memory
# for the run's activations, evaluation batches, other processes: else the first step could swap or be killed
UNKNOWN_BUDGET = 2 * GiB  # --in-memory auto where no free memory can be read (no /proc: macOS, Windows)
NO_LIMIT = 2**60  # a cgroup limit this high means none (cgroup v1 writes 2^63 rounded down to a page)
CGROUPS = (("", "memory.max", "memory.current", "inactive_file"),  # v2: the unified hierarchy
           ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))  # v1


def memory_available(device, root="/"):
    """Bytes the decoded images may take on `device`, None where unknown: its free memory (CUDA:
    mem_get_info; CPU: host_memory_free, root: where proc/ and sys/ are) less the margin above."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else host_memory_free(root)
    return None if free is None else max(0, free - max(MARGIN_MIN, free // MARGIN_FRACTION))


def host_memory_free(root="/"):
    """Bytes this process can still allocate on the host (meminfo, cgroups); None where nothing says."""
    meminfo = _fields(os.path.join(root, "proc", "meminfo"))
    found = [meminfo.get("MemAvailable", meminfo.get("MemFree")), *_cgroup_rooms(root)]
    return min((v for v in found if v is not None), default=None)


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _fields(path):
    """{key: bytes} of a file of "key: 123 kB" (/proc/meminfo) or "key 123" (memory.stat) lines."""
    fields = {}
    for line in _read(path).splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) > 1 and parts[1].isdigit():
            fields[parts[0]] = int(parts[1]) * (1024 if parts[2:] == ["kB"] else 1)
    return fields


def _cgroup_rooms(root):
    """Room under the memory limit (v2, v1) of this process's cgroup and each ancestor up to the mount's root
    (a container's own), usage less the inactive file cache, which the kernel reclaims before killing."""
    paths, rooms = {}, []
    for line in _read(os.path.join(root, "proc", "self", "cgroup")).splitlines():
        parts = line.split(":", 2)  # hierarchy-id:controllers:path; v2 is "0::/path"
        if len(parts) == 3 and (parts[:2] == ["0", ""] or "memory" in parts[1].split(",")):
            paths["memory" if parts[1] else ""] = parts[2]
    for sub, limit_file, usage_file, inactive_key in CGROUPS:
        parts = [p for p in paths.get(sub, "/").split("/") if p and p != ".."]
        for depth in range(len(parts), -1, -1):
            folder = os.path.join(root, "sys", "fs", "cgroup", sub, *parts[:depth])
            limit, usage = (_read(os.path.join(folder, f)) for f in (limit_file, usage_file))
            if not limit.isdigit() or int(limit) >= NO_LIMIT:  # "max" or absent: no limit here
                continue
            used = int(usage) if usage.isdigit() else 0
            inactive = _fields(os.path.join(folder, "memory.stat")).get(inactive_key, 0)
            rooms.append(max(0, int(limit) - max(0, used - inactive)))
    return rooms


def in_memory_plan(mode, nbytes, device, log=lambda line: None, root="/"):
    """--in-memory `mode` -> whether to decode the images (nbytes in one process) into memory. auto: when
    they fit memory_available (where unknown, UNKNOWN_BUDGET), else DataLoader workers (said through
    `log`); on: LTauxError in one line when they do not fit; off: never."""
    if mode == "off":
        return False
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")  # torchrun's processes here: on the CPU, a copy each
    copies = max(1, int(local)) if device.type == "cpu" and local.isdigit() else 1
    need, room = nbytes * copies, memory_available(device, root)
    needed = f"the decoded images need {_bytes(need)}{f' ({copies} processes)' if copies > 1 else ''}"
    if room is None:  # nothing says what is free: `on` is taken at its word, `auto` keeps to a fixed budget
        if mode == "auto" and need > UNKNOWN_BUDGET:
            log(f"in memory: no, {needed}, over {_bytes(UNKNOWN_BUDGET)} where free memory cannot be read: "
                "DataLoader workers instead")
        return mode == "on" or need <= UNKNOWN_BUDGET
    if need <= room:
        return True
    where = "this machine" if device.type == "cpu" else str(device)
    text = f"{needed}, {where} has {_bytes(room)} to spare (free memory less a safety margin)"
    if mode == "on":
        raise ltaux.LTauxError(f"--in-memory on: {text}: use --in-memory off (DataLoader workers)")
    log(f"in memory: no, {text}: DataLoader workers instead")
    return False


def _bytes(n):
    return f"{n / GiB:.2f} GiB ({n:,} bytes)"


class MemoryBatches:
    """--in-memory training batches: the DataLoader path's (gather, then cifar_augment from the seeds
    SeededCifar uses) without workers. Yields (uint8 (2S/W, 3, s, s), labels) from the sampler's epoch
    and first step (set_epoch) on."""

    def __init__(self, images, labels, sampler):
        self.images, self.labels, self.batch_sampler = images, labels, sampler

    def __iter__(self):
        s, dev = self.batch_sampler, self.images.device
        index = s.epoch_batches()[s.first:].to(dev)  # (M - first, 2S / W)
        seeds = s.epoch_seeds()[s.first:].to(dev)
        for idx, seed in zip(index, seeds):
            yield cifar_augment(self.images[idx], seed), self.labels[idx]

    def __len__(self):
        return len(self.batch_sampler)


# ----------------------------------------------------------------------------------------------
# a run's inputs: the demo's data, the lists and their images, checked before anything is written


def make_demo_data(root, classes=30, train=(500, 5), val=10, test=40, size=32):
    """Write a synthetic long-tailed dataset (PNGs + split lists) under root, whole or not at all, always the
    same; returns {split: list path}. Class c is a low-frequency colour pattern P_c = base + 0.6 * own_c
    under a random shift, brightness and strong low-frequency noise: tail classes learnable but hard. Train
    counts decay exponentially from train[0] to train[1] (groups 11/10/9); val, test: images per class."""
    (head, tail), g = train, torch.Generator().manual_seed(0)
    upsample = functools.partial(torch.nn.functional.interpolate, size=size, mode="bilinear")  # smooth
    lists = {s: os.path.join(root, f"demo_{s}.txt") for s in ("train", "val", "test")}
    if all(os.path.exists(p) for p in lists.values()):
        return lists
    if os.path.exists(root):  # never write into (or delete) a folder we did not make
        raise ltaux.LTauxError(f"{root}: exists but holds no demo lists; "
                               "remove it or pass another --demo-dir")
    base = upsample(torch.randn(1, 3, 4, 4, generator=g))
    protos = base + 0.6 * upsample(torch.randn(classes, 3, 4, 4, generator=g))
    counts = [round(head * (tail / head) ** (c / (classes - 1))) for c in range(classes)]
    with bookkeeping.atomic_folder(root) as tmp:
        for split, per_class in (("train", counts), ("val", [val] * classes), ("test", [test] * classes)):
            os.makedirs(os.path.join(tmp, split))
            with open(os.path.join(tmp, f"demo_{split}.txt"), "w") as f:
                for c, n in enumerate(per_class):
                    noise = upsample(torch.randn(n, 3, 8, 8, generator=g)) * 0.9
                    noise += torch.randn(n, 3, size, size, generator=g) * 0.2
                    x = protos[c] * (0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)) + noise
                    shifts = torch.randint(-4, 5, (n, 2), generator=g).tolist()
                    imgs = ((x.tanh() + 1) * 127.5).round().to(torch.uint8)
                    os.makedirs(os.path.join(tmp, split, f"class{c:02d}"), exist_ok=True)
                    for i in range(n):
                        rel = f"{split}/class{c:02d}/{i:04d}.png"
                        save_png(torch.roll(imgs[i], shifts[i], dims=(1, 2)), os.path.join(tmp, rel))
                        f.write(f"{rel} {c}\n")
    return lists


def save_png(x, path):
    """uint8 tensor (3, H, W) -> PNG file, with Pillow alone."""
    Image.frombytes("RGB", (x.shape[2], x.shape[1]), bytes(x.permute(1, 2, 0).flatten().tolist())).save(path)


def open_inputs(args, log, barrier=None):
    """A train.py run's lists, root and labels, checked: (train set, {"val"/"test": set}, counts (C,)). Rank
    0 writes the demo's data (`barrier` waits for it); a *_train.txt's siblings fill unset --val-split /
    --test-split; paths become absolute, as checkpoints keep them."""
    if args.data is None:
        if args.rank == 0 and not os.path.exists(os.path.join(args.demo_dir, "demo_test.txt")):
            log(f"demo: writing its synthetic dataset (30 classes, 4,876 PNGs, about 20 MB) "
                f"to {args.demo_dir} (--demo-dir), once")
            make_demo_data(args.demo_dir)
        if barrier:
            barrier()
        lists = make_demo_data(args.demo_dir)
        args.data, args.split = args.demo_dir, lists["train"]
        args.val_split, args.test_split = args.val_split or lists["val"], args.test_split or lists["test"]
    if args.split is None:
        raise ltaux.LTauxError("--split is required with --data (e.g. data_lists/ImageNet_LT_train.txt)")
    for name in ("val", "test") if args.split.endswith("_train.txt") else ():
        sibling = args.split[: -len("_train.txt")] + f"_{name}.txt"
        if getattr(args, f"{name}_split") is None and os.path.exists(sibling):
            setattr(args, f"{name}_split", sibling)
    for k in ("data", "split", "val_split", "test_split"):
        setattr(args, k, getattr(args, k) and os.path.abspath(getattr(args, k)))
    train_set = open_list(args, args.split, train=True)
    evals = {k: open_list(args, f, train=False)
             for k, f in (("val", args.val_split), ("test", args.test_split)) if f}
    check_root(train_set)
    counts = ltaux.class_counts(train_set.labels, train_set.num_classes)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        above = [(line, y) for y, line in zip(train_set.labels, train_set.lines) if y > empty[0]][:3]
        raise ltaux.LTauxError(
            f"{args.split}: classes {empty[:10]}{'...' if len(empty) > 10 else ''} have no training image "
            "(labels must be 0..C-1 without gaps); the labels above the first gap are on line"
            + "s" * (len(above) > 1) + " " + ", ".join(f"{line} (label {y})" for line, y in above)
            + ("..." if len(above) == 3 else ""))
    for ds in evals.values():
        check_label_range(ds, train_set.num_classes, f"the training list {args.split}")
    for line in describe_lists([args.split] + [d.split_file for d in evals.values()]):
        log(line)
    return train_set, evals, counts


def check_label_range(ds, num_classes, what):
    for y, line in zip(ds.labels, ds.lines):
        if y >= num_classes:
            raise ltaux.LTauxError(f"{ds.split_file}:{line}: label {y} is not a class of {what} "
                                   f"(0..{num_classes - 1})")


def open_list(args, path, train):
    if not os.path.exists(path):
        raise ltaux.LTauxError(f"{path}: split list not found (--split is a path from the current folder; "
                               "the official lists: see data_lists/README.md, then check them with: "
                               "cd data_lists && sha256sum -c SHA256SUMS --ignore-missing)")
    return ltaux.SplitDataset(args.data, path, build_transform(args.image_size, train),
                              allow_unsafe_paths=args.allow_unsafe_paths, read=read_image)


def check_root(ds, probe=8):
    if not os.path.isdir(ds.root):
        raise ltaux.LTauxError(f"--data {ds.root}: no such folder")
    shown = [os.path.join(ds.root, p) for p in ds.paths[:probe]]
    if not any(os.path.exists(p) for p in shown):
        raise ltaux.LTauxError(f"--data {ds.root}: none of the first {len(shown)} images of {ds.split_file} "
                               f"exist under it (e.g. {shown[0]}): the root is probably wrong")


def describe_lists(paths):
    """A line per official list (sha256 as in data_lists/SHA256SUMS); a warning for one only named so."""
    lines, names = [], {os.path.basename(n) for n in recipes.official_sums().values()}
    for path in paths:
        name = recipes.official_name(path)
        if name:
            lines.append(f"{path}: official {name} (sha256 ok)")
        elif os.path.basename(path) in names:
            warnings.warn(f"{path}: named like an official list, but its sha256 differs from "
                          "data_lists/SHA256SUMS")
    return lines


def check_files(datasets, stop, log, shown=20):
    """Open every listed image, calling stop() after each; report all failures at once: the first `shown`
    inline and, when there are more, all in a temporary file (--out is untouched until inputs are good)."""
    items, failures = [(ds, i) for ds in datasets for i in range(len(ds))], []
    for done, (ds, i) in enumerate(items, 1):
        try:
            ds.load(i)
        except ltaux.LTauxError as e:
            failures.append(str(e))
        if done % 5000 == 0 or done == len(items):
            log(f"check-files: {done}/{len(items)} images, {len(failures)} unreadable")
        stop()
    if not failures:
        return
    more = ""
    if len(failures) > shown:
        with tempfile.NamedTemporaryFile("w", prefix="ltaux-unreadable-", suffix=".txt", delete=False) as f:
            f.write("\n".join(failures) + "\n")
        more = f"\n  ... and {len(failures) - shown} more: all are listed in {f.name}"
    raise ltaux.LTauxError(f"{len(failures)} unreadable images:\n  " + "\n  ".join(failures[:shown]) + more)


def make_batches(train_set, evals, sampler, args, device, log, stop=None):
    """A run's training batches and {name: evaluation batches}: in memory (MemoryBatches, decoded once here
    when in_memory_plan says they fit; see --in-memory) or DataLoader workers. stop: as decode_all's."""
    images = sum(len(d) for d in [train_set, *evals.values()])
    size, per_rank = images * 3 * args.image_size ** 2, max(1, args.batch_size // args.world_size)
    if args.image_size >= SMALL_IMAGES or not in_memory_plan(args.in_memory, size, device, log):
        return (training_loader(train_set, sampler, device, args.workers, args.decode, args.image_size),
                {k: eval_loader(d, per_rank, device, args.workers, args.rank, args.world_size)
                 for k, d in evals.items()})
    t0 = time.time()
    decoded = {k: decode_all(d, device, args.workers, stop=stop)
               for k, d in dict(evals, train=train_set).items()}
    log(f"in memory: {images} images decoded once ({size / 2**20:.0f} MiB on {device}, "
        f"{time.time() - t0:.1f}s); batches gathered and augmented on {device}, no loader workers")
    train = MemoryBatches(*decoded.pop("train"), sampler)
    rank, world = args.rank, args.world_size  # evaluation: batches (views) of this rank's shard, rank::W
    return train, {k: list(zip(x[rank::world].split(per_rank), y[rank::world].split(per_rank)))
                   for k, (x, y) in decoded.items()}
