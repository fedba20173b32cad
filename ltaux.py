"""ltaux: auxiliary learning for long-tailed recognition, in one torch-only module.

Reference implementation of
    J. Zhang, L. Liu, P. Wang, C. Shen. "To Balance or Not to Balance: A Simple-yet-Effective
    Approach for Learning with Long-Tailed Distributions". arXiv:1912.04486.

The idea (Section 3.2): a network is a feature extractor phi and a classifier h. Train h only on
class-balanced mini-batches (CBS), so that it is not biased towards head classes, but train phi on
BOTH the class-balanced batch and a regular random batch (RRS), the latter through an auxiliary
head h_a, so that the head-class information that CBS throws away still shapes the features.
Section 3.3 adds a third head h_s that predicts the rotation (0/90/180/270 degrees) of every image.
The loss is Eq. 2:   L = l1 * CE(h(phi(B_cbs))) + l2 * CE(h_a(phi(B_rrs))) + l3 * CE(h_s(phi(B_rot)))
and at test time only phi and h are kept, so the deployed model is a plain classifier.

What is here, each piece usable on its own (copy what you need):
    read_split, SplitDataset       the OLTR split-list format ("relative/path label" per line)
    class_counts, shot_groups      training-set statistics and many/medium/few grouping
    AuxBatchSampler                Algorithm 1 lines 2-8: one sampler that yields [B_cbs; B_rrs]
    LTResNet                       phi (a torchvision ResNet) + heads h (.fc), h_a (.aux_fc), h_s (.rot_fc)
    rotate_batch                   the rotation pretext task (Section 3.3)
    aux_loss                       Eq. 2 with one backbone pass over the joint batch (Section 3.4)
    shot_accuracy                  overall / many / medium / few top-1 (Section 4.2)

Dependencies: torch, torchvision, Pillow. No global state, nothing happens on import.
"""

import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

__all__ = [
    "LTauxError", "read_split", "SplitDataset", "class_counts", "shot_groups", "AuxBatchSampler",
    "LTResNet", "rotate_batch", "aux_loss", "shot_accuracy",
]


class LTauxError(ValueError):
    """An error the user can cause and fix (bad split list, unreadable image, wrong checkpoint).

    The message always names the file (and line) at fault. Entry points print it on one line
    instead of a traceback. It keeps a single-string constructor so that DataLoader workers can
    re-raise it in the main process.
    """


# ----------------------------------------------------------------------------------------------
# Split lists (the format of the official ImageNet-LT / Places-LT lists released with OLTR)


