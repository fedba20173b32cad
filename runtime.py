"""Run-time pieces shared by train.py, evaluate.py and bench.py (not the method: that is ltaux.py).

Device and precision choice, image reading (decode_jpeg, Pillow for the rest) and the transforms,
--decode gpu's two halves (DeviceDecodeDataset), uint8 -> jittered, normalised float on the device,
checkpoint files (atomic writes, safe reads, weight loading with checks), prediction over a
(sharded) loader, the result table, and the one-line error report of the entry points.
"""

import functools
import io
import os
import sys

import torch
import torch.distributed as dist
import torchvision.transforms as T
import torchvision.transforms.v2 as T2
import torchvision.transforms.v2.functional as F2
from PIL import Image

try:  # deprecated in torchvision 0.29 for TorchCodec; without it, Pillow decodes every image
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:
    ImageReadMode = decode_jpeg = None

import ltaux
from ltaux import LTauxError

CKPT_FORMAT = "ltaux-checkpoint-v2"  # v2: phi ends in Linear + ReLU (embed.0.*); v1 files do not fit
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, applied on the device
SHOT_RULE = "many >= --many, few <= --few"  # in checkpoints since the groups follow the paper (Section 4.2)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def report(error):
    """Print a user error on one line (also one re-raised from a DataLoader worker); exit status 2."""
    msg = str(error).strip()
    if "Original Traceback" in msg:  # keep the worker's own message, not its traceback
        msg = msg.splitlines()[-1].replace("ltaux.LTauxError: ", "")
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return 2


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
    it does not, oneDNN emulates bf16 and a ResNet step runs about 10x slower than in fp32."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the query
        return False


def amp_dtype(amp, device):
    """--amp bf16 | fp16 | off | None -> (name, autocast dtype or None). None: bf16 on CUDA and on a CPU
    that runs bf16 natively (cpu_runs_bf16), else off."""
    amp = amp or ("bf16" if device.type == "cuda" or cpu_runs_bf16() else "off")
    return amp, AMP_DTYPES[amp]


def build_transform(size, train):
    """uint8 image tensor (3, H, W) -> uint8 (3, size, size), as DataLoader workers run it. What needs no
    worker runs later, batched, on the device (to_device): float conversion, the ImageNet-LT recipe's
    ColorJitter (color_jitter), normalisation. Resizing is torchvision's antialiased bilinear on tensors
    (within one grey level of PIL's, and faster: README "Input pipeline").
    Below 64 px (the CIFAR recipe) the transform is the fixed resize + centre crop alone, for training
    too: the random pad-4 crop and flip come from each sample's seed (cifar_augment), batched."""
    if size >= 64:  # the ImageNet-LT recipe of OLTR: RandomResizedCrop, flip (+ ColorJitter 0.4 on the device)
        if train:
            return RandomResizedCropFlip(size)
        return T2.Compose([T2.Resize(round(size * 256 / 224), antialias=True), T2.CenterCrop(size)])
    return T2.Compose([T2.Resize(size, antialias=True), T2.CenterCrop(size)])


