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

Glossary (the paper's letters, used in every docstring and shape comment below):
    N   training images            C   classes               M   iterations (steps) per epoch, ceil(N / S)
    S   images per sampler part    Z   images per class in B_cbs (4)     k = S / Z   classes in B_cbs
    W   processes (GPUs); each holds S / W images of every part of the global batch

In the order of the paper, each piece usable on its own (copy what you need):
    AuxBatchSampler                Algorithm 1 lines 2-8: one sampler that yields [B_cbs; B_rrs]
    LTResNet                       phi and the heads h, h_a, h_s; forward(x, splits) is the head protocol
    rotate_batch, aux_loss         Algorithm 1 line 9 and Eq. 2 (lines 10-11), one backbone pass
    rotation_augment               Table 5's baseline: rotations as plain augmentation
    class_counts, shot_groups, shot_accuracy    Section 4.2: overall / many / medium / few top-1
    read_split, SplitDataset       the OLTR split-list format ("relative/path label" per line)

Dependencies: torch, torchvision, Pillow. No global state, nothing happens on import.
"""

import hashlib
import os
import re
import stat
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

__all__ = [
    "AuxBatchSampler", "LTResNet", "rotate_batch", "aux_loss", "rotation_augment", "class_counts",
    "shot_groups", "shot_accuracy", "LTauxError", "read_split", "SplitDataset",
]


# ----------------------------------------------------------------------------------------------
# Algorithm 1, lines 2-8: the class-balanced batch B_cbs and the random batch B_rrs


class AuxBatchSampler(torch.utils.data.Sampler):
    """Batches of dataset indices [B_cbs; B_rrs] for one DataLoader (Algorithm 1, lines 2-8).

      * B_cbs, S indices: k = S / Z distinct classes, Z images each, laid out class by class
        (rows [c1 x Z, c2 x Z, ...]). Line 2: classes come from a cycle through a reshuffled list of the
        classes that have images; line 5: each class's images from a cycle through its reshuffled image list.
        Both cycles run over the whole training run, not per epoch (the algorithm has no epochs), so over any
        number of epochs every image of a class is drawn equally often, +-1. Strictly without replacement:
        the k classes of a batch are distinct and so are the Z images of a class, also where a batch straddles
        two passes over a list. A class with fewer than Z images is still drawn, repeating some in that draw.
      * B_rrs, S indices (line 8): a fresh permutation of the training set per epoch, read in order
        (topped up from a second permutation to fill the last batch): an epoch sees every image once.
    mode "cbs_rrs" yields [B_cbs; B_rrs] (2S indices), "cbs" only B_cbs, "rrs" only B_rrs.

    Batches depend only on (seed, epoch): set_epoch(e) alone reproduces epoch e (the cycles are replayed to
    its start once, then carried on). With W > 1 processes every rank generates the same global batch and
    keeps its slice of EACH part (S / W indices of B_cbs, then of B_rrs): their union is the W = 1 batch.

    Args:
        labels: class label of every training image, N ints; batch_size: S (train.py: 256).
        per_class: Z (default: 4, Section 4.4); mode, seed, rank, world_size: as above (default: "cbs_rrs",
            0, 0, 1), seed being the base of every random draw; num_batches: M (default: ceil(N / S)).
        with_seeds: yield (index, sample_seed) pairs, one seed per batch position drawn from (seed, epoch),
            so that augmentation does not depend on the number of DataLoader workers (default: False).
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
        self.rank_cols = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        self.num_batches = num_batches or -(-len(labels) // batch_size)
        self.by_class = torch.argsort(labels, stable=True)  # class c: by_class[start[c]:start[c] + counts[c]]
        self.counts, self.start = counts, torch.cumsum(counts, 0) - counts
        self.epoch, self.first = 0, 0
        self._cycles = None  # [epoch whose start they are at, class cycle, {class: image cycle}]
        self._global = (None, None)  # (epoch, its global batches): epoch_batches() is called repeatedly

    @staticmethod
    def derive_seed(*keys):
        """One seed per use of the base seed, e.g. derive_seed(seed, "rrs", epoch): independent random
        streams that do not depend on how many other draws came before (stable across runs: blake2b)."""
        digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1  # 63 bits: valid for CPU and CUDA generators

    class Cycle:
        """An endless stream over range(n) from successive random permutations, taken in groups of `group`
        items, without replacement as B_cbs above: a new permutation's head is stably re-ordered to avoid
        the open group that straddles it (when group <= n)."""

        def __init__(self, n, group, seed):
            self.n, self.group, self.gen = n, group, torch.Generator().manual_seed(seed)
            self.perm, self.pos = [], 0

        def take(self, count):
            """The next `count` items (a whole number of groups): list of ints."""
            out = []
            while len(out) < count:
                if self.pos == len(self.perm):
                    self.perm, self.pos = self._fresh(out[len(out) - len(out) % self.group:]), 0
                step = min(count - len(out), len(self.perm) - self.pos)
                out += self.perm[self.pos:self.pos + step]
                self.pos += step
            return out

        def _fresh(self, open_group):
            perm = torch.randperm(self.n, generator=self.gen).tolist()
            if open_group and self.group <= self.n:  # the first items not in the open group go first
                taken = set(open_group)
                head = set([p for p in perm if p not in taken][:self.group - len(open_group)])
                perm.sort(key=lambda p: p not in head)  # stable: each side keeps its order
            return perm

    def set_epoch(self, epoch, start_batch=0):
        """Select the epoch to generate and the batch to start from (to resume mid-epoch)."""
        self.epoch, self.first = epoch, start_batch

    def _cbs(self, epoch):
        """The class-balanced parts of `epoch`: LongTensor (M, S). The cycles carry on from the epoch
        generated last, or are replayed from epoch 0."""
        S, Z, M = self.batch_size, self.per_class, self.num_batches
        if self._cycles is None or self._cycles[0] > epoch:
            class_cycle = self.Cycle(len(self.classes), S // Z, self.derive_seed(self.seed, "classes"))
            self._cycles = [0, class_cycle, {}]
        for _ in range(self._cycles[0], epoch + 1):  # replays the epochs before `epoch`, if any
            _, class_cycle, cycles = self._cycles
            picks = self.classes[class_cycle.take(M * S // Z)]  # line 2: (M * k,), k distinct per batch
            draws = torch.bincount(picks, minlength=len(self.counts))
            local = []  # line 5: each class's next Z-image groups, in class order, then draw order
            for c in torch.nonzero(draws).flatten().tolist():
                if c not in cycles:
                    cycles[c] = self.Cycle(int(self.counts[c]), Z, self.derive_seed(self.seed, "images", c))
                local += cycles[c].take(int(draws[c]) * Z)
            images = self.by_class[torch.tensor(local) + self.start.repeat_interleave(draws * Z)]  # (M * S,)
            self._cycles[0] += 1
        out = torch.empty(len(picks), Z, dtype=torch.long)
        out[torch.argsort(picks, stable=True)] = images.view(-1, Z)  # back to batch order
        return out.view(M, S)

    def _rrs(self, epoch):
        """One epoch of random parts (line 8): LongTensor (M, S)."""
        gen = torch.Generator().manual_seed(self.derive_seed(self.seed, "rrs", epoch))
        need, n = self.num_batches * self.batch_size, len(self.labels)
        perms = [torch.randperm(n, generator=gen) for _ in range(-(-need // n))]
        return torch.cat(perms)[:need].view(self.num_batches, self.batch_size)

    def epoch_batches(self):
        """This rank's batches of the current epoch: LongTensor (M, parts * S / W)."""
        if self._global[0] != self.epoch:
            parts = [self._cbs(self.epoch)] if self.mode != "rrs" else []
            if self.mode != "cbs":
                parts.append(self._rrs(self.epoch))
            self._global = (self.epoch, parts)
        return torch.cat([p[:, self.rank_cols] for p in self._global[1]], dim=1)

    def epoch_seeds(self):
        """One augmentation seed per batch position of this rank: LongTensor like epoch_batches()."""
        gen = torch.Generator().manual_seed(self.derive_seed(self.seed, "augment", self.epoch))
        parts = 2 if self.mode == "cbs_rrs" else 1
        seeds = torch.randint(0, 2**62, (self.num_batches, parts, self.batch_size), generator=gen)
        return seeds[:, :, self.rank_cols].reshape(self.num_batches, -1)

    def __iter__(self):
        batches = self.epoch_batches()[self.first:].tolist()
        if self.with_seeds:
            batches = (list(zip(b, s)) for b, s in zip(batches, self.epoch_seeds()[self.first:].tolist()))
        yield from batches

    def __len__(self):
        return self.num_batches - self.first


# ----------------------------------------------------------------------------------------------
# The model (Sections 3.4 and 4.3): a ResNet phi shared by three fully-connected heads


class CifarResNet(nn.Module):
    """ResNet-32 for 32 px images (He et al. 2016, Sec. 4.2): 3x3 stem, 3 stages of 5 BasicBlocks
    with 16/32/64 channels, global average pooling. Images (B, 3, H, W) -> features (B, 64)."""

    def __init__(self, blocks=5, widths=(16, 32, 64)):
        super().__init__()
        block = torchvision.models.resnet.BasicBlock
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers = []
        for i, (inplanes, w) in enumerate(zip(widths[:1] + widths[:-1], widths)):  # stage i: inplanes -> w
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or inplanes != w:
                down = nn.Sequential(nn.Conv2d(inplanes, w, 1, stride, bias=False), nn.BatchNorm2d(w))
            stage = [block(inplanes, w, stride, down)] + [block(w, w) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.avgpool(x), 1)


class LTResNet(nn.Module):
    """phi = ResNet + global average pooling + (embed_dim > 0) Linear(width, embed_dim) + ReLU, the
    feature extractor of OLTR [19] that Section 4.3 adopts; then the primary head h (.fc), the
    auxiliary RRS head h_a (.aux_fc) and the 4-way rotation head h_s (.rot_fc), each one nn.Linear.
    forward(x) uses phi and h only: exactly the deployed model (Section 3.4).

    Args:
        arch: one of ARCHS, resnet32 being the CIFAR one (default: resnet10); num_classes: C (default: 1000).
        embed_dim: width of the Linear + ReLU after pooling, 0 for none (default: None = 512 for the
            ImageNet ResNets, as OLTR; 0 for resnet32, better on CIFAR-10-LT: docs/implementation.md).
        pretrained: a torchvision-format state dict file for the backbone, e.g. what torchvision's
            ResNet152_Weights.IMAGENET1K_V1 downloads; fc.* keys are ignored (default: None, random init).
    """

    ARCHS = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet32")

    def __init__(self, arch="resnet10", num_classes=1000, embed_dim=None, pretrained=None):
        super().__init__()
        if arch not in self.ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose from {self.ARCHS}")
        self.arch, self.num_classes = arch, num_classes
        self.embed_dim = (0 if arch == "resnet32" else 512) if embed_dim is None else embed_dim
        self.backbone, width = self.build_backbone(arch)
        if pretrained:
            self.load_backbone(pretrained)
        self.embed = (nn.Sequential(nn.Linear(width, self.embed_dim), nn.ReLU(inplace=True))
                      if self.embed_dim else nn.Identity())  # OLTR's fc_add + ReLU
        self.feat_dim = self.embed_dim or width
        self.fc = nn.Linear(self.feat_dim, num_classes)  # h: primary, trained on B_cbs
        self.aux_fc = nn.Linear(self.feat_dim, num_classes)  # h_a: auxiliary, trained on B_rrs
        self.rot_fc = nn.Linear(self.feat_dim, 4)  # h_s: rotation, trained on B_rot

    @staticmethod
    def build_backbone(arch):
        """A ResNet without its classifier: (module mapping (B, 3, H, W) -> (B, width), width)."""
        if arch == "resnet32":
            return CifarResNet(), 64
        if arch == "resnet10":  # the ImageNet-LT backbone of OLTR and the paper: one block per stage
            net = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
        else:
            net = getattr(torchvision.models, arch)(weights=None)
        width, net.fc = net.fc.in_features, nn.Identity()
        return net, width

    def load_backbone(self, path):
        """Load torchvision-format backbone weights from a local file (fc.* keys are dropped)."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise LTauxError(f"{path}: pretrained weights not found") from None
        except Exception as e:  # noqa: BLE001 - corrupt file, pickled objects, ...
            raise LTauxError(f"{path}: cannot load pretrained weights ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise LTauxError(f"{path}: not a state dict of tensors (torchvision format expected)")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        own = self.backbone.state_dict()
        wrong = [k for k in own if k not in state or state[k].shape != own[k].shape]
        wrong += [k for k in state if k not in own]
        if wrong:
            raise LTauxError(f"{path}: not {self.arch} weights ({len(wrong)} keys missing, unexpected or "
                             f"of another shape, e.g. {wrong[0]!r})")
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
        if bad:  # refused now: trained on, it would only surface later as a non-finite loss
            raise LTauxError(f"{path}: pretrained weights hold NaN or inf (first in {bad[0]!r}): "
                             "not usable weights")
        self.backbone.load_state_dict(state)

    def features(self, x):
        """phi: images (B, 3, H, W) -> features (B, D), D = embed_dim or the backbone's width."""
        return self.embed(self.backbone(x))

    def forward(self, x, splits=None):
        """The head protocol. forward(x): primary logits h(phi(x)), images (B, 3, H, W) -> (B, C).

        forward(x, splits) with splits = [(head_name, rows), ...] (rows summing to B): one backbone
        pass over x, then each head on its consecutive block of rows; returns a tuple of logits, e.g.
        model(x, [("fc", S), ("aux_fc", S), ("rot_fc", 2 * S)]) -> ((S, C), (S, C), (2S, 4)).
        Keeping the heads inside forward() lets DistributedDataParallel and torch.compile see them.
        """
        if splits is None:
            return self.fc(self.features(x))
        feats = torch.split(self.features(x), [rows for _, rows in splits])
        return tuple(getattr(self, name)(f) for (name, _), f in zip(splits, feats))


# ----------------------------------------------------------------------------------------------
# Algorithm 1 line 9 (the rotation task of Section 3.3, after Gidaris et al. 2018) and Eq. 2


def rotate_batch(x, mode="random", generator=None):
    """Rotate square images by multiples of 90 degrees: x_rot[i] = torch.rot90(x[src(i)], y_rot[i]).

    mode "random": one random angle per image (Section 3.3), rows in input order (src(i) = i). The
        angles are balanced over the batch (a random permutation split into four near-equal groups,
        the larger ones first): each image's angle is uniform when B is a multiple of 4 (else each
        angle's probability is within 3 / (4B) of 1/4), and every shape is static (no host sync).
    mode "all": all four rotations of every image (Table 5 / [8]), rows [x@0; x@90; x@180; x@270],
        src(i) = i mod B.
    x: images (B, C, H, W) with H == W; generator: on x.device (default: the global RNG).
    Returns x_rot (B', C, H, W) and y_rot (B',) long, the angle 90 * y_rot counter-clockwise in dims (2, 3);
    B' = B ("random") or 4B ("all").
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotation needs square images, got {tuple(x.shape[-2:])}")
    B = x.shape[0]
    if mode == "all":
        x_rot = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])  # (4B, C, H, W)
        return x_rot, torch.arange(4, device=x.device).repeat_interleave(B)  # (4B,)
    if mode != "random":
        raise ValueError(f"rotation mode must be 'random' or 'all', got {mode!r}")
    perm = torch.randperm(B, device=x.device, generator=generator)  # (B,)
    x_rot, y_rot = torch.empty_like(x), torch.empty(B, dtype=torch.long, device=x.device)
    for k, rows in enumerate(torch.tensor_split(perm, 4)):  # group sizes known on the host
        x_rot[rows] = torch.rot90(x[rows], k, dims=(2, 3))
        y_rot.index_fill_(0, rows, k)  # not y_rot[rows] = k: on CUDA that copies k to the device and waits
    return x_rot, y_rot


def aux_loss(model, cbs, rrs, lambdas=(0.5, 1.0, 1.0), rotation=None, generator=None):
    """Eq. 2, L = l1 * CE(h(phi(B_cbs)), y_cbs) + l2 * CE(h_a(phi(B_rrs)), y_rrs)
    + l3 * CE(h_s(phi(B_rot)), y_rot), with one backbone pass over [B_cbs; B_rrs; B_rot], so BatchNorm
    sees the joint batch (Section 3.4).
    h reads only the B_cbs rows, h_a only the B_rrs rows: the RRS loss reaches phi but not h (Section 3.2).

    Baselines (Section 4.3): with rrs None (CBS-Only) or cbs None (RRS-Only) the one batch trains h alone
    with weight 1, and there is no rotation term unless `rotation` asks for one.

    Args:
        model: an LTResNet or anything with its head protocol (LTResNet.forward), maybe in DDP or compiled.
        cbs, rrs: B_cbs and B_rrs as (images (S, 3, H, W), labels (S,) long), or None.
        lambdas: (l1, l2, l3) (default: (0.5, 1.0, 1.0), the paper's 0.5 : 1 : 1).
        rotation: "random" (one angle per image), "all" (four per image) or "off" (default: None =
            "random" for [B_cbs; B_rrs], "off" for a baseline); generator: as rotate_batch.
    Returns loss, a scalar tensor, and parts, detached scalar tensors "cbs", "rrs", "ss" (those computed).
    """
    l1, l2, l3 = lambdas
    if cbs is None or rrs is None:  # a baseline: h alone on the one batch
        if cbs is None and rrs is None:
            raise ValueError("aux_loss needs at least one of cbs, rrs")
        name, (x, y) = ("rrs", rrs) if cbs is None else ("cbs", cbs)
        if rotation in (None, "off"):
            l_cls = F.cross_entropy(model(x), y)  # h(phi(B)): (S, C) logits
            return l_cls, {name: l_cls.detach()}
        x_rot, y_rot = rotate_batch(x, rotation, generator)  # (S or 4S, 3, H, W), (S or 4S,)
        z, z_rot = model(torch.cat([x, x_rot]), [("fc", len(x)), ("rot_fc", len(x_rot))])
        l_cls, l_ss = F.cross_entropy(z, y), F.cross_entropy(z_rot, y_rot)
        return l_cls + l3 * l_ss, {name: l_cls.detach(), "ss": l_ss.detach()}
    (x_cbs, y_cbs), (x_rrs, y_rrs) = cbs, rrs
    x = torch.cat([x_cbs, x_rrs])  # [B_cbs; B_rrs]: (2S, 3, H, W)
    heads = [("fc", len(x_cbs)), ("aux_fc", len(x_rrs))]
    if rotation != "off":
        x_rot, y_rot = rotate_batch(x, rotation or "random", generator)  # line 9, B_rot: (2S or 8S, 3, H, W)
        x, heads = torch.cat([x, x_rot]), heads + [("rot_fc", len(x_rot))]  # (4S or 10S, 3, H, W)
    z_cbs, z_rrs, *z_rot = model(x, heads)  # one backbone pass: (S, C), (S, C), [(2S or 8S, 4)]
    l_cbs = F.cross_entropy(z_cbs, y_cbs)  # line 10: h on B_cbs
    l_rrs = F.cross_entropy(z_rrs, y_rrs)  # line 10: h_a on B_rrs
    loss, parts = l1 * l_cbs + l2 * l_rrs, {"cbs": l_cbs.detach(), "rrs": l_rrs.detach()}
    if z_rot:
        l_ss = F.cross_entropy(z_rot[0], y_rot)  # line 11: h_s on B_rot
        loss, parts["ss"] = loss + l3 * l_ss, l_ss.detach()  # Eq. 2
    return loss, parts


def rotation_augment(x, y, mode="random", generator=None):
    """Table 5's baseline, rotations as plain data augmentation (no h_s): [x; rotate_batch(x)] with the
    class labels repeated, so that phi sees the same images as CBS+RRS+SS with the same `mode`.
    x: images (B, 3, H, W); y: labels (B,); mode, generator: as rotate_batch. Returns x_aug (2B or 5B,
    3, H, W) and y_aug (2B or 5B,): rows [x; x_rot], labels [y; y of each source row].
    """
    x_rot, _ = rotate_batch(x, mode, generator)  # (B or 4B, ...), source row of x_rot[i] is i mod B
    return torch.cat([x, x_rot]), torch.cat([y, y.repeat(len(x_rot) // len(x))])


# ----------------------------------------------------------------------------------------------
# Section 4.2: overall and many / medium / few-shot top-1


def class_counts(labels, num_classes):
    """Training images per class: labels (N,) ints -> LongTensor (C,)."""
    return torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=num_classes)


def shot_groups(counts, many=100, few=20):
    """Many/medium/few group of each class (Section 4.2): counts (C,) -> LongTensor (C,).

    0 = many (count >= many), 2 = few (count <= few), 1 = medium otherwise: the paper's "many shot
    (Nc >= 100), low shot (Nc <= 20)", as OLTR's shot_acc computes it (132/156/77 classes on
    Places-LT). Decoupling's code uses > 100 / < 20: many=101, few=19.
    """
    counts = torch.as_tensor(counts)
    groups = torch.ones_like(counts, dtype=torch.long)
    groups[counts >= many] = 0
    groups[counts <= few] = 2
    return groups


def shot_accuracy(pred, target, train_counts, many=100, few=20):
    """Top-1 accuracy overall and per many/medium/few group, in percent.

    Group accuracy is the mean per-class accuracy over the group's classes that occur in `target`
    (the OLTR protocol); an empty group reports None. `overall` is plain top-1 over all samples,
    `mean_per_class` the mean over classes that occur in `target` (they differ on unbalanced lists).
    pred, target: (N,) long; train_counts: training images per class (C,); many, few: as shot_groups.
    Returns a dict: overall, mean_per_class, many, medium, few (float or None), per_class (list of C
    floats, None for classes absent from target), counts (list of C test counts).
    """
    pred, target = torch.as_tensor(pred).flatten().cpu(), torch.as_tensor(target).flatten().cpu()
    train_counts = torch.as_tensor(train_counts).cpu()
    C = len(train_counts)
    if len(target) == 0:
        raise ValueError("shot_accuracy needs at least one sample")
    if int(target.max()) >= C:
        raise ValueError(f"target has class {int(target.max())} but train_counts has only {C} classes")
    n = torch.bincount(target, minlength=C).double()  # (C,) test images per class
    hit = torch.bincount(target[pred == target], minlength=C).double()  # (C,) correct per class
    present = n > 0
    acc = 100.0 * hit / n.clamp(min=1)  # (C,), 0 for classes absent from target
    groups = shot_groups(train_counts, many, few)
    out = {"overall": 100.0 * float(hit.sum() / n.sum()), "mean_per_class": float(acc[present].mean())}
    for g, name in enumerate(("many", "medium", "few")):
        sel = present & (groups == g)
        out[name] = float(acc[sel].mean()) if bool(sel.any()) else None
    out["per_class"] = [float(a) if p else None for a, p in zip(acc.tolist(), present.tolist())]
    out["counts"] = n.long().tolist()
    return out


# ----------------------------------------------------------------------------------------------
# Split lists (the format of the official ImageNet-LT / Places-LT lists released with OLTR)


class LTauxError(ValueError):
    """An error the user can cause and fix (bad split list, unreadable image, wrong checkpoint): the message
    names the file (and line) at fault, and entry points print it on one line instead of a traceback.
    It keeps a single-string constructor so that DataLoader workers can re-raise it in the main process."""


def read_split(path, allow_unsafe_paths=False, return_lines=False, allow_negative=False, max_label=10**6):
    """Read a split list: one `relative/path label` per line, label an integer >= 0.

    Blank lines (trailing or not) are skipped, a UTF-8 byte-order mark is dropped. A path that appears
    twice triggers a warning (it is kept: some users oversample on purpose). Paths must be relative and
    free of `..` unless allow_unsafe_paths=True, so that a list cannot make a program read outside the
    dataset root. allow_negative accepts label -1 as in the open-set lists; max_label guards against
    typos that would allocate C-sized tensors.
    Returns (paths: list[str], labels: list[int]), with return_lines also the 1-based line numbers.
    Raises LTauxError naming the file and line for a missing or empty file, a line without exactly
    two fields, a non-integer, negative or too large label, or an unsafe path.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isfile(path):
        raise LTauxError(f"{path}: not a regular file (a split list is a text file)")
    try:
        with open(path, "r", encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise LTauxError(f"{path}: split list not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LTauxError(f"{path}: cannot read split list ({e})") from None
    entries, seen, dups = [], {}, []  # entries: (path, label, line)
    for n, line in enumerate(text.split("\n"), start=1):  # "\n" alone ends a line (not U+2028 and the like)
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise LTauxError(f"{path}:{n}: expected 'relative/path label', got {line.strip()!r}")
        p, y = fields[0], _split_label(path, n, fields[1], allow_negative, max_label)
        if not allow_unsafe_paths and (os.path.isabs(p) or ".." in p.replace("\\", "/").split("/")):
            raise LTauxError(f"{path}:{n}: path {p!r} is absolute or contains '..' "
                             "(lists are read relative to the dataset root; allow_unsafe_paths=True "
                             "or --allow-unsafe-paths accepts it)")
        if seen.setdefault(p, n) != n:  # listed before
            dups.append(f"{path}:{n}: duplicate path {p!r} (first on line {seen[p]})")
        entries.append((p, y, n))
    if not entries:
        raise LTauxError(f"{path}: split list is empty")
    paths, labels, lines = map(list, zip(*entries))
    if dups:  # one warning, however many
        more = f" (and {len(dups) - 1} more duplicate lines)" if len(dups) > 1 else ""
        warnings.warn(dups[0] + more, stacklevel=2)
    return (paths, labels, lines) if return_lines else (paths, labels)


def _split_label(path, n, text, allow_negative, max_label):
    """The label of line n of a split list: an int in 0..max_label (or -1 if allowed), else LTauxError.
    Only ASCII digits count (int() would also take '0_3' or full-width digits)."""
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise LTauxError(f"{path}:{n}: label {text!r} is not an integer")
    y = int(text)
    if y < 0 and not (allow_negative and y == -1):
        raise LTauxError(f"{path}:{n}: label {y} is negative")
    if y > max_label:
        raise LTauxError(f"{path}:{n}: label {y} is larger than {max_label} (a typo?)")
    return y


def load_rgb(path, max_aspect=50):
    """Open an image with Pillow, decode it fully and return it in RGB.

    Greyscale, CMYK, palette and RGBA files work (transparency is dropped); 16-bit greyscale is scaled
    to 8 bits by its bit depth (v / 257: a dark image stays dark; Pillow alone would clip it to white),
    32-bit integer greyscale likewise (values above 65535 saturate), float greyscale is clipped to
    0..255. Decoding happens here, so a truncated file fails here and not later inside a transform.
    An aspect ratio above `max_aspect` is refused: resizing its short side would allocate a huge image.
    """
    with Image.open(path) as img:
        w, h = img.size
        if max(w, h) > max_aspect * max(1, min(w, h)):
            raise ValueError(f"aspect ratio {w}x{h} exceeds {max_aspect}:1")
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # by the bit depth; + 0.5: F -> L truncates
            return img.convert("F").point(lambda v: v / 257.0 + 0.5).convert("L").convert("RGB")
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")  # palette transparency must go through RGBA first
        return img.convert("RGB")  # Pillow converts F through L, which clips to 0..255


class SplitDataset(torch.utils.data.Dataset):
    """A dataset over a split list (see read_split, also for allow_unsafe_paths), paths joined under `root`.

    read: path -> image (default: load_rgb, an RGB PIL image; train.py passes a tensor decoder), then
    `transform` if given. Attributes: paths, labels, lines (1-based) of the list; num_classes = 1 + the
    largest label. dataset[i] -> (transform(image), label). dataset[(i, seed)] seeds torch's RNG with
    `seed` for this one sample (the caller's RNG state is restored), which makes random augmentation
    independent of the number of DataLoader workers (see AuxBatchSampler(with_seeds=True)).
    A missing or unreadable image raises LTauxError naming its path and split line.
    """

    def __init__(self, root, split_file, transform=None, allow_unsafe_paths=False, read=load_rgb):
        self.root, self.split_file = os.fspath(root), os.fspath(split_file)
        self.transform, self.read = transform, read
        self.paths, self.labels, self.lines = read_split(
            split_file, allow_unsafe_paths=allow_unsafe_paths, return_lines=True)
        self.num_classes = max(self.labels) + 1
        self.warned = {}  # the warnings registry of the image reads (load)

    def __len__(self):
        return len(self.paths)

    def load(self, i, read=None):
        """Entry i read by `read` (default: self.read); LTauxError names the file and split line on failure.
        Pillow's DecompressionBombWarning (an image of more than Image.MAX_IMAGE_PIXELS pixels, and at most
        twice that) is re-issued once, naming the split line and the image; other warnings pass unchanged."""
        full = os.path.join(self.root, self.paths[i])
        try:
            if not stat.S_ISREG(os.stat(full).st_mode):  # a FIFO or device would block or stream forever
                raise OSError(f"not a regular file")
            with warnings.catch_warnings(record=True) as caught:  # the user's filters still apply
                img = (read or self.read)(full)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as e:  # the warning: raised where a filter makes it an error
            reason = "file not found" if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}"
            raise LTauxError(f"{self.split_file}:{self.lines[i]}: "
                             f"cannot read image {full} ({reason})") from None
        bombs = [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
        if bombs:  # Pillow names no file, and a header read then a decode (read_image) warn twice
            warnings.warn(f"{self.split_file}:{self.lines[i]}: image {full}: {bombs[0].message}",
                          bombs[0].category, stacklevel=2)
        for w in caught:
            if w not in bombs:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source,
                                       registry=self.warned)  # once per place, as outside catch_warnings
        return img

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        img = self.load(i)
        if self.transform is not None:
            with torch.random.fork_rng(devices=[], enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                img = self.transform(img)
        return img, self.labels[i]