def read_split(path, allow_unsafe_paths=False, return_lines=False, allow_negative=False):
    """Read a split list: one `relative/path label` per line, label an integer >= 0.

    Blank lines (trailing or not) are skipped. A path that appears twice triggers a warning (it is
    kept: some users oversample on purpose). Paths must be relative and free of `..` unless
    allow_unsafe_paths=True, so that a list cannot make a program read outside the dataset root.

    Args:
        path: the list file.
        allow_unsafe_paths: accept absolute paths and `..` components (default: False).
        return_lines: also return the 1-based line number of each entry (default: False).
        allow_negative: accept label -1 as in the open-set lists (default: False).
    Returns:
        (paths: list[str], labels: list[int]) or, with return_lines, (paths, labels, lines).
    Raises:
        LTauxError naming the file and line for a missing or empty file, a line without exactly
        two fields, a non-integer or negative label, or an unsafe path.
    """
    path = os.fspath(path)
    try:
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise LTauxError(f"{path}: split list not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LTauxError(f"{path}: cannot read split list ({e})") from None
    paths, labels, lines, seen, dups = [], [], [], {}, []
    for n, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise LTauxError(f"{path}:{n}: expected 'relative/path label', got {line.strip()!r}")
        p, lab = fields
        try:
            y = int(lab)
        except ValueError:
            raise LTauxError(f"{path}:{n}: label {lab!r} is not an integer") from None
        if y < 0 and not (allow_negative and y == -1):
            raise LTauxError(f"{path}:{n}: label {y} is negative")
        if not allow_unsafe_paths and (os.path.isabs(p) or ".." in p.replace("\\", "/").split("/")):
            raise LTauxError(f"{path}:{n}: path {p!r} is absolute or contains '..' "
                             "(lists are read relative to the dataset root; allow_unsafe_paths=True "
                             "or --allow-unsafe-paths accepts it)")
        if p in seen:
            dups.append(f"{path}:{n}: duplicate path {p!r} (first on line {seen[p]})")
        else:
            seen[p] = n
        paths.append(p)
        labels.append(y)
        lines.append(n)
    if not paths:
        raise LTauxError(f"{path}: split list is empty")
    if dups:  # one warning, however many
        more = f" (and {len(dups) - 1} more duplicate lines)" if len(dups) > 1 else ""
        warnings.warn(dups[0] + more, stacklevel=2)
    return (paths, labels, lines) if return_lines else (paths, labels)


def load_rgb(path):
    """Open an image with Pillow, decode it fully and return it in RGB.

    Greyscale, CMYK, palette and RGBA files all work (transparency is dropped). Decoding happens
    here, so a truncated file fails here and not later inside a transform.
    """
    with Image.open(path) as img:
        img.load()
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")  # palette transparency must go through RGBA first
        return img.convert("RGB")


class SplitDataset(torch.utils.data.Dataset):
    """A dataset over a split list: images under `root`, read with Pillow and converted to RGB.

    Args:
        root: dataset root; list paths are joined under it.
        split_file: the split list (see read_split).
        transform: callable applied to the PIL image (default: None, returns the PIL image).
        allow_unsafe_paths: see read_split (default: False).
    Attributes:
        paths, labels, lines: the parsed list (lines are 1-based line numbers).
        num_classes: 1 + the largest label.
    Items:
        dataset[i] -> (transform(image), label). dataset[(i, seed)] seeds torch's RNG with `seed`
        for this one sample (the caller's RNG state is restored), which makes random augmentation
        independent of the number of DataLoader workers (see AuxBatchSampler(with_seeds=True)).
    Raises:
        LTauxError naming the image path and the split line if an image is missing or unreadable.
    """

    def __init__(self, root, split_file, transform=None, allow_unsafe_paths=False):
        self.root = os.fspath(root)
        self.split_file = os.fspath(split_file)
        self.transform = transform
        self.paths, self.labels, self.lines = read_split(
            split_file, allow_unsafe_paths=allow_unsafe_paths, return_lines=True)
        self.num_classes = max(self.labels) + 1

    def __len__(self):
        return len(self.paths)

    def load(self, i):
        """The RGB PIL image of entry i; LTauxError names the file and split line on failure."""
        full = os.path.join(self.root, self.paths[i])
        try:
            return load_rgb(full)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            reason = "file not found" if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}"
            raise LTauxError(f"{self.split_file}:{self.lines[i]}: cannot read image {full} ({reason})") from None

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        img = self.load(i)
        if self.transform is not None:
            if seed is None:
                img = self.transform(img)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    img = self.transform(img)
        return img, self.labels[i]


def class_counts(labels, num_classes):
    """Training images per class: labels (N,) ints -> LongTensor (C,)."""
    return torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=num_classes)


def shot_groups(counts, many=100, few=20):
    """Many/medium/few group of each class: counts (C,) -> LongTensor (C,).

    0 = many (count > many), 2 = few (count < few), 1 = medium otherwise. The defaults are the
    convention of the OLTR and Decoupling code (385/479/136 classes on ImageNet-LT, 131/163/71 on
    Places-LT); the paper's text states >= 100 and <= 20, i.e. many=99, few=21.
    """
    counts = torch.as_tensor(counts)
    groups = torch.ones_like(counts, dtype=torch.long)
    groups[counts > many] = 0
    groups[counts < few] = 2
    return groups


# ----------------------------------------------------------------------------------------------
# Sampling (Algorithm 1, lines 2-8)