def cifar_augment(x, seeds, pad=4):
    """The CIFAR recipe's augmentation (pad 4 with zeros, random crop back to H x W, random horizontal
    flip), batched, on any device, drawn from each sample's seed: the crop offsets and the flip are
    digits of the seed (top = seed mod 9, left = seed div 9 mod 9, flip = seed div 81 mod 2), so a
    sample gets the same pixels alone in a DataLoader worker or in a batch on the GPU.

    Args:
        x: uint8 images (B, 3, H, W).
        seeds: (B,) int64 >= 0, uniformly random (AuxBatchSampler.epoch_seeds).
        pad: zero padding on each side (default: 4).
    Returns:
        uint8 images (B, 3, H, W) (a strided view in channels-last order).
    """
    B, _, H, W = x.shape
    n, dev = 2 * pad + 1, x.device
    seeds = seeds.to(dev)
    top, left, flip = seeds % n, seeds // n % n, (seeds // (n * n) % 2).bool()  # (B,) each
    rows = top[:, None] + torch.arange(H, device=dev)  # (B, H) rows of the padded image
    cols = left[:, None] + torch.arange(W, device=dev)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))  # (B, 3, H + 2 pad, W + 2 pad)
    out = padded[torch.arange(B, device=dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, 3)
    return out.permute(0, 3, 1, 2)


class SeededCifar(torch.utils.data.Dataset):
    """A training SplitDataset (fixed transform: build_transform(size < 64)) whose items dataset[(i, seed)]
    get cifar_augment with that seed: what a DataLoader worker runs on the CIFAR recipe's path."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        i, seed = item
        x, y = self.dataset[i]
        return cifar_augment(x[None], torch.tensor([seed]))[0].contiguous(), y


def decode_all(dataset, device, workers=0, batch_size=256):
    """Every image of a SplitDataset through its (fixed) transform, once: (uint8 (N, 3, s, s), labels (N,)),
    both on `device`. Errors name the file and split line as in training."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    images = torch.cat([x for x, _ in loader]) if len(dataset) else torch.empty(0, 3, 1, 1, dtype=torch.uint8)
    return images.to(device), torch.tensor(dataset.labels, device=device)


class MemoryBatches:
    """The training batches of a small dataset held in memory (--in-memory): the sampler's [B_cbs; B_rrs]
    indices of each step gather the images from one uint8 tensor on the device, then cifar_augment draws
    from the same per-sample seeds as a worker (SeededCifar) would: the same uint8 batches as the
    DataLoader path, without worker processes. Iterating yields (uint8 (2S/W, 3, s, s), labels) per step
    from the sampler's epoch and first step (set_epoch)."""

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


class MemoryEval:
    """An evaluation list held in memory: batches (uint8 images, labels) of this rank's shard (rank::W),
    in list order, for predict()."""

    def __init__(self, images, labels, batch_size, rank=0, world_size=1):
        self.images, self.labels = images[rank::world_size], labels[rank::world_size]
        self.batch_size = batch_size

    def __iter__(self):
        for i in range(0, len(self.images), self.batch_size):
            yield self.images[i:i + self.batch_size], self.labels[i:i + self.batch_size]

    def __len__(self):
        return -(-len(self.images) // self.batch_size)


class RandomResizedCropFlip:
    """torchvision's RandomResizedCrop(size) then RandomHorizontalFlip() on uint8 tensors, with the random
    draw (params) apart from the pixel work (apply): --decode gpu draws in the workers and applies on
    the device. The draws are torchvision's own (get_params, then torch.rand(1) < 0.5), from torch's
    global RNG, so that a seeded sample gives the same crop whichever half runs it.

    Args:
        size: output side (default: none, required).
        scale: range of the crop's area, a fraction of the image's (default: (0.08, 1.0)).
        ratio: range of the crop's aspect ratio (default: (3/4, 4/3)).
    """

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


# ----------------------------------------------------------------------------------------------
# reading images: JPEGs by torchvision.io.decode_jpeg, in the workers or (--decode gpu) on the device


JPEG_MODES = ("RGB", "L", "CMYK")  # decode_jpeg(mode=RGB) gives Pillow's convert("RGB") pixels for these


def read_encoded(path, max_aspect=50):
    """An image file's bytes and header -> (data uint8 (N,), is_jpeg, (H, W)). Only the header is
    parsed (Pillow: format, size, its decompression-bomb check, and load_rgb's aspect limit)."""
    data, is_jpeg, size = _read_header(path, max_aspect)
    return torch.frombuffer(data, dtype=torch.uint8), is_jpeg, size


def _read_header(path, max_aspect=50):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
        if max(w, h) > max_aspect * max(1, min(w, h)):
            raise ValueError(f"aspect ratio {w}x{h} exceeds {max_aspect}:1")
        is_jpeg = img.format == "JPEG" and img.mode in JPEG_MODES and decode_jpeg is not None
    return data, is_jpeg, (h, w)


def read_image(path):
    """An image file -> uint8 RGB (3, H, W). JPEGs are decoded by torchvision.io.decode_jpeg
    (libjpeg-turbo: Pillow's pixels, bit for bit); other files, and JPEGs it rejects, by Pillow
    (ltaux.load_rgb), whose error then names what is wrong. The file is read once."""
    data, is_jpeg, _ = _read_header(path)
    if is_jpeg:
        try:
            return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # truncated or damaged: Pillow reads it again and raises an OSError that says why
    return F2.pil_to_tensor(ltaux.load_rgb(io.BytesIO(data)))


class DeviceDecodeDataset(torch.utils.data.Dataset):
    """--decode gpu, the workers' half: a training SplitDataset's items as file bytes plus the crop to
    apply after decoding, so that workers only read files and draw random numbers.

    Args:
        dataset: ltaux.SplitDataset of the training list (its labels, lines and error messages).
        size: crop size of RandomResizedCropFlip.
    Items:
        dataset[(i, seed)] -> (data, params (6,) int64: i, top, left, h, w, flip; label). data is the
        JPEG file's bytes (N,), or, for any other file, the finished uint8 image (3, size, size). The
        seed gives the crop that SplitDataset's transform would draw for (i, seed).
    Batches (collate): (list of data, params (B, 6), labels (B,)); decode() finishes them on the device.
    """

    def __init__(self, dataset, size):
        self.dataset, self.crop = dataset, RandomResizedCropFlip(size)

    def __len__(self):
        return len(self.dataset)

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
        """A collated batch -> (uint8 images (B, 3, size, size) on the device, labels (B,)). JPEGs are
        decoded together by decode_jpeg(device=...); one the device decoder rejects is read on the CPU
        (read_image); one that fails there too raises LTauxError naming its file and split line."""
        data, params, labels = batch
        rows = params.tolist()  # one conversion, not two tensor reads per image
        out = torch.empty(len(data), 3, self.crop.size, self.crop.size, dtype=torch.uint8, device=device)
        jpeg = [b for b, d in enumerate(data) if d.dim() == 1]
        for b, x in zip(jpeg, decode_many([data[b] for b in jpeg], device)):
            if x is None:  # the device decoder said no: the CPU path, with its error messages
                x = self.dataset.load(rows[b][0], read=read_image)
            out[b] = self.crop.apply(x.to(device, non_blocking=True), rows[b][1:])
        for b, d in enumerate(data):
            if d.dim() == 3:
                out[b] = d.to(device, non_blocking=True)
        return out, labels


def decode_many(data, device):
    """JPEG bytes [(N_i,)] -> [uint8 (3, H_i, W_i) on the device, or None where decoding failed]: one
    batched decode_jpeg call, or one call per image when the batch fails."""
    if not data:
        return []
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    out = []
    for d in data:
        try:
            out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out.append(None)
    return out


def jitter_on_device(size, train):
    """Whether training images of this size get color_jitter on the device (the ImageNet-LT recipe)."""
    return train and size >= 64


def color_jitter(x, generator=None, brightness=0.4, contrast=0.4, saturation=0.4):
    """torchvision's ColorJitter(brightness, contrast, saturation), batched on the images' device.

    Every image draws its own factors, uniform in [1 - s, 1 + s] for each strength s, as ColorJitter
    does; each operation is torchvision's tensor version (adjust_brightness: scale; adjust_contrast:
    blend with the image's mean grey; adjust_saturation: blend with its grey image; grey = ITU-R 601
    luma), clamped to [0, 255] after each. Differences: the operations run in a fixed order
    (brightness, contrast, saturation), where torchvision draws a random order per image, and in float,
    where PIL rounds to 8 bits after each operation.

    Args:
        x: float images (B, 3, H, W) with values in [0, 255].
        generator: torch.Generator on x.device (default: the global RNG).
    Returns:
        float images (B, 3, H, W) in [0, 255].
    """
    strength = torch.tensor([brightness, contrast, saturation], device=x.device).view(3, 1, 1, 1, 1)
    f = 1 + strength * (2 * torch.rand(3, x.shape[0], 1, 1, 1, device=x.device, generator=generator) - 1)
    x = (x * f[0]).clamp_(0, 255)  # brightness: (B, 3, H, W), the one new batch; the rest in place
    mean = grey(x).mean(dim=(2, 3), keepdim=True)  # (B, 1, 1, 1)
    x.mul_(f[1]).add_((1 - f[1]) * mean).clamp_(0, 255)  # contrast
    g = grey(x)  # (B, 1, H, W)
    return x.mul_(f[2]).add_((1 - f[2]) * g).clamp_(0, 255)  # saturation


def grey(x):
    """ITU-R 601 luma of RGB images: (B, 3, H, W) -> (B, 1, H, W), as torchvision's rgb_to_grayscale."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


@functools.lru_cache(maxsize=None)
def mean_std(device):
    """ImageNet mean and std for uint8 pixels, made once per device (a per-step copy would sync)."""
    return (torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255)


def to_device(x, device, jitter=None):
    """uint8 images (B, 3, H, W) -> normalised float (B, 3, H, W) on the device, channels_last (faster for
    these ResNets on CUDA and on CPUs alike: 1.15-1.2x for a CPU training step, bench.py).
    With jitter = a torch.Generator on the device, color_jitter first (training, ImageNet-LT recipe)."""
    x = x.to(device, non_blocking=True).float()
    if jitter is not None:
        x = color_jitter(x, jitter)
    mean, std = mean_std(device)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def check_label_range(ds, num_classes, what):
    """Every label of an evaluation list must be a class 0..C-1 of `what`. Raises LTauxError."""
    for y, line in zip(ds.labels, ds.lines):
        if y >= num_classes:
            raise LTauxError(f"{ds.split_file}:{line}: label {y} is not a class of {what} (0..{num_classes - 1})")


# ----------------------------------------------------------------------------------------------
# checkpoints


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, fsync, rename: a kill at any moment
    leaves either the old file or the new one, never a truncated one."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def first_non_finite(state):
    """The name of the first floating tensor of a state dict holding nan or inf, or None (one host sync)."""
    names = [k for k, v in state.items() if torch.is_floating_point(v)]
    if not names:
        return None
    ok = torch.stack([state[k].isfinite().all() for k in names]).cpu()
    return None if bool(ok.all()) else names[int((~ok).nonzero()[0])]


CKPT_KEYS = {"args": dict, "model": dict, "optimizer": dict, "scaler": dict, "train_counts": torch.Tensor,
             "epoch": int, "step_in_epoch": int, "global_step": int, "best_acc": float, "rng_cpu": torch.Tensor}


def load_checkpoint(path):
    """Load an ltaux checkpoint safely (weights_only=True: a file carrying pickled code is refused)
    and check that it holds what train.py writes. Raises LTauxError naming the file."""
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
    bad = [k for k, t in CKPT_KEYS.items() if not isinstance(ckpt.get(k), t)]
    run = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    if not bad and (run.get("arch") not in ltaux.LTResNet.ARCHS or not isinstance(ckpt["model"].get("fc.weight"),
                                                                                    torch.Tensor)):
        bad = ["args.arch" if run.get("arch") not in ltaux.LTResNet.ARCHS else "model.fc.weight"]
    if bad:
        raise LTauxError(f"{path}: damaged ltaux checkpoint ({bad[0]} missing or of the wrong type)")
    bad = first_non_finite({k: v for k, v in ckpt["model"].items() if isinstance(v, torch.Tensor)})
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


@torch.inference_mode()
def predict(model, loader, device, amp=None, world_size=1, features=False):
    """Predictions and labels of a (sharded) evaluation loader, gathered in list order: (N,), (N,).
    With features=True also returns phi's features (N, D) (single process only)."""
    model.eval()
    preds, targets, feats = [], [], []
    for images, labels in loader:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            f = model.features(to_device(images, device))  # (B, D)
            logits = model.fc(f)  # (B, C): phi and h, the deployed model
        preds.append(logits.argmax(1))
        targets.append(labels.to(device))
        if features:
            feats.append(f.float().cpu())
    pred, target = torch.cat(preds), torch.cat(targets)
    if world_size > 1:
        pred, target = gather_interleaved(pred, target, world_size)
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