def _cyclic_stream(n, length, group, gen):
    """`length` items of range(n), read from successive random permutations of range(n).

    The stream is consumed in consecutive groups of `group` items. When group <= n, no group holds
    an item twice, including a group that straddles two permutations: the head of the new
    permutation is re-ordered (stably) so that its first items avoid the tail of the old one.
    Every permutation stays a permutation, so no item repeats before all n items were used.
    When group > n, repeats inside a group are unavoidable and the permutations are just chained.
    Returns a LongTensor (length,).
    """
    passes = max(1, -(-length // n))
    perms = torch.rand(passes, n, generator=gen).argsort(dim=1)
    if group <= n and n % group != 0 and passes > 1:
        rows = perms.tolist()
        for p in range(1, passes):
            start = p * n  # stream position of this permutation
            r = start % group  # items of the straddling group that come from the previous pass
            if r == 0:
                continue
            tail = set(rows[p - 1][n - r:])
            head = rows[p][:group - r]
            if tail.isdisjoint(head):
                continue
            need = group - r
            chosen = [x for x in rows[p] if x not in tail][:need]
            picked = set(chosen)
            rows[p] = chosen + [x for x in rows[p] if x not in picked]
        perms = torch.tensor(rows, dtype=torch.long)
    return perms.reshape(-1)[:length]


class AuxBatchSampler(torch.utils.data.Sampler):
    """Batches of dataset indices for the method (Algorithm 1 lines 2-8), one DataLoader for both.

    Each batch is the class-balanced part B_cbs followed by the random part B_rrs:
      * B_cbs (batch_size indices): k = batch_size / per_class distinct classes, per_class images
        each. Classes are drawn by cycling through a reshuffled list of the classes that have images;
        images by cycling through the reshuffled image list of their class. Sampling is strictly
        without replacement: the k classes of a batch are distinct and so are the Z images of a
        class, also where a batch straddles two passes over a list. A class with fewer than Z images
        is still drawn, and then repeats some of its images inside that draw.
      * B_rrs (batch_size indices): a fresh permutation of the whole training set per epoch, read in
        order (topped up from a second permutation to fill the last batch), so an epoch sees every
        image once.
    mode "cbs_rrs" yields [B_cbs; B_rrs], "cbs" only B_cbs, "rrs" only B_rrs.

    Batches depend only on (seed, epoch): call set_epoch(e) before iterating. Each epoch is
    generated independently, so a class's image cycle restarts each epoch. With world_size W > 1
    every rank generates the same global batch and keeps its own contiguous slice of EACH part
    (batch_size / W indices of B_cbs, then batch_size / W of B_rrs), so the union over ranks is the
    single-process batch, whatever W.

    Args:
        labels: class label of every training image, sequence of N ints.
        batch_size: S, images per part of the global batch (default: 256 in train.py).
        per_class: Z, images per class in B_cbs (default: 4).
        mode: "cbs_rrs", "cbs" or "rrs" (default: "cbs_rrs").
        seed: base seed (default: 0).
        rank, world_size: this process and the number of processes (default: 0, 1).
        num_batches: batches per epoch (default: ceil(N / S)).
        with_seeds: yield (index, sample_seed) pairs instead of indices, one seed per batch position
            drawn from (seed, epoch), for worker-independent augmentation (default: False).
    """

    MODES = ("cbs_rrs", "cbs", "rrs")

    def __init__(self, labels, batch_size, per_class=4, mode="cbs_rrs", seed=0, rank=0, world_size=1,
                 num_batches=None, with_seeds=False):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.ndim != 1 or labels.numel() == 0 or int(labels.min()) < 0:
            raise ValueError("labels must be a non-empty sequence of non-negative ints")
        if batch_size < 1 or per_class < 1:
            raise ValueError(f"batch size S={batch_size} and per-class Z={per_class} must be positive")
        if batch_size % world_size != 0:
            raise ValueError(f"batch size S={batch_size} is not divisible by the world size {world_size}")
        counts = torch.bincount(labels)
        self.classes = torch.nonzero(counts).flatten()  # classes that have at least one image
        if mode != "rrs":
            if batch_size % per_class != 0:
                raise ValueError(f"batch size S={batch_size} is not divisible by per-class Z={per_class}")
            if batch_size // per_class > len(self.classes):
                raise ValueError(f"k = S/Z = {batch_size // per_class} classes per batch, but only "
                                 f"{len(self.classes)} classes have images: lower S or raise Z")
        self.labels, self.batch_size, self.per_class, self.mode = labels, batch_size, per_class, mode
        self.seed, self.rank, self.world_size, self.with_seeds = seed, rank, world_size, with_seeds
        self.num_batches = num_batches or -(-len(labels) // batch_size)
        # images of each class, contiguous: by_class[start[c] : start[c] + counts[c]]
        self.by_class = torch.argsort(labels, stable=True)
        self.counts = counts
        self.start = torch.cumsum(counts, 0) - counts
        self.epoch, self.first = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        """Select the epoch to generate and the batch to start from (to resume mid-epoch)."""
        self.epoch, self.first = epoch, start_batch

    def _cbs(self, gen):
        """The epoch's class-balanced parts: LongTensor (num_batches, S)."""
        S, Z, M = self.batch_size, self.per_class, self.num_batches
        k = S // Z
        picks = self.classes[_cyclic_stream(len(self.classes), M * k, k, gen)]  # (M*k,) class ids
        # j-th draw of class c takes items [j*Z, (j+1)*Z) of that class's own image stream
        order = torch.argsort(picks, stable=True)
        sorted_picks = picks[order]
        n_draws = torch.bincount(picks, minlength=len(self.counts))
        first_draw = torch.cumsum(n_draws, 0) - n_draws
        draw = torch.empty_like(picks)
        draw[order] = torch.arange(len(picks)) - first_draw[sorted_picks]
        streams, offset = [], torch.zeros(len(self.counts), dtype=torch.long)
        pos = 0
        for c in torch.nonzero(n_draws).flatten().tolist():
            local = _cyclic_stream(int(self.counts[c]), int(n_draws[c]) * Z, Z, gen)
            streams.append(self.by_class[self.start[c] + local])
            offset[c] = pos
            pos += len(local)
        streams = torch.cat(streams)
        at = offset[picks, None] + draw[:, None] * Z + torch.arange(Z)  # (M*k, Z) stream positions
        return streams[at].reshape(M, S)

    def _rrs(self, gen):
        """The epoch's random parts: LongTensor (num_batches, S)."""
        need, n = self.num_batches * self.batch_size, len(self.labels)
        perms = [torch.randperm(n, generator=gen) for _ in range(-(-need // n))]
        return torch.cat(perms)[:need].reshape(self.num_batches, self.batch_size)

    def epoch_batches(self):
        """This rank's batches of the current epoch: LongTensor (num_batches, parts * S / W)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        parts = []
        if self.mode != "rrs":
            parts.append(self._cbs(gen))
        if self.mode != "cbs":
            parts.append(self._rrs(gen))
        s = self.batch_size // self.world_size
        return torch.cat([p[:, self.rank * s:(self.rank + 1) * s] for p in parts], dim=1)

    def epoch_seeds(self):
        """One augmentation seed per batch position of this rank: LongTensor like epoch_batches()."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 0x5EED)
        parts = 2 if self.mode == "cbs_rrs" else 1
        seeds = torch.randint(0, 2**62, (self.num_batches, parts, self.batch_size), generator=gen)
        s = self.batch_size // self.world_size
        return seeds[:, :, self.rank * s:(self.rank + 1) * s].reshape(self.num_batches, -1)

    def __iter__(self):
        batches = self.epoch_batches()[self.first:].tolist()
        if not self.with_seeds:
            yield from batches
            return
        seeds = self.epoch_seeds()[self.first:].tolist()
        for b, s in zip(batches, seeds):
            yield list(zip(b, s))

    def __len__(self):
        return self.num_batches - self.first


# ----------------------------------------------------------------------------------------------
# Model (Section 3.4: a ResNet phi shared by three fully-connected heads)


class CifarResNet(nn.Module):
    """ResNet-32 for 32 px images (He et al. 2016, Sec. 4.2): 3x3 stem, 3 stages of 5 BasicBlocks
    with 16/32/64 channels, global average pooling. Outputs (B, 64); `.fc` is an identity."""

    def __init__(self, blocks=5, widths=(16, 32, 64)):
        super().__init__()
        block = torchvision.models.resnet.BasicBlock
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers, inplanes = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or inplanes != w:
                down = nn.Sequential(nn.Conv2d(inplanes, w, 1, stride, bias=False), nn.BatchNorm2d(w))
            stage = [block(inplanes, w, stride, down)] + [block(w, w) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*stage))
            inplanes = w
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity()

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.avgpool(x), 1)


def build_backbone(arch):
    """A torchvision-style ResNet without its classifier: (backbone, output width)."""
    tv = torchvision.models
    if arch == "resnet10":  # the ImageNet-LT backbone of OLTR and the paper
        net = tv.resnet.ResNet(tv.resnet.BasicBlock, [1, 1, 1, 1])
    elif arch in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
        net = getattr(tv, arch)(weights=None)
    elif arch == "resnet32":
        return CifarResNet(), 64
    else:
        raise ValueError(f"unknown arch {arch!r}; choose from {LTResNet.ARCHS}")
    width = net.fc.in_features
    net.fc = nn.Identity()
    return net, width


class LTResNet(nn.Module):
    """phi = ResNet + global average pooling (+ an embed_dim-wide linear layer, paper Section 4.3),
    with the primary head h (.fc), the auxiliary RRS head h_a (.aux_fc) and the 4-way rotation
    head h_s (.rot_fc). forward(x) uses phi and h only: exactly the deployed model (Section 3.4).

    Args:
        arch: resnet10 | resnet18 | resnet34 | resnet50 | resnet101 | resnet152 | resnet32 (CIFAR)
            (default: resnet10).
        num_classes: C, width of h and h_a (default: 1000).
        embed_dim: width of the linear layer after pooling, 0 for none (default: 512).
        pretrained: path to a torchvision-format state dict for the backbone, e.g. the file
            torchvision's ResNet152_Weights.IMAGENET1K_V1 downloads; its fc.* keys are ignored
            (default: None, random initialisation).
    """

    ARCHS = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet32")

    def __init__(self, arch="resnet10", num_classes=1000, embed_dim=512, pretrained=None):
        super().__init__()
        self.arch, self.num_classes = arch, num_classes
        self.backbone, width = build_backbone(arch)
        if pretrained:
            self.load_backbone(pretrained)
        self.embed = nn.Linear(width, embed_dim) if embed_dim else nn.Identity()
        self.feat_dim = embed_dim or width
        self.fc = nn.Linear(self.feat_dim, num_classes)  # h: primary, trained on B_cbs
        self.aux_fc = nn.Linear(self.feat_dim, num_classes)  # h_a: auxiliary, trained on B_rrs
        self.rot_fc = nn.Linear(self.feat_dim, 4)  # h_s: rotation, trained on B_rot

    def load_backbone(self, path):
        """Load torchvision-format backbone weights from a local file (fc.* keys are dropped)."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise LTauxError(f"{path}: pretrained weights not found") from None
        except Exception as e:  # noqa: BLE001 - corrupt file, pickled objects, ...
            raise LTauxError(f"{path}: cannot load pretrained weights ({type(e).__name__}: {e})") from None
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        own = self.backbone.state_dict()
        wrong = [k for k in own if k not in state or state[k].shape != own[k].shape]
        wrong += [k for k in state if k not in own]
        if wrong:
            raise LTauxError(f"{path}: not {self.arch} weights ({len(wrong)} keys missing, unexpected or "
                             f"of another shape, e.g. {wrong[0]!r})")
        self.backbone.load_state_dict(state)

    def features(self, x):
        """phi: images (B, 3, H, W) -> features (B, D)."""
        return self.embed(self.backbone(x))

    def forward(self, x, splits=None):
        """Primary logits h(phi(x)): images (B, 3, H, W) -> (B, C).

        With splits = [(head_name, rows), ...] (rows summing to B), one backbone pass over x and then
        each head on its consecutive block of rows: returns a tuple of logits, e.g.
        model(x, [("fc", S), ("aux_fc", S), ("rot_fc", 2 * S)]) -> ((S, C), (S, C), (2S, 4)).
        Keeping the heads inside forward() lets DistributedDataParallel and torch.compile see them.
        """
        if splits is None:
            return self.fc(self.features(x))
        feats = torch.split(self.features(x), [rows for _, rows in splits])
        return tuple(getattr(self, name)(f) for (name, _), f in zip(splits, feats))


# ----------------------------------------------------------------------------------------------
# Rotation pretext task (Section 3.3, after Gidaris et al. 2018) and the loss (Eq. 2)


def rotate_batch(x, mode="random", generator=None):
    """Rotate square images by multiples of 90 degrees with torch.rot90.

    mode "random": every image gets one random angle (Section 3.3). Angles are balanced over the
        batch (a random permutation split into four near-equal quarters), which keeps every shape
        static: no host synchronisation, compile-friendly. Rows come out grouped by angle.
    mode "all": all four rotations of every image (Table 5), rows [x@0; x@90; x@180; x@270].

    Args:
        x: (B, C, H, W) with H == W.
        generator: torch.Generator on x.device for the "random" permutation (default: global RNG).
    Returns:
        x_rot (B', C, H, W) and y_rot (B',) long, angle = 90 * y_rot counter-clockwise
        (torch.rot90(x, k=y_rot, dims=(2, 3))); B' = B ("random") or 4B ("all").
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotation needs square images, got {tuple(x.shape[-2:])}")
    B = x.shape[0]
    if mode == "all":
        x_rot = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
        return x_rot, torch.arange(4, device=x.device).repeat_interleave(B)
    if mode != "random":
        raise ValueError(f"rotation mode must be 'random' or 'all', got {mode!r}")
    perm = torch.randperm(B, device=x.device, generator=generator)
    quarters = torch.tensor_split(x[perm], 4)  # sizes known on the host: no sync
    x_rot = torch.cat([torch.rot90(q, k, dims=(2, 3)) for k, q in enumerate(quarters)])
    y_rot = torch.cat([torch.full((len(q),), k, device=x.device, dtype=torch.long)
                       for k, q in enumerate(quarters)])
    return x_rot, y_rot


def aux_loss(model, x_cbs, y_cbs, x_rrs, y_rrs, lambdas=(0.5, 1.0, 1.0), rotation="random",
             generator=None):
    """Eq. 2: L = l1 * CE(h(phi(B_cbs)), y_cbs) + l2 * CE(h_a(phi(B_rrs)), y_rrs) + l3 * CE(h_s(phi(B_rot)), y_rot).

    One backbone pass over the concatenation [B_cbs; B_rrs; B_rot] (so BatchNorm sees the joint
    batch, Section 3.4), with B_rot = rotate_batch([B_cbs; B_rrs]) (Algorithm 1 line 9). Then h reads
    the B_cbs rows, h_a the B_rrs rows and h_s the rotated rows: the RRS loss reaches phi but not h,
    the CBS loss reaches phi but not h_a (Section 3.2).

    Baselines: when x_cbs or x_rrs is None, the other batch trains the primary head h alone with
    weight 1 (CBS-Only / RRS-Only, Section 4.3). lambdas[2] == 0 or rotation=None skips the rotated
    rows entirely.

    Args:
        model: an LTResNet, possibly wrapped by DistributedDataParallel or torch.compile (anything whose
            forward(x, splits) works like LTResNet.forward).
        x_cbs, x_rrs: images (S, 3, H, W) or None; y_cbs, y_rrs: labels (S,) long or None.
        lambdas: (l1, l2, l3) (default: (0.5, 1.0, 1.0), the paper's 0.5 : 1 : 1).
        rotation: "random" (one angle per image), "all" (four per image) or None (default: "random").
        generator: torch.Generator on the images' device for the rotation draw (default: global RNG).
    Returns:
        loss: scalar tensor; parts: dict with detached scalar tensors "cbs", "rrs", "ss" (those computed).
    """
    l1, l2, l3 = lambdas
    if x_cbs is None and x_rrs is None:
        raise ValueError("aux_loss needs at least one of x_cbs, x_rrs")
    both = x_cbs is not None and x_rrs is not None
    xs, splits, ys, weights = [], [], [], {}
    if x_cbs is not None:  # h on B_cbs (Algorithm 1 line 10)
        xs.append(x_cbs), ys.append(y_cbs), splits.append(("fc", len(x_cbs)))
        weights["cbs"] = l1 if both else 1.0
    if x_rrs is not None:  # h_a on B_rrs, or h itself for the RRS-Only baseline
        xs.append(x_rrs), ys.append(y_rrs), splits.append(("aux_fc" if both else "fc", len(x_rrs)))
        weights["rrs"] = l2 if both else 1.0
    x = torch.cat(xs) if both else xs[0]
    if rotation and l3:  # h_s on B_rot = Rotate([B_cbs; B_rrs]) (lines 9 and 11)
        x_rot, y_rot = rotate_batch(x, rotation, generator)
        ys.append(y_rot), splits.append(("rot_fc", len(x_rot)))
        weights["ss"] = l3
        x = torch.cat([x, x_rot])
    logits = model(x, splits)  # one backbone pass over the joint batch
    loss, parts = 0.0, {}
    for name, z, y in zip(weights, logits, ys):
        part = F.cross_entropy(z, y)
        loss = loss + weights[name] * part
        parts[name] = part.detach()
    return loss, parts


# ----------------------------------------------------------------------------------------------
# Evaluation (Section 4.2)


def shot_accuracy(pred, target, train_counts, many=100, few=20):
    """Top-1 accuracy overall and per many/medium/few group, in percent.

    Group accuracy is the mean per-class accuracy over the group's classes that occur in `target`
    (the OLTR protocol); an empty group reports None. `overall` is plain top-1 over all samples,
    `mean_per_class` the mean over classes that occur in `target` (they differ on unbalanced lists).

    Args:
        pred, target: predicted and true labels, (N,) long.
        train_counts: training images per class, (C,).
        many, few: group thresholds (many: count > many, few: count < few; default 100, 20).
    Returns:
        dict: overall, mean_per_class, many, medium, few (float or None), per_class (list of C floats,
        None for classes absent from target), counts (list of C test counts).
    """
    pred, target = torch.as_tensor(pred).flatten().cpu(), torch.as_tensor(target).flatten().cpu()
    train_counts = torch.as_tensor(train_counts).cpu()
    C = len(train_counts)
    if len(target) == 0:
        raise ValueError("shot_accuracy needs at least one sample")
    if int(target.max()) >= C:
        raise ValueError(f"target has class {int(target.max())} but train_counts has only {C} classes")
    n = torch.bincount(target, minlength=C).double()
    hit = torch.bincount(target[pred == target], minlength=C).double()
    present = n > 0
    acc = torch.where(present, 100.0 * hit / n.clamp(min=1), torch.zeros_like(n))
    groups = shot_groups(train_counts, many, few)
    out = {"overall": 100.0 * float(hit.sum() / n.sum()), "mean_per_class": float(acc[present].mean())}
    for g, name in enumerate(("many", "medium", "few")):
        sel = present & (groups == g)
        out[name] = float(acc[sel].mean()) if bool(sel.any()) else None
    out["per_class"] = [float(a) if p else None for a, p in zip(acc.tolist(), present.tolist())]
    out["counts"] = n.long().tolist()
    return out
