"""Sanity checks of ltaux, module by module in the order of the code: ltaux.py (the method), recipes.py,
pipeline.py, runtime.py, then the entry points train.py, evaluate.py, cifar_lt.py, bench.py, data_lists/ and
README.md. CPU only (the few CUDA tests skip without a GPU).

    python -m pytest -q                     # everything, a few minutes on 2 cores
    python -m pytest -q -m "not slow"       # the method and the data pieces, seconds

The method tests check behaviour through the public API (what each head is given, which rows the
sampler puts where, what the loss adds up), so that a wrongly wired method fails: heads, halves,
labels or loss weights swapped, a CBS part that is not class-balanced, rotation labels that do not
match the rotation, a deployed model that uses another head. Tests that read ../shared (the official
lists, real images, the paper's text) skip cleanly where it is absent.
"""

import ast
import collections
import contextlib
import csv
import functools
import hashlib
import importlib.util
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import bookkeeping
import evaluate
import ltaux
import pipeline
import recipes
import runtime
import train

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision"
                                        ":DeprecationWarning")  # torchvision 0.29 on decode_jpeg (README)

HERE = os.path.dirname(os.path.abspath(__file__))

SHARED = os.path.join(HERE, "..", "shared")

SHARED_LISTS = os.path.join(SHARED, "data_lists")

PAPER_TXT = os.path.join(SHARED, "seed", "paper.txt")

def write_list(path, rows):
    with open(path, "w") as f:
        f.write("".join(rows))
    return str(path)

def need(name):
    path = os.path.join(SHARED_LISTS, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} absent")
    return path


# ==============================================================================================
# ltaux.py
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# Algorithm 1 lines 2-8: AuxBatchSampler


def lt_labels(seed=0):
    """37 classes: a few large ones, many with 5 images, two with fewer than Z = 4."""
    counts = [200, 120, 60, 33, 17, 9] + [5] * 29 + [2, 1]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))].tolist(), counts


def halves(sampler):
    """(B_cbs, B_rrs) index tensors (M, S / W) of the current epoch, as the sampler lays them out."""
    b = sampler.epoch_batches()
    s = sampler.batch_size // sampler.world_size
    return (b[:, :s], b[:, s:]) if sampler.mode == "cbs_rrs" else (b, None)


def test_sampler_first_half_is_k_classes_of_z_images_second_half_is_random():
    labels, counts = lt_labels()
    L = torch.tensor(labels)
    s = ltaux.AuxBatchSampler(labels, 40, 4, num_batches=300)  # k = 10 does not divide C = 37
    cbs, rrs = halves(s)
    assert cbs.shape == (300, 40) and rrs.shape == (300, 40)
    for row in cbs:
        cls = L[row.view(10, 4)]
        assert (cls == cls[:, :1]).all()  # Z consecutive images of one class
        assert len(set(cls[:, 0].tolist())) == 10  # k distinct classes
        for g, c in zip(row.view(10, 4).tolist(), cls[:, 0].tolist()):
            assert len(set(g)) == min(4, counts[c])  # distinct images (all of them if fewer than Z)
    # balanced vs natural: B_cbs draws every class about equally, B_rrs in proportion to its size
    n_cbs = torch.bincount(L[cbs].flatten(), minlength=37).float()
    n_rrs = torch.bincount(L[rrs].flatten(), minlength=37).float()
    assert n_cbs[0] < 2 * n_cbs[20] and n_rrs[0] > 20 * n_rrs[20]
    assert n_cbs.max() - n_cbs.min() <= 4  # every class drawn as often as any other, +-1 draw of Z images


def test_sampler_augmentation_seeds_are_new_every_epoch_and_replayed_by_set_epoch():
    """Each epoch draws new per-sample augmentation seeds (a crop and flip that never change would pass
    every other test), and set_epoch alone replays an epoch's seeds (exact resume)."""
    labels, _ = lt_labels()
    s = ltaux.AuxBatchSampler(labels, 64, 4, with_seeds=True)
    seeds = []
    for e in range(3):
        s.set_epoch(e)
        seeds.append(s.epoch_seeds())
    assert not torch.equal(seeds[0], seeds[1]) and not torch.equal(seeds[1], seeds[2])
    fresh = ltaux.AuxBatchSampler(labels, 64, 4, with_seeds=True)
    fresh.set_epoch(2)
    assert torch.equal(fresh.epoch_seeds(), seeds[2])


def test_rrs_only_sampler_is_the_random_half_and_new_every_epoch():
    """mode "rrs" (RRS-Only) yields exactly CBS+RRS's B_rrs: a fresh permutation of the training set every
    epoch, not one permutation repeated."""
    labels, _ = lt_labels()
    both, rrs = ltaux.AuxBatchSampler(labels, 64, 4), ltaux.AuxBatchSampler(labels, 64, 4, mode="rrs")
    epochs = []
    for e in range(3):
        both.set_epoch(e)
        rrs.set_epoch(e)
        got = rrs.epoch_batches()
        assert torch.equal(got, both.epoch_batches()[:, 64:])
        assert sorted(got.flatten()[:len(labels)].tolist()) == list(range(len(labels)))
        epochs.append(got)
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])


def test_sampler_default_is_z_4():
    labels, _ = lt_labels()
    L = torch.tensor(labels)
    row = ltaux.AuxBatchSampler(labels, 40, mode="cbs").epoch_batches()[0]
    cls = L[row]
    assert all(len(set(cls[i:i + 4].tolist())) == 1 for i in range(0, 40, 4))
    assert len(set(cls[::4].tolist())) == 10  # Z = 4: k = 40 / 4 = 10 classes


def test_sampler_rrs_half_is_a_uniform_permutation_per_epoch():
    labels, _ = lt_labels()
    N = len(labels)
    s = ltaux.AuxBatchSampler(labels, 64, 4)
    firsts = []
    for e in range(40):
        s.set_epoch(e)
        rrs = halves(s)[1].flatten()
        assert len(s) == -(-N // 64) and sorted(rrs[:N].tolist()) == list(range(N))  # every image once
        firsts.append(rrs[:64])
        if e == 0:  # not in list order: position and index are uncorrelated
            pos = torch.arange(N, dtype=torch.float)
            assert abs(torch.corrcoef(torch.stack([pos, rrs[:N].float()]))[0, 1]) < 0.15
    hits = torch.bincount(torch.cat(firsts), minlength=N).float()  # 40 epochs x 64 of N = 577 images
    assert hits.mean() == pytest.approx(40 * 64 / N) and hits.std() < 2 * (40 * 64 / N) ** 0.5


def test_sampler_cycles_run_across_epochs():
    """Algorithm 1 has no epochs: over any number of epochs every image of a class is drawn equally
    often (+-1) and every class as often as any other (+-1 draw)."""
    labels, counts = lt_labels(1)
    L = torch.tensor(labels)
    s = ltaux.AuxBatchSampler(labels, 40, 4, mode="cbs", num_batches=7)  # 70 draws an epoch, C = 37
    drawn, draws = torch.zeros(len(labels), dtype=torch.long), torch.zeros(37, dtype=torch.long)
    for e in range(6):
        s.set_epoch(e)
        cbs = s.epoch_batches()
        drawn += torch.bincount(cbs.flatten(), minlength=len(labels))
        draws += torch.bincount(L[cbs[:, ::4]].flatten(), minlength=37)
        for c in range(6):  # large classes: equal use of their images, +-1, after every epoch
            d = drawn[L == c]
            assert int(d.max() - d.min()) <= 1, (e, c)
        assert int(draws.max() - draws.min()) <= 1, e


def test_sampler_set_epoch_alone_reproduces_an_epoch_and_resumes_mid_epoch():
    labels, _ = lt_labels()
    a = ltaux.AuxBatchSampler(labels, 40, 4, seed=3)
    seq = []
    for e in range(4):
        a.set_epoch(e)
        seq.append(list(a))
    b = ltaux.AuxBatchSampler(labels, 40, 4, seed=3)
    b.set_epoch(3)
    assert list(b) == seq[3]  # without epochs 0-2 before it
    b.set_epoch(1)
    assert list(b) == seq[1]  # and back
    assert seq[2] != seq[3]
    c = ltaux.AuxBatchSampler(labels, 40, 4, seed=4)
    c.set_epoch(3)
    assert list(c) != seq[3]
    b.set_epoch(3, start_batch=5)
    assert list(b) == seq[3][5:] and len(b) == len(seq[3]) - 5


@pytest.mark.parametrize("mode", ["cbs_rrs", "cbs", "rrs"])
@pytest.mark.parametrize("world", [2, 4])
def test_sampler_rank_slices_join_to_the_single_process_batch(mode, world):
    labels, _ = lt_labels()
    one = ltaux.AuxBatchSampler(labels, 40, 4, mode=mode, seed=1)
    one.set_epoch(1)
    full = one.epoch_batches()
    parts = 2 if mode == "cbs_rrs" else 1
    slices = []
    for r in range(world):
        s = ltaux.AuxBatchSampler(labels, 40, 4, mode=mode, seed=1, rank=r, world_size=world)
        s.set_epoch(1)
        slices.append(s.epoch_batches().view(len(full), parts, 40 // world))
    assert torch.equal(torch.cat(slices, dim=2).view(len(full), -1), full)


def test_sampler_seeds_are_paired_with_indices_and_distinct():
    labels, _ = lt_labels()
    got = list(ltaux.AuxBatchSampler(labels, 40, 4, with_seeds=True))
    assert [[i for i, _ in b] for b in got] == list(ltaux.AuxBatchSampler(labels, 40, 4))
    seeds = [sd for b in got for _, sd in b]
    assert len(set(seeds)) == len(seeds)


@pytest.mark.parametrize("kw, msg", [
    (dict(batch_size=42, per_class=4), "not divisible by per-class"),
    (dict(batch_size=40, per_class=4, world_size=3), "not divisible by the world size"),
    (dict(batch_size=400, per_class=4), "classes per batch"),
    (dict(batch_size=40, mode="balanced"), "mode must be"),
])
def test_sampler_rejects_bad_arguments(kw, msg):
    labels, _ = lt_labels()
    with pytest.raises(ValueError, match=msg):
        ltaux.AuxBatchSampler(labels, **kw)


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED_LISTS, "Places_LT_train.txt")), reason="no ../shared")
def test_sampler_on_places_lt_never_repeats_a_class_or_an_image():
    _, labels = ltaux.read_split(os.path.join(SHARED_LISTS, "Places_LT_train.txt"))
    s = ltaux.AuxBatchSampler(labels, 256, 4, mode="cbs")
    L = torch.tensor(labels)
    for e in (0, 1):  # the second epoch continues the cycles of the first
        s.set_epoch(e)
        cbs = s.epoch_batches()
        assert all(len(L[row[::4]].unique()) == 64 for row in cbs)
        assert all(len(g.unique()) == 4 for g in cbs.view(-1, 4))  # every Places-LT class has >= 5 images


# ----------------------------------------------------------------------------------------------
# the model (Sections 3.4, 4.3): phi and the heads h, h_a, h_s


@pytest.mark.parametrize("arch", ["resnet10", "resnet18", "resnet32", "resnet50"])  # 34/101/152: same classes
def test_every_arch_has_the_three_heads_and_the_deployed_model_is_phi_and_h(arch):
    torch.manual_seed(0)
    m = ltaux.LTResNet(arch, num_classes=7, embed_dim=16).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = m.features(x)
        assert f.shape == (2, 16) and (f >= 0).all()  # phi ends in ReLU
        assert torch.equal(m(x), m.fc(f))
        assert m.aux_fc(f).shape == (2, 7) and m.rot_fc(f).shape == (2, 4)
        before = m(x)
        for head in (m.aux_fc, m.rot_fc):
            head.weight.add_(1.0)  # the auxiliary heads do not take part in prediction
        assert torch.equal(m(x), before)
        m.fc.bias.add_(1.0)
        assert torch.allclose(m(x), before + 1.0)


def test_phi_is_oltr_linear_relu_and_defaults_per_backbone():
    m = ltaux.LTResNet("resnet10", 5)
    assert isinstance(m.embed[0], torch.nn.Linear) and isinstance(m.embed[1], torch.nn.ReLU)
    assert m.embed[0].out_features == 512 and m.feat_dim == 512 and m.fc.in_features == 512
    assert ltaux.LTResNet("resnet152", 5).embed[0].in_features == 2048
    assert ltaux.LTResNet("resnet32", 5).feat_dim == 64  # CIFAR: no extra layer (measured, README)
    none = ltaux.LTResNet("resnet18", 5, embed_dim=0)
    assert isinstance(none.embed, torch.nn.Identity) and none.feat_dim == 512
    assert ltaux.LTResNet("resnet50", 5, embed_dim=0).feat_dim == 2048


def test_pretrained_backbone_loads_torchvision_weights(tmp_path):
    tv = torchvision.models.resnet18(weights=None)
    torch.save(tv.state_dict(), tmp_path / "r18.pth")  # torchvision format, fc.* included
    m = ltaux.LTResNet("resnet18", 5, pretrained=str(tmp_path / "r18.pth"))
    assert torch.equal(m.backbone.conv1.weight, tv.conv1.weight)
    with pytest.raises(ltaux.LTauxError, match="r18.pth: not resnet50 weights"):
        ltaux.LTResNet("resnet50", 5, pretrained=str(tmp_path / "r18.pth"))
    with pytest.raises(ltaux.LTauxError, match="missing.pth: pretrained weights not found"):
        ltaux.LTResNet("resnet18", 5, pretrained=str(tmp_path / "missing.pth"))
    torch.save({"model": tv.state_dict()}, tmp_path / "nested.pth")
    with pytest.raises(ltaux.LTauxError, match="nested.pth: not a state dict of tensors"):
        ltaux.LTResNet("resnet18", 5, pretrained=str(tmp_path / "nested.pth"))


def test_pretrained_weights_with_nan_or_inf_are_refused_naming_the_first(tmp_path):
    """--pretrained weights holding NaN or inf are refused at load, in one line naming the file and the
    first bad tensor in the file's order (fc.*, which is dropped, does not count)."""
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["fc.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "fc_only.pth")
    ltaux.LTResNet("resnet18", 5, pretrained=str(tmp_path / "fc_only.pth"))  # a NaN in the dropped fc: fine
    state["layer2.0.conv1.weight"][3, 1, 0, 2] = float("inf")
    state["layer3.1.bn2.running_var"][7] = float("nan")
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ltaux.LTauxError) as e:
        ltaux.LTResNet("resnet18", 5, pretrained=str(tmp_path / "bad.pth"))
    assert str(e.value) == f"{tmp_path / 'bad.pth'}: pretrained weights hold NaN or inf (first in " \
        "'layer2.0.conv1.weight'): not usable weights"


# ----------------------------------------------------------------------------------------------
# Algorithm 1 line 9 and Eq. 2: rotations and the loss


def find_rotation(row, sources):
    """(source index, k) such that row == rot90(sources[index], k); asserts there is exactly one."""
    hits = [(j, k) for j in range(len(sources)) for k in range(4)
            if torch.equal(row, torch.rot90(sources[j], k, dims=(1, 2)))]
    assert len(hits) == 1, hits
    return hits[0]


def test_rotate_batch_labels_are_the_applied_rotations():
    x = torch.randn(10, 3, 6, 6)
    x_rot, y_rot = ltaux.rotate_batch(x, generator=torch.Generator().manual_seed(0))
    assert x_rot.shape == x.shape and y_rot.shape == (10,)
    for i in range(10):
        assert torch.equal(x_rot[i], torch.rot90(x[i], int(y_rot[i]), dims=(1, 2)))  # row i is x[i] rotated
    assert sorted(torch.bincount(y_rot, minlength=4).tolist()) == [2, 2, 3, 3]  # balanced angles
    x12 = torch.randn(12, 3, 2, 2)  # B a multiple of 4: each image's angle is uniform
    draws = torch.stack([ltaux.rotate_batch(x12, generator=torch.Generator().manual_seed(s))[1] for s in range(400)])
    freq = torch.stack([torch.bincount(draws[:, i], minlength=4) for i in range(12)]).float() / 400
    assert (freq - 0.25).abs().max() < 0.09
    x_all, y_all = ltaux.rotate_batch(x, "all")
    assert x_all.shape == (40, 3, 6, 6) and y_all.tolist() == [0] * 10 + [1] * 10 + [2] * 10 + [3] * 10
    for i in (0, 13, 25, 39):
        assert torch.equal(x_all[i], torch.rot90(x[i % 10], int(y_all[i]), dims=(1, 2)))
    with pytest.raises(ValueError, match="square"):
        ltaux.rotate_batch(torch.randn(2, 3, 4, 6))


class SpyModel(torch.nn.Module):
    """Any network with LTResNet's head protocol: records what each head is given and answers with
    fixed, row-dependent logits (a different random linear map per head)."""

    def __init__(self, num_classes=5, size=4):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        d = 3 * size * size
        self.w = torch.nn.ParameterDict({n: torch.nn.Parameter(torch.randn(d, c, generator=g))
                                         for n, c in (("fc", num_classes), ("aux_fc", num_classes), ("rot_fc", 4))})
        self.calls = []

    def forward(self, x, splits=None):
        self.calls.append((x.detach().clone(), splits))
        if splits is None:
            return x.flatten(1) @ self.w["fc"]
        return tuple(r.flatten(1) @ self.w[name] for (name, _), r in zip(splits, torch.split(x, [n for _, n in splits])))

    def logits(self, name, rows):
        return rows.flatten(1) @ self.w[name]


def spy_batch(S=8, C=5, size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(S, 3, size, size, generator=g), torch.randint(0, C, (S,), generator=g),
            torch.randn(S, 3, size, size, generator=g), torch.randint(0, C, (S,), generator=g))


def heads_given(call):
    x, splits = call
    return dict(zip([n for n, _ in splits], torch.split(x, [n for _, n in splits])))


@pytest.mark.parametrize("rotation", ["random", "all"])
def test_aux_loss_routes_each_batch_to_its_head_and_sums_eq2(rotation):
    m = SpyModel()
    x_c, y_c, x_r, y_r = spy_batch()
    lambdas = (0.3, 1.7, 0.9)  # distinct, so that a swapped weight shows
    loss, parts = ltaux.aux_loss(m, (x_c, y_c), (x_r, y_r), lambdas, rotation, torch.Generator().manual_seed(1))
    assert len(m.calls) == 1  # one backbone pass over [B_cbs; B_rrs; B_rot]
    given = heads_given(m.calls[0])
    assert set(given) == {"fc", "aux_fc", "rot_fc"}
    assert torch.equal(given["fc"], x_c) and torch.equal(given["aux_fc"], x_r)  # h: B_cbs, h_a: B_rrs
    both = torch.cat([x_c, x_r])
    found = [find_rotation(row, both) for row in given["rot_fc"]]  # h_s: rotations of [B_cbs; B_rrs]
    uses = collections.Counter(j for j, _ in found)
    assert sorted(uses) == list(range(16)) and set(uses.values()) == {1 if rotation == "random" else 4}
    y_rot = torch.tensor([k for _, k in found])
    l_cbs = F.cross_entropy(m.logits("fc", x_c), y_c)
    l_rrs = F.cross_entropy(m.logits("aux_fc", x_r), y_r)
    l_ss = F.cross_entropy(m.logits("rot_fc", given["rot_fc"]), y_rot)  # the labels are the applied angles
    assert torch.allclose(parts["cbs"], l_cbs) and torch.allclose(parts["rrs"], l_rrs)
    assert torch.allclose(parts["ss"], l_ss)
    assert torch.allclose(loss, 0.3 * l_cbs + 1.7 * l_rrs + 0.9 * l_ss)
    assert all(not p.requires_grad for p in parts.values()) and loss.requires_grad


def test_aux_loss_defaults_are_the_papers_and_off_drops_the_rotation_task():
    m = SpyModel()
    x_c, y_c, x_r, y_r = spy_batch()
    loss, parts = ltaux.aux_loss(m, (x_c, y_c), (x_r, y_r))  # default: lambdas 0.5 : 1 : 1, one random angle
    assert len(heads_given(m.calls[-1])["rot_fc"]) == 16
    assert torch.allclose(loss, 0.5 * parts["cbs"] + parts["rrs"] + parts["ss"])
    loss, parts = ltaux.aux_loss(m, (x_c, y_c), (x_r, y_r), (0.5, 2.0, 1.0), rotation="off")
    assert set(heads_given(m.calls[-1])) == {"fc", "aux_fc"} and set(parts) == {"cbs", "rrs"}
    assert torch.allclose(loss, 0.5 * parts["cbs"] + 2.0 * parts["rrs"])


@pytest.mark.parametrize("which", ["rrs", "cbs"])
def test_baselines_train_h_alone_without_rotation_unless_asked(which):
    m = SpyModel()
    x_c, y_c, x_r, y_r = spy_batch()
    x, y = (x_r, y_r) if which == "rrs" else (x_c, y_c)
    args = (None, (x_r, y_r)) if which == "rrs" else ((x_c, y_c), None)
    loss, parts = ltaux.aux_loss(m, *args)
    x_seen, splits = m.calls[-1]
    assert torch.equal(x_seen, x) and splits in (None, [("fc", 8)])  # h alone, on that batch only
    assert set(parts) == {which} and torch.allclose(loss, F.cross_entropy(m.logits("fc", x), y))
    loss, parts = ltaux.aux_loss(m, *args, lambdas=(0.5, 1.0, 0.7), rotation="random")
    given = heads_given(m.calls[-1])
    assert set(given) == {"fc", "rot_fc"} and torch.equal(given["fc"], x)
    assert torch.allclose(loss, parts[which] + 0.7 * parts["ss"])


def real_model_and_batch(seed=0):
    torch.manual_seed(seed)
    m = ltaux.LTResNet("resnet10", num_classes=5, embed_dim=8)
    g = torch.Generator().manual_seed(seed)
    x_c, x_r = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)
    y_c, y_r = torch.randint(0, 5, (8,), generator=g), torch.randint(0, 5, (8,), generator=g)
    return m, x_c, y_c, x_r, y_r


def grad_sums(m, loss):
    m.zero_grad(set_to_none=True)
    loss.backward()
    g = {n: sum(float(p.grad.abs().sum()) for p in mod.parameters() if p.grad is not None)
         for n, mod in (("h", m.fc), ("h_a", m.aux_fc), ("h_s", m.rot_fc), ("phi", m.backbone), ("embed", m.embed))}
    return g


@pytest.mark.parametrize("lambdas, trained", [
    ((1.0, 0.0, 0.0), {"h"}), ((0.0, 1.0, 0.0), {"h_a"}), ((0.0, 0.0, 1.0), {"h_s"}),
    ((0.5, 1.0, 1.0), {"h", "h_a", "h_s"}),
])
def test_ltresnet_gradients_reach_phi_and_only_the_weighted_heads(lambdas, trained):
    m, x_c, y_c, x_r, y_r = real_model_and_batch()
    loss, _ = ltaux.aux_loss(m, (x_c, y_c), (x_r, y_r), lambdas)
    g = grad_sums(m, loss)
    assert g["phi"] > 0 and g["embed"] > 0
    assert {k for k in ("h", "h_a", "h_s") if g[k] > 0} == trained


def test_ltresnet_head_names_mean_h_h_a_h_s():
    m, x_c, y_c, x_r, y_r = real_model_and_batch()
    m.eval()  # BatchNorm by running statistics: rows do not interact, so each part can be recomputed
    _, parts = ltaux.aux_loss(m, (x_c, y_c), (x_r, y_r))
    with torch.no_grad():
        assert torch.allclose(parts["cbs"], F.cross_entropy(m(x_c), y_c), atol=1e-5)  # the deployed h
        assert torch.allclose(parts["rrs"], F.cross_entropy(m.aux_fc(m.features(x_r)), y_r), atol=1e-5)
    loss, parts = ltaux.aux_loss(m, None, (x_r, y_r))
    assert torch.allclose(loss, F.cross_entropy(m(x_r), y_r), atol=1e-5)
    g = grad_sums(m, loss)
    assert g["h"] > 0 and g["h_a"] == 0 and g["h_s"] == 0


@pytest.mark.parametrize("mode, copies", [("random", 1), ("all", 4)])
def test_rotation_augment_keeps_each_images_label(mode, copies):
    x, y, _, _ = spy_batch(S=6, C=6)
    y = torch.arange(6)  # distinct labels: a mis-ordered one shows
    x_aug, y_aug = ltaux.rotation_augment(x, y, mode, torch.Generator().manual_seed(2))
    assert len(x_aug) == len(y_aug) == 6 * (1 + copies)
    assert torch.equal(x_aug[:6], x) and torch.equal(y_aug[:6], y)
    found = [find_rotation(row, x) for row in x_aug[6:]]
    assert [int(y[j]) for j, _ in found] == y_aug[6:].tolist()
    assert collections.Counter(j for j, _ in found) == {j: copies for j in range(6)}


# ----------------------------------------------------------------------------------------------
# Section 4.2: many / medium / few


def test_class_counts_and_shot_group_boundaries():
    """Section 4.2 and OLTR's shot_acc: many >= 100, few <= 20 (a version with > / < fails here); Decoupling's
    code (> 100, < 20) is many=101, few=19."""
    counts = ltaux.class_counts([0, 0, 2], 4)
    assert counts.tolist() == [2, 0, 1, 0]
    groups = ltaux.shot_groups(torch.tensor([101, 100, 99, 21, 20, 19, 5]))
    assert groups.tolist() == [0, 0, 1, 1, 2, 2, 2]  # 100 many, 99 and 21 medium, 20 few
    decoupling = ltaux.shot_groups(torch.tensor([101, 100, 99, 21, 20, 19, 5]), many=101, few=19)
    assert decoupling.tolist() == [0, 1, 1, 1, 1, 2, 2]


def test_shot_accuracy_by_hand():
    counts = torch.tensor([500, 50, 5, 7])  # many, medium, few, few (absent from the test set)
    target = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 0, 1, 1, 0, 2, 0])
    m = ltaux.shot_accuracy(pred, target, counts)
    assert m["overall"] == pytest.approx(100 * 5 / 8)
    assert m["many"] == pytest.approx(75.0) and m["medium"] == pytest.approx(50.0)
    assert m["few"] == pytest.approx(50.0)  # class 3 is absent: not averaged in
    assert m["mean_per_class"] == pytest.approx((75 + 50 + 50) / 3)
    assert m["per_class"] == [75.0, 50.0, 50.0, None] and m["counts"] == [4, 2, 2, 0]
    m = ltaux.shot_accuracy(torch.tensor([1]), torch.tensor([1]), counts)
    assert m["many"] is None and m["few"] is None and m["medium"] == 100.0
    m = ltaux.shot_accuracy(pred, target, counts, many=40, few=6)  # thresholds are arguments
    assert m["many"] == pytest.approx((75 + 50) / 2) and m["few"] == pytest.approx(50.0) and m["medium"] is None


# ----------------------------------------------------------------------------------------------
# split lists and datasets (the OLTR format)


def test_read_split_parses_and_skips_blank_lines(tmp_path):
    f = write_list(tmp_path / "a.txt", ["train/a/1.jpg 0\n", "train/b/2.jpg 3\n", "\n", "  \n"])
    assert ltaux.read_split(f) == (["train/a/1.jpg", "train/b/2.jpg"], [0, 3])
    assert ltaux.read_split(f, return_lines=True)[2] == [1, 2]


@pytest.mark.parametrize("rows, where", [
    (["a.jpg 0\n", "b.jpg\n"], ":2:"),
    (["a.jpg 0\n", "b c.jpg 1\n"], ":2:"),
    (["a.jpg 0\n", "b.jpg one\n"], ":2: label 'one' is not an integer"),
    (["a.jpg 0\n", "\n", "b.jpg -1\n"], ":3: label -1 is negative"),
    ([], "split list is empty"),
    (["\n", "\n"], "split list is empty"),
    (["/etc/passwd 0\n"], ":1: path '/etc/passwd' is absolute"),
    (["a/../../x.jpg 0\n"], ":1: path 'a/../../x.jpg' is absolute or contains '..'"),
])
def test_read_split_errors_name_file_and_line(tmp_path, rows, where):
    f = write_list(tmp_path / "bad.txt", rows)
    with pytest.raises(ltaux.LTauxError, match="bad.txt") as e:
        ltaux.read_split(f)
    assert where in str(e.value)


def test_read_split_missing_file_unsafe_opt_in_and_duplicates(tmp_path):
    with pytest.raises(ltaux.LTauxError, match="nope.txt: split list not found"):
        ltaux.read_split(tmp_path / "nope.txt")
    f = write_list(tmp_path / "u.txt", ["../x.jpg 0\n"])
    assert ltaux.read_split(f, allow_unsafe_paths=True)[0] == ["../x.jpg"]
    f = write_list(tmp_path / "d.txt", ["x.jpg 0\n", "y.jpg 0\n", "x.jpg 1\n", "y.jpg 0\n"])
    with pytest.warns(UserWarning, match=r"d.txt:3: duplicate path 'x.jpg' \(first on line 1\) \(and 1 more"):
        assert len(ltaux.read_split(f)[0]) == 4
    f = write_list(tmp_path / "o.txt", ["x.jpg -1\n"])
    assert ltaux.read_split(f, allow_negative=True)[1] == [-1]


@pytest.mark.parametrize("label", ["0_3", "\uff13", "٣", "1e2", "0x1"])
def test_read_split_takes_only_ascii_digits_as_labels(tmp_path, label):
    """int() would read '0_3' as 3 and a full-width or Arabic-Indic digit as a number."""
    path = write_list(tmp_path / "l.txt", ["a.png 0\n", f"b.png {label}\n"])
    with pytest.raises(ltaux.LTauxError, match=r"l\.txt:2: label .* is not an integer"):
        ltaux.read_split(path)


@pytest.mark.parametrize("sep", ["\u2028", "\x1c", "\x85", "\x0b"])
def test_read_split_counts_lines_by_newlines_alone(tmp_path, sep):
    """A U+2028 (or another character str.splitlines() breaks at) inside a line must not shift the line
    numbers of the lines after it: the bad label below is on line 4."""
    path = tmp_path / "l.txt"
    path.write_text(f"a.png 0\nb.png 1{sep}\nd.png 2\ne.png x\n", encoding="utf-8")
    with pytest.raises(ltaux.LTauxError, match=r"l\.txt:4: label 'x' is not an integer"):
        ltaux.read_split(str(path))


def test_read_split_drops_a_byte_order_mark_and_bounds_labels(tmp_path):
    f = tmp_path / "bom.txt"
    f.write_bytes("\ufeffa/1.jpg 0\nb/2.jpg 1\n".encode("utf-8"))
    assert ltaux.read_split(f)[0] == ["a/1.jpg", "b/2.jpg"]
    big = write_list(tmp_path / "big.txt", ["a.jpg 0\n", "b.jpg 1000000000\n"])
    with pytest.raises(ltaux.LTauxError, match=r"big.txt:2: label 1000000000 is larger than"):
        ltaux.read_split(big)


def make_image_tree(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    rgb = Image.new("RGB", (20, 12), (200, 10, 30))
    rgb.save(root / "rgb.jpg")
    rgb.convert("L").save(root / "grey.png")
    rgb.convert("CMYK").save(root / "cmyk.jpg")
    rgb.convert("P").save(root / "pal.png")
    Image.new("RGBA", (20, 12), (1, 2, 3, 0)).save(root / "rgba.png")
    pt = rgb.convert("P")
    pt.info["transparency"] = 0
    pt.save(root / "pal_t.png", transparency=0)
    rows = [f"{n} {i}\n" for i, n in enumerate(["rgb.jpg", "grey.png", "cmyk.jpg", "pal.png", "rgba.png", "pal_t.png"])]
    return root, write_list(tmp_path / "modes.txt", rows)


def test_dataset_converts_every_mode_to_rgb(tmp_path):
    root, split = make_image_tree(tmp_path)
    ds = ltaux.SplitDataset(root, split, transform=torchvision.transforms.PILToTensor())
    tensors = ltaux.SplitDataset(root, split, read=pipeline.read_image)  # train.py's reader: the same pixels
    for i in range(len(ds)):
        diff = (ds[i][0].float() - tensors[i][0].float()).abs()
        assert diff.mean() < 0.5 and diff.max() <= 8, ds.paths[i]
    assert len(ds) == 6 and ds.num_classes == 6 and ds.labels == list(range(6))
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 12, 20) and x.dtype == torch.uint8 and y == i
    assert ds[0][0][0].float().mean() > 150  # red stays red


def test_dataset_seeded_items_are_reproducible_and_leave_rng_alone(tmp_path):
    Image.effect_noise((16, 16), 60).convert("RGB").save(tmp_path / "noise.png")
    split = write_list(tmp_path / "n.txt", ["noise.png 0\n"])
    ds = ltaux.SplitDataset(tmp_path, split, transform=torchvision.transforms.Compose([
        torchvision.transforms.RandomCrop(8), torchvision.transforms.PILToTensor()]))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a, b, c = ds[(0, 123)][0], ds[(0, 123)][0], ds[(0, 7)][0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("read", ["load_rgb", "read_image"])
@pytest.mark.parametrize("content, reason", [
    (None, "file not found"),
    (b"", "UnidentifiedImageError"),
    (b"this is not an image at all", "UnidentifiedImageError"),
    ("truncated", "truncated"),
])
def test_dataset_bad_image_names_path_and_line(tmp_path, content, reason, read):
    root = tmp_path / "r"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "ok.jpg")
    if content == "truncated":
        Image.effect_noise((64, 64), 50).convert("RGB").save(root / "bad.jpg", quality=95)
        data = (root / "bad.jpg").read_bytes()
        (root / "bad.jpg").write_bytes(data[: len(data) // 2])
    elif content is not None:
        (root / "bad.jpg").write_bytes(content)
    split = write_list(tmp_path / "s.txt", ["ok.jpg 0\n", "\n", "bad.jpg 1\n"])
    ds = ltaux.SplitDataset(root, split, read=ltaux.load_rgb if read == "load_rgb" else pipeline.read_image)
    ds[0]
    with pytest.raises(ltaux.LTauxError) as e:
        ds[1]
    msg = str(e.value)
    assert "s.txt:3" in msg and str(root / "bad.jpg") in msg and reason in msg
    assert "BytesIO" not in msg  # the file is named, not the buffer it was read into


@pytest.mark.parametrize("read", ["load_rgb", "read_image", "read_encoded"])
def test_a_decompression_bomb_warning_names_the_split_line_and_the_image(tmp_path, monkeypatch, read):
    """Pillow warns of an image above Image.MAX_IMAGE_PIXELS (and up to twice that) without naming it: the
    dataset re-issues it once per image (read_image's header read and decode warn twice), naming the split
    line and the image; the image is still read; a smaller image gives no warning; above twice the limit,
    Pillow's error names the file as every bad image does."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    for name, side in (("small.png", 8), ("big.png", 12), ("huge.png", 16)):  # 64, 144, 256 pixels
        Image.new("RGB", (side, side), (9, 9, 9)).save(tmp_path / name)
    split = write_list(tmp_path / "b.txt", ["small.png 0\n", "\n", "big.png 1\n", "huge.png 2\n"])
    ds = ltaux.SplitDataset(tmp_path, split, read=getattr(ltaux if read == "load_rgb" else pipeline, read))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds.load(0)
        assert caught == []
        ds.load(1)
    assert [w.category for w in caught] == [Image.DecompressionBombWarning]
    big = tmp_path / "big.png"
    assert str(caught[0].message).startswith(f"{split}:3: image {big}: Image size (144 pixels) exceeds limit")
    with pytest.raises(ltaux.LTauxError, match=r"b.txt:4: .*huge.png \(DecompressionBombError"):
        ds.load(2)


@pytest.mark.parametrize("read", ["load_rgb", "read_image"])
def test_wide_greyscale_is_rescaled_and_extreme_aspect_ratios_refused(tmp_path, read):
    ramp = Image.new("I;16", (64, 2))
    ramp.putdata([v * 1000 for v in range(64)] * 2)  # 0 .. 63000 of 65535: Pillow alone clips to white
    ramp.save(tmp_path / "g16.png")
    Image.new("RGB", (4000, 8)).save(tmp_path / "strip.png")
    Image.new("RGB", (4000, 8)).save(tmp_path / "strip.jpg")
    split = write_list(tmp_path / "w.txt", ["g16.png 0\n", "strip.png 1\n", "strip.jpg 2\n"])
    ds = ltaux.SplitDataset(tmp_path, split, transform=torchvision.transforms.PILToTensor()) if read == "load_rgb" \
        else ltaux.SplitDataset(tmp_path, split, read=pipeline.read_image)
    x = ds[0][0][0, 0].float()
    assert (x - torch.arange(64) * 1000 / 257).abs().max() <= 1  # scaled by the bit depth (/257): the ramp survives
    dark = Image.new("I;16", (4, 4))
    dark.putdata([2000] * 16)  # a dark 16-bit image stays dark (a min..max stretch would make it white or black)
    dark.save(tmp_path / "g16.png")
    assert ds[0][0].unique().tolist() == [8]
    with pytest.raises(ltaux.LTauxError, match=r"w.txt:2: .*aspect ratio 4000x8"):
        ds[1]
    with pytest.raises(ltaux.LTauxError, match=r"w.txt:3: .*aspect ratio 4000x8"):
        ds[2]


# ==============================================================================================
# recipes.py
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# the paper's methods


def test_methods_are_the_papers_four():
    """Section 4.3: RRS-Only and CBS-Only train phi + h on one batch; CBS+RRS adds h_a on B_RRS; CBS+RRS+SS adds
    h_s. A method given another sampler part, a head it does not train or the rotation task fails here."""
    got = {k: (m.name, m.sampler, tuple(m.heads), m.rotation) for k, m in recipes.METHODS.items()}
    assert got == {"rrs": ("RRS-Only", "rrs", ("fc",), False), "cbs": ("CBS-Only", "cbs", ("fc",), False),
                   "cbs_rrs": ("CBS+RRS", "cbs_rrs", ("fc", "aux_fc"), False),
                   "cbs_rrs_ss": ("CBS+RRS+SS", "cbs_rrs", ("fc", "aux_fc", "rot_fc"), True)}


# ----------------------------------------------------------------------------------------------
# the paper's rows and the recipes' protocol


@pytest.mark.skipif(not os.path.exists(PAPER_TXT), reason="no ../shared/seed/paper.txt")
def test_the_papers_rows_are_tables_1_to_5_as_printed():
    """recipes.PAPER against the paper's text: every row of Tables 1-5 that a recipe can reproduce (a swapped
    recipe, method or column fails)."""
    text = open(PAPER_TXT).read()
    tables = [text[text.index(f"Table {t - 1}:") if t > 1 else 0: text.index(f"Table {t}:")] for t in range(1, 6)]
    names = {"rrs": "RRS-Only", "cbs": "CBS-Only", "cbs_rrs": "CBS+RRS†", "cbs_rrs_ss": "CBS+RRS†+SS†",
             "ft_cbs": "ftRRS+CBS", "cbs_rrs 1:1": "1:1", "cbs_rrs 1:0.5": "1:0.5", "rotation_aug": "Rotation Augmentation"}
    left = {"imagenet_lt_r10": 1, "imagenet_lt_r50": 2}  # Table 1 / 2: ImageNet-LT in the first four columns
    right = {"places_lt_r152": 1, "places_lt_r50": 2}
    checked = 0
    for recipe, rows in recipes.PAPER.items():
        for key, (table, values) in rows.items():
            t = int(table.split()[1])
            line = next(l for l in tables[t - 1].splitlines() if l.startswith(names[key] + " "))
            numbers = [float(v) for v in line[len(names[key]):].split()]
            if t in (3, 4, 5):  # ImageNet-LT ResNet-10 left, Places-LT ResNet-50 right
                half = numbers[:4] if recipe == "imagenet_lt_r10" else numbers[4:]
            else:
                half = numbers[:4] if left.get(recipe) == t else numbers[4:]
                assert left.get(recipe, right.get(recipe, t)) == t or recipe == "places_lt_r152_2019"
            assert tuple(half) == values, (recipe, key)
            checked += 1
    assert checked == 28  # 8 + 4 + 4 + 8 rows, and the 2019 Places-LT recipe shares the ResNet-152 ones


def official_digest(name):
    """The sha256 that data_lists/SHA256SUMS gives the official list `name`."""
    return next(d for d, n in recipes.official_sums().items() if n == name)


def test_paper_row_names_the_protocol_differences(tmp_path):
    defaults = vars(train.get_args_parser().parse_args([]))
    run = dict(defaults, **recipes.RECIPES["imagenet_lt_r10"], recipe="imagenet_lt_r10", method="cbs_rrs_ss",
               split="elsewhere/ImageNet_LT_train.txt", split_sha256=official_digest("ImageNet_LT_train.txt"))
    row = recipes.paper_row(run, defaults)
    assert (row["many"], row["overall"], row["differs"]) == (52.4, 41.9, [])
    assert row["name"] == "paper: CBS+RRS+SS, Table 1 (ImageNet-LT, ResNet-10)"
    mine = write_list(tmp_path / "my_test.txt", ["a.jpg 0\n"])
    row = recipes.paper_row(dict(run, epochs=2, batch_size=64, amp="off", many=101), defaults, mine)
    assert row["differs"] == ["--batch-size 64", "--epochs 2", "--many 101",  # --amp: no protocol difference
                              f"evaluated on {mine}, not ImageNet_LT_test.txt"]
    assert recipes.paper_row(dict(run, method="rrs"), defaults)["overall"] == 32.4
    assert recipes.paper_row(dict(run, method="cbs_rrs", lambdas=[1.0, 0.5, 0.0]), defaults)["name"].startswith(
        "paper: CBS:RRS 1:0.5, Table 4")
    ft = recipes.paper_row(dict(run, method="cbs", init="rrs.pt", epochs=30, backbone_lr_scale=0.1), defaults)
    assert (ft["overall"], ft["differs"]) == (37.6, [])  # ftRRS+CBS: its stage-2 settings are not the paper's
    ft = recipes.paper_row(dict(run, method="cbs", init="rrs.pt", epochs=30, lr=0.2), defaults)
    assert ft["differs"] == ["--lr 0.2"]
    aug = recipes.paper_row(dict(run, method="cbs_rrs", rotation_aug=True, rotation="all"), defaults)
    assert aug["differs"] == [] and recipes.paper_row(dict(run, rotation="all"), defaults)["differs"] == ["--rotation all"]
    assert recipes.paper_row(dict(run, method="cbs_rrs", rotation_aug=True), defaults)["overall"] == 41.0
    assert recipes.paper_row(dict(run, method="cbs_rrs", lambdas=[2.0, 1.0, 0.0]), defaults) is None  # not in the paper
    assert recipes.paper_row(dict(run, recipe=None), defaults) is None
    assert recipes.paper_row(dict(run, recipe="cifar10_lt"), defaults) is None
    pl = dict(defaults, **recipes.RECIPES["places_lt_r152_2019"], recipe="places_lt_r152_2019", method="cbs",
              pretrained="r152.pth", split_sha256=official_digest("Places_LT_train.txt"))
    assert recipes.paper_row(pl, defaults)["overall"] == 35.7 and recipes.paper_row(pl, defaults)["differs"] == []


@pytest.mark.parametrize("recipe, method, flags, marked", [
    ("imagenet_lt_r10", "cbs_rrs_ss", dict(pretrained="w.pth"), ["--pretrained w.pth"]),  # Table 1, scratch
    ("imagenet_lt_r50", "rrs", dict(pretrained="w.pth"), ["--pretrained w.pth"]),  # Table 2
    ("places_lt_r50", "cbs", dict(pretrained="w.pth"), ["--pretrained w.pth"]),  # Table 2
    ("places_lt_r152", "cbs_rrs", dict(pretrained="w.pth"), []),  # Table 1's Places-LT fine-tunes them
    ("places_lt_r152_2019", "cbs_rrs_ss", dict(pretrained="w.pth"), []),
    ("imagenet_lt_r10", "cbs_rrs_ss", dict(init="a.pt"), ["--init a.pt"]),  # phi from another run
    ("places_lt_r152", "cbs_rrs", dict(init="a.pt", pretrained="w.pth"), ["--init a.pt"]),
    ("imagenet_lt_r10", "cbs", dict(init="rrs.pt"), []),  # ftRRS+CBS (Table 3): --init is its protocol
    ("places_lt_r50", "cbs", dict(init="rrs.pt", pretrained="w.pth"), ["--pretrained w.pth"]),
    ("imagenet_lt_r50", "cbs_rrs", dict(amp="off"), []),  # precision: not the protocol
    ("places_lt_r50", "rrs", dict(amp="fp16"), []),
])
def test_paper_row_marks_pretrained_and_init_only_where_the_table_has_none(recipe, method, flags, marked):
    """--pretrained marks a row trained from scratch (ResNet-10, Table 2) but not Table 1's Places-LT
    ResNet-152, which fine-tunes ImageNet weights; --init marks every row but ftRRS+CBS; --amp marks none."""
    defaults = vars(train.get_args_parser().parse_args([]))
    train_list = recipes.TRAIN_LISTS[recipe]
    run = dict(defaults, **recipes.RECIPES[recipe], recipe=recipe, method=method, split=train_list,
               split_sha256=official_digest(train_list), **flags)
    assert recipes.paper_row(run, defaults)["differs"] == marked


def test_paper_row_knows_the_official_lists_by_checksum_not_by_name(tmp_path):
    """A copy of an official list under any name is official; a list named like one with other lines is not
    (for the training list too), and neither is the validation list. Either Places-LT path layout counts."""
    defaults = vars(train.get_args_parser().parse_args([]))
    run = dict(defaults, **recipes.RECIPES["places_lt_r50"], recipe="places_lt_r50", method="cbs_rrs_ss")
    official_train, official_test = need("Places_LT_train.txt"), need("Places_LT_test.txt")
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(official_train, copy / "my_train.txt")
    shutil.copy(official_test, copy / "my_test.txt")
    fake = tmp_path / "fake"
    fake.mkdir()
    fake_train = write_list(fake / "Places_LT_train.txt", open(official_train).readlines()[:-1])
    fake_test = write_list(fake / "Places_LT_test.txt", open(official_test).readlines()[1:])
    assert recipes.official_name(str(copy / "my_test.txt")) == "Places_LT_test.txt"
    assert recipes.official_name(fake_test) is None
    assert recipes.official_name(str(tmp_path / "absent.txt")) is None

    def differs(train_list, test_list):
        return recipes.paper_row(dict(run, split=train_list), defaults, test_list)["differs"]
    assert differs(official_train, official_test) == []
    assert differs(str(copy / "my_train.txt"), str(copy / "my_test.txt")) == []
    assert differs(fake_train, fake_test) == [f"trained on {fake_train}, not Places_LT_train.txt",
                                              f"evaluated on {fake_test}, not Places_LT_test.txt"]
    val = need("Places_LT_val.txt")
    assert differs(official_train, val) == [f"evaluated on {val}, not Places_LT_test.txt"]
    layout = os.path.join(SHARED_LISTS, "places365_data256_layout")
    if os.path.isdir(layout):
        assert differs(*(os.path.join(layout, f"Places_LT_{s}.txt") for s in ("train", "test"))) == []
    # a checkpoint's recorded sha256 stands for a training list that is not at hand
    assert differs(str(tmp_path / "gone.txt"), official_test) == [
        f"trained on {tmp_path / 'gone.txt'} (not found here: not checked against Places_LT_train.txt)"]
    gone = dict(run, split=str(tmp_path / "gone.txt"), split_sha256=official_digest("Places_LT_train.txt"))
    assert recipes.paper_row(gone, defaults, official_test)["differs"] == []
    gone["split_sha256"] = "0" * 64
    assert recipes.paper_row(gone, defaults)["differs"] == [
        f"trained on {tmp_path / 'gone.txt'}, not Places_LT_train.txt"]


def test_paper_difference_is_run_minus_paper_per_cell_in_the_tables_order():
    """Distinct values in every cell: any two cells swapped, or the subtraction reversed, fails."""
    paper = dict(name="paper: X", many=61.0, medium=42.0, few=23.0, overall=34.0, differs=[])
    acc = dict(many=70.5, medium=40.5, few=None, overall=35.0, mean_per_class=36.0)
    assert recipes.paper_difference(acc, paper) == {"many": 9.5, "medium": -1.5, "few": None, "overall": 1.0}
    acc["few"] = 30.0
    diff = recipes.paper_difference(acc, paper)
    assert list(diff.items()) == [("many", 9.5), ("medium", -1.5), ("few", 7.0), ("overall", 1.0)]
    rows = runtime.paper_lines(acc, paper).strip().splitlines()
    assert rows == ["| paper: X | 61.0 | 42.0 | 23.0 | 34.0 | - |",
                    "| difference (run - paper) | +9.5 | -1.5 | +7.0 | +1.0 | - |"]


# ==============================================================================================
# pipeline.py
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# reading images and the recipes' transforms


def pattern_image(w=120, h=90):
    """A smooth RGB image that is neither symmetric nor square: red ramps left to right, green top to
    bottom, blue is a blob near the top-left corner (a swapped axis, offset or flip shows)."""
    xs, ys = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    blob = torch.exp(-((xs - 0.3) ** 2 + (ys - 0.2) ** 2) / 0.05)
    x = (torch.stack([ys, xs, blob]) * 230 + 10).round().to(torch.uint8)
    return x, torchvision.transforms.functional.to_pil_image(x)


def test_crop_draws_torchvisions_crop_and_flip_and_applies_them_as_pil_does():
    crop, (x, img) = pipeline.RandomResizedCropFlip(48), pattern_image()
    T = torchvision.transforms
    flips, differences = [], []
    for seed in range(60):
        torch.manual_seed(seed)
        p = crop.params(90, 120)
        torch.manual_seed(seed)  # torchvision's RandomResizedCrop then RandomHorizontalFlip, on PIL
        want = T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) + (int(torch.rand(1) < 0.5),)
        assert p == want
        top, left, h, w, flip = p
        ref = img.resize((48, 48), Image.BILINEAR, box=(left, top, left + w, top + h))
        ref = T.functional.pil_to_tensor(ref.transpose(Image.FLIP_LEFT_RIGHT) if flip else ref)
        out = crop.apply(x, p)
        assert out.shape == (3, 48, 48) and out.dtype == torch.uint8
        differences.append((out.float() - ref.float()).abs().mean())
        flips.append(flip)
    assert max(differences) < 1.0  # the same crop, resize and flip as PIL, to within a grey level
    noise = Image.effect_noise((120, 90), 60).convert("RGB")  # aliasing shows on noise: antialiased like PIL
    small = pipeline.RandomResizedCropFlip(24).apply(T.functional.pil_to_tensor(noise), (0, 0, 90, 120, 0))
    pil = T.functional.pil_to_tensor(noise.resize((24, 24), Image.BILINEAR))
    assert (small.float() - pil.float()).abs().mean() < 1.0
    assert 15 < sum(flips) < 45
    torch.manual_seed(3)
    a = crop(x)
    torch.manual_seed(3)
    assert torch.equal(a, crop.apply(x, crop.params(90, 120)))  # __call__ = params then apply


def test_read_image_decodes_jpegs_with_decode_jpeg_and_the_rest_with_pillow(tmp_path, monkeypatch):
    root, split = make_image_tree(tmp_path)
    calls = []
    real = pipeline.decode_jpeg
    monkeypatch.setattr(pipeline, "decode_jpeg", lambda data, **kw: calls.append(len(data)) or real(data, **kw))
    for name in ("rgb.jpg", "cmyk.jpg", "grey.png", "pal.png"):
        x = pipeline.read_image(str(root / name))
        assert x.shape == (3, 12, 20) and x.dtype == torch.uint8
    assert calls == [os.path.getsize(root / "rgb.jpg"), os.path.getsize(root / "cmyk.jpg")]


def test_worker_transforms_follow_the_recipes():
    """Test time: resize the short side to size * 256 / 224, centre crop. CIFAR: pad 4, crop, flip."""
    ramp = torch.arange(256, dtype=torch.uint8).expand(3, 256, 256).contiguous()  # value = column
    out = pipeline.build_transform(224, train=False)(ramp)
    assert out.shape == (3, 224, 224) and out[0, 0, 0] == 16 and out[0, 0, -1] == 239  # 256 px, centre 224
    ramp = (50 + 5 * torch.arange(32)).to(torch.uint8).expand(3, 32, 32).contiguous()
    seeds = torch.randint(0, 2**62, (200,), generator=torch.Generator().manual_seed(0))
    x = pipeline.cifar_augment(ramp.expand(200, 3, 32, 32), seeds)[:, 0].float()
    flipped = (x[:, 16, 8:24].diff(dim=1).mean(1) < 0).sum()
    padded = (x == 0).flatten(1).any(1).sum()
    assert 60 < flipped < 140 and 180 < padded < 200  # flipped half the time, padded 80 times in 81


def reference_cifar_crop(img, top, left, flip, pad=4):
    """One image the textbook way: zero-pad, slice, flip."""
    padded = torch.zeros(3, img.shape[1] + 2 * pad, img.shape[2] + 2 * pad, dtype=img.dtype)
    padded[:, pad:pad + img.shape[1], pad:pad + img.shape[2]] = img
    out = padded[:, top:top + img.shape[1], left:left + img.shape[2]]
    return out.flip(-1) if flip else out


def test_cifar_augment_is_pad_crop_flip_drawn_from_each_seed():
    """Each image: zero-pad 4, crop at (seed mod 9, seed div 9 mod 9), flip if seed div 81 is odd; batched
    exactly as one by one (top/left swapped, flip axis, padding side or the digits wrong: fails)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 12, 10), dtype=torch.uint8, generator=g)
    seeds = torch.randint(0, 2**62, (64,), generator=g)
    out = pipeline.cifar_augment(x, seeds)
    assert out.shape == x.shape and out.dtype == torch.uint8
    for i in range(64):
        s = int(seeds[i])
        assert torch.equal(out[i], reference_cifar_crop(x[i], s % 9, s // 9 % 9, s // 81 % 2))
        assert torch.equal(pipeline.cifar_augment(x[i:i + 1], seeds[i:i + 1])[0], out[i])  # alone = in a batch
    big = torch.randint(0, 2**62, (20000,), generator=g)
    for digit in (big % 9, big // 9 % 9):
        assert (torch.bincount(digit, minlength=9).float() / 20000 - 1 / 9).abs().max() < 0.015  # uniform offsets
    assert abs(float((big // 81 % 2).float().mean()) - 0.5) < 0.02


# ----------------------------------------------------------------------------------------------
# colour jitter and normalisation on the device


def jitter_factors(which, n=2000, seed=0):
    """Run color_jitter with one operation on, on mid-range images (no clamping), and read back each
    image's factor together with torchvision's own operation applied with that factor."""
    import torchvision.transforms.functional as TF
    g = torch.Generator().manual_seed(seed)
    x = 60 + 120 * torch.rand(n, 3, 4, 4, generator=g)
    strengths = {**dict(brightness=0.0, contrast=0.0, saturation=0.0), which: 0.4}
    out = pipeline.color_jitter(x, torch.Generator().manual_seed(seed + 1), **strengths)
    if which == "brightness":
        f = (out / x).mean(dim=(1, 2, 3))
        ref = torch.stack([TF.adjust_brightness(x[i] / 255, float(f[i])) * 255 for i in range(8)])
    elif which == "contrast":
        f = out.std(dim=(1, 2, 3)) / x.std(dim=(1, 2, 3))
        ref = torch.stack([TF.adjust_contrast(x[i] / 255, float(f[i])) * 255 for i in range(8)])
    else:
        g_x = pipeline.grey(x)
        f = ((out - g_x) * (x - g_x)).sum(dim=(1, 2, 3)) / ((x - g_x) ** 2).sum(dim=(1, 2, 3))
        ref = torch.stack([TF.adjust_saturation(x[i] / 255, float(f[i])) * 255 for i in range(8)])
    return f, out[:8], ref


@pytest.mark.parametrize("which", ["brightness", "contrast", "saturation"])
def test_color_jitter_is_torchvisions_operation_with_uniform_factors(which):
    f, out, ref = jitter_factors(which)
    assert torch.allclose(out, ref, atol=1e-2)  # the same operation as torchvision, factor for factor (0..255)
    assert f.min() >= 0.6 - 1e-4 and f.max() <= 1.4 + 1e-4  # ColorJitter(0.4): uniform in [0.6, 1.4]
    quantiles = torch.linspace(0.6, 1.4, len(f))
    assert (f.sort().values - quantiles).abs().max() < 0.04  # and uniform (Kolmogorov-Smirnov distance)


def test_training_images_are_jittered_on_the_device_and_only_at_imagenet_sizes():
    x = torch.full((4, 3, 8, 8), 128, dtype=torch.uint8)
    plain = pipeline.to_device(x, torch.device("cpu"))
    jittered = pipeline.to_device(x, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.allclose(plain[0], plain[1]) and not torch.allclose(jittered[0], jittered[1])
    again = pipeline.to_device(x, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.equal(jittered, again)  # seeded per step: an exact resume
    assert pipeline.jitter_on_device(224, train=True) and not pipeline.jitter_on_device(224, train=False)
    assert not pipeline.jitter_on_device(32, train=True)  # the CIFAR recipe has no colour jitter
    x = torch.full((3, 300, 200), 100, dtype=torch.uint8)
    for size, train_ in ((224, True), (224, False), (32, False)):  # workers: no jitter, uint8 out
        assert torch.equal(pipeline.build_transform(size, train_)(x), torch.full((3, size, size), 100, dtype=torch.uint8))
    cifar = pipeline.build_transform(32, train=True)(x)  # the fixed part; the random crop comes from the seed
    assert torch.equal(cifar, torch.full((3, 32, 32), 100, dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_grey_is_the_itu_r_601_luma_bit_for_bit(dtype):
    """torchvision's tensor rgb_to_grayscale gives the formula's float luma exactly, uint8 in or float in."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 17, 13), generator=g).to(dtype)
    if dtype.is_floating_point:
        x = x + torch.rand(x.shape, generator=g)  # fractions too, as after brightness and contrast
    want = (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # float32 either way
    out = pipeline.grey(x)
    assert out.shape == (8, 1, 17, 13) and out.dtype == torch.float32 and torch.equal(out, want)



# ----------------------------------------------------------------------------------------------
# --in-memory and --decode gpu: the same pixels as the workers


def test_in_memory_batches_are_the_workers_batches(tmp_path):
    """MemoryBatches (gather + cifar_augment on the device) and a DataLoader over SeededCifar (workers) give
    the same uint8 batches, bit for bit, for a whole epoch and from a mid-epoch start."""
    root, lists = make_tiny(tmp_path)
    ds = ltaux.SplitDataset(root, lists["train"], pipeline.build_transform(16, train=True), read=pipeline.read_image)
    sampler = ltaux.AuxBatchSampler(ds.labels, 8, 2, with_seeds=True, seed=3)
    memory = pipeline.MemoryBatches(*pipeline.decode_all(ds, torch.device("cpu")), sampler)
    workers = torch.utils.data.DataLoader(pipeline.SeededCifar(ds), batch_sampler=sampler, num_workers=1)
    for epoch, first in ((0, 0), (1, 0), (2, 5)):
        sampler.set_epoch(epoch, first)
        a, b = list(memory), list(workers)
        assert len(a) == len(b) == 12 - first
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][0], a[1][0])


def jpeg_set(root, n=10, png=(3,)):
    """n noisy JPEGs of different sizes (one greyscale), entries in `png` saved as PNG: a split list."""
    os.makedirs(root, exist_ok=True)
    rows = []
    for i in range(n):
        img = Image.effect_noise((70 + 9 * i, 60 + 5 * (i % 4)), 40 + i).convert("RGB")
        img = Image.merge("RGB", (img.getchannel(0), img.getchannel(1).rotate(90), img.getchannel(2)))
        name = f"{i}.png" if i in png else f"{i}.jpg"
        (img.convert("L") if i == 5 else img).save(root / name, **({} if i in png else {"quality": 90}))
        rows.append(f"{name} {i % 3}\n")
    return write_list(root / "list.txt", rows)


def both_paths(root, split, items, size=64, device="cpu"):
    """The same seeded items through the workers' CPU path and through --decode gpu's two halves."""
    ds = ltaux.SplitDataset(root, split, pipeline.build_transform(size, train=True), read=pipeline.read_image)
    cpu_images, cpu_labels = torch.utils.data.default_collate([ds[it] for it in items])
    dd = pipeline.DeviceDecodeDataset(ds, size)
    batch = dd.collate([dd[it] for it in items])
    images, labels = dd.decode(batch, torch.device(device))
    assert torch.equal(labels, cpu_labels) and torch.equal(batch[1][:, 0], torch.tensor([i for i, _ in items]))
    return cpu_images, images, batch


def test_decode_gpu_path_on_cpu_gives_the_workers_images_bit_for_bit(tmp_path):
    split = jpeg_set(tmp_path)
    items = [(i % 10, 1000 + i) for i in range(20)]
    before = torch.get_rng_state()
    cpu_images, images, (data, _, _) = both_paths(tmp_path, split, items, size=64)
    assert torch.equal(torch.get_rng_state(), before)  # seeded items leave the caller's RNG alone
    assert images.dtype == torch.uint8 and images.shape == (20, 3, 64, 64)
    assert torch.equal(images, cpu_images)  # same seeds -> same crops; decode_jpeg on CPU = Pillow's pixels
    assert [d.dim() for d in data] == [3 if i == 3 else 1 for i, _ in items]  # JPEGs travel as bytes only
    assert not torch.equal(images[0], images[10])  # image 0 under two seeds: two crops


def crop_cases(tmp_path, size=64):
    """Images (jpeg_set's 10 and two pattern images, decoded on the CPU) with seeded crop draws, plus a
    whole-image crop and a crop already size x size: (images [uint8 (3, H, W)], params (B, 5) int64)."""
    split = jpeg_set(tmp_path)
    names = [line.split()[0] for line in open(split)]
    pictures = [pipeline.read_image(str(tmp_path / n)) for n in names]
    pictures += [pattern_image()[0], pattern_image(90, 130)[0]]
    crop, images, params = pipeline.RandomResizedCropFlip(size), [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for k in range(48):
            x = pictures[k % len(pictures)]
            images.append(x)
            params.append(crop.params(*x.shape[-2:]))
    x = pictures[-1]
    images += [x, x, x]
    params += [(0, 0, 130, 90, 1), (7, 5, size, size, 1), (30, 2, size, size, 0)]
    return images, torch.tensor(params)


def test_decode_gpu_float_crop_matches_the_uint8_crop_within_one_level(tmp_path, monkeypatch):
    """crop_batch's float path (CUDA's: interpolate in float, rounded half up) against the workers'
    RandomResizedCropFlip.apply, image by image: the same crop and flip, within one grey level, rounded
    (no bias); the uint8 path (the CPU's) equal bit for bit."""
    images, params = crop_cases(tmp_path)
    crop = pipeline.RandomResizedCropFlip(64)
    ref = torch.stack([crop.apply(x, p) for x, p in zip(images, params.tolist())])  # the workers' crops
    tall = params[:, 2] - params[:, 3]  # crop height - width: both signs, so a transposed box shows
    assert 0 < params[:, 4].sum() < len(params) and tall.max() > 0 > tall.min()  # and both flips
    assert torch.equal(pipeline.crop_batch(images, params, 64, torch.device("cpu")), ref)
    monkeypatch.setattr(pipeline, "UINT8_RESIZE", ())  # the float path, as on CUDA
    out = pipeline.crop_batch(images, params, 64, torch.device("cpu"))
    assert out.dtype == torch.uint8 and out.shape == ref.shape
    d = out.int() - ref.int()  # (B, 3, 64, 64)
    assert d.abs().max() <= 1  # the same crop, resize and flip in every image
    # the CPU kernel rounds to uint8 after each of its two passes, in fixed point: some pixels are one
    # level apart, without a bias (truncating the float path would shift the mean by about -0.5)
    assert (d != 0).float().mean() < 0.25 and abs(d.float().mean()) < 0.05
    assert torch.equal(out[-2:], ref[-2:])  # a size x size crop: its pixels as they are (one of them flipped)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", "cpu-float", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA"))])
def test_decode_gpu_path_has_the_workers_augmentation_statistics(tmp_path, device, monkeypatch):
    """Over 200 seeded crops of 4 pattern JPEGs: per-image mean and spread, the flip (which way the
    red ramp rises) and the zoom (how much of the ramp the crop spans) agree between the two halves
    (on CUDA nvjpeg and the resize differ in bits, not in distribution). cpu-float: CUDA's float crop."""
    if device == "cpu-float":
        monkeypatch.setattr(pipeline, "UINT8_RESIZE", ())
        device = "cpu"
    rows = []
    for i in range(4):
        pattern_image(100 + 30 * i, 90 + 10 * i)[1].save(tmp_path / f"{i}.jpg", quality=90)
        rows.append(f"{i}.jpg {i}\n")
    split = write_list(tmp_path / "p.txt", rows)
    cpu_images, images, _ = both_paths(tmp_path, split, [(i % 4, i) for i in range(200)], device=device)

    def stats(x):
        red = x.float().cpu()[:, 0].mean(dim=1)  # (B, 64): the red ramp across the crop
        return torch.stack([x.float().cpu().mean(dim=(1, 2, 3)), x.float().cpu().std(dim=(1, 2, 3)),
                            (red[:, -8:].mean(1) > red[:, :8].mean(1)).float(), (red[:, -8:].mean(1) -
                            red[:, :8].mean(1)).abs()], 1)

    a, b = stats(cpu_images), stats(images)
    assert 0.3 < a[:, 2].mean() < 0.7 and a[:, 3].std() > 10  # the statistics vary: they can tell
    # each statistic within its bound (a list `<` would compare the first one alone), image by image
    assert ((a - b).abs().mean(0) < torch.tensor([1.0, 1.0, 0.02, 1.0])).all()
    assert ((a.mean(0) - b.mean(0)).abs() < torch.tensor([0.5, 0.5, 0.01, 0.5])).all()  # and on average


def test_decode_gpu_falls_back_to_the_cpu_path_and_names_a_bad_file(tmp_path, monkeypatch):
    split = jpeg_set(tmp_path)
    rejected = pipeline.read_encoded(str(tmp_path / "4.jpg"))[0]
    calls, real = [], pipeline.decode_jpeg

    def picky(data, **kw):  # a device decoder that cannot read 4.jpg (as nvjpeg with some files)
        calls.append((len(data) if isinstance(data, list) else 1, "device" in kw))
        if any(torch.equal(d, rejected) for d in (data if isinstance(data, list) else [data])):
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, **kw)

    items = [(i, 7 + i) for i in range(10)]
    ds = ltaux.SplitDataset(tmp_path, split, pipeline.build_transform(64, train=True), read=pipeline.read_image)
    want = torch.stack([ds[it][0] for it in items])
    monkeypatch.setattr(pipeline, "decode_jpeg", picky)
    dd = pipeline.DeviceDecodeDataset(ds, 64)
    images, _ = dd.decode(dd.collate([dd[it] for it in items]), torch.device("cpu"))
    assert torch.equal(images, want)  # 4.jpg read by Pillow instead, same crop
    # one batched call for the 9 JPEGs, then one by one on the device, then 4.jpg by read_image (Pillow)
    assert calls == [(9, True)] + [(1, True)] * 9 + [(1, False)]

    data = (tmp_path / "6.jpg").read_bytes()
    (tmp_path / "6.jpg").write_bytes(data[: len(data) // 2])  # its header still parses: the worker sends it
    batch = dd.collate([dd[it] for it in items])
    with pytest.raises(ltaux.LTauxError, match=r"list.txt:7: cannot read image .*6.jpg .*truncated"):
        dd.decode(batch, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# --in-memory: what fits, and a stop signal while decoding


GIB = 2**30
MEMINFO_8G = "MemTotal:       16777216 kB\nMemFree:         1048576 kB\nMemAvailable:    8388608 kB\n"


@pytest.mark.parametrize("files, free", [
    ({"proc/meminfo": MEMINFO_8G}, 8 * GIB),  # no cgroup limit
    ({"proc/meminfo": "MemTotal: 4194304 kB\nMemFree: 1048576 kB\n"}, 1 * GIB),  # kernel without MemAvailable
    # cgroup v2 container: 4 GiB limit, 3 GiB used of which 1 GiB reclaimable file cache
    ({"proc/meminfo": MEMINFO_8G, "proc/self/cgroup": "0::/\n", "sys/fs/cgroup/memory.max": f"{4 * GIB}\n",
      "sys/fs/cgroup/memory.current": f"{3 * GIB}\n",
      "sys/fs/cgroup/memory.stat": f"anon 5\ninactive_file {GIB}\n"}, 2 * GIB),
    ({"proc/meminfo": MEMINFO_8G, "proc/self/cgroup": "0::/\n", "sys/fs/cgroup/memory.max": "max\n",
      "sys/fs/cgroup/memory.current": f"{3 * GIB}\n"}, 8 * GIB),  # v2, no limit
    ({"proc/meminfo": MEMINFO_8G, "proc/self/cgroup": "0::/a/b\n", "sys/fs/cgroup/a/memory.max": f"{3 * GIB}",
      "sys/fs/cgroup/a/memory.current": f"{GIB}", "sys/fs/cgroup/a/b/memory.max": "max",
      "sys/fs/cgroup/a/b/memory.current": f"{GIB // 2}"}, 2 * GIB),  # v2: the parent's limit binds
    ({"proc/meminfo": MEMINFO_8G, "proc/self/cgroup": "4:memory:/docker/x\n",
      "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712",
      "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{GIB}"}, 8 * GIB),  # v1, no limit (2^63 in pages)
    ({"proc/self/cgroup": "4:memory:/\n", "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712",
      "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{GIB}"}, None),  # no limit is no figure
    ({"proc/meminfo": MEMINFO_8G, "proc/self/cgroup": "5:cpu,memory:/docker/x\n0::/\n",
      "sys/fs/cgroup/memory/memory.limit_in_bytes": f"{2 * GIB}",
      "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{3 * GIB // 2}",
      "sys/fs/cgroup/memory/memory.stat": f"cache 9\ntotal_inactive_file {GIB // 2}\n"},
     1 * GIB),  # v1 container (its cgroup is the mount's root): 2 GiB limit, 1 GiB in use
    ({"proc/meminfo": "MemTotal: 8 kB\n"}, None),  # nothing says: unknown, not zero
    ({}, None),  # no /proc at all (macOS)
])
def test_host_memory_is_the_least_of_meminfo_and_every_cgroup_limit(tmp_path, files, free):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert pipeline.host_memory_free(str(tmp_path)) == free
    available = pipeline.memory_available(torch.device("cpu"), str(tmp_path))
    assert available == (None if free is None else max(0, free - max(GIB, free // 4)))  # the safety margin


def test_memory_available_on_cuda_is_the_devices_free_memory(monkeypatch, tmp_path):
    asked = []

    def mem_get_info(device=None):
        asked.append(device)
        return 8 * GIB, 9 * GIB  # free, total
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "meminfo").write_text("MemAvailable: 1024 kB\n")  # the host's: not asked
    assert pipeline.memory_available(torch.device("cuda", 1), str(tmp_path)) == 6 * GIB
    assert asked == [torch.device("cuda", 1)]


def test_in_memory_plan_decides_from_free_memory_and_refuses_on_in_one_line(monkeypatch):
    monkeypatch.setattr(pipeline, "memory_available", lambda device, root="/": 3 * GIB)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cpu, logged = torch.device("cpu"), []
    assert pipeline.in_memory_plan("auto", 3 * GIB, cpu, logged.append) and not logged
    assert not pipeline.in_memory_plan("auto", 3 * GIB + 1, cpu, logged.append)
    assert len(logged) == 1 and "DataLoader workers instead" in logged[0]
    assert not pipeline.in_memory_plan("off", 1, cpu) and pipeline.in_memory_plan("on", 3 * GIB, cpu)
    with pytest.raises(ltaux.LTauxError) as e:
        pipeline.in_memory_plan("on", 5 * GIB, cpu)
    msg = str(e.value)
    assert "\n" not in msg and "(5,368,709,120 bytes)" in msg and "(3,221,225,472 bytes)" in msg
    assert msg.startswith("--in-memory on: ") and "use --in-memory off" in msg
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes of the run on this host: a copy each
    assert not pipeline.in_memory_plan("auto", 2 * GIB, cpu)
    assert pipeline.in_memory_plan("auto", 2 * GIB, torch.device("cuda", 0))  # a device each
    monkeypatch.setattr(pipeline, "memory_available", lambda device, root="/": None)  # unknown (macOS)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert pipeline.in_memory_plan("auto", 2 * GIB, cpu)
    assert not pipeline.in_memory_plan("auto", 2 * GIB + 1, cpu)
    assert pipeline.in_memory_plan("on", 100 * GIB, cpu)  # nothing to refuse it on


class CountedImages(torch.utils.data.Dataset):
    """n tiny uint8 images (3, 4, 4) holding their index; records which were read (in this process)."""

    def __init__(self, n):
        self.labels, self.calls = [i % 3 for i in range(n)], []

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        self.calls.append(i)
        return torch.full((3, 4, 4), i, dtype=torch.uint8), self.labels[i]


class Stop(Exception):
    pass


def raise_stop():
    raise Stop  # as train.py's StopFlag.before_training once a signal arrived


def test_decode_all_asks_stop_after_every_small_batch_and_ends_there():
    cpu = torch.device("cpu")
    ds, asked = CountedImages(200), []
    images, labels = pipeline.decode_all(ds, cpu, stop=lambda: asked.append(len(ds.calls)) and False)
    assert images.shape == (200, 3, 4, 4) and labels.tolist() == ds.labels
    assert torch.equal(images[:, 0, 0, 0], torch.arange(200, dtype=torch.uint8))  # in order
    assert asked[-1] == 200 and len(asked) >= 200 // 32  # asked after every batch
    ds = CountedImages(200)
    assert pipeline.decode_all(ds, cpu, stop=lambda: True) is None
    assert 0 < len(ds.calls) <= 32  # one batch, a small one: a stop is seen within about a second
    ds, asked = CountedImages(200), []

    def stop():
        asked.append(1)
        if len(asked) == 2:
            raise_stop()
    with pytest.raises(Stop):
        pipeline.decode_all(ds, cpu, stop=stop)
    assert len(asked) == 2 and len(ds.calls) <= 64  # the exception ends it: no batch after


def test_decode_all_stopped_shuts_its_workers_down_at_once():
    import multiprocessing
    with pytest.raises(Stop) as e:  # e holds the traceback, and so decode_all's frame, past this line
        pipeline.decode_all(CountedImages(5000), torch.device("cpu"), workers=1, stop=raise_stop)
    assert e.traceback and not multiprocessing.active_children()  # shut down now, not with the traceback


@pytest.mark.slow
def test_in_memory_on_that_does_not_fit_is_refused_before_decoding(tiny, tmp_path, capsys, monkeypatch):
    """train.py asks in_memory_plan first: `on` beyond the free memory ends in one line naming both sizes, no
    image decoded, nothing written; `auto` trains with DataLoader workers instead and says why."""
    def no_decode(*args, **kw):
        raise AssertionError("decoded although it cannot fit")
    monkeypatch.setattr(pipeline, "decode_all", no_decode)
    monkeypatch.setattr(pipeline, "memory_available", lambda device, root="/": 1000)
    images = sum(len(open(f).readlines()) for f in tiny[1].values())
    msg = bad_run(tiny, tmp_path, capsys, "--in-memory", "on")
    assert f"need 0.00 GiB ({images * 3 * 16 * 16:,} bytes)" in msg and "(1,000 bytes) to spare" in msg
    assert "use --in-memory off" in msg and not (tmp_path / "o").exists()
    rc, cap = run_train(tiny, tmp_path / "auto", "--in-memory", "auto", "--epochs", "1", capsys=capsys)
    assert rc == 0 and "in memory: no, the decoded images need" in cap.out


def sigint_at_image(n, monkeypatch):
    """Send this process a SIGINT as SplitDataset.load reads its n-th image; returns the list of reads."""
    real, calls = ltaux.SplitDataset.load, []

    def load(self, i, read=None):
        calls.append(i)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, i, read)
    monkeypatch.setattr(ltaux.SplitDataset, "load", load)
    return calls


@pytest.mark.slow
def test_sigint_while_decoding_into_memory_ends_after_the_batch(tiny, tmp_path, capsys, monkeypatch):
    calls = sigint_at_image(20, monkeypatch)
    rc, cap = run_train(tiny, tmp_path / "o", "--in-memory", "on", capsys=capsys)
    assert rc == 128 + signal.SIGINT and "Traceback" not in cap.err
    assert cap.err.strip() == "error: SIGINT before training started: stopped, nothing was written"
    total = sum(len(open(f).readlines()) for f in tiny[1].values())
    assert len(calls) <= 20 + pipeline.DECODE_BATCH < total and not (tmp_path / "o").exists()


# ==============================================================================================
# runtime.py
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# device and precision: convolutions narrower than their stride train in fp32 on the CPU


def conv_outputs(model, x, amp):
    """{conv name: (input width, output dtype)} of one forward pass of x (B, 3, H, W) under CPU autocast."""
    seen, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            record = lambda _, i, o, name=name: seen.update({name: (i[0].shape[-1], o.dtype)})  # noqa: E731
            hooks.append(m.register_forward_hook(record))
    with torch.autocast("cpu", dtype=amp):
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_build_model_keeps_convs_narrower_than_their_stride_in_fp32_on_the_cpu(tiny, tmp_path):
    """At 16 px ResNet-10's layer4 sees 1 x 1 inputs: its two stride-2 convolutions run in fp32 under CPU
    bf16 autocast, every other convolution in bf16 (a guard that misses them, or one that turns the whole
    network fp32, fails); the weights and state_dict keys are a plain LTResNet's; CUDA models are left
    alone."""
    args, _ = train.parse_args(base_args(tiny, tmp_path / "o"))
    args.world_size = 1
    torch.manual_seed(0)
    model = train.build_model(args, 6, torch.device("cpu"))
    torch.manual_seed(0)
    plain = ltaux.LTResNet("resnet10", 6, 8).state_dict()
    assert list(model.state_dict()) == list(plain)
    assert all(torch.equal(v, plain[k]) for k, v in model.state_dict().items())
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    got = conv_outputs(model, x, torch.bfloat16)
    fp32 = {name for name, (_, dtype) in got.items() if dtype == torch.float32}
    assert fp32 == {"backbone.layer4.0.conv1", "backbone.layer4.0.downsample.0"}, got
    assert all(width == 1 for name, (width, _) in got.items() if name in fp32)
    assert all(dtype == torch.bfloat16 for name, (_, dtype) in got.items() if name not in fp32)
    cuda = runtime.guard_narrow_convs(ltaux.LTResNet("resnet10", 6, 8), torch.device("cuda"))
    assert all(type(m) is not runtime.NarrowInputConv2d for m in cuda.modules())


@pytest.mark.skipif(not runtime.cpu_runs_bf16(), reason="oneDNN computes no bf16 on this CPU")
def test_weight_gradients_of_convs_narrower_than_their_stride_are_right_under_cpu_bf16(tiny, tmp_path):
    """oneDNN's bf16 weight-gradient kernel of a padded convolution whose input is narrower than its stride
    leaves garbage (NaN now and then) in the taps that see only padding, in most steps on a CPU with native
    bf16. Through the guard, under bf16 autocast: the fp32 gradient in every trial, for stride 2, 3 and 4;
    and in a 16 px ResNet-10 as train.py builds it, layer4's first convolution (input 1 x 1) gets gradient
    only in its centre tap, step after step."""
    torch.manual_seed(0)
    for stride, width in ((2, 1), (3, 2), (4, 3)):
        conv = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, stride, 1, bias=False))
        runtime.guard_narrow_convs(conv, torch.device("cpu"))
        w = conv[0].weight
        for _ in range(40):
            x = torch.randn(2, 16, 4, width).contiguous(memory_format=torch.channels_last)
            w.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16):
                conv(x).float().sum().backward()
            ref, = torch.autograd.grad(F.conv2d(x, w, stride=stride, padding=1).sum(), w)
            assert (w.grad[..., 0] == 0).all(), (stride, width)  # the taps left of the input see only padding
            assert torch.allclose(w.grad, ref, rtol=1e-5, atol=1e-5), (stride, width)
    args, _ = train.parse_args(base_args(tiny, tmp_path / "o"))
    args.world_size = 1
    model = train.build_model(args, 6, torch.device("cpu"))
    w = model.backbone.layer4[0].conv1.weight
    for _ in range(20):
        x = torch.randn(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F.cross_entropy(model(x), torch.arange(8) % 6).backward()
        border = w.grad.clone()
        border[:, :, 1, 1] = 0
        assert torch.isfinite(w.grad).all() and (border == 0).all() and (w.grad[:, :, 1, 1] != 0).any()


# ----------------------------------------------------------------------------------------------
# files: atomic writes, a second signal while writing


KILLER = r"""
import os, signal, sys, torch
sys.path.insert(0, sys.argv[1])
import bookkeeping
path = sys.argv[2]
bookkeeping.atomic_write(path, {"v": torch.zeros(3)})   # the good, old checkpoint
class Bomb:
    def __reduce__(self):                          # runs while torch.save is writing the new one
        os.kill(os.getpid(), signal.SIGKILL)
if sys.argv[3] == "during-write":
    bookkeeping.atomic_write(path, {"v": torch.ones(1 << 20), "x": Bomb()})
else:                                              # after the bytes are written, before the rename
    os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
    bookkeeping.atomic_write(path, {"v": torch.ones(1 << 20)})
"""


@pytest.mark.slow
@pytest.mark.parametrize("when", ["during-write", "before-rename"])
def test_kill_during_save_leaves_the_old_checkpoint(tmp_path, when):
    path = tmp_path / "last.pt"
    p = subprocess.run([sys.executable, "-c", KILLER, HERE, str(path), when], capture_output=True)
    assert p.returncode == -signal.SIGKILL
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.zeros(3))


def test_a_second_signal_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    stop = bookkeeping.StopFlag(torch.device("cpu"), 1)
    try:
        stop.handle(signal.SIGINT, None)
        assert stop.agreed() and exits == []
        stop.handle(signal.SIGTERM, None)  # the same request delivered twice (Slurm + torchrun): no exit
        assert exits == []
        stop.last -= 2.0
        stop.handle(signal.SIGINT, None)  # a second Ctrl-C a while later: out, now
        assert exits == [128 + signal.SIGINT]
    finally:
        stop.restore()


def test_a_second_signal_during_a_save_waits_for_the_file_to_be_whole(monkeypatch, tmp_path):
    """A second signal that comes while a checkpoint is being written exits as soon as the file is whole
    (renamed into place), not in the middle: no half file, no .tmp file left behind."""
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    stop = bookkeeping.StopFlag(torch.device("cpu"), 1)
    try:
        stop.handle(signal.SIGTERM, None)
        stop.last -= 2.0
        with stop.saving():
            bookkeeping.atomic_write(str(tmp_path / "last.pt"), {"v": torch.zeros(3)})
            stop.handle(signal.SIGTERM, None)  # a second request, mid-write
            assert exits == []
        assert exits == [128 + signal.SIGTERM] and os.listdir(tmp_path) == ["last.pt"]
    finally:
        stop.restore()


def test_predict_runs_the_model_in_eval_mode():
    """runtime.predict uses BatchNorm's running statistics (eval mode), whatever mode the model was in and
    whatever the batch size, and changes no weight or statistic: features equal the eval-mode model's."""
    torch.manual_seed(0)
    model = ltaux.LTResNet("resnet10", num_classes=6, embed_dim=8)
    for m in model.modules():  # running statistics far from any batch's
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 3)
    images, labels = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8), torch.arange(12) % 6
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        x = pipeline.to_device(images, torch.device("cpu"))
        want, want_f = model.eval()(x).argmax(1), model.features(x)
    model.train()
    for bs in (3, 12):
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=bs)
        pred, _, feats = runtime.predict(model, loader, torch.device("cpu"), features=True)
        assert torch.equal(pred, want) and torch.allclose(feats, want_f, atol=1e-5)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_predict_is_the_deployed_model_phi_and_h():
    """runtime.predict (validation, the final test, evaluate.py) classifies with phi and h (fc) alone: with
    h_a and h_s made to disagree with h on every image, its predictions are the model's forward's."""
    torch.manual_seed(0)
    model = ltaux.LTResNet("resnet10", num_classes=6, embed_dim=8).eval()
    with torch.no_grad():
        model.aux_fc.weight.copy_(-model.fc.weight)
        model.aux_fc.bias.copy_(-model.fc.bias)
    images, labels = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8), torch.arange(10) % 6
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=4)
    pred, target = runtime.predict(model, loader, torch.device("cpu"))
    with torch.no_grad():
        logits = model(pipeline.to_device(images, torch.device("cpu")))
    assert torch.equal(target, labels) and torch.equal(pred, logits.argmax(1))
    assert not torch.equal(pred, model.aux_fc(model.features(pipeline.to_device(images, torch.device("cpu")))).argmax(1))


# ==============================================================================================
# train.py
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# tiny data and finished runs, shared by the sections below


TRAIN_COUNTS = [40, 25, 12, 6, 5, 4]


def make_tiny(root, flat_test=False):
    """6 classes of 16 px PNGs (40 ... 4 training images) in class folders, balanced val and test lists;
    flat_test: the test images in one folder (test/<k>_<i>.png, as Places-LT's val_256/)."""
    g = torch.Generator().manual_seed(0)
    lists = {}
    for split, counts in (("train", TRAIN_COUNTS), ("val", [3] * 6), ("test", [4] * 6)):
        rows, flat = [], flat_test and split == "test"
        for c, n in enumerate(counts):
            folder = root / split / ("" if flat else f"c{c}")
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                x = (torch.rand(3, 16, 16, generator=g) * 80 + c * 30).to(torch.uint8)
                name = f"{c}_{i}.png" if flat else f"{i}.png"
                pipeline.save_png(x, str(folder / name))
                rows.append(f"{os.path.relpath(folder / name, root)} {c}\n")
        lists[split] = write_list(root / f"tiny_{split}.txt", rows)
    return root, lists


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def base_args(tiny, out, *extra, amp="off"):
    """A tiny run's command line. amp: its --amp, fp32 unless a test is about precision (None: --amp's
    default, which depends on the CPU), so that no test depends on the machine's precision."""
    root, lists = tiny
    return ["--data", str(root), "--split", lists["train"], "--val-split", lists["val"], "--test-split",
            lists["test"], "--arch", "resnet10", "--image-size", "16", "--batch-size", "8", "--per-class", "2",
            "--embed-dim", "8", "--epochs", "2", "--workers", "0", "--device", "cpu", "--print-freq", "4",
            "--lr", "0.05", "--out", str(out), *(["--amp", amp] if amp else []), *extra]


def run_train(tiny, out, *extra, capsys=None):
    rc = train.main(base_args(tiny, out, *extra))
    captured = capsys.readouterr() if capsys else None
    return rc, captured


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def weights(out, name="last.pt"):
    return bookkeeping.load_checkpoint(str(os.path.join(out, name)))["model"]


METHOD_RUNS = {  # name: extra flags
    "rrs": ["--method", "rrs"], "cbs": ["--method", "cbs"], "cbs_rrs": ["--method", "cbs_rrs"],
    "cbs_rrs_ss": ["--method", "cbs_rrs_ss"], "rotation_aug": ["--method", "cbs_rrs", "--rotation-aug"],
    "ss_all": ["--method", "cbs_rrs_ss", "--rotation", "all", "--lambdas", "1", "1", "0.5", "--warmup-epochs", "0.5"],
}


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """One finished 2-epoch run per method (same seed and data): {name: (folder, stdout)}."""
    base, done = tmp_path_factory.mktemp("runs"), {}
    for name, extra in METHOD_RUNS.items():
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            assert train.main(base_args(tiny, base / name, *extra)) == 0
        done[name] = (base / name, stdout.getvalue())
    return done


def bad_run(tiny, tmp_path, capsys, *extra, lists=None, out="o"):
    root, base = tiny
    rc = train.main(base_args((root, {**base, **(lists or {})}), tmp_path / out, *extra))
    cap = capsys.readouterr()
    assert rc == 2, cap.out + cap.err
    err = [line for line in cap.err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "Traceback" not in cap.err, cap.err
    return err[0]


def start(args, **kw):
    return subprocess.Popen([sys.executable, "-u", os.path.join(HERE, "train.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=HERE, start_new_session=True, **kw)


def signal_when(p, prefix, signum):
    """Read p's output until a line starts with `prefix`, then signal p's whole process group."""
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith(prefix):
            os.killpg(p.pid, signum)  # as Slurm's scancel, systemd and kill -TERM -PGID do: workers too
            break
    return "".join(lines) + p.stdout.read()


# ----------------------------------------------------------------------------------------------
# the method end to end: what each --method trains, and how


@pytest.mark.parametrize("method", list(recipes.METHODS))
def test_train_step_gives_aux_loss_b_cbs_first_as_the_sampler_lays_it_out(method, monkeypatch):
    """AuxBatchSampler yields [B_cbs; B_rrs]: train.train_step gives aux_loss the first S rows as B_cbs and
    the rest as B_rrs (a one-part method: all rows, as its part), the lambdas of --lambdas and the rotation
    task only for CBS+RRS+SS. Swapped halves, a part given to the wrong argument or lambdas reordered fail."""
    import types

    class Seen(Exception):
        pass

    def spy(net, cbs, rrs, lambdas, rotation, gen):
        raise Seen(cbs, rrs, lambdas, rotation)

    monkeypatch.setattr(ltaux, "aux_loss", spy)
    args = types.SimpleNamespace(method=method, image_size=16, batch_size=4, world_size=1, rotation_aug=False,
                                 rotation="all", lr=0.1, epochs=1, warmup_epochs=0.0, seed=0, rank=0,
                                 lambdas=[0.25, 2.0, 3.0])
    batches = types.SimpleNamespace(batch_sampler=types.SimpleNamespace(num_batches=5))
    optimizer = types.SimpleNamespace(param_groups=[dict(lr_scale=1.0)])
    run = types.SimpleNamespace(args=args, device=torch.device("cpu"), batches=batches, optimizer=optimizer,
                                amp=None, net=None, gen=torch.Generator(), graph=None)
    mode = recipes.METHODS[method].sampler
    n = 8 if mode == "cbs_rrs" else 4
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 16, 16).contiguous()
    with pytest.raises(Seen) as seen:
        train.train_step(run, images, torch.arange(n) + 10, 0)
    cbs, rrs, lambdas, rotation = seen.value.args
    assert lambdas == [0.25, 2.0, 3.0] and rotation == ("all" if method == "cbs_rrs_ss" else "off")
    want = {"cbs_rrs": ([10, 11, 12, 13], [14, 15, 16, 17]), "cbs": ([10, 11, 12, 13], None),
            "rrs": (None, [10, 11, 12, 13])}[mode]
    for part, rows in zip((cbs, rrs), want):
        assert (part is None) == (rows is None)
        if part is not None:
            x, y = part
            assert y.tolist() == rows
            assert torch.equal(x, pipeline.to_device(images[[r - 10 for r in rows]], torch.device("cpu")))


@pytest.mark.slow
def test_cuda_graph_on_a_cpu_says_so_and_trains_exactly_as_without(runs, tiny, tmp_path, capsys):
    """--cuda-graph where no graph can be captured (here: a CPU) runs the same eager steps, said once."""
    rc, cap = run_train(tiny, tmp_path / "g", "--method", "cbs_rrs_ss", "--cuda-graph", capsys=capsys)
    assert rc == 0 and cap.out.count("--cuda-graph: eager steps (CUDA only, this run is on cpu)") == 1
    want = read_log(runs["cbs_rrs_ss"][0])
    assert [(r["loss"], r["val_overall"]) for r in read_log(tmp_path / "g")] == [
        (r["loss"], r["val_overall"]) for r in want]
    device = torch.device("cuda")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert runtime.why_no_graph(device, 1, scaler, False) is None
    assert "one process" in runtime.why_no_graph(device, 2, scaler, False)
    assert "fp16" in runtime.why_no_graph(device, 1, torch.amp.GradScaler("cpu"), False)
    assert "--compile" in runtime.why_no_graph(device, 1, scaler, True)


class FakeGraph:
    """torch.cuda.CUDAGraph's part that StepGraph uses, on the CPU: torch.cuda.graph(g) records the body's
    function and the learning-rate tensors it would read; replay() runs it again on the recorded input tensors
    and writes its results into the recorded output tensors, as a real replay writes the same memory."""
    made = []

    def __init__(self):
        self.generators, self.replays, self.body = [], 0, None
        FakeGraph.made.append(self)

    def register_generator_state(self, generator):
        self.generators.append(generator)

    def replay(self):
        self.replays += 1
        self.body()


def test_step_graph_warms_up_captures_once_and_replays_with_each_batch_and_rate(monkeypatch):
    """StepGraph's own logic on a CPU stand-in for CUDA graphs: 3 eager calls, then one capture (on input
    tensors of its own, with tensor learning rates, the generator registered), then replays that see each
    call's batch and each step's learning rate; the optimizer's rates are floats again between calls."""
    FakeGraph.made.clear()
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([dict(params=[w]), dict(params=[], lr=0.0)], lr=0.1)
    gen = torch.Generator()

    def fn(images, labels):  # reads what a step reads: its inputs and the groups' rates (floats or tensors)
        lr = opt.param_groups[0]["lr"]
        return {"seen": images.float().sum() + 1000 * labels.float().sum() + torch.as_tensor(lr) * 1e6}

    @contextlib.contextmanager
    def capture(graph, capture_error_mode):
        assert capture_error_mode == "thread_local"
        rates = [g["lr"] for g in opt.param_groups]
        assert all(isinstance(r, torch.Tensor) for r in rates)
        yield  # the body runs here (a real capture records it without running it)
        inputs, outputs = step.inputs, step.outputs

        def body():
            saved = [g["lr"] for g in opt.param_groups]
            for g, r in zip(opt.param_groups, rates):
                g["lr"] = r
            for k, v in fn(*inputs).items():
                outputs[k].copy_(v)
            for g, r in zip(opt.param_groups, saved):
                g["lr"] = r
        graph.body = body

    class Stream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    step = runtime.StepGraph(fn, opt, gen)
    results = []
    for i in range(6):
        opt.param_groups[0]["lr"] = 0.001 * (i + 1)
        images, labels = torch.full((2, 3), float(i)), torch.tensor([i, 2 * i])
        out = step(images, labels)
        assert out["seen"].item() == pytest.approx(6 * i + 3000 * i + 1000 * (i + 1)), i
        assert all(isinstance(g["lr"], float) for g in opt.param_groups)
        results.append(out)
    assert len(FakeGraph.made) == 1 and FakeGraph.made[0].generators == [gen]
    assert FakeGraph.made[0].replays == 3  # steps 3, 4, 5; steps 0-2 eager
    assert results[3] is results[4] is results[5]  # a replay writes the captured outputs
    assert step.inputs[0] is not images  # its own input tensors, refilled each step

    @contextlib.contextmanager
    def failing(graph, capture_error_mode):
        yield
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(torch.cuda, "graph", failing)
    step = runtime.StepGraph(fn, opt, gen, warmup=0)
    with pytest.raises(ltaux.LTauxError, match=r"^--cuda-graph: the training step could not be captured in a "
                       r"CUDA graph \(CUDA error: operation not permitted when stream is capturing\); run "
                       r"without --cuda-graph$"):
        step(images, labels)
    assert all(isinstance(g["lr"], float) for g in opt.param_groups)  # the checkpoints' floats, kept


def cuda_run(method, S=8, steps=8):
    """What train_step needs of a Run, on CUDA: ResNet-32 on 10 classes, bf16, fused SGD, S per part."""
    import types
    device = torch.device("cuda")
    args = types.SimpleNamespace(method=method, image_size=32, batch_size=S, world_size=1, rotation_aug=False,
                                 rotation="random", lr=0.1, momentum=0.9, weight_decay=5e-4, epochs=1,
                                 warmup_epochs=0.0, backbone_lr_scale=1.0, seed=0, rank=0, lambdas=[0.5, 1.0, 1.0])
    model = ltaux.LTResNet("resnet32", 10).to(device, memory_format=torch.channels_last)
    run = types.SimpleNamespace(args=args, device=device, amp=torch.bfloat16, model=model, net=model,
                                optimizer=train.build_optimizer(model, args, device), gen=torch.Generator(device),
                                scaler=torch.amp.GradScaler("cuda", enabled=False),
                                batches=types.SimpleNamespace(batch_sampler=types.SimpleNamespace(num_batches=steps)),
                                graph=None)
    return run


def cuda_batches(n, S=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 256, (2 * S, 3, 32, 32), generator=g, dtype=torch.uint8).cuda(),
             torch.randint(0, 10, (2 * S,), generator=g).cuda()) for _ in range(n)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("method", ["cbs_rrs_ss", "rrs"])
def test_a_cuda_step_never_waits_for_the_gpu(method):
    """No host sync in a step (a copy of a Python number to the device, .item(), a pageable copy): the CPU
    queues the next step while the GPU runs this one, and a CUDA graph can hold the step."""
    run, batches = cuda_run(method), cuda_batches(4)
    train.train_step(run, *batches[0], 0)  # first: cuDNN's choices, lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, (images, labels) in enumerate(batches[1:], 1):
            train.train_step(run, images, labels, step)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_graph_steps_compute_what_eager_steps_compute():
    """--cuda-graph's StepGraph against eager steps from the same weights, batches and seeds: the same losses
    at every step (the rates change every step: a rate frozen at the capture would drift), the same weights."""
    out = {}
    for graphed in (False, True):
        torch.manual_seed(0)
        run = cuda_run("cbs_rrs_ss")
        if graphed:
            run.graph = runtime.StepGraph(functools.partial(train.update, run), run.optimizer, run.gen)
        losses = [{k: float(v) for k, v in train.train_step(run, x, y, i).items()}
                  for i, (x, y) in enumerate(cuda_batches(8))]
        out[graphed] = losses, {k: v.float().cpu() for k, v in run.model.state_dict().items()}
    assert run.graph.graph is not None and run.graph.calls == 3  # 3 eager steps, then 5 replays
    (eager, w_eager), (graph, w_graph) = out[False], out[True]
    for a, b in zip(eager, graph):
        assert b == pytest.approx(a, rel=1e-2, abs=1e-3)
    assert len({round(step["ss"], 4) for step in graph[3:]}) == 5  # every replay saw its own batch
    for k in w_eager:
        torch.testing.assert_close(w_graph[k], w_eager[k], rtol=2e-2, atol=2e-3, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHOD_RUNS))
def test_every_method_trains_logs_and_tests(runs, name):
    out, stdout = runs[name]
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1]
    parts = {"rrs": ["loss_rrs"], "cbs": ["loss_cbs"], "cbs_rrs": ["loss_cbs", "loss_rrs"],
             "rotation_aug": ["loss_cbs", "loss_rrs"]}.get(name, ["loss_cbs", "loss_rrs", "loss_ss"])
    for key in parts + ["loss", "lr", "images_per_s", "epoch_time_s", "val_overall", "val_many", "val_medium"]:
        assert key in log[-1], key
    assert set(k for k in log[-1] if k.startswith("loss_")) == set(parts)
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) != float("inf") for r in log)
    progress = [line for line in stdout.splitlines() if line.startswith("epoch 0 [")]
    assert progress and all(w in progress[0] for w in ("loss", "lr", "img/s", "eta"))
    assert "device: cpu, 1 process" in stdout and "| many | medium | few | overall |" in stdout
    assert f"next: python evaluate.py --checkpoint {out}/best.pt" in stdout
    ckpt = bookkeeping.load_checkpoint(str(out / "last.pt"))
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (2, 0, 2 * 12)
    assert ckpt["train_counts"].tolist() == TRAIN_COUNTS
    assert json.load(open(out / "test_metrics.json")).keys() >= {"overall", "many", "medium", "few"}
    assert sorted(os.listdir(out)) == ["best.pt", "last.pt", "log.jsonl", "test_metrics.json"]


@pytest.mark.slow
def test_each_method_trains_exactly_its_heads(runs):
    """Same seed, same initial weights: a head a method does not train keeps them (frozen)."""
    w = {name: weights(out) for name, (out, _) in runs.items()}
    same = lambda a, b, key: torch.equal(w[a][key], w[b][key])  # noqa: E731
    for base in ("rrs", "cbs"):  # the baselines: h only
        assert same(base, "cbs_rrs", "rot_fc.weight") and not same(base, "cbs_rrs_ss", "aux_fc.weight")
        assert same("rrs", "cbs", "aux_fc.weight") and not same(base, "cbs_rrs", "fc.weight")
    assert not same("cbs_rrs", "cbs_rrs_ss", "aux_fc.weight")  # h_a trained by both
    assert same("cbs_rrs", "rrs", "rot_fc.weight") and not same("cbs_rrs_ss", "rrs", "rot_fc.weight")  # h_s: SS only
    assert same("rotation_aug", "rrs", "rot_fc.weight")  # augmentation, not the rotation task


class AuxLossSpy:
    """Records what train.py hands to ltaux.aux_loss, then calls the real one."""

    def __init__(self):
        self.real, self.calls = ltaux.aux_loss, []

    def __call__(self, model, cbs, rrs, lambdas, rotation, generator):
        self.calls.append((*(cbs or (None, None)), *(rrs or (None, None)), list(lambdas), rotation))
        return self.real(model, cbs, rrs, lambdas, rotation, generator)


def balanced(y, k, z):
    """y (S,) laid out as k distinct classes of z consecutive images each."""
    groups = y.view(k, z)
    return bool((groups == groups[:, :1]).all()) and len(groups[:, 0].unique()) == k


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rrs", "cbs", "cbs_rrs", "cbs_rrs_ss", "rotation_aug"])
def test_train_py_feeds_eq2_as_the_method_says(tiny, tmp_path, capsys, monkeypatch, name):
    spy = AuxLossSpy()
    monkeypatch.setattr(ltaux, "aux_loss", spy)
    assert run_train(tiny, tmp_path / "o", *METHOD_RUNS[name], "--epochs", "1", capsys=capsys)[0] == 0
    assert len(spy.calls) == 12  # ceil(92 / 8) steps
    labels = sorted(ltaux.read_split(tiny[1]["train"])[1])
    if name in ("rrs", "cbs"):  # the baselines: one batch, h alone, weight 1, no rotation term
        assert all((c[0] is None) == (name == "rrs") and (c[2] is None) == (name == "cbs") for c in spy.calls)
        assert all(c[5] == "off" for c in spy.calls)
    if name != "rrs":  # B_cbs: k = 4 classes of Z = 2 images, every step
        assert all(balanced(c[1][:8], 4, 2) for c in spy.calls)
    if name != "cbs":  # B_rrs: the epoch is a permutation of the training set
        y_rrs = torch.cat([c[3][:8] for c in spy.calls])
        assert sorted(y_rrs[:len(labels)].tolist()) == labels
    if name == "cbs_rrs_ss":
        assert all(c[4] == [0.5, 1.0, 1.0] and c[5] == "random" for c in spy.calls)  # the paper's defaults
    if name == "cbs_rrs":
        assert all(c[4][:2] == [0.5, 1.0] and c[5] == "off" for c in spy.calls)
    if name == "rotation_aug":  # Table 5: [x; rotated x] with each image's own label, no h_s
        x_cbs, y_cbs, x_rrs, y_rrs, _, rotation = spy.calls[0]
        assert rotation == "off" and len(x_cbs) == len(x_rrs) == 16
        assert torch.equal(y_cbs[8:], y_cbs[:8]) and torch.equal(y_rrs[8:], y_rrs[:8])
        for i in range(8):
            assert find_rotation(x_cbs[8 + i], x_cbs[:8])[0] == i


@pytest.mark.slow
@pytest.mark.parametrize("method, trained", [
    ("rrs", {"fc"}), ("cbs", {"fc"}), ("cbs_rrs", {"fc", "aux_fc"}), ("cbs_rrs_ss", {"fc", "aux_fc", "rot_fc"}),
])
def test_build_model_freezes_the_heads_a_method_does_not_use(method, trained):
    """A head outside the loss must not require grad: DistributedDataParallel (find_unused_parameters
    off) fails on a trainable parameter that gets no gradient, so this matters for multi-GPU runs
    even though a single process leaves such a head unchanged."""
    args, _ = train.parse_args(["--data", "/d", "--split", "s", "--method", method, "--embed-dim", "8"])
    args.world_size = 1
    model = train.build_model(args, 6, torch.device("cpu"))
    got = {h for h in ("fc", "aux_fc", "rot_fc") if all(p.requires_grad for p in getattr(model, h).parameters())}
    assert got == trained
    for h in {"fc", "aux_fc", "rot_fc"} - trained:
        assert not any(p.requires_grad for p in getattr(model, h).parameters()), h
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith(("backbone.", "embed.")))


@pytest.mark.slow
@pytest.mark.parametrize("extra, lambdas, rotation, x_rows", [
    (["--method", "cbs_rrs_ss", "--rotation", "all", "--lambdas", "1", "2", "0.5"], [1.0, 2.0, 0.5], "all", 8),
    (["--method", "cbs_rrs", "--lambdas", "0.3", "2", "0"], [0.3, 2.0], "off", 8),
    (["--method", "cbs_rrs", "--rotation-aug", "--rotation", "all"], [0.5, 1.0], "off", 40),
])
def test_train_py_honours_lambdas_and_rotation_flags(tiny, tmp_path, capsys, monkeypatch, extra, lambdas,
                                                     rotation, x_rows):
    """--lambdas reach Eq. 2 for every method; --rotation all reaches h_s (Table 5) and the augmentation
    baseline (5 copies: the image and its 4 rotations)."""
    spy = AuxLossSpy()
    monkeypatch.setattr(ltaux, "aux_loss", spy)
    assert run_train(tiny, tmp_path / "o", *extra, "--epochs", "1", capsys=capsys)[0] == 0
    assert spy.calls
    for x_cbs, y_cbs, x_rrs, y_rrs, got_lambdas, got_rotation in spy.calls:
        assert list(got_lambdas)[:len(lambdas)] == pytest.approx(lambdas) and got_rotation == rotation  # l3: h_s only
        assert len(x_cbs) == len(y_cbs) == len(x_rrs) == len(y_rrs) == x_rows


@pytest.mark.slow
def test_train_py_draws_new_rotation_angles_every_step(tiny, tmp_path, capsys, monkeypatch):
    """One random angle per image (Section 3.3) means new angles each step, not one fixed pattern."""
    real, seen = ltaux.rotate_batch, []

    def spy(x, mode="random", generator=None):
        x_rot, y_rot = real(x, mode, generator)
        seen.append(y_rot.clone())
        return x_rot, y_rot

    monkeypatch.setattr(ltaux, "rotate_batch", spy)
    assert run_train(tiny, tmp_path / "o", *METHOD_RUNS["cbs_rrs_ss"], "--epochs", "1", capsys=capsys)[0] == 0
    assert len(seen) == 12 and len({tuple(y.tolist()) for y in seen}) > 1


@pytest.mark.slow
@pytest.mark.parametrize("lambdas, flag", [(["0", "1", "0"], "--method rrs"), (["1", "0", "0"], "--method cbs")])
def test_table4_endpoints_name_the_baseline_to_run(tiny, tmp_path, capsys, lambdas, flag):
    msg = bad_run(tiny, tmp_path, capsys, "--method", "cbs_rrs", "--lambdas", *lambdas)
    assert "Table 4" in msg and flag in msg


@pytest.mark.slow
def test_init_loads_all_of_phi_and_fresh_heads(runs, tiny, tmp_path, capsys):
    src = weights(runs["rrs"][0])
    rc, _ = run_train(tiny, tmp_path / "ft", "--epochs", "1", "--method", "cbs", "--lr", "0", "--init",
                      str(runs["rrs"][0] / "last.pt"), capsys=capsys)
    assert rc == 0
    got = weights(tmp_path / "ft")
    phi = [k for k in src if k.startswith(("backbone.", "embed.")) and "num_batches" not in k]
    assert any(k.startswith("embed.") for k in phi)
    for k in phi:  # lr 0: phi exactly as loaded (BatchNorm running statistics aside)
        if "running_" not in k:
            assert torch.equal(got[k], src[k]), k
    assert not torch.equal(got["fc.weight"], src["fc.weight"])  # heads fresh
    rc, cap = run_train(tiny, tmp_path / "bad", "--arch", "resnet18", "--init", str(runs["rrs"][0] / "last.pt"),
                        capsys=capsys)
    assert rc == 2 and "checkpoint is resnet10 with 6 classes, this run is resnet18" in cap.err
    root, lists = tiny
    five = write_list(tmp_path / "five_train.txt", [r for r in open(lists["train"]) if not r.endswith(" 5\n")])
    rc = train.main(base_args((root, {**lists, "train": five, "val": five, "test": five}), tmp_path / "bad5",
                              "--init", str(runs["rrs"][0] / "last.pt")))
    assert rc == 2 and "this run is resnet10 with 5 classes" in capsys.readouterr().err


@pytest.mark.slow
def test_freeze_backbone_trains_the_512d_layer_and_heads_and_bn_statistics_still_move(tiny, tmp_path, capsys):
    """--freeze-backbone (OLTR's Places-LT stage 1 before 2020-02-11): the backbone's weights (BN's affine
    parameters included) stay as they were, phi's 512-d layer and the heads train, and BN's running
    statistics keep updating (the backbone stays in train mode)."""
    assert run_train(tiny, tmp_path / "a", "--epochs", "1", "--freeze-backbone", capsys=capsys)[0] == 0
    args, _ = train.parse_args(base_args(tiny, tmp_path / "b"))
    args.world_size = 1
    torch.manual_seed(args.seed)
    init = train.build_model(args, 6, torch.device("cpu")).state_dict()  # the run's initial weights (same seed)
    w = weights(tmp_path / "a")
    frozen = [k for k in w if k.startswith("backbone.") and "running" not in k and "num_batches" not in k]
    assert frozen and all(torch.equal(w[k], init[k]) for k in frozen)
    assert not torch.equal(w["backbone.bn1.running_mean"], init["backbone.bn1.running_mean"])
    for k in ("embed.0.weight", "fc.weight", "aux_fc.weight", "rot_fc.weight"):
        assert not torch.equal(w[k], init[k]), k


# ----------------------------------------------------------------------------------------------
# the input paths and precision of a run


@pytest.mark.slow
def test_in_memory_and_worker_paths_train_the_same_weights(tiny, tmp_path, capsys):
    """--in-memory on (no workers) and off (2 workers): the same batches, so the same losses and weights, bit
    for bit on the CPU (a different crop draw, flip or sample order in either path fails)."""
    rc, cap = run_train(tiny, tmp_path / "on", "--in-memory", "on", capsys=capsys)
    assert rc == 0 and "in memory: 134 images decoded once" in cap.out
    rc, cap = run_train(tiny, tmp_path / "off", "--in-memory", "off", "--workers", "2", capsys=capsys)
    assert rc == 0 and "in memory" not in cap.out
    a, b = read_log(tmp_path / "on"), read_log(tmp_path / "off")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    wa, wb = weights(tmp_path / "on"), weights(tmp_path / "off")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.load(open(tmp_path / "on" / "test_metrics.json")) == json.load(open(tmp_path / "off" / "test_metrics.json"))


@pytest.mark.slow
@pytest.mark.parametrize("supported", [True, False])
def test_cpu_amp_default_is_bf16_only_where_the_cpu_runs_bf16(tiny, tmp_path, capsys, monkeypatch, supported):
    """--amp's default on a CPU follows runtime.cpu_runs_bf16, itself oneDNN's bf16 query (emulated bf16 is
    ~10x slower: fp32 there); an explicit --amp wins; a CUDA device is bf16 either way."""
    with monkeypatch.context() as m:
        m.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: supported)
        assert runtime.cpu_runs_bf16() == supported
    monkeypatch.setattr(runtime, "cpu_runs_bf16", lambda: supported)
    cpu = torch.device("cpu")
    assert runtime.amp_dtype(None, cpu) == (("bf16", torch.bfloat16) if supported else ("off", None))
    assert runtime.amp_dtype("off", cpu) == ("off", None) and runtime.amp_dtype(None, torch.device("cuda"))[0] == "bf16"
    rc = train.main(base_args(tiny, tmp_path / "o", "--epochs", "1", "--method", "rrs", amp=None))
    out = capsys.readouterr().out
    assert rc == 0 and f"device: cpu, 1 process, amp {'bf16' if supported else 'off'};" in out


@pytest.fixture(scope="module")
def jpeg_tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    return root, jpeg_set(root, n=24, png=(3, 11))


@pytest.mark.slow
def test_train_decode_gpu_trains_exactly_as_decode_cpu(jpeg_tiny, tmp_path, monkeypatch, capsys):
    root, split = jpeg_tiny
    common = ["--data", str(root), "--split", split, "--arch", "resnet10", "--image-size", "64",
              "--batch-size", "6", "--per-class", "2", "--embed-dim", "8", "--epochs", "1", "--device", "cpu",
              "--print-freq", "1", "--lr", "0.05", "--amp", "off"]
    assert train.main(common + ["--out", str(tmp_path / "gpu"), "--decode", "gpu"]) == 2
    assert "--decode gpu needs a CUDA device (this run is on cpu)" in capsys.readouterr().err
    assert train.main(common + ["--out", str(tmp_path / "c"), "--decode", "gpu", "--image-size", "32"]) == 2
    assert "--decode gpu is for the ImageNet-LT recipe" in capsys.readouterr().err
    assert train.main(common + ["--out", str(tmp_path / "cpu"), "--workers", "0"]) == 0
    monkeypatch.setattr(train, "DECODE_DEVICES", ("cuda", "cpu"))  # the same code, on the CPU
    spy = []
    real = pipeline.DeviceDecodeDataset.decode
    monkeypatch.setattr(pipeline.DeviceDecodeDataset, "decode", lambda self, b, d: spy.append(len(b[0])) or real(self, b, d))
    assert train.main(common + ["--out", str(tmp_path / "gpu"), "--decode", "gpu", "--workers", "2"]) == 0
    assert spy == [12] * 4  # every step decoded in the main process: 2S images, ceil(24 / 6) steps
    cpu, gpu = read_log(tmp_path / "cpu"), read_log(tmp_path / "gpu")
    assert [r["loss"] for r in gpu] == pytest.approx([r["loss"] for r in cpu], rel=1e-5)  # same crops, same order


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_train_on_cuda_with_both_decoders(jpeg_tiny, tmp_path):
    """The CUDA path end to end: bf16, channels_last, jitter on the GPU, nvJPEG with --decode gpu."""
    root, split = jpeg_tiny
    common = ["--data", str(root), "--split", split, "--arch", "resnet10", "--image-size", "64", "--batch-size", "6",
              "--per-class", "2", "--embed-dim", "8", "--epochs", "2", "--device", "cuda", "--lr", "0.05"]
    for mode in ("cpu", "gpu"):
        assert train.main(common + ["--out", str(tmp_path / mode), "--decode", mode, "--workers", "2"]) == 0
    cpu, gpu = read_log(tmp_path / "cpu"), read_log(tmp_path / "gpu")
    assert all(math.isfinite(r["loss"]) for r in cpu + gpu)
    assert gpu[0]["loss"] == pytest.approx(cpu[0]["loss"], rel=0.05)  # the same crops; nvJPEG, resize differ in bits


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_train_on_cuda_in_memory(tiny, tmp_path, capsys):
    """The CIFAR recipe's path on CUDA: images decoded once onto the GPU, batches gathered and augmented there
    (the same uint8 batches as the workers'), bf16; then the workers' path with the same seed: close losses."""
    root, lists = tiny
    ds = ltaux.SplitDataset(root, lists["train"], pipeline.build_transform(16, train=True), read=pipeline.read_image)
    sampler = ltaux.AuxBatchSampler(ds.labels, 8, 2, with_seeds=True)
    cuda = list(pipeline.MemoryBatches(*pipeline.decode_all(ds, torch.device("cuda")), sampler))
    cpu = list(torch.utils.data.DataLoader(pipeline.SeededCifar(ds), batch_sampler=sampler))
    assert all(torch.equal(a.cpu(), b) and torch.equal(ya.cpu(), yb) for (a, ya), (b, yb) in zip(cuda, cpu))
    for mode in ("on", "off"):
        assert run_train(tiny, tmp_path / mode, "--device", "cuda", "--in-memory", mode)[0] == 0
    out = capsys.readouterr().out
    assert "in memory: 134 images decoded once" in out and "amp bf16" in out
    on, off = read_log(tmp_path / "on"), read_log(tmp_path / "off")
    assert on[0]["loss"] == pytest.approx(off[0]["loss"], rel=0.05) and math.isfinite(on[-1]["loss"])


# ----------------------------------------------------------------------------------------------
# arguments and recipes


@pytest.mark.slow
def test_recipes_defaults_and_explicit_flags():
    a, _ = train.parse_args(["--data", "/d", "--split", "s", "--recipe", "places_lt_r152", "--lr", "0.5",
                             "--pretrained", "w.pth"])
    assert a.arch == "resnet152" and a.backbone_lr_scale == 0.01 and a.lr == 0.5 and a.epochs == 30
    old, _ = train.parse_args(["--data", "/d", "--split", "s", "--recipe", "places_lt_r152_2019", "--pretrained", "w"])
    assert (old.batch_size, old.lr * old.backbone_lr_scale, old.freeze_backbone) == (256, pytest.approx(0.01), True)
    demo, _ = train.parse_args([])
    assert demo.recipe == "demo" and demo.image_size == 32
    plain, _ = train.parse_args(["--data", "/d"])
    assert plain.image_size == 224 and plain.per_class == 4 and plain.lambdas == [0.5, 1.0, 1.0]
    c10, _ = train.parse_args(["--data", "/d", "--recipe", "cifar10_lt"])
    assert c10.arch == "resnet32" and c10.batch_size // c10.per_class <= 10  # k <= C = 10
    text = " ".join(train.get_args_parser().format_help().split())
    assert "(default: 256)" in text and "(default: cbs_rrs_ss)" in text and "lr = 0.1 * S / 256" in text
    assert "(default: 4)" in text and "(default: [0.5, 1.0, 1.0])" in text
    assert recipes.ARCHS == ltaux.LTResNet.ARCHS


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["places_lt_r152", "places_lt_r152_2019"])
def test_pretrained_recipes_refuse_to_start_without_weights(tiny, tmp_path, capsys, recipe):
    """The Places-LT ResNet-152 recipes fine-tune ImageNet weights (phi at lr 0.001 or frozen): without
    --pretrained (or --init / --resume) they would train from scratch and learn nothing. Exit 2, one line."""
    msg = bad_run(tiny, tmp_path, capsys, "--recipe", recipe)
    assert msg.startswith(f"error: --recipe {recipe} fine-tunes ImageNet-pretrained ResNet-152 weights: pass "
                          "--pretrained ~/.cache/torch/hub/checkpoints/resnet152-394f9c45.pth (torchvision's "
                          "ResNet152_Weights.IMAGENET1K_V1 state dict")
    assert not os.path.exists(tmp_path / "o")


def difference_row(out):
    """The cells of the printed '| difference (run - paper) |' row: many, medium, few, overall."""
    row = next(line for line in out.splitlines() if line.startswith("| difference (run - paper) |"))
    return [c.strip() for c in row.strip("| \n").split(" | ")[1:5]]


STAND_IN = dict(many=55.25, medium=36.0, few=27.0, overall=41.4)  # distinct, and so are their differences


def stand_in_accuracy(monkeypatch):
    """ltaux.shot_accuracy (train.py's and evaluate.py's) with STAND_IN's group values: a 2-epoch tiny run
    scores alike in every group, where a swap of two cells would not show."""
    real = ltaux.shot_accuracy
    monkeypatch.setattr(ltaux, "shot_accuracy", lambda *a, **kw: {**real(*a, **kw), **STAND_IN})


def check_paper_difference(m, out, paper=(51.0, 38.5, 21.0, 40.9)):
    """metrics (test_metrics.json or metrics.json) and the printed table carry run - paper for each cell, in
    the tables' order: the four cells of the run, of the paper and of the difference are distinct, so any
    swap shows."""
    cells = ("many", "medium", "few", "overall")
    assert tuple(m["paper"][k] for k in cells) == paper and {k: m[k] for k in cells} == STAND_IN
    assert len({m[k] - m["paper"][k] for k in cells}) == 4
    assert m["paper_difference"] == {k: pytest.approx(m[k] - m["paper"][k]) for k in cells}
    assert list(m["paper_difference"]) == list(cells)
    assert difference_row(out) == [f"{m[k] - m['paper'][k]:+.1f}" for k in cells]


@pytest.mark.slow
def test_a_recipe_runs_table_carries_the_papers_row_and_a_plain_run_does_not(tiny, tmp_path, capsys,
                                                                             monkeypatch):
    stand_in_accuracy(monkeypatch)
    rc, cap = run_train(tiny, tmp_path / "r", "--recipe", "imagenet_lt_r10", "--method", "cbs_rrs", capsys=capsys)
    assert rc == 0
    row = next(l for l in cap.out.splitlines() if l.startswith("| paper: CBS+RRS, Table 1 (ImageNet-LT, ResNet-10) ("))
    assert "a different protocol: --embed-dim 8, --batch-size 8, --per-class 2, --epochs 2, --lr 0.05, " \
           f"--image-size 16, trained on {tiny[1]['train']}, not ImageNet_LT_train.txt, " \
           f"evaluated on {tiny[1]['test']}, not ImageNet_LT_test.txt) |" in row
    assert row.endswith("| 51.0 | 38.5 | 21.0 | 40.9 | - |") and "--amp" not in row
    check_paper_difference(json.load(open(tmp_path / "r" / "test_metrics.json")), cap.out)
    rc, cap = ev("--checkpoint", str(tmp_path / "r" / "best.pt"), "--out", str(tmp_path / "e"), capsys=capsys)
    assert rc == 0 and "| paper: CBS+RRS, Table 1 (ImageNet-LT, ResNet-10) (a different protocol" in cap.out
    check_paper_difference(json.load(open(tmp_path / "e" / "metrics.json")), cap.out)
    rc, cap = run_train(tiny, tmp_path / "plain", "--epochs", "1", capsys=capsys)
    assert rc == 0 and "paper:" not in cap.out and "paper" not in json.load(open(tmp_path / "plain" / "test_metrics.json"))


@pytest.mark.slow
def test_help_is_fast_and_needs_no_torch():
    code = "import runpy, sys; sys.argv = ['train.py', '--help']; runpy.run_path('train.py', run_name='__main__')"
    p = subprocess.run([sys.executable, "-c", code + "\n"], capture_output=True, text=True, cwd=HERE)
    assert p.returncode == 0 and "--batch-size" in p.stdout
    p = subprocess.run([sys.executable, "-X", "importtime", os.path.join(HERE, "train.py"), "--help"],
                       capture_output=True, text=True, cwd=HERE)
    assert p.returncode == 0 and " torch\n" not in p.stderr and "| torch" not in p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("extra, expect", [
    (["--batch-size", "9", "--per-class", "2"], "not divisible by per-class Z=2"),
    (["--batch-size", "16", "--per-class", "2"], "k = S/Z = 8 classes per batch, but only 6 classes"),
    (["--method", "cbs_rrs_ss", "--rotation-aug"], "--rotation-aug is the augmentation baseline"),
    (["--lr", "-1"], "--lr -1.0: must be a finite number in [0, 1e+30]"),
    (["--lr", "inf"], "--lr inf: must be a finite number"),
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--momentum", "-0.1"], "--momentum -0.1: must be a finite number in [0, 1]"),
    (["--momentum", "1.5"], "--momentum 1.5: must be a finite number in [0, 1]"),
    (["--weight-decay", "-1"], "--weight-decay -1.0: must be a finite number in [0, 1e+30]"),
    (["--warmup-epochs", "inf"], "--warmup-epochs inf: must be a finite number in [0, 2]"),
    (["--warmup-epochs", "3"], "--warmup-epochs 3.0: must be a finite number in [0, 2]"),
    (["--print-freq", "0"], "--print-freq 0: must be in 1.."),
    (["--eval-freq", "0"], "--eval-freq 0: must be in 1.."),
    (["--workers", "-1"], "--workers -1: must be in 0..1024"),
    (["--image-size", "0"], "--image-size 0: must be in 8..4096"),
    (["--image-size", "1000000"], "--image-size 1000000: must be in 8..4096"),
    (["--epochs", "0"], "--epochs 0: must be in 1..100000"),
    (["--epochs", "1000000000000000"], "--epochs 1000000000000000: must be in 1..100000"),
    (["--seed", "100000000000000000000"], "--seed 100000000000000000000: must be in 0..9223372036854775807"),
    (["--lambdas", "0.5", "-1", "1"], "weights must be finite and >= 0"),
    (["--lambdas", "0", "0", "0"], "leaves h untrained"),
    (["--embed-dim", "-2"], "--embed-dim -2: must be in 0..65536"),
    (["--embed-dim", "1000000000000"], "--embed-dim 1000000000000: must be in 0..65536"),
    (["--many", "-5"], "--many -5 --few 20: need whole numbers with 0 <= --few < --many"),
    (["--many", "10", "--few", "10"], "--many 10 --few 10: need whole numbers with 0 <= --few < --many"),
    (["--in-memory", "on", "--image-size", "64"], "--in-memory on is for the CIFAR recipe's small images"),
    (["--lr", "1e300"], "--lr 1e+300: must be a finite number in [0, 1e+30]"),  # past fp32: SGD would overflow
    (["--lr", "1e29"], "non-finite"),
    (["--batch-size", "10", "--per-class", "3"], "--batch-size 10 --per-class 3 with "),  # S / Z: both flags named  # finite, absurd: the run stops at the first non-finite loss or weight
])
def test_bad_arguments(tiny, tmp_path, capsys, extra, expect):
    assert expect in bad_run(tiny, tmp_path, capsys, *extra)
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.slow
def test_device_and_out_mistakes(tiny, tmp_path, capsys, monkeypatch):
    if not torch.cuda.is_available():
        assert "no CUDA device is available" in bad_run(tiny, tmp_path, capsys, "--device", "cuda")
    (tmp_path / "afile").write_text("x")
    assert "is a file, not a folder" in bad_run(tiny, tmp_path, capsys, out="afile")
    (tmp_path / "ro").mkdir(mode=0o500)
    real = os.access  # root writes anywhere (CI runs as root): the folder answers as for anyone else
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path / "ro") else real(p, mode))
    assert f"--out {tmp_path / 'ro' / 'run'}: {tmp_path / 'ro'} is not writable" in bad_run(tiny, tmp_path, capsys,
                                                                                           out="ro/run")
    assert not (tmp_path / "ro" / "run").exists()
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")  # a link to a folder that was never made
    msg = bad_run(tiny, tmp_path, capsys, out="dangling")
    assert f"{tmp_path / 'dangling'} is a symbolic link to {tmp_path / 'nowhere'}, which does not exist" in msg
    assert f"--out {tmp_path / 'afile' / 'run'}: {tmp_path / 'afile'} is a file, not a folder" in bad_run(
        tiny, tmp_path, capsys, out="afile/run")  # not "is not writable", not a traceback


# ----------------------------------------------------------------------------------------------
# bad input: one line naming the file (and line), exit status 2, nothing written


@pytest.mark.slow
@pytest.mark.parametrize("rows, expect", [
    (["train/c0/0.png 0\n", "train/c0/1.png zero\n"], "bad_train.txt:2: label 'zero' is not an integer"),
    (["train/c0/0.png 0\n", "train/c0/1.png\n"], "bad_train.txt:2: expected 'relative/path label'"),
    (["train/c0/0.png 0\n", "train/c0/1.png -3\n"], "bad_train.txt:2: label -3 is negative"),
    ([], "bad_train.txt: split list is empty"),
    (["train/c0/%d.png 0\n" % i for i in range(10)] + ["train/c2/%d.png 2\n" % i for i in range(10)],
     "bad_train.txt: classes [1] have no training image (labels must be 0..C-1 without gaps); the labels above "
     "the first gap are on lines 11 (label 2), 12 (label 2), 13 (label 2)..."),
])
def test_bad_train_list(tiny, tmp_path, capsys, rows, expect):
    bad = write_list(tmp_path / "bad_train.txt", rows)
    assert expect in bad_run(tiny, tmp_path, capsys, "--per-class", "1", lists={"train": bad})
    assert not os.path.exists(tmp_path / "o")  # a run that fails on its inputs creates nothing


@pytest.mark.slow
def test_val_label_unknown_to_train(tiny, tmp_path, capsys):
    bad = write_list(tmp_path / "v.txt", ["val/c0/0.png 0\n", "val/c0/1.png 6\n"])
    assert "v.txt:2: label 6 is not a class of the training list" in bad_run(tiny, tmp_path, capsys, lists={"val": bad})


@pytest.mark.slow
def test_missing_list_and_wrong_root_say_what_to_do(tiny, tmp_path, capsys):
    msg = bad_run(tiny, tmp_path, capsys, lists={"train": str(tmp_path / "t_trian.txt")})
    assert "t_trian.txt: split list not found" in msg and "data_lists/README.md" in msg and "SHA256SUMS" in msg
    root, lists = tiny
    rc = train.main(base_args((tmp_path, lists), tmp_path / "o"))
    err = capsys.readouterr().err
    assert rc == 2 and "the root is probably wrong" in err and str(tmp_path / "train/c0/0.png") in err


@pytest.mark.slow
def test_duplicate_paths_warn(tiny, tmp_path, capsys):
    root, lists = tiny
    rows = open(lists["train"]).readlines()
    dup = write_list(tmp_path / "dup_train.txt", rows + rows[:1])
    with pytest.warns(UserWarning, match=f"dup_train.txt:{len(rows) + 1}: duplicate path"):
        assert train.main(base_args((root, {**lists, "train": dup}), tmp_path / "o", "--epochs", "1")) == 0


@pytest.mark.slow
@pytest.mark.parametrize("memory, workers", [("off", 0), ("off", 1), ("on", 0)])
def test_bad_image_during_training_names_path_and_line(tiny, tmp_path, capsys, memory, workers):
    """A missing image: in the workers' path when it is first loaded (in a worker or not), with --in-memory when
    it is decoded, before the first step; either way one line with the list's line, and no folder left."""
    root, lists = tiny
    rows = open(lists["train"]).readlines()
    rows[7] = "train/c0/missing.png 0\n"
    bad = write_list(tmp_path / "img_train.txt", rows)
    msg = bad_run(tiny, tmp_path, capsys, "--in-memory", memory, "--workers", str(workers), lists={"train": bad})
    assert "img_train.txt:8: cannot read image" in msg and "missing.png (file not found)" in msg
    assert not os.path.exists(tmp_path / "o")  # nothing written: the folder it made is gone again


@pytest.mark.slow
@pytest.mark.parametrize("memory", ["on", "off"])
def test_a_fifo_listed_as_an_image_is_refused_not_waited_on(tiny, tmp_path, memory):
    root, lists = tiny
    os.mkfifo(tmp_path / "pipe.png")
    rows = open(lists["train"]).readlines()
    split = write_list(tmp_path / "f_train.txt", rows[:5] + [f"{tmp_path / 'pipe.png'} 0\n"] + rows[5:])
    p = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *base_args(tiny, tmp_path / "o"), "--split",
                        split, "--allow-unsafe-paths", "--in-memory", memory, "--workers", "0"],
                       capture_output=True, text=True, cwd=HERE, timeout=120)
    assert p.returncode == 2 and "f_train.txt:6: cannot read image" in p.stderr and "not a regular file" in p.stderr


@pytest.mark.slow
def test_check_files_lists_every_failure(tiny, tmp_path, capsys):
    root, lists = tiny
    (tmp_path / "zero.png").write_bytes(b"")
    rows = open(lists["train"]).readlines()
    rows[3], rows[9] = "train/c0/gone.png 0\n", f"../{tmp_path.name}/zero.png 0\n"
    bad = write_list(tmp_path / "cf_train.txt", rows)
    rc = train.main(base_args((root, {**lists, "train": bad}), tmp_path / "o", "--check-files", "--allow-unsafe-paths"))
    cap = capsys.readouterr()
    assert rc == 2 and "error: 2 unreadable images" in cap.err
    assert "cf_train.txt:4:" in cap.err and "cf_train.txt:10:" in cap.err and "UnidentifiedImageError" in cap.err
    assert "check-files: 134/134 images, 2 unreadable" in cap.out
    rows += [f"train/c0/gone{i}.png 0\n" for i in range(30)]
    many = write_list(tmp_path / "many_train.txt", rows)
    rc = train.main(base_args((root, {**lists, "train": many}), tmp_path / "o2", "--check-files", "--allow-unsafe-paths"))
    err = capsys.readouterr().err
    assert rc == 2 and "error: 32 unreadable images" in err and "and 12 more" in err
    listed = err.rsplit("all are listed in ", 1)[1].strip()
    assert len(open(listed).read().splitlines()) == 32 and not (tmp_path / "o2").exists()  # --out untouched
    os.remove(listed)


@pytest.mark.slow
def test_non_finite_loss_stops_before_anything_is_saved(tiny, tmp_path, capsys):
    msg = bad_run(tiny, tmp_path, capsys, "--lr", "1e30")
    assert "non-finite loss at step" in msg and "cbs" in msg and "no checkpoint was written yet" in msg
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.slow
def test_weights_are_checked_after_the_update_and_before_any_save(tiny, tmp_path, capsys):
    """One step per epoch: the loss of that step is finite, the update is not. Nothing is saved (a version that
    checks only the loss writes best.pt / last.pt with inf weights here), and evaluate / resume refuse a
    checkpoint with non-finite weights in one line."""
    msg = bad_run(tiny, tmp_path, capsys, "--batch-size", "92", "--per-class", "46", "--method", "rrs",
                  "--lr", "1e30", "--weight-decay", "1e10", "--epochs", "1")
    assert "non-finite weights (" in msg and "at the end of epoch 0" in msg and "nothing saved" in msg
    assert msg.endswith("; no checkpoint was written yet")
    assert not os.path.exists(tmp_path / "o")
    ok = tmp_path / "ok"
    assert run_train(tiny, ok, "--epochs", "1", capsys=capsys)[0] == 0
    ckpt = torch.load(ok / "last.pt", weights_only=True)
    ckpt["model"]["fc.bias"][1] = float("nan")
    torch.save(ckpt, ok / "nan.pt")
    assert evaluate.main(["--checkpoint", str(ok / "nan.pt")]) == 2
    assert train.main(["--resume", str(ok / "nan.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("nan.pt: holds non-finite weights (fc.bias): not a usable checkpoint") == 2


# ----------------------------------------------------------------------------------------------
# the output folder: a finished run is never lost to a new command


@pytest.mark.slow
def test_another_run_in_out_is_refused_until_every_input_is_valid(runs, tiny, tmp_path, capsys):
    out = tmp_path / "o"
    shutil.copytree(runs["cbs_rrs_ss"][0], out)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    msg = bad_run(tiny, tmp_path, capsys, "--epochs", "1")
    assert "holds another training" in msg and "--resume" in msg and "--overwrite" in msg
    msg = bad_run(tiny, tmp_path, capsys, "--overwrite", lists={"train": str(tmp_path / "t_trian.txt")})
    assert "split list not found" in msg  # a typo with --overwrite: the finished run is still there
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    other = tmp_path / "other"
    shutil.copytree(runs["rrs"][0], other)
    rc = train.main(["--resume", str(other / "last.pt"), "--out", str(out), "--epochs", "3"])
    assert rc == 2 and "holds another training" in capsys.readouterr().err  # resume into a third run's folder
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert run_train(tiny, out, "--epochs", "1", "--overwrite", capsys=capsys)[0] == 0
    assert len(read_log(out)) == 1


@pytest.mark.slow
def test_a_running_training_owns_its_folder(tiny, tmp_path, capsys):
    """The run holds an OS lock on --out itself (not on a file in it): a second run on the folder is refused
    at once, --overwrite or not; a file named .lock (here a link to a user's notes) is never written through
    or trusted; the lock ends with its process, leaving nothing stale."""
    out = tmp_path / "o"
    out.mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    os.symlink(tmp_path / "notes.txt", out / ".lock")
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[2]); import bookkeeping\n"
                               "lock = bookkeeping.FolderLock(sys.argv[1], 'training')\nprint('locked', flush=True)\nsys.stdin.read()",
                               str(out), HERE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        msg = bad_run(tiny, tmp_path, capsys, "--epochs", "1", "--overwrite")
        assert f"{out}: in use by another training that is still running" in msg
    finally:
        holder.communicate("")  # the holder exits: the OS drops its lock
    assert run_train(tiny, out, "--epochs", "1", capsys=capsys)[0] == 0
    assert (tmp_path / "notes.txt").read_text() == "mine" and os.path.islink(out / ".lock")


@pytest.mark.slow
def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(runs, tiny, tmp_path, capsys):
    """--overwrite moves the old run (and its evaluations) aside; a new run that fails before its first
    checkpoint (an unreadable image in the middle of its list) puts it back, byte for byte; one that
    writes a checkpoint deletes it, eval-* folders included."""
    out = tmp_path / "o"
    shutil.copytree(runs["cbs"][0], out)
    (out / "eval-tiny_test").mkdir()
    (out / "eval-tiny_test" / "metrics.json").write_text("{}")
    before = {f: (out / f).read_bytes() for f in os.listdir(out) if f.endswith((".pt", ".json", ".jsonl"))}
    root, lists = tiny
    rows = open(lists["train"]).readlines()
    bad = write_list(tmp_path / "bad_train.txt", rows[:40] + ["train/c0/missing.png 0\n"] + rows[40:])
    for memory in ("on", "off"):  # fails while decoding into memory / in the middle of epoch 0
        msg = bad_run(tiny, tmp_path, capsys, "--overwrite", "--in-memory", memory, "--workers", "0",
                      lists={"train": bad})
        assert "bad_train.txt:41: cannot read image" in msg
        assert {f: (out / f).read_bytes() for f in before} == before and (out / "eval-tiny_test").is_dir()
        assert not [f for f in os.listdir(out) if f.startswith(".replaced")]
    assert run_train(tiny, out, "--epochs", "1", "--overwrite", capsys=capsys)[0] == 0
    assert sorted(os.listdir(out)) == ["best.pt", "last.pt", "log.jsonl", "test_metrics.json"]


@pytest.mark.slow
def test_best_pt_is_written_before_last_pt(runs, tiny, tmp_path, capsys, monkeypatch):
    """A crash between the two writes must not leave a last.pt whose best accuracy best.pt lacks."""
    order = []
    real = bookkeeping.atomic_write
    monkeypatch.setattr(bookkeeping, "atomic_write", lambda path, data: (order.append(os.path.basename(path)),
                                                                         real(path, data)))
    assert run_train(tiny, tmp_path / "o", "--epochs", "2", capsys=capsys)[0] == 0
    for i, name in enumerate(order):
        if name == "last.pt":  # every last.pt's best accuracy is already in a best.pt
            assert "best.pt" in order[:i]
    best, last = (bookkeeping.load_checkpoint(str(tmp_path / "o" / f)) for f in ("best.pt", "last.pt"))
    assert best["best_acc"] == last["best_acc"]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["deleted", "renamed"])
def test_an_output_folder_that_vanishes_mid_run_ends_in_one_line(tiny, tmp_path, capsys, monkeypatch, how):
    out, real = tmp_path / "o", train.train_step

    def step(run, images, labels, step):
        if step == 14:  # in epoch 1, after epoch 0's checkpoints
            shutil.rmtree(out) if how == "deleted" else os.rename(out, tmp_path / "moved")
        return real(run, images, labels, step)
    monkeypatch.setattr(train, "train_step", step)
    msg = bad_run(tiny, tmp_path, capsys)  # one line, exit status 2, no traceback
    # best.pt, log.jsonl or last.pt comes first, as epoch 1 improves validation or not: any of them will do
    files = "|".join(map(re.escape, train.RUN_FILES))
    assert re.match(rf"error: {re.escape(str(out))}/({files}): cannot write it \(No such file or directory\)",
                    msg), msg
    assert msg.endswith(f"; {out} is gone (deleted or renamed)")
    if how == "renamed":  # the last good checkpoint went with the folder, whole
        assert bookkeeping.load_checkpoint(str(tmp_path / "moved" / "last.pt"))["epoch"] == 1


@pytest.mark.slow
def test_a_full_disk_at_a_save_ends_in_one_line_and_leaves_no_temporary_file(tiny, tmp_path):
    """RLIMIT_FSIZE (a disk that takes no more than 64 KiB per file): the first checkpoint cannot be written;
    one line names it, exit 2, nothing half written."""
    import resource
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))  # noqa: E731
    p = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *base_args(tiny, tmp_path / "o")],
                       capture_output=True, text=True, cwd=HERE, preexec_fn=limit, timeout=300)
    err = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert p.returncode == 2 and len(err) == 1 and "Traceback" not in p.stderr, p.stderr
    assert err[0] == f"error: {tmp_path / 'o' / 'best.pt'}: cannot write it (written short: the disk is full or a " \
        "file-size limit was reached); no checkpoint was written yet"
    assert not (tmp_path / "o").exists()  # made by the run, left without a file (no .tmp either): removed


# ----------------------------------------------------------------------------------------------
# resume: the same run, on the same data, from any checkpoint ltaux wrote


@pytest.mark.slow
def test_resume_refuses_changed_method_and_applies_optimisation_flags(runs, tmp_path, capsys):
    out = tmp_path / "o"
    shutil.copytree(runs["cbs_rrs_ss"][0], out)
    for flag in (["--batch-size", "16"], ["--method", "cbs"], ["--arch", "resnet18"]):
        rc = train.main(["--resume", str(out / "last.pt"), *flag, "--epochs", "3"])
        err = capsys.readouterr().err
        assert rc == 2 and "the resumed run has" in err and "--init" in err, err
    rc = train.main(["--resume", str(out / "last.pt"), "--epochs", "3", "--momentum", "0.5", "--weight-decay", "0"])
    cap = capsys.readouterr()
    assert rc == 0 and "--momentum 0.5 (the checkpoint's run had 0.9)" in cap.out and "--epochs 3" in cap.out
    ckpt = bookkeeping.load_checkpoint(str(out / "last.pt"))
    assert all(g["momentum"] == 0.5 and g["weight_decay"] == 0 for g in ckpt["optimizer"]["param_groups"])
    assert [r["epoch"] for r in read_log(out)] == [0, 1, 2]


@pytest.mark.slow
def test_resume_into_a_new_folder_holds_the_whole_run(runs, tiny, tmp_path, capsys):
    """--resume X/last.pt --out NEW: best.pt and the log come along, so the final test finds best.pt even when
    validation does not improve after the resume, or when the run had already finished; without a best.pt
    beside the checkpoint the resumed weights become best.pt (and it says so)."""
    done = runs["cbs_rrs_ss"][0]  # a finished 2-epoch run
    assert train.main(["--resume", str(done / "last.pt"), "--out", str(tmp_path / "new")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "new" / "best.pt").read_bytes() == (done / "best.pt").read_bytes()
    assert json.load(open(tmp_path / "new" / "test_metrics.json")) == json.load(open(done / "test_metrics.json"))
    assert read_log(tmp_path / "new") == read_log(done) and "epoch 1 done" not in out
    assert train.main(["--resume", str(done / "last.pt"), "--out", str(tmp_path / "more"), "--epochs", "3"]) == 0
    assert [r["epoch"] for r in read_log(tmp_path / "more")] == [0, 1, 2] and (tmp_path / "more" / "best.pt").exists()
    (tmp_path / "lonely").mkdir()
    shutil.copy(done / "last.pt", tmp_path / "lonely" / "last.pt")
    capsys.readouterr()
    assert train.main(["--resume", str(tmp_path / "lonely" / "last.pt"), "--out", str(tmp_path / "new2")]) == 0
    assert "testing the resumed weights (now best.pt)" in capsys.readouterr().out
    assert (tmp_path / "new2" / "test_metrics.json").exists()


@pytest.mark.slow
def test_resume_refuses_other_data(runs, tiny, tmp_path, capsys):
    """The same file names under another root with other pixels, or the same lines in another order: refused,
    naming what differs (a checkpoint records the list's sha256 and a sample of the images)."""
    root, lists = tiny
    last = str(runs["rrs"][0] / "last.pt")
    other = tmp_path / "other"
    shutil.copytree(root, other)
    for f in sorted((other / "train").rglob("*.png")):
        pipeline.save_png(torch.zeros(3, 16, 16, dtype=torch.uint8), str(f))
    rc = train.main(["--resume", last, "--data", str(other), "--out", str(tmp_path / "a"), "--epochs", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and "is not the image the resumed run" in err and f"--data {other}: train/c0/0.png" in err
    rows = open(lists["train"]).readlines()
    shuffled = write_list(other / "tiny_train.txt", rows[1:] + rows[:1])
    rc = train.main(["--resume", last, "--data", str(root), "--split", shuffled, "--out", str(tmp_path / "b"),
                     "--epochs", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and "not the training list of the resumed run" in err and "order differ" in err


@pytest.mark.slow
def test_saved_unsafe_paths_flag_is_not_honoured_on_resume(runs, tmp_path, capsys):
    ckpt = bookkeeping.load_checkpoint(str(runs["rrs"][0] / "last.pt"))
    ckpt["args"]["allow_unsafe_paths"] = True
    ckpt["args"]["split"] = write_list(tmp_path / "u_train.txt", ["../../etc/x.png 0\n"] + open(
        ckpt["args"]["split"]).readlines())
    bookkeeping.atomic_write(str(tmp_path / "last.pt"), ckpt)
    rc = train.main(["--resume", str(tmp_path / "last.pt"), "--epochs", "3"])
    assert rc == 2 and "is absolute or contains '..'" in capsys.readouterr().err


def test_cuda_graph_is_this_commands_not_the_checkpoints(tmp_path, monkeypatch):
    """A resume of a --cuda-graph run without the flag runs eager steps (after a failed capture, the error's
    advice 'run without --cuda-graph' must be one a resume can follow), and the reverse turns it on."""
    argv = ["--data", str(tmp_path), "--recipe", "cifar10_lt", "--out", str(tmp_path / "o")]
    for first, again, want in (["--cuda-graph"], [], False), ([], ["--cuda-graph"], True):
        saved = train.plain_args(train.parse_args(argv + first)[0])
        monkeypatch.setattr(bookkeeping, "load_checkpoint", lambda path: {"args": saved})
        assert train.parse_args(["--resume", str(tmp_path / "o" / "last.pt")] + again)[0].cuda_graph is want


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.slow
def test_checkpoints_that_are_not_ours_are_refused_in_one_line(runs, tmp_path, capsys):
    torch.save({"format": bookkeeping.CKPT_FORMAT, "payload": Evil()}, tmp_path / "evil.pt")
    rc = train.main(["--resume", str(tmp_path / "evil.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and "evil.pt: refused: it holds pickled Python objects" in err and "pwned" not in err
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    assert train.main(["--resume", str(tmp_path / "junk.pt")]) == 2
    assert "junk.pt: not a readable checkpoint" in capsys.readouterr().err
    good = bookkeeping.load_checkpoint(str(runs["rrs"][0] / "last.pt"))
    for name, damage in (("nokeys", lambda c: c.pop("optimizer")), ("arch", lambda c: c["args"].update(arch="vgg")),
                         ("types", lambda c: c.update(epoch="one")), ("rng", lambda c: c.update(rng_cpu=torch.zeros(3)))):
        c = {**good, "args": dict(good["args"])}
        damage(c)
        torch.save(c, tmp_path / f"{name}.pt")
        rc = train.main(["--resume", str(tmp_path / f"{name}.pt"), "--epochs", "3", "--out", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert rc == 2 and f"{name}.pt: " in err and "Traceback" not in err, err
    torch.save({**good, "format": "ltaux-checkpoint-v1"}, tmp_path / "v1.pt")
    assert train.main(["--resume", str(tmp_path / "v1.pt")]) == 2
    assert "written by an older ltaux" in capsys.readouterr().err


@pytest.mark.slow
def test_a_checkpoint_whose_saved_arguments_were_edited_is_refused(runs, tmp_path, capsys):
    good = bookkeeping.load_checkpoint(str(runs["rrs"][0] / "last.pt"))
    for name, edit in (("lambdas", dict(lambdas=[1.0])), ("method", dict(method="magic")), ("lr", dict(lr="fast")),
                       ("recipe", dict(recipe="nonsense"))):
        torch.save({**good, "args": {**good["args"], **edit}}, tmp_path / f"{name}.pt")
        rc = train.main(["--resume", str(tmp_path / f"{name}.pt")])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err and f"{name}.pt: its saved" in err, err
        assert evaluate.main(["--checkpoint", str(tmp_path / f"{name}.pt")]) == 2
        capsys.readouterr()
    torch.save({**good, "args": {**good["args"], "recipe": "demo"}}, tmp_path / "demo_recipe.pt")  # a demo run's
    assert evaluate.main(["--checkpoint", str(tmp_path / "demo_recipe.pt"), "--out", str(tmp_path / "e"),
                          "--workers", "0"]) == 0
    capsys.readouterr()
    torch.save({**good, "epoch": -3}, tmp_path / "negative.pt")
    assert train.main(["--resume", str(tmp_path / "negative.pt")]) == 2
    assert "negative.pt: damaged ltaux checkpoint (epoch missing, negative or of the wrong type)" in capsys.readouterr().err
    torch.save({**good, "args": {**good["args"], "data": None, "demo_dir": str(tmp_path / "elsewhere")}},
               tmp_path / "demo.pt")
    args, _ = train.parse_args(["--resume", str(tmp_path / "demo.pt")])
    assert args.demo_dir == train.get_args_parser().get_default("demo_dir")  # never from a checkpoint


@pytest.mark.slow
def test_a_damaged_log_on_resume_is_read_around(runs, tmp_path, capsys):
    out = tmp_path / "o"
    shutil.copytree(runs["rrs"][0], out)
    with open(out / "log.jsonl", "ab") as f:
        f.write(b'[1, 2]\n"text"\n{"epoch": "one"}\n\xff\xfe not utf-8 {\n{"epoch": 0, "loss"')
    (out / ".last.pt.tmp4242").write_bytes(b"half a checkpoint")  # what a SIGKILL during a save leaves
    assert train.main(["--resume", str(out / "last.pt"), "--epochs", "3"]) == 0
    assert [r["epoch"] for r in read_log(out)] == [0, 1, 2] and not (out / ".last.pt.tmp4242").exists()


@pytest.mark.slow
def test_a_resume_never_rewinds_its_folder(tiny, tmp_path, capsys):
    """--resume of a checkpoint behind the folder's last.pt (a best.pt, an older copy) is refused in one line
    naming last.pt, and nothing in the folder changes; --out NEW continues it elsewhere. --epochs below what
    the checkpoint has trained and --init with --resume are refused too."""
    out = tmp_path / "o"
    assert run_train(tiny, out, "--epochs", "1", capsys=capsys)[0] == 0
    shutil.copy(out / "last.pt", out / "epoch1.pt")
    assert train.main(["--resume", str(out / "last.pt"), "--epochs", "2"]) == 0
    capsys.readouterr()
    before = {f: (out / f).read_bytes() for f in ("last.pt", "log.jsonl")}
    assert train.main(["--resume", str(out / "epoch1.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out / 'last.pt'} is further on" in err and "--out" in err
    assert {f: (out / f).read_bytes() for f in before} == before  # neither cut back nor overwritten
    assert train.main(["--resume", str(out / "epoch1.pt"), "--out", str(tmp_path / "branch"), "--epochs", "2"]) == 0
    assert [r["epoch"] for r in read_log(tmp_path / "branch")] == [0, 1]  # epoch 0 carried over, 1 trained
    capsys.readouterr()
    assert train.main(["--resume", str(out / "last.pt"), "--epochs", "1"]) == 2
    assert "--epochs 1: the resumed run" in capsys.readouterr().err
    assert train.main(["--resume", str(out / "last.pt"), "--init", str(out / "epoch1.pt")]) == 2
    assert "--init" in capsys.readouterr().err
    assert (out / "log.jsonl").read_bytes() == before["log.jsonl"]


@pytest.mark.slow
def test_a_killed_overwrite_never_hides_a_run(tiny, tmp_path, capsys):
    """A run SIGKILLed during --overwrite left the replaced run in .replaced-by-PID/ and an empty-looking
    folder: the next train.py puts it back (and then refuses to train over it without --overwrite); when the
    killed run had written files of its own, it names where the old run is and trains nothing."""
    out = tmp_path / "o"
    assert run_train(tiny, out, "--epochs", "1", capsys=capsys)[0] == 0
    old = (out / "last.pt").read_bytes()
    aside = out / ".replaced-by-99999999"
    aside.mkdir()
    for f in ("last.pt", "best.pt", "log.jsonl", "test_metrics.json"):
        os.replace(out / f, aside / f)
    msg = bad_run(tiny, tmp_path, capsys, "--epochs", "1")
    assert "holds another training" in msg and (out / "last.pt").read_bytes() == old and not aside.exists()
    os.mkdir(aside)
    os.replace(out / "last.pt", aside / "last.pt")  # the killed run had written its own best.pt already
    msg = bad_run(tiny, tmp_path, capsys, "--epochs", "1", "--overwrite")
    assert f"{aside}: holds the files that an interrupted --overwrite was replacing" in msg
    assert (aside / "last.pt").read_bytes() == old and not (out / "last.pt").exists()


@pytest.mark.slow
def test_a_checkpoint_keeps_absolute_paths(tiny, tmp_path, capsys, monkeypatch):
    """Trained with a relative --data and lists, the run is evaluated from another folder on the same data."""
    root, lists = tiny
    monkeypatch.chdir(root)
    rel = {k: os.path.relpath(v, root) for k, v in lists.items()}
    args = base_args((".", rel), tmp_path / "o", "--epochs", "1")
    assert train.main(args) == 0
    saved = bookkeeping.load_checkpoint(str(tmp_path / "o" / "best.pt"))["args"]
    assert saved["data"] == str(root) and saved["test_split"] == lists["test"] and saved["split"] == lists["train"]
    monkeypatch.chdir(tmp_path)
    assert ev("--checkpoint", str(tmp_path / "o" / "best.pt"), capsys=capsys)[0] == 0


def test_a_newer_checkpoint_is_called_newer(tmp_path):
    torch.save({"format": "ltaux-checkpoint-v3"}, tmp_path / "new.pt")
    torch.save({"format": "ltaux-checkpoint-v1"}, tmp_path / "old.pt")
    with pytest.raises(ltaux.LTauxError, match="written by a newer ltaux: update ltaux"):
        bookkeeping.load_checkpoint(str(tmp_path / "new.pt"))
    with pytest.raises(ltaux.LTauxError, match="written by an older ltaux"):
        bookkeeping.load_checkpoint(str(tmp_path / "old.pt"))


def test_a_folder_lock_tells_which_job_holds_it(tmp_path):
    """evaluate.py on a folder a training holds says a training holds it (not "another evaluation")."""
    lock = bookkeeping.FolderLock(str(tmp_path), "training")
    try:
        with pytest.raises(ltaux.LTauxError, match="in use by another training that is still running"):
            bookkeeping.OutputFolder(str(tmp_path), ("metrics.json",), "evaluation")
    finally:
        lock.release()
    assert os.listdir(tmp_path) == []  # the note went with the lock


# ----------------------------------------------------------------------------------------------
# signals in every phase, and dead workers


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_and_resume_matches_an_uninterrupted_run(runs, tiny, tmp_path):
    """Cut while 2 DataLoader workers feed it (they must not die first), resumed in memory with none: the same
    weights as the run straight through (made in memory), bit for bit."""
    straight = runs["cbs_rrs_ss"][0]
    p = start(base_args(tiny, tmp_path / "cut", "--print-freq", "1", "--workers", "2", "--in-memory", "off"))
    out = signal_when(p, "epoch 1 [ 4/", signal.SIGTERM)
    assert p.wait(timeout=120) == 0, out
    assert "stopped at epoch 1 step" in out and "--resume" in out and "Traceback" not in out
    cut = bookkeeping.load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    assert cut["epoch"] == 1 and 4 <= cut["step_in_epoch"] < 12
    assert cut["global_step"] == 12 + cut["step_in_epoch"]
    assert not [f for f in os.listdir(tmp_path / "cut") if ".tmp" in f]
    p = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--resume", str(tmp_path / "cut" / "last.pt"),
                        "--workers", "0"], capture_output=True, text=True, cwd=HERE, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    a, b = weights(straight), weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit, BN buffers too
    log_a, log_b = read_log(straight), read_log(tmp_path / "cut")
    assert [r["epoch"] for r in log_b] == [0, 1]
    assert log_b[1]["loss"] == pytest.approx(log_a[1]["loss"], rel=1e-5)  # the whole epoch, not the resumed part


@pytest.mark.slow
def test_sigterm_repeated_every_third_of_a_second_is_one_request(tiny, tmp_path):
    """A supervisor that repeats SIGTERM every 0.3 s until the process ends: each comes within a second of
    the previous one, so it is the same request: the run saves last.pt and exits 0 (not 143)."""
    p = start(base_args(tiny, tmp_path / "o", "--print-freq", "1", "--epochs", "4"))
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("epoch 1 [ 2/"):
            break
    while p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=0.3)
        except subprocess.TimeoutExpired:
            pass
    out = "".join(lines) + p.stdout.read()
    assert p.returncode == 0, out
    assert "stopped at epoch 1 step" in out and "Traceback" not in out
    assert bookkeeping.load_checkpoint(str(tmp_path / "o" / "last.pt"))["epoch"] == 1
    assert not [f for f in os.listdir(tmp_path / "o") if ".tmp" in f]


@pytest.mark.slow
def test_sigint_during_the_final_test_stops_it_and_resume_runs_it(tiny, tmp_path, capsys, monkeypatch):
    """Ctrl-C during the final test: no traceback, no test_metrics.json, exit 0 with the way on; --resume of
    the finished run runs the test and nothing else."""
    real = runtime.predict

    def interrupted(*a, stop=None, **kw):
        if stop is not None:  # the final test (validation passes no stop)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, stop=stop, **kw)
    monkeypatch.setattr(runtime, "predict", interrupted)
    rc, cap = run_train(tiny, tmp_path / "o", "--epochs", "1", capsys=capsys)
    assert rc == 0 and "stopped during the final test: training is complete" in cap.out and "Traceback" not in cap.err
    assert "test_metrics.json" not in os.listdir(tmp_path / "o")
    monkeypatch.setattr(runtime, "predict", real)
    assert train.main(["--resume", str(tmp_path / "o" / "last.pt")]) == 0
    out = capsys.readouterr().out
    assert "test (" in out and "epoch 0 done" not in out and (tmp_path / "o" / "test_metrics.json").exists()


@pytest.mark.slow
def test_sigint_during_check_files_ends_at_once_in_one_line(tiny, tmp_path, capsys, monkeypatch):
    calls = sigint_at_image(10, monkeypatch)
    rc, cap = run_train(tiny, tmp_path / "o", "--check-files", capsys=capsys)
    assert rc == 128 + signal.SIGINT and "Traceback" not in cap.err
    assert cap.err.strip() == "error: SIGINT before training started: stopped, nothing was written"
    assert len(calls) == 10 and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_killed_loader_worker_ends_the_run_in_one_line(tiny, tmp_path, capsys, monkeypatch):
    """A DataLoader worker killed outright (SIGKILL, the OOM killer): one line naming what happened and the
    last good checkpoint, exit 2, no traceback."""
    main_pid, real, served = os.getpid(), pipeline.SeededCifar.__getitem__, []

    def item(self, key):
        served.append(key)  # in the worker's own copy of this list
        if os.getpid() != main_pid and len(served) == 20:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, key)
    monkeypatch.setattr(pipeline.SeededCifar, "__getitem__", item)
    msg = bad_run(tiny, tmp_path, capsys, "--in-memory", "off", "--workers", "1")
    assert "a data-loader worker died (" in msg and msg.endswith("; no checkpoint was written yet")


# ----------------------------------------------------------------------------------------------
# torchrun


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tiny, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(HERE, "train.py"), *base_args(tiny, out, "--epochs", "1")],
                       capture_output=True, text=True, cwd=HERE, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("epoch 0 done") == 1  # rank 0 alone logs
    assert "device: cpu, 2 processes" in p.stdout
    assert sorted(os.listdir(out)) == ["best.pt", "last.pt", "log.jsonl", "test_metrics.json"]  # rank 0 alone writes
    ckpt = bookkeeping.load_checkpoint(str(out / "last.pt"))
    assert ckpt["global_step"] == 12 and ckpt["args"]["batch_size"] == 8
    model, ckpt = bookkeeping.model_from_checkpoint(str(out / "best.pt"))
    counts = ckpt["train_counts"]
    ds = ltaux.SplitDataset(tiny[0], tiny[1]["test"], pipeline.build_transform(16, train=False),
                            read=pipeline.read_image)
    pred, target = runtime.predict(model, torch.utils.data.DataLoader(ds, batch_size=7), torch.device("cpu"))
    single = ltaux.shot_accuracy(pred, target, counts)
    ddp = json.load(open(out / "test_metrics.json"))
    assert ddp["overall"] == pytest.approx(single["overall"])  # gathered: no test image lost or counted twice


@pytest.mark.slow
def test_sigterm_under_torchrun_every_rank_stops_after_the_same_step(tiny, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-u", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(HERE, "train.py"), *base_args(tiny, out, "--epochs", "50", "--print-freq", "1")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE, env=env,
                         start_new_session=True)
    text = signal_when(p, "epoch 0 [ 3/", signal.SIGTERM)
    p.wait(timeout=120)
    assert "stopped at epoch 0 step" in text, text
    ckpt = bookkeeping.load_checkpoint(str(out / "last.pt"))
    assert ckpt["epoch"] == 0 and 3 <= ckpt["step_in_epoch"] <= 6  # agreed within a few steps, then saved


@pytest.mark.slow
def test_bad_image_under_torchrun_prints_one_error_line(tiny, tmp_path):
    root, lists = tiny
    rows = open(lists["train"]).readlines()
    rows[50] = "train/c0/missing.png 0\n"
    bad = write_list(tmp_path / "bad_train.txt", rows)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(HERE, "train.py"), *base_args((root, {**lists, "train": bad}), tmp_path / "o")],
                       capture_output=True, text=True, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    ours = [line for line in (p.stdout + p.stderr).splitlines() if line.startswith("error: ")]
    assert p.returncode != 0 and len(ours) == 1 and "bad_train.txt:51: cannot read image" in ours[0]
    assert "Connection closed by peer" not in p.stderr and "ProcessGroupGloo" not in p.stderr  # no collective traceback


# ----------------------------------------------------------------------------------------------
# the demo


@pytest.mark.slow
def test_demo_data_is_long_tailed_and_never_written_into_a_users_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    with pytest.raises(ltaux.LTauxError, match="exists but holds no demo lists"):
        pipeline.make_demo_data(str(tmp_path / "mine"))
    lists = pipeline.make_demo_data(str(tmp_path / "demo"), classes=12, train=(150, 5), val=2, test=3, size=8)
    _, labels = ltaux.read_split(lists["train"])
    groups = ltaux.shot_groups(ltaux.class_counts(labels, 12))
    assert set(groups.tolist()) == {0, 1, 2}  # the demo spans many, medium and few
    assert ltaux.class_counts(ltaux.read_split(lists["test"])[1], 12).tolist() == [3] * 12
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


# ==============================================================================================
# evaluate.py
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# metrics, per-class CSV, Fig. 3 / Fig. 4 and t-SNE, on a flat test list


NAMES = ["c0", "c1", "c2", "c3", "c4", "c5"]


SUMMARY = ("many", "medium", "few", "overall", "mean_per_class")


@pytest.fixture(scope="module")
def flat_tiny(tmp_path_factory):
    """tiny, with a flat test list: class names must come from the training list's folders."""
    return make_tiny(tmp_path_factory.mktemp("flat"), flat_test=True)


@pytest.fixture(scope="module")
def eval_runs(flat_tiny, tmp_path_factory):
    """Checkpoints made once: the method (cbs_rrs_ss), RRS-Only (with --amp bf16) and CBS-Only (with
    --many 30 --few 5), plus two doctored copies: 5 classes, and other training counts."""
    out = tmp_path_factory.mktemp("runs")
    paths = {}
    for method, extra in (("cbs_rrs_ss", []), ("rrs", ["--amp", "bf16"]), ("cbs", ["--many", "30", "--few", "5"])):
        assert train.main(base_args(flat_tiny, out / method, "--epochs", "1", "--method", method, *extra)) == 0
        paths[method] = str(out / method / "best.pt")
    ckpt = torch.load(paths["rrs"], weights_only=True)
    five = dict(ckpt, train_counts=ckpt["train_counts"][:5])
    five["model"] = {k: v[:5] if k.split(".")[0] in ("fc", "aux_fc") else v for k, v in ckpt["model"].items()}
    torch.save(five, str(out / "five.pt"))
    torch.save(dict(ckpt, train_counts=ckpt["train_counts"] + torch.tensor([0, 0, 0, 1, 0, 0])), str(out / "other.pt"))
    paths["five"], paths["other"] = str(out / "five.pt"), str(out / "other.pt")
    return paths


def ev(*argv, capsys=None):
    rc = evaluate.main(["--workers", "0", "--device", "cpu", *argv])
    cap = capsys.readouterr() if capsys else None
    return rc, cap


def png(path):
    with Image.open(path) as im:
        return im.convert("RGB")


def has_color(img, color, box=None):
    """Whether the exact colour occurs (within box = (left, top, right, bottom))."""
    img = img.crop(box) if box else img
    return any(c == color for _, c in img.getcolors(1 << 20))


@pytest.mark.slow
def test_metrics_and_csv(eval_runs, flat_tiny, tmp_path, capsys):
    rc, cap = ev("--checkpoint", eval_runs["cbs_rrs_ss"], "--out", str(tmp_path / "e"), capsys=capsys)
    assert rc == 0, cap.err
    m = json.load(open(tmp_path / "e" / "metrics.json"))
    assert m["class_names"] == NAMES  # from the train list's folders: the test list is flat
    assert m["train_counts"] == TRAIN_COUNTS and m["test_counts"] == [4] * 6
    assert m["thresholds"] == {"many": 100, "few": 20} and m["method"] == "cbs_rrs_ss" and m["compare"] == []
    assert m["split"] == flat_tiny[1]["test"] and m["checkpoint"] == os.path.abspath(eval_runs["cbs_rrs_ss"])
    fc = torch.load(eval_runs["cbs_rrs_ss"], weights_only=True)["model"]["fc.weight"]  # h, not h_a
    assert m["weight_norms"] == pytest.approx(fc.norm(dim=1).tolist(), rel=1e-5)
    model, ckpt = bookkeeping.model_from_checkpoint(eval_runs["cbs_rrs_ss"])
    counts = ckpt["train_counts"]
    ds = ltaux.SplitDataset(flat_tiny[0], flat_tiny[1]["test"], pipeline.build_transform(16, train=False),
                            read=pipeline.read_image)
    pred, target = runtime.predict(model, torch.utils.data.DataLoader(ds, batch_size=7), torch.device("cpu"))
    want = ltaux.shot_accuracy(pred, target, counts)
    assert [m[k] for k in SUMMARY] == pytest.approx([want[k] for k in SUMMARY])
    assert m["per_class"] == pytest.approx(want["per_class"])
    rows = list(csv.DictReader(open(tmp_path / "e" / "per_class.csv")))
    assert list(rows[0]) == ["cls", "name", "train_count", "shot_group", "test_count", "accuracy", "weight_norm"]
    assert [r["name"] for r in rows] == NAMES and [int(r["train_count"]) for r in rows] == TRAIN_COUNTS
    assert [r["shot_group"] for r in rows] == ["medium", "medium", "few", "few", "few", "few"]
    assert [float(r["weight_norm"]) for r in rows] == pytest.approx(fc.norm(dim=1).tolist(), abs=1e-4)
    assert [float(r["accuracy"]) for r in rows] == pytest.approx(want["per_class"], abs=0.01)
    assert sorted(os.listdir(tmp_path / "e")) == ["accuracy.png", "metrics.json", "per_class.csv", "weight_norms.png"]
    for name in ("accuracy.png", "weight_norms.png"):
        img = png(tmp_path / "e" / name)
        assert img.size == evaluate.SIZE and has_color(img, evaluate.FREQ_COLOR)
    assert has_color(png(tmp_path / "e" / "weight_norms.png"), evaluate.THIS_COLOR, (80, 80, 1100, 500))


@pytest.mark.slow
def test_thresholds_come_from_the_checkpoint(eval_runs, tmp_path, capsys):
    rc, cap = ev("--checkpoint", eval_runs["cbs"], "--out", str(tmp_path / "e"), capsys=capsys)  # run: --many 30 --few 5
    assert rc == 0, cap.err
    rows = list(csv.DictReader(open(tmp_path / "e" / "per_class.csv")))
    assert [r["shot_group"] for r in rows] == ["many", "medium", "medium", "medium", "few", "few"]  # 5 <= --few 5
    m = json.load(open(tmp_path / "e" / "metrics.json"))
    assert m["thresholds"] == {"many": 30, "few": 5} and m["many"] is not None
    rc, cap = ev("--checkpoint", eval_runs["cbs"], "--out", str(tmp_path / "f"), "--many", "100", "--few", "20",
                 capsys=capsys)
    rows = list(csv.DictReader(open(tmp_path / "f" / "per_class.csv")))
    assert rc == 0 and [r["shot_group"] for r in rows] == ["medium", "medium", "few", "few", "few", "few"]


@pytest.mark.slow
def test_evaluate_and_train_check_the_thresholds_alike(eval_runs, tiny, tmp_path, capsys):
    msg = bad_run(tiny, tmp_path, capsys, "--many", "-5")
    rc, cap = ev("--checkpoint", eval_runs["cbs"], "--many", "-5", "--few", "20", "--out", str(tmp_path / "e"),
                 capsys=capsys)
    assert rc == 2 and cap.err.strip() == msg == "error: --many -5 --few 20: need whole numbers with 0 <= --few < --many " \
        "(many-shot: at least --many training images, few-shot: at most --few)"


@pytest.mark.slow
def test_a_checkpoint_from_before_the_papers_groups_is_evaluated_with_them_and_says_so_once(eval_runs, tmp_path, capsys):
    """Checkpoints written before ltaux counted many / few inclusively (no shot_rule): evaluated with the
    paper's rule, one note line for all of them, naming the flags that give the old groups."""
    for name in ("cbs_rrs_ss", "rrs"):
        ckpt = torch.load(eval_runs[name], weights_only=True)
        del ckpt["shot_rule"]
        torch.save(ckpt, tmp_path / f"old_{name}.pt")
    rc, cap = ev("--checkpoint", str(tmp_path / "old_cbs_rrs_ss.pt"), "--compare", str(tmp_path / "old_rrs.pt"),
                 "--out", str(tmp_path / "e"), "--many", "30", "--few", "5", capsys=capsys)
    notes = [line for line in cap.out.splitlines() if line.startswith("note: ")]
    assert rc == 0 and len(notes) == 1 and "old_cbs_rrs_ss.pt, " in notes[0] and "old_rrs.pt were written before" in notes[0]
    assert "--many 31 --few 4 gives those groups" in notes[0]
    rows = list(csv.DictReader(open(tmp_path / "e" / "per_class.csv")))
    assert [r["shot_group"] for r in rows] == ["many", "medium", "medium", "medium", "few", "few"]  # inclusive: 5 is few
    rc, cap = ev("--checkpoint", eval_runs["cbs"], "--out", str(tmp_path / "f"), capsys=capsys)
    assert rc == 0 and "note:" not in cap.out  # a checkpoint of this version says nothing


@pytest.mark.slow
def test_amp_comes_from_the_checkpoint(eval_runs, tmp_path, monkeypatch, capsys):
    seen, predict = [], runtime.predict

    def spy(model, loader, device, amp=None, *a, **kw):
        seen.append(amp)
        return predict(model, loader, device, amp, *a, **kw)
    monkeypatch.setattr(runtime, "predict", spy)
    assert ev("--checkpoint", eval_runs["rrs"], "--out", str(tmp_path / "e"), capsys=capsys)[0] == 0  # run: --amp bf16
    assert seen == [torch.bfloat16] and json.load(open(tmp_path / "e" / "metrics.json"))["amp"] == "bf16"
    assert ev("--checkpoint", eval_runs["rrs"], "--out", str(tmp_path / "f"), "--amp", "off", capsys=capsys)[0] == 0
    assert seen[1:] == [None]
    assert ev("--checkpoint", eval_runs["cbs"], "--out", str(tmp_path / "g"), capsys=capsys)[0] == 0  # run: no --amp
    assert seen[2:] == [None]  # CPU: off


@pytest.mark.slow
def test_evaluate_owns_exactly_the_files_it_writes(eval_runs, tmp_path, capsys):
    """Re-running an evaluation (same checkpoint, same list) replaces its own outputs; another evaluation's
    files, or files merely named like its outputs, are refused without --overwrite and never deleted; stale
    figures of its own earlier --compare go; a second evaluation on the same --out at once is refused."""
    folder = os.path.join(os.path.dirname(eval_runs["cbs"]), "eval-tiny_test")  # the default --out
    assert ev("--checkpoint", eval_runs["cbs"], capsys=capsys)[0] == 0
    assert ev("--checkpoint", eval_runs["cbs"], capsys=capsys)[0] == 0  # the trainer's suggested command, again
    assert json.load(open(os.path.join(folder, "metrics.json")))["files"] == list(evaluate.OUTPUTS[:4])
    out = tmp_path / "e"
    out.mkdir()
    (out / "gain.png").write_bytes(b"mine")  # not written by evaluate.py
    rc, cap = ev("--checkpoint", eval_runs["cbs"], "--out", str(out), capsys=capsys)
    assert rc == 2 and cap.err.count("\n") == 1 and "holds another evaluation (gain.png)" in cap.err and "--overwrite" in cap.err
    assert ev("--checkpoint", eval_runs["cbs"], "--out", str(out), "--overwrite", capsys=capsys)[0] == 0
    assert (out / "gain.png").read_bytes() == b"mine"  # replaced only what it writes; deleted nothing
    rc, cap = ev("--checkpoint", eval_runs["rrs"], "--out", str(out), capsys=capsys)  # another checkpoint's
    assert rc == 2 and "holds another evaluation" in cap.err
    own = tmp_path / "own"
    assert ev("--checkpoint", eval_runs["cbs_rrs_ss"], "--out", str(own), "--compare", eval_runs["rrs"], capsys=capsys)[0] == 0
    assert {"gain.png", "tsne.png"} <= set(os.listdir(own))
    assert ev("--checkpoint", eval_runs["cbs_rrs_ss"], "--out", str(own), capsys=capsys)[0] == 0  # no --compare now
    assert sorted(os.listdir(own)) == sorted(evaluate.OUTPUTS[:4])  # its own stale figures went
    lock = bookkeeping.FolderLock(str(own), "evaluation")  # another evaluation still writing there
    try:
        rc, cap = ev("--checkpoint", eval_runs["cbs_rrs_ss"], "--out", str(own), capsys=capsys)
        assert rc == 2 and "in use by another evaluation that is still running" in cap.err
    finally:
        lock.release()


@pytest.mark.slow
@pytest.mark.parametrize("bad, words", [("five", "has 5 classes"), ("other", "other class counts")])
def test_compare_needs_the_same_classes(eval_runs, tmp_path, capsys, bad, words):
    rc, cap = ev("--checkpoint", eval_runs["cbs_rrs_ss"], "--out", str(tmp_path / "e"), "--compare", eval_runs["rrs"],
                 eval_runs[bad], capsys=capsys)
    assert rc == 2 and cap.err.count("\n") == 1 and cap.err.startswith(f"error: {eval_runs[bad]}: ")
    assert words in cap.err and not os.path.exists(tmp_path / "e")  # refused before any work or output


@pytest.mark.slow
def test_compare_table_and_figures(eval_runs, tmp_path, capsys):
    out = tmp_path / "e"
    rc, cap = ev("--checkpoint", eval_runs["cbs_rrs_ss"], "--out", str(out), "--compare", eval_runs["rrs"], eval_runs["cbs"],
                 capsys=capsys)
    assert rc == 0, cap.err
    assert "note:" not in cap.out  # the runs differ only in --amp and the thresholds: not in what they train
    m = json.load(open(out / "metrics.json"))
    assert [c["method"] for c in m["compare"]] == ["rrs", "cbs"]
    labels = ["CBS+RRS+SS (cbs_rrs_ss)", "RRS-Only (rrs)", "CBS-Only (cbs)"]
    rows = [line for line in cap.out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0][2:] for r in rows] == labels + [f"gain over {b}" for b in labels[1:]]
    for row, base in zip(rows[3:], m["compare"]):  # this run minus each baseline, in points
        cells = [c.strip() for c in row.strip("| ").split(" | ")[1:]]
        want = ["-" if m[k] is None or base[k] is None else f"{m[k] - base[k]:+.1f}" for k in SUMMARY]
        assert cells == want
    for name in evaluate.OUTPUTS:
        assert str(out / name) in cap.out  # the list of files written
    gain, norms, tsne = png(out / "gain.png"), png(out / "weight_norms.png"), png(out / "tsne.png")
    assert gain.size == norms.size == evaluate.SIZE
    plot = (81, 80, evaluate.SIZE[0] - 91, evaluate.SIZE[1] - 59)  # inside the axes, below the legend
    for base, color in zip(m["compare"], evaluate.RUN_COLORS):  # blue: over RRS-Only, red: over CBS-Only
        differs = any(a != b for a, b in zip(m["per_class"], base["per_class"]))
        assert has_color(gain, color, plot) == differs  # a bar exactly where a class's accuracy differs
        assert has_color(norms, color, plot)  # each model's series of ||w_c||
    assert has_color(norms, evaluate.THIS_COLOR, plot)
    P = evaluate.TSNE_PANEL
    assert tsne.size == (3 * P + evaluate.TSNE_LEGEND, P + 70)
    for k in range(3):  # each panel holds points of several of the 6 classes (all tiny classes are picked)
        panel = tsne.crop((k * P + 11, 61, (k + 1) * P - 11, P + 39))
        assert sum(has_color(panel, c) for c in evaluate.PALETTE[:6]) >= 4


@pytest.mark.slow
def test_compare_says_when_the_runs_were_trained_otherwise(eval_runs, tmp_path, capsys):
    """A baseline of other epochs and lr (a 1-epoch baseline made an 8-epoch run look 20 points better):
    one note line naming both runs' values; --seed and --amp, which differ too, are not named."""
    ckpt = torch.load(eval_runs["rrs"], weights_only=True)
    ckpt["args"].update(epochs=8, lr=0.2, seed=3)
    (tmp_path / "long").mkdir()
    torch.save(ckpt, str(tmp_path / "long" / "best.pt"))
    rc, cap = ev("--checkpoint", eval_runs["cbs_rrs_ss"], "--out", str(tmp_path / "e"), "--compare",
                 str(tmp_path / "long" / "best.pt"), eval_runs["cbs"], capsys=capsys)
    assert rc == 0, cap.err
    assert [line for line in cap.out.splitlines() if line.startswith("note:")] == [
        "note: the gains are not the methods' alone: CBS+RRS+SS (cbs_rrs_ss) was trained with --epochs 1, "
        "--lr 0.05, but RRS-Only (long) with --epochs 8, --lr 0.2"]


def settings_run(label, method="cbs_rrs_ss", **args):
    defaults = vars(recipes.training_parser().parse_args([]))
    args = dict(defaults, method=method, **args)
    return evaluate.Run(f"{label}.pt", None, args, torch.tensor([5, 1]), False, label=label)


def test_compare_note_names_only_the_settings_that_shape_training():
    """Seed, precision and shot thresholds are not named; a baseline's lambdas (unused) and Z (RRS-Only has
    no class-balanced batch) are not either; cbs_rrs's lambdas are compared where both losses use them."""
    main = settings_run("M")
    quiet = [settings_run("R", "rrs", seed=4, amp="off", many=30, few=2, lambdas=[1.0, 2.0, 3.0],
                          per_class=8),
             settings_run("C", "cbs_rrs", lambdas=[0.5, 1.0, 0.0]), settings_run("S", rotation="random")]
    assert evaluate.settings_note(main, quiet) is None
    loud = [settings_run("C", "cbs", epochs=1, per_class=8),
            settings_run("A", "cbs_rrs", lambdas=[1.0, 1.0, 0.0]),
            settings_run("S", rotation="all", arch="resnet50")]
    assert evaluate.settings_note(main, loud) == (
        "note: the gains are not the methods' alone: M was trained with --arch resnet10, --per-class 4, "
        "--epochs 90, --rotation random, --lambdas 0.5 1 1, but C with --per-class 8, --epochs 1, "
        "A with --lambdas 1 1, "
        "S with --arch resnet50, --rotation all")


def figure_run(accuracy, counts):
    """A Run as draw_figures reads it: per-class accuracy (None: no test image), training counts, norms."""
    run = evaluate.Run("r/best.pt", None, {}, torch.tensor(counts), False, label="CBS+RRS+SS (r)")
    run.metrics = dict(per_class=accuracy, counts=[0 if a is None else 4 for a in accuracy])
    run.norms = [1.0 + 0.25 * c for c in range(len(counts))]
    return run


def test_accuracy_figure_draws_the_frequency_curve_over_the_bars_and_marks_zero_accuracy():
    """Class 0's bar reaches 100 %: the orange curve crosses it and must stay visible; class 1 at 0 %
    gets a marker on the axis; class 2 (no test image) gets nothing there."""
    counts = [40, 20, 10, 5]
    run = figure_run([100.0, 0.0, None, 50.0], counts)
    rows = evaluate.per_class_rows(run, ["a", "b", "c", "d"], 30, 8)  # many, medium, medium, few
    img = evaluate.draw_figures(run, [], rows, "lists/x_test.txt", [])["accuracy.png"]
    at = evaluate.Chart("", "", (0, 100), counts, [0, 1, 1, 2])  # the figure's geometry
    assert img.getpixel((round(at.x(0.5)), round(at.cy(40)))) == evaluate.FREQ_COLOR  # over class 0's bar
    assert img.getpixel((round(at.x(0.2)), round(at.y(50)))) == evaluate.GROUP_COLORS[0]  # the bar itself
    assert img.getpixel((round(at.x(1.5)), round(at.y(0)) - 3)) == evaluate.GROUP_COLORS[1]  # 0 %: marked
    assert img.getpixel((round(at.x(2.5)), round(at.y(0)) - 3)) == (255, 255, 255)  # no test image: nothing


def test_weight_norm_figure_does_not_depend_on_the_test_list():
    """||w_c|| are the weights alone: the same figure whatever list was evaluated (unlike accuracy.png)."""
    run = figure_run([100.0, 0.0, None, 50.0], [40, 20, 10, 5])
    rows = evaluate.per_class_rows(run, ["a", "b", "c", "d"], 30, 8)
    one = evaluate.draw_figures(run, [], rows, "lists/ImageNet_LT_test.txt", [])
    two = evaluate.draw_figures(run, [], rows, "other/Places_LT_val.txt", [])
    assert one["weight_norms.png"].tobytes() == two["weight_norms.png"].tobytes()
    assert one["accuracy.png"].tobytes() != two["accuracy.png"].tobytes()


@pytest.mark.parametrize("groups", [[6, 6, 6], [20, 0, 0]])
def test_tsne_gives_every_shown_class_its_own_colour(groups):
    """Section 4.6's 18 classes (6 per group) and more than the palette holds: as many distinct colours
    as classes, each drawn in the legend."""
    picked = [(c, g) for g, n in enumerate(groups) for c in range(sum(groups[:g]), sum(groups[:g + 1]))]
    run = evaluate.Run("r/best.pt", None, {}, torch.tensor([1] * len(picked)), False, label="r")
    run.tsne_labels = [c for c, _ in picked]  # feats None: the legend alone, no t-SNE to compute
    rows = [dict(name=f"class{c}", train_count=100 - c) for c, _ in picked]
    img = evaluate.draw_tsne([run], rows, picked, "x_test.txt")
    colors = evaluate.class_colors(len(picked))
    assert len(set(colors)) == len(picked) and colors[:18] == list(evaluate.PALETTE)
    legend = (evaluate.TSNE_PANEL, 0, img.width, img.height)
    assert all(has_color(img, c, legend) for c in colors)


def test_pairwise_distances_are_exact_also_far_from_the_origin():
    """evaluate.pairwise_sq (torch.cdist) against the definition sum_k (x_ik - x_jk)^2: the same on features
    as they come, and still exact for close points far from the origin, where |a|^2 + |b|^2 - 2ab is noise."""
    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(60, 16, generator=g, dtype=torch.float64),
              1e6 + 1e-2 * torch.randn(60, 16, generator=g, dtype=torch.float64)):
        want = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        got = evaluate.pairwise_sq(x)
        assert got.shape == (60, 60) and bool((got.diagonal() == 0).all())
        assert torch.allclose(got, want, rtol=1e-9, atol=0)


@pytest.mark.slow
def test_tsne_keeps_blobs_apart_and_is_deterministic():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(3, 10, generator=g) * 10
    x = torch.cat([c + torch.randn(30, 10, generator=g) for c in centres])  # 3 blobs x 30 points in 10-D
    label = torch.arange(3).repeat_interleave(30)
    y = evaluate.tsne(x, seed=0)
    assert y.shape == (90, 2) and bool(torch.isfinite(y).all())
    d = torch.cdist(y, y).fill_diagonal_(float("inf"))
    assert (label[d.argmin(1)] == label).float().mean() >= 0.95
    assert torch.equal(y, evaluate.tsne(x, seed=0)) and not torch.equal(y, evaluate.tsne(x, seed=1))


@pytest.mark.slow
def test_tsne_picks_six_classes_per_group_evenly():
    counts = torch.tensor([500 - 10 * c for c in range(20)] + [60 - c for c in range(20)] + [10] * 4)
    labels = [c for c in range(44) for _ in range(60 if c % 2 else 3)]
    idx, picked = evaluate.tsne_indices(labels, counts, many=100, few=20)
    groups = [g for _, g in picked]
    assert groups == [0] * 6 + [1] * 6 + [2] * 4  # few: only 4 classes
    many = [c for c, g in picked if g == 0]
    assert many[0] == 1 and many[-1] == 18 and sorted(many) == many  # spread over the group, most frequent first
    per_class = {c: sum(labels[i] == c for i in idx) for c, _ in picked}
    assert all(n == (50 if c % 2 else 3) for c, n in per_class.items())  # up to 50 images per class


@pytest.mark.slow
def test_class_names_from_folders():
    names = evaluate.class_names([
        (["val/x.jpg", "val/y.jpg"], [0, 1]),  # flat: names nothing
        (["train/n01440764/a.JPEG", "d/a/apartment_building/outdoor/1.jpg", "d/b/bus/outdoor/2.jpg",
          "train/n01443537/b.JPEG", "train/n01440764/c.JPEG"], [0, 1, 2, 3, 0]),
        (["v/a/1.jpg", "v/b/1.jpg", "v/c/1.jpg", "v/n01443537/1.jpg"], [5, 5, 5, 3]),  # 3 is named; 5 too big
    ], 5)
    assert names == ["n01440764", "apartment_building/outdoor", "bus/outdoor", "n01443537", "4"]


@pytest.mark.slow
def test_help_and_imports():
    text = evaluate.get_args_parser().format_help()
    assert "--eval-batch-size" in text and "--batch-size " not in text and "(default: 256)" in text
    assert "--many 101 --few 19" in text  # Decoupling's groups, named
    tree = ast.parse(open(os.path.join(HERE, "evaluate.py")).read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"argparse", "collections", "csv", "dataclasses", "io", "json", "math", "os", "sys", "torch",
                        "PIL", "bookkeeping", "ltaux", "pipeline", "recipes", "runtime"}  # never train.py


@pytest.mark.slow
@pytest.mark.parametrize("program", ["train.py", "evaluate.py", "bench.py", "cifar_lt.py"])
def test_help_opens_with_examples_and_needs_no_torch(program):
    """Every entry point answers --help without importing torch (seconds, not ten), its examples first."""
    p = subprocess.run([sys.executable, "-X", "importtime", os.path.join(HERE, program), "--help"],
                       capture_output=True, text=True, cwd=HERE)
    assert p.returncode == 0 and " torch\n" not in p.stderr and "| torch" not in p.stderr, p.stderr[-500:]
    assert ("examples:\n  python " + program) in p.stdout


# ==============================================================================================
# cifar_lt.py
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# the CIFAR-10-LT protocol's table


@pytest.mark.slow
def test_protocol_table_is_computed_from_the_runs_metrics(tiny, tmp_path, capsys):
    """cifar_lt.py on two tiny runs (one method, two seeds, run side by side): each cell of the table is the
    mean +- sample std of the runs' own test_metrics.json; the same command again trains nothing more."""
    import cifar_lt
    root, lists = tiny
    cmd = ["--data", str(root), "--split", lists["train"], "--test-split", lists["test"], "--recipe", "none",
           "--methods", "rrs", "--seeds", "0", "1", "--epochs", "1", "--parallel", "2", "--device", "cpu",
           "--out", str(tmp_path / "p"), "--", "--arch", "resnet10", "--image-size", "16", "--batch-size",
           "8", "--per-class", "2", "--embed-dim", "8", "--lr", "0.05", "--many", "30", "--few", "5",
           "--amp", "off"]
    assert cifar_lt.main(cmd) == 0
    out = capsys.readouterr().out
    assert out.count("started rrs_s") == 2 and "finished rrs_s0: exit 0" in out and "failed" not in out
    runs = [json.load(open(tmp_path / "p" / f"rrs_s{s}" / "test_metrics.json")) for s in (0, 1)]
    row = next(line for line in out.splitlines() if line.startswith("| RRS-Only"))
    for key, cell in zip(("many", "medium", "few", "overall"), row.split(" | ")[1:5]):
        v = [r[key] for r in runs]
        mean, std = sum(v) / 2, abs(v[0] - v[1]) / math.sqrt(2)
        assert cell == f"{mean:.1f} ± {std:.1f}", (key, cell, v)
    assert row.endswith("| 2/2 |") and "| published: BBN (Zhou et al. 2020) | | | | 79.8 | |" in out
    assert cifar_lt.main(cmd) == 0 and "started" not in capsys.readouterr().out  # finished runs are kept


@pytest.mark.slow
def test_protocol_table_mean_and_std_by_hand(tmp_path, capsys):
    import cifar_lt
    for i, (m, s, acc) in enumerate([("cbs", 0, 70.0), ("cbs", 1, 72.0), ("cbs", 2, 74.0), ("rrs", 0, 50.0)]):
        os.makedirs(tmp_path / f"{m}_s{s}")
        json.dump(dict(many=acc, medium=None, few=1.0, overall=acc - 1),
                  open(tmp_path / f"{m}_s{s}" / "test_metrics.json", "w"))
    lists = [write_list(tmp_path / n, ["a.png 0\n"]) for n in ("tr.txt", "te.txt")]
    assert cifar_lt.main(["--data", str(tmp_path), "--split", lists[0], "--test-split", lists[1],
                          "--out", str(tmp_path), "--methods", "rrs", "cbs", "--table-only"]) == 0
    out = capsys.readouterr().out
    assert "| CBS-Only (`cbs`) | 72.0 ± 2.0 | - | 1.0 ± 0.0 | 71.0 ± 2.0 | 3/3 |" in out
    assert "| RRS-Only (`rrs`) | 50.0 | - | 1.0 | 49.0 | 1/3 |" in out


# ----------------------------------------------------------------------------------------------
# the command: mistakes refused before any run starts, failed runs named, damaged run files read around


def protocol_main(tmp_path, monkeypatch, *argv):
    """cifar_lt.main on two one-line lists in tmp_path, runs in tmp_path/p, with starting a run failing the
    test; returns its exit status."""
    import cifar_lt
    monkeypatch.setattr(cifar_lt, "run_all", lambda *a: pytest.fail("a run was started"))
    monkeypatch.setattr(cifar_lt, "_cuda_available", lambda: False)
    lists = [write_list(tmp_path / n, ["a.png 0\n"]) for n in ("tr.txt", "te.txt")]
    return cifar_lt.main(["--data", str(tmp_path), "--split", lists[0], "--test-split", lists[1],
                          "--out", str(tmp_path / "p"), *argv])


def refused(tmp_path, monkeypatch, capsys, *argv):
    """The one `error: ` line of a command that must be refused: exit status 2, nothing started or written."""
    rc = protocol_main(tmp_path, monkeypatch, *argv)
    cap = capsys.readouterr()
    assert rc == 2 and cap.out == "" and "Traceback" not in cap.err, (rc, cap.out, cap.err)
    lines = cap.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), cap.err
    assert not (tmp_path / "p").exists()
    return lines[0]


@pytest.mark.parametrize("after, typed, flag, instead", [
    (["--method", "rrs"], "--method", "--method", "use cifar_lt.py's own --methods"),
    (["--seed=3"], "--seed", "--seed", "use cifar_lt.py's own --seeds"),
    (["--out", "X"], "--out", "--out", "use cifar_lt.py's own --out"),
    (["--meth", "rrs"], "--meth", "--method", "--methods"),  # an abbreviation train.py reads as --method
    (["--lr", "0.05", "--test-split=t.txt"], "--test-split", "--test-split", "own --test-split"),
    (["--epochs", "3"], "--epochs", "--epochs", "own --epochs"),
    (["--resume", "last.pt"], "--resume", "--resume", "run the same cifar_lt.py command again"),
])
def test_protocol_refuses_the_flags_it_sets_after_dashdash(tmp_path, monkeypatch, capsys, after, typed, flag,
                                                           instead):
    """A flag after `--` that cifar_lt.py sets for each run would mislabel the runs (an RRS run in the
    CBS-Only row) or make each run replace the last: refused in one line naming it and cifar_lt.py's own
    option."""
    line = refused(tmp_path, monkeypatch, capsys, "--methods", "cbs", "--", *after)
    assert line.startswith(f"error: `-- {typed}") and f"train.py's {flag} " in line and instead in line, line
    # train.py's other flags still go to every run, after the script's own
    assert protocol_main(tmp_path, monkeypatch, "--table-only", "--", "--lr", "0.05", "--many=30") == 0
    import cifar_lt
    lists = ["--split", str(tmp_path / "tr.txt"), "--test-split", str(tmp_path / "te.txt")]
    args, extra = cifar_lt.parse(["--data", str(tmp_path), *lists, "--", "--lr", "0.05", "--many=30"])
    assert cifar_lt.train_command(args, "rrs", 0, extra)[-3:] == ["--lr", "0.05", "--many=30"]


@pytest.mark.parametrize("argv, words", [
    (["--seeds", "0", "0"], "--seeds 0 0: 0 is given twice"),
    (["--seeds", "1", "2", "01"], "--seeds 1 2 1: 1 is given twice"),
    (["--methods", "rrs", "cbs", "rrs"], "--methods rrs cbs rrs: rrs is given twice"),
])
def test_protocol_refuses_a_repeated_seed_or_method(tmp_path, monkeypatch, capsys, argv, words):
    """One run twice would be reported as two (`25.0 ± 0.0`, `2/2`)."""
    assert words in refused(tmp_path, monkeypatch, capsys, *argv)


@pytest.mark.parametrize("argv, words", [
    (["--epochs", "0"], "--epochs 0: must be >= 1"),
    (["--time-limit", "-5"], "--time-limit -5: must be >= 0"),
    (["--time-limit", "nan"], "--time-limit nan: must be >= 0"),
    (["--parallel", "-3"], "--parallel -3: must be >= 1"),
    (["--parallel", "0"], "--parallel 0: must be >= 1"),
    (["--threads", "-2"], "--threads -2: must be >= 1"),
    (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),  # argparse's own, on one line too
])
def test_protocol_refuses_numbers_out_of_range(tmp_path, monkeypatch, capsys, argv, words):
    assert words in refused(tmp_path, monkeypatch, capsys, *argv)


def test_protocol_refuses_an_unknown_recipe_up_front(tmp_path, monkeypatch, capsys):
    line = refused(tmp_path, monkeypatch, capsys, "--recipe", "cifar10-lt")
    assert line.startswith("error: --recipe cifar10-lt: not a train.py recipe") and "cifar10_lt" in line
    assert protocol_main(tmp_path, monkeypatch, "--recipe", "none", "--table-only") == 0  # no recipe


@pytest.mark.slow
def test_protocol_names_failed_runs_after_the_table_and_exits_1(tmp_path, monkeypatch, capsys):
    """Each run a tiny python program: rrs writes its metrics and exits 0, cbs fails; the table still comes,
    then the failed run and its .log, exit status 1; this process's signal handlers are its own again."""
    import cifar_lt
    script = ("import json, os, sys; out, method = sys.argv[1:]; os.makedirs(out)\n"
              "if method == 'cbs': sys.exit(print('cbs went wrong') or 3)\n"
              "json.dump(dict(many=61.0, medium=42.0, few=None, overall=57.0), "
              "open(os.path.join(out, 'test_metrics.json'), 'w'))")
    monkeypatch.setattr(cifar_lt, "train_command", lambda args, m, s, extra: [
        sys.executable, "-c", script, os.path.join(args.out, cifar_lt.run_name(m, s)), m])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    lists = [write_list(tmp_path / n, ["a.png 0\n"]) for n in ("tr.txt", "te.txt")]
    out = tmp_path / "p"
    rc = cifar_lt.main(["--data", str(tmp_path), "--split", lists[0], "--test-split", lists[1],
                        "--out", str(out), "--methods", "rrs", "cbs", "--seeds", "0", "--device", "cpu",
                        "--parallel", "2"])
    cap = capsys.readouterr()
    assert rc == 1, (cap.out, cap.err)
    assert "| RRS-Only (`rrs`) | 61.0 | 42.0 | - | 57.0 | 1/1 |" in cap.out
    assert "| CBS-Only (`cbs`) | - | - | - | - | 0/1 |" in cap.out
    assert cap.err.splitlines()[-1] == f"error: 1 run(s) failed: cbs_s0 ({out / 'cbs_s0.log'})", cap.err
    assert "cbs went wrong" in (out / "cbs_s0.log").read_text()
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_protocol_table_reads_around_damaged_run_files(tmp_path, monkeypatch, capsys):
    """--table-only over run folders a crash, an editor or another program left: each file that is not
    train.py's is named in one warning line, its cells stay empty ('-'), the good cells are still averaged."""
    files = {
        "rrs_s0/test_metrics.json": '{"many": 50.0, "medium": 40.0, "few": null, "overall": 45.0}',  # good
        "rrs_s1/test_metrics.json": '{"many": 70.0, "medium": 20.0, "few": null, "ove',  # cut short
        "rrs_s2/test_metrics.json": '[50.0, 40.0]',  # JSON, not an object
        "cbs_s0/test_metrics.json": '{"many": "61.0", "medium": true, "few": null, "overall": 55.0}',
        "cbs_s1/test_metrics.json": '{"many": 63.0, "medium": 30.0, "overall": NaN}',  # no few, NaN
        "cbs_s2/test_metrics.json": b"\xff\xfe\x00garbage",
        "cbs_rrs_s0/log.jsonl": '{"epoch": 0}\n{"epoch": 1}\n{"epo',  # the last line cut short
        "cbs_rrs_ss_s0/log.jsonl": '[1]\n{"epoch": true}\n',
    }
    for rel, text in files.items():
        (tmp_path / "p" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "p" / rel).write_bytes(text if isinstance(text, bytes) else text.encode())
    (tmp_path / "p" / "cbs_rrs_s1" / "test_metrics.json").mkdir(parents=True)  # not even a file
    assert protocol_main(tmp_path, monkeypatch, "--table-only") == 0
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    warned = [line for line in cap.err.splitlines() if line.startswith("warning: ")]
    assert len(warned) == len(cap.err.splitlines()) == len(files)  # one per damaged file, none for the good
    for rel in list(files)[1:] + ["cbs_rrs_s1/test_metrics.json"]:
        assert sum(line.startswith(f"warning: {tmp_path / 'p' / rel}: ") for line in warned) == 1, rel
    assert "many, medium: missing or not a number" in cap.err
    assert "few, overall: missing or not a number" in cap.err
    assert "| RRS-Only (`rrs`) | 50.0 | 40.0 | - | 45.0 | 1/3 |" in cap.out
    assert "| CBS-Only (`cbs`) | 63.0 | 30.0 | - | 55.0 | 2/3 |" in cap.out
    assert "| CBS+RRS (`cbs_rrs`) | - | - | - | - | 0/3 |" in cap.out
    assert "unfinished (resume with the same command): cbs_rrs_s0 at epoch 2, cbs_rrs_ss_s0 at epoch 0" \
        in cap.out


def test_protocol_help_example_for_a_cpu_budget_is_the_run_readme_reports():
    import cifar_lt
    readme = open(os.path.join(HERE, "README.md")).read()
    measured = re.findall(r"`(python cifar_lt\.py [^`]*--epochs [^`]*)`", readme)
    assert measured == ["python cifar_lt.py --data CIFAR10_LT_ROOT --epochs 7 --seeds 0 --parallel 2"]
    examples = cifar_lt.get_args_parser().format_help().split("examples:\n")[1].split("\n\n")[0]
    assert f"  {measured[0]}\n" in examples
    assert [line.split("#")[0].split() for line in examples.splitlines() if "--epochs" in line] == \
        [measured[0].split()]  # no other short-budget example beside it


# ==============================================================================================
# bench.py
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# every figure, and its arguments


@pytest.mark.slow
def test_bench_runs_and_reports_every_figure(tmp_path, capsys):
    """Every figure of bench.py on tiny settings, and the arithmetic that ties them together (a rate that
    is not the ratio it claims, or a worker count off by one, fails)."""
    import bench
    (tmp_path / "photos").mkdir()
    for i in range(4):  # one name with a space: the end-to-end figure must not care
        Image.effect_noise((120 + 20 * i, 90), 50).convert("RGB").save(tmp_path / "photos" / f"p {i}.jpg", quality=90)
    res = bench.main(["--image-size", "16", "--batch-size", "4", "--num-classes", "5", "--steps", "2", "--warmup", "1",
                      "--loader-images", "8", "--loader-size", "64", "--images", str(tmp_path / "photos"),
                      "--target-rate", "1000", "--loader-workers", "1", "--loader-batches", "2", "--cifar-steps", "1",
                      "--cifar-images", "120", "--cifar-batch-size", "24", "--cifar-workers", "1",
                      "--cifar-modes", "eager", "graph", "--cifar-epochs", "1"])
    out = capsys.readouterr().out
    assert json.loads(out[: out.index("\n}\n") + 2])["step"]["images_per_step"] == 16
    s, st, c, ld = res["sampler"], res["step"], res["cifar"], res["loader"]
    assert s["S"] == 4 and s["indices_per_s"] == pytest.approx(s["batches_per_s"] * 8)
    assert s["fraction_of_step"] == pytest.approx(s["ms_per_batch"] / st["method_ms_per_step"])
    assert st["ratio"] == pytest.approx(st["method_images_per_s"] / st["plain_images_per_s"])
    assert c["fast_speedup"] == pytest.approx(c["fast_images_per_s"] / c["before_images_per_s"])
    assert c["memory_vs_synthetic"] == pytest.approx(c["memory_images_per_s"] / c["fast_images_per_s"])
    assert c["amp"] == runtime.amp_dtype(None, torch.device("cpu"))[0] and c["epoch"]["steps"] == 5  # ceil(120 / 24)
    assert c["epoch"]["speedup"] == pytest.approx(c["epoch"]["before_epoch_s"] / c["epoch"]["memory_epoch_s"])
    eager, graph = res["modes"]["eager"], res["modes"]["graph"]  # train.py twice; on a CPU --cuda-graph is eager
    assert len(eager["losses"]) == 1 and graph["losses"] == eager["losses"] and eager["said"] == []
    assert graph["said"] == ["--cuda-graph: eager steps (CUDA only, this run is on cpu)"]
    assert graph["max_rel_loss_difference"] == 0 and ("| train.py cifar10_lt, 1 epochs, S=24, step mode graph "
                                                      "(--cuda-graph: eager steps (CUDA only") in out
    only = bench.main(["--figures", "modes", "--cifar-modes", "eager", "--cifar-epochs", "1", "--cifar-images", "120",
                       "--cifar-batch-size", "24"])
    table = capsys.readouterr().out
    assert {"step", "sampler", "cifar", "loader"}.isdisjoint(only) and list(only["modes"]) == ["eager"]
    assert table.rstrip().endswith("(largest difference to eager 0.00%) |") and table.count("\n| ") == 2
    assert ld["source"].startswith("4 JPEGs in")
    assert ld["workers_ltaux"] == math.ceil(1000 / ld["ltaux_images_per_s_per_worker"])
    assert ld["speedup"] == pytest.approx(ld["ltaux_images_per_s_per_worker"] / ld["oltr_images_per_s_per_worker"])
    assert ld["gpu_worker_cost_ratio"] > 1  # a worker that only reads bytes beats one that decodes
    assert list(ld["end_to_end_images_per_s"]) == ["cpu"]
    assert ld["step_need_images_per_s"] == pytest.approx(st["method_images_per_s"] / 2)
    for row in ("| ratio method / plain |", "| ltaux --decode cpu: decode_jpeg", "--decode gpu's decode",
                "| CIFAR recipe: resnet32 cbs_rrs_ss step", "fed by the in-memory pipeline", "| CIFAR-recipe epoch, 119 JPEGs",
                "| train.py's loader, 1 workers, --decode cpu", "| what the cbs_rrs_ss step above decodes (2S of its"):
        assert row in out, row
    assert "PIL decode, crop, flip, uint8 out" not in out  # a pipeline ltaux no longer has


def test_bench_modes_refuses_a_run_a_stop_signal_cut_short(monkeypatch, capsys):
    """A timeout's SIGTERM makes train.py save and return 0 after fewer epochs: bench must not compare the
    losses of a 1-epoch run with those of a 2-epoch one (zip would compare the first epoch alone, silently)."""
    import bench
    import train

    def stopped_run(argv):
        out = argv[argv.index("--out") + 1]
        os.makedirs(out)
        with open(os.path.join(out, "log.jsonl"), "w") as f:
            f.write(json.dumps({"loss": 2.0, "images_per_s": 10.0}) + "\n")  # epoch 0 of 2, then the stop
        return 0
    monkeypatch.setattr(train, "main", stopped_run)
    with pytest.raises(SystemExit) as e:
        bench.main(["--figures", "modes", "--cifar-modes", "eager", "graph", "--cifar-epochs", "2",
                    "--cifar-images", "120", "--cifar-batch-size", "24"])
    assert e.value.code == 2 and "the eager run stopped after 1 of 2 epochs" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("argv, words", [
    (["--steps", "0"], "--steps must be in 1..2^20"),
    (["--cifar-batch-size", "50"], "--cifar-batch-size a multiple of Z = 12"),
    (["--loader-size", "32"], "--loader-size must be in 64..4096"),
    (["--device", "foo"], "invalid choice: 'foo'"),
    (["--target-rate", "nan"], "--target-rate must be a positive number"),
    (["--target-rate", "-5"], "--target-rate must be a positive number"),
    (["--cifar-data", "/nonexistent"], "--cifar-data /nonexistent: needs CIFAR10_LT_r100_train.txt and"),
    (["--figures", "modes", "--device", "cpu"], "--figures modes: no step mode to compare on cpu"),  # not an
    (["--figures", "modes", "--cifar-modes", "--device", "cpu"], "--cifar-modes names none"),  # empty table
])
def test_bench_refuses_bad_arguments_in_one_line(argv, words, capsys):
    import bench
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("lists, images, budget, words", [
    (["CIFAR10_LT_r100_train.txt"], "photos", "60", "no CIFAR10_test.txt"),
    (["CIFAR10_LT_r100_train.txt", "CIFAR10_test.txt"], "missing", "60", "JPEG_FOLDER"),
    (["CIFAR10_LT_r100_train.txt", "CIFAR10_test.txt"], "photos", "abc", "SECONDS 'abc'"),
])
def test_gpu_check_refuses_bad_arguments_before_any_step(tmp_path, lists, images, budget, words):
    """.ci/gpu with a bad argument: one line, exit 2, and no step marked done (a second, corrected call
    must still compare --cuda-graph with eager)."""
    (tmp_path / "photos").mkdir()
    for name in lists:
        (tmp_path / name).write_text("")
    env = dict(os.environ, DEVICE="cpu", OUT=str(tmp_path / "out"), RUNS=str(tmp_path / "runs"))
    done = subprocess.run(["bash", os.path.join(HERE, ".ci", "gpu"), str(tmp_path), str(tmp_path / images),
                           budget], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert words in done.stderr and not (tmp_path / "runs" / "checked").exists()


def test_bench_mode_rows_say_when_a_mode_fell_back_to_eager():
    """A graph row whose run ran eager steps says so in the table (its rate is eager's, not a graph's)."""
    import types
    import bench
    said = "--cuda-graph: eager steps (CUDA only, this run is on cpu)"
    res = {"modes": {"eager": dict(losses=[2.0], images_per_s=10.0, said=[], max_rel_loss_difference=0.0),
                     "graph": dict(losses=[2.0], images_per_s=11.0, said=[said], max_rel_loss_difference=0.0)}}
    eager, graph = bench.mode_rows(res, types.SimpleNamespace(cifar_batch_size=24)).splitlines()
    assert f"step mode graph ({said}) | 11 images/s" in graph and "step mode eager | 10 images/s" in eager
    assert "11 images/s (its only epoch: warm-up, capture, compilation in), loss" in graph
    res["modes"]["graph"].update(losses=[2.0, 1.0], images_per_s=12.0)  # the median of epochs 2.. alone
    assert "| 12 images/s, loss per epoch 2.0000 1.0000 " in bench.mode_rows(res, types.SimpleNamespace(
        cifar_batch_size=24)).splitlines()[1]
    del res["modes"]["eager"], res["modes"]["graph"]["max_rel_loss_difference"]  # --cifar-modes graph alone
    assert bench.mode_rows(res, types.SimpleNamespace(cifar_batch_size=24)).endswith(
        "loss per epoch 2.0000 1.0000 (no eager run to compare with) |\n")  # not a difference of 0.00%


@pytest.mark.slow
def test_bench_names_a_bad_jpeg_before_timing_anything(tmp_path, capsys):
    import bench
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(SystemExit) as e:
        bench.main(["--images", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {tmp_path / 'bad.jpg'}: cannot read image") and err.count("\n") == 1


# ==============================================================================================
# data_lists/
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# the official lists and their checksums


@pytest.mark.slow
def test_places_lt_train_figures():
    paths, labels = ltaux.read_split(need("Places_LT_train.txt"))
    counts = ltaux.class_counts(labels, max(labels) + 1)
    assert len(paths) == 62500 and len(counts) == 365
    assert int(counts.min()) == 5 and int(counts.max()) == 4980
    assert torch.bincount(ltaux.shot_groups(counts)).tolist() == [132, 156, 77]  # the paper's groups (README)
    assert torch.bincount(ltaux.shot_groups(counts, 101, 19)).tolist() == [131, 163, 71]  # Decoupling's code


@pytest.mark.slow
def test_imagenet_lt_test_is_balanced():
    _, labels = ltaux.read_split(need("ImageNet_LT_test.txt"))
    counts = ltaux.class_counts(labels, 1000)
    assert len(labels) == 50000 and counts.min() == counts.max() == 50


@pytest.mark.slow
def test_shipped_checksums_match_the_official_lists_and_train_py_says_so(tmp_path):
    with open(os.path.join(HERE, "data_lists", "SHA256SUMS")) as f:
        sums = dict(line.split() for line in f if line.strip() and not line.startswith("#"))
    assert len(sums) == 11 and "ImageNet_LT_train.txt" in sums.values()
    for digest, name in sums.items():
        path = os.path.join(SHARED_LISTS, name)
        if os.path.exists(path):
            assert hashlib.sha256(open(path, "rb").read()).hexdigest() == digest, name
    official = need("Places_LT_val.txt")
    assert pipeline.describe_lists([official]) == [f"{official}: official Places_LT_val.txt (sha256 ok)"]
    mine = write_list(tmp_path / "Places_LT_val.txt", ["a.jpg 0\n"])
    with pytest.warns(UserWarning, match="named like an official list, but its sha256 differs"):
        assert pipeline.describe_lists([mine, write_list(tmp_path / "own.txt", ["a.jpg 0\n"])]) == []


# ----------------------------------------------------------------------------------------------
# make_lt_split.py: your own long-tailed splits


SCRIPT = os.path.join(HERE, "data_lists", "make_lt_split.py")


def load_module():
    spec = importlib.util.spec_from_file_location("make_lt_split_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_png():
    """A valid 1x1 grey PNG."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b""))


def make_tree(root, sizes):
    """root/<class>/<i>.png for {class: number of images}; also a non-image and a hidden file per class."""
    png = tiny_png()
    for c, n in sizes.items():
        os.makedirs(root / c)
        for i in range(n):
            (root / c / f"{i:04d}.png").write_bytes(png)
        (root / c / "notes.txt").write_text("not an image")
        (root / c / f".{c}_hidden.png").write_bytes(png)
    return root


def read_split_maker_list(path):
    rows = [line.split() for line in open(path)]
    assert all(len(r) == 2 for r in rows), path
    return [(p, int(y)) for p, y in rows]


def per_class(rows):
    counts = {}
    for _, y in rows:
        counts[y] = counts.get(y, 0) + 1
    return counts


def cli(*args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True,
                          timeout=60)


def one_error_line(res):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


SIZES = {"ant": 130, "bee": 115, "cat": 120, "dog": 112, "eel": 110, "fox": 140}  # >= 20 + 50 + 40 each


@pytest.mark.slow
def test_default_run_holds_out_balanced_disjoint_val_and_test(tmp_path, capsys):
    tree = make_tree(tmp_path / "tree", SIZES)
    prefix = str(tmp_path / "My_LT")
    assert load_module().main(["--root", str(tree), "--prefix", prefix, "--max", "40", "--min", "2"]) == 0
    lists = {s: read_split_maker_list(f"{prefix}_{s}.txt") for s in ("train", "val", "test")}
    classes = sorted(SIZES)
    for split, rows in lists.items():
        for p, y in rows:  # relative paths into the tree, label = index of the sorted class name
            assert p.split("/")[0] == classes[y] and (tree / p).is_file() and p.endswith(".png"), (split, p)
        assert len({p for p, _ in rows}) == len(rows), split  # no image twice in one list
    assert per_class(lists["val"]) == {k: 20 for k in range(len(classes))}  # the documented defaults
    assert per_class(lists["test"]) == {k: 50 for k in range(len(classes))}
    train, val, test = ({p for p, _ in lists[s]} for s in ("train", "val", "test"))
    assert not train & val and not train & test and not val & test
    counts = sorted(per_class(lists["train"]).values(), reverse=True)
    assert len(counts) == len(classes) and counts[0] == 40 and counts[-1] == 2  # long-tailed, every class
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    out = capsys.readouterr().out
    assert f"{prefix}_val.txt: 120 images" in out and f"{prefix}_test.txt: 300 images" in out


@pytest.mark.slow
def test_seeded_and_zero_skips_a_list(tmp_path):
    tree = make_tree(tmp_path / "tree", SIZES)
    mod = load_module()
    texts = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert mod.main(["--root", str(tree), "--prefix", str(tmp_path / name), "--seed", str(seed)]) == 0
        texts.append([open(tmp_path / f"{name}_{s}.txt").read() for s in ("train", "val", "test")])
    assert texts[0] == texts[1] and texts[0] != texts[2]  # same seed, same lists; another seed, other lists
    assert mod.main(["--root", str(tree), "--prefix", str(tmp_path / "d"), "--val-per-class", "0",
                     "--test-per-class", "3"]) == 0
    assert not (tmp_path / "d_val.txt").exists()
    assert per_class(read_split_maker_list(tmp_path / "d_test.txt")) == {k: 3 for k in range(len(SIZES))}


@pytest.mark.slow
@pytest.mark.parametrize("args, flag", [
    (["--max", "0"], "--max"),
    (["--min", "0"], "--min"),
    (["--min", "10", "--max", "5"], "--min"),
    (["--imbalance", "0.5"], "--imbalance"),
    (["--imbalance", "nan"], "--imbalance"),
    (["--imbalance", "1000", "--max", "500"], "--imbalance"),
    (["--imbalance", "10", "--min", "3"], "--imbalance"),
    (["--alpha", "0", "--profile", "pareto"], "--alpha"),
    (["--alpha", "0.001", "--profile", "pareto"], "--alpha 0.001: must be in [0.1, 1000]"),  # overflowed
    (["--val-per-class", "-1"], "--val-per-class"),
    (["--test-per-class", "-5"], "--test-per-class"),
    (["--max", "ten"], "--max"),
    (["--profile", "linear"], "--profile"),
])
def test_bad_argument_exits_2_with_one_line(tmp_path, args, flag):
    tree = make_tree(tmp_path / "tree", {"a": 80, "b": 80})
    line = one_error_line(cli("--root", tree, "--prefix", tmp_path / "X", *args))
    assert flag in line
    assert not [f for f in os.listdir(tmp_path) if f.startswith("X")]  # nothing written


@pytest.mark.slow
def test_missing_or_unusable_input_exits_2_naming_it(tmp_path):
    missing = tmp_path / "no_such_tree"
    assert str(missing) in one_error_line(cli("--root", missing, "--prefix", tmp_path / "X"))
    tree = make_tree(tmp_path / "tree", {"a": 80, "b": 80})
    (tmp_path / "a_file").write_text("")
    assert f"{tmp_path / 'a_file'}: not a folder" in one_error_line(cli("--root", tree, "--prefix",
                                                                         tmp_path / "a_file" / "X"))
    small = make_tree(tmp_path / "small", {"a": 80, "b": 30, "c": 10})
    line = one_error_line(cli("--root", small, "--prefix", tmp_path / "X"))  # defaults need 71 per class
    assert str(small) in line and "2 of 3 classes" in line and "b (30)" in line and "c (10)" in line
    spaced = make_tree(tmp_path / "spaced", {"a": 80, "b c": 80})
    assert "'b c'" in one_error_line(cli("--root", spaced, "--prefix", tmp_path / "X"))
    assert not [f for f in os.listdir(tmp_path) if f.startswith("X")]


def test_missing_output_folder_is_created_once_the_inputs_are_checked(tmp_path, capsys):
    """--prefix in a folder that does not exist yet: the folder (and its parents) is made and holds the lists;
    a refused run makes no folder."""
    tree, small = make_tree(tmp_path / "tree", SIZES), make_tree(tmp_path / "small", {"a": 80, "b": 30})
    mod = load_module()
    out = tmp_path / "new" / "lists"
    assert mod.main(["--root", str(small), "--prefix", str(out / "My_LT")]) == 2  # b: too few images
    assert "1 of 2 classes have fewer than 71 images" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert mod.main(["--root", str(tree), "--prefix", str(out / "My_LT")]) == 0
    assert sorted(os.listdir(out)) == ["My_LT_test.txt", "My_LT_train.txt", "My_LT_val.txt"]
    assert per_class(read_split_maker_list(out / "My_LT_test.txt")) == {k: 50 for k in range(len(SIZES))}


@pytest.mark.slow
@pytest.mark.parametrize("n_short", [3, 8])
def test_shortfall_message_count_matches_the_names_listed(tmp_path, n_short):
    sizes = {f"c{i}": 8 for i in range(n_short)}  # 2 + 2 held out, 4 left: short of any target above 4
    sizes.update({f"d{i}": 60 for i in range(2)})
    tree = make_tree(tmp_path / "tree", sizes)
    res = cli("--root", tree, "--prefix", tmp_path / "S", "--val-per-class", "2", "--test-per-class", "2",
              "--max", "50", "--min", "5", "--profile", "pareto")
    assert res.returncode == 0, res.stderr
    msg = [line for line in res.stdout.splitlines() if "fewer images than" in line]
    assert len(msg) == 1, res.stdout
    m = re.fullmatch(r"(\d+) of (\d+) classes have fewer images than their training target \((.*)\)", msg[0])
    assert m, msg[0]
    count, total, listed = int(m.group(1)), int(m.group(2)), m.group(3)
    first = re.match(r"first (\d+) of (\d+): ", listed)
    entries = listed[first.end():].split("; ") if first else listed.split("; ")
    assert total == len(sizes)
    if first:
        assert int(first.group(2)) == count and int(first.group(1)) == len(entries) < count
    else:
        assert len(entries) == count
    train = per_class(read_split_maker_list(tmp_path / "S_train.txt"))
    assert count == sum(1 for i, c in enumerate(sorted(sizes)) if c.startswith("c")) == n_short
    assert all(train[i] == 4 for i, c in enumerate(sorted(sizes)) if c.startswith("c"))  # keeps what it has


@pytest.mark.slow
def test_refuses_to_overwrite_without_force_and_writes_atomically(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "tree", SIZES)
    prefix = tmp_path / "O"
    assert cli("--root", tree, "--prefix", prefix).returncode == 0
    (tmp_path / "O_test.txt").write_text("sentinel\n")
    line = one_error_line(cli("--root", tree, "--prefix", prefix, "--seed", "1"))
    assert str(tmp_path / "O_test.txt") in line and "--force" in line
    assert (tmp_path / "O_test.txt").read_text() == "sentinel\n"  # untouched, and nothing else rewritten
    before = (tmp_path / "O_train.txt").read_text()

    mod = load_module()  # a write that fails half-way leaves the old lists whole and no temporary file
    def fail(src, dst):
        raise OSError(28, "No space left on device", dst)
    monkeypatch.setattr(mod.os, "replace", fail)
    assert mod.main(["--root", str(tree), "--prefix", str(prefix), "--seed", "1", "--force"]) == 2
    monkeypatch.undo()
    assert (tmp_path / "O_test.txt").read_text() == "sentinel\n"
    assert (tmp_path / "O_train.txt").read_text() == before
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]

    res = cli("--root", tree, "--prefix", prefix, "--seed", "1", "--force")
    assert res.returncode == 0, res.stderr
    assert per_class(read_split_maker_list(tmp_path / "O_test.txt")) == {k: 50 for k in range(len(SIZES))}
    assert (tmp_path / "O_train.txt").read_text() != before  # another seed, rewritten
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert os.stat(tmp_path / "O_train.txt").st_mode & 0o777 == 0o666 & ~current_umask()


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------------------
# make_cifar_lt.py: CIFAR-10/100-LT from the python pickles, read by torchvision's dataset classes


CONVERTER = os.path.join(HERE, "data_lists", "make_cifar_lt.py")


_spec = importlib.util.spec_from_file_location("make_cifar_lt", CONVERTER)


mcl = importlib.util.module_from_spec(_spec)


_spec.loader.exec_module(mcl)


C10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def dump_like_the_download(obj, path):
    """A CIFAR file as torchvision reads it (pickle.load(f, encoding="latin1") of the Python 2 originals):
    a dict of str keys holding a uint8 numpy array, lists of ints and str class names."""
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_batch(rng, labels, key, extra=()):
    import numpy as np  # torchvision's own dependency: its CIFAR classes return numpy arrays
    raw = rng.getrandbits(8 * 3072 * len(labels)).to_bytes(3072 * len(labels), "little")
    d = {"batch_label": "fake", key: labels, "filenames": ["img_%d.png" % i for i in range(len(labels))],
         "data": np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3072).copy()}
    d.update(extra)
    return d, raw


def trust(monkeypatch, folder, name):
    """torchvision's MD5 table of `name` (CIFAR10 / CIFAR100) set to the fake files in `folder`: the real one
    names the published files, which these tests do not have (and must not download)."""
    cls = getattr(torchvision.datasets, name)
    md5 = lambda f: hashlib.md5(open(os.path.join(folder, f), "rb").read()).hexdigest()  # noqa: E731
    monkeypatch.setattr(cls, "train_list", [[f, md5(f)] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, md5(f)] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", dict(cls.meta, md5=md5(cls.meta["filename"])))


def fake_cifar10(root, monkeypatch=None, n_train=30, n_test=10, seed=0, folder="cifar-10-batches-py"):
    """root/<folder> with 10 classes, trusted by torchvision when monkeypatch is given; returns
    {split: (raw planar bytes, labels)} as the converter should see it."""
    rng, folder = random.Random(seed), os.path.join(root, folder)
    os.makedirs(folder)
    dump_like_the_download({"label_names": C10_NAMES, "num_vis": 3072}, os.path.join(folder, "batches.meta"))
    train = [c for c in range(10) for _ in range(n_train)]
    rng.shuffle(train)
    truth = {"train": (b"", [])}
    for b in range(5):  # five batches, as in the download
        d, raw = make_batch(rng, train[b::5], "labels")
        dump_like_the_download(d, os.path.join(folder, f"data_batch_{b + 1}"))
        truth["train"] = (truth["train"][0] + raw, truth["train"][1] + d["labels"])
    test = [c for c in range(10) for _ in range(n_test)]
    rng.shuffle(test)
    d, raw = make_batch(rng, test, "labels")
    dump_like_the_download(d, os.path.join(folder, "test_batch"))
    truth["test"] = (raw, test)
    if monkeypatch:
        trust(monkeypatch, folder, "CIFAR10")
    return truth


def fake_cifar100(folder, monkeypatch, C=12, n_train=20, n_test=5, seed=1):
    """cifar-100-python with C classes; coarse labels differ from the fine ones so taking the wrong key
    fails."""
    rng = random.Random(seed)
    os.makedirs(folder)
    dump_like_the_download({"fine_label_names": ["class_%02d" % c for c in range(C)],
                            "coarse_label_names": ["superclass"]}, os.path.join(folder, "meta"))
    truth = {}
    for split, n in (("train", n_train), ("test", n_test)):
        fine = [c for c in range(C) for _ in range(n)]
        rng.shuffle(fine)
        d, raw = make_batch(rng, fine, "fine_labels", {"coarse_labels": [(y + 1) % C for y in fine]})
        dump_like_the_download(d, os.path.join(folder, split))
        truth[split] = (raw, fine)
    trust(monkeypatch, folder, "CIFAR100")
    return truth


def planar_to_rgb(row):
    """The expected decoded pixels, written independently of the converter: R, G, B planes -> RGB triples."""
    return bytes(v for px in zip(row[:1024], row[1024:2048], row[2048:]) for v in px)


def read_cifar_list(path):
    with open(path) as f:
        return [(p, int(y)) for p, y in (line.split() for line in f)]


def check_list(out, list_name, split, truth, names):
    """Every line names an existing image whose pixels and label are those of its pickle row; returns the
    rows."""
    raw, labels = truth[split]
    rows = []
    for rel, y in read_cifar_list(os.path.join(out, list_name)):
        top, cls, fname = rel.split("/")
        i = int(fname.split(".")[0])
        assert (top, cls, y) == (split, names[labels[i]], labels[i]), rel
        with Image.open(os.path.join(out, rel)) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (32, 32))
            assert im.tobytes() == planar_to_rgb(raw[i * 3072:(i + 1) * 3072]), rel
        rows.append(i)
    assert len(rows) == len(set(rows))
    return rows


def files_under(root):
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


def run(args):
    r = subprocess.run([sys.executable, CONVERTER] + args, capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout, r.stderr


def convert(capsys, args):
    """mcl.main in this process (where the fake download is trusted): (exit status, stdout, stderr)."""
    rc = mcl.main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.slow
def test_ldam_counts_cifar10_r100():
    assert mcl.ldam_counts(10, 5000, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(mcl.ldam_counts(100, 500, 100)) == 10847  # CIFAR-100-LT r100 as in LDAM's paper
    assert mcl.ldam_counts(100, 500, 100)[-1] == 5


@pytest.mark.slow
def test_cifar10_tree_lists_pixels_and_counts(tmp_path, capsys, monkeypatch):
    truth = fake_cifar10(tmp_path / "dl", monkeypatch)
    out = tmp_path / "c10"
    assert mcl.main(["--src", str(tmp_path / "dl"), "--out", str(out), "--imbalance", "10",
                     "--max-per-class", "30"]) == 0
    train = check_list(out, "CIFAR10_LT_r10_train.txt", "train", truth, C10_NAMES)
    test = check_list(out, "CIFAR10_test.txt", "test", truth, C10_NAMES)
    per_class = [sum(truth["train"][1][i] == c for i in train) for c in range(10)]
    assert per_class == [int(30 * 0.1 ** (c / 9)) for c in range(10)] == [30, 23, 17, 13, 10, 8, 6, 5, 3, 3]
    assert sorted(test) == list(range(100))  # the whole test set
    listed = {p for p, _ in read_cifar_list(out / "CIFAR10_LT_r10_train.txt")
              + read_cifar_list(out / "CIFAR10_test.txt")}
    assert files_under(out) == listed | {"CIFAR10_LT_r10_train.txt", "CIFAR10_test.txt"}  # kept images only
    assert sorted(os.listdir(tmp_path)) == ["c10", "dl"]  # no temporary folder left
    text = capsys.readouterr().out
    assert "10 classes, 118 train images (3 ... 30 per class), 100 test images" in text
    assert "many-shot (>= 100): 0 classes, medium: 2, few-shot (<= 20): 8" in text
    assert (f"python train.py --recipe cifar10_lt --data {out} --split {out}/CIFAR10_LT_r10_train.txt "
            f"--test-split {out}/CIFAR10_test.txt") in text


@pytest.mark.slow
def test_cifar100_fine_labels_and_detection(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "cifar-100-python"
    truth = fake_cifar100(folder, monkeypatch)
    names = ["class_%02d" % c for c in range(12)]
    out = tmp_path / "out"
    out.mkdir()  # an empty --out is fine
    rc, stdout, err = convert(capsys, ["--src", str(folder), "--out", str(out), "--imbalance", "5",
                                       "--max-per-class", "20"])
    assert (rc, err) == (0, ""), err
    train = check_list(out, "CIFAR100_LT_r5_train.txt", "train", truth, names)
    assert [sum(truth["train"][1][i] == c for i in train) for c in range(12)] == \
        [int(20 * 0.2 ** (c / 11)) for c in range(12)]
    assert sorted(check_list(out, "CIFAR100_test.txt", "test", truth, names)) == list(range(60))
    assert "--recipe cifar100_lt" in stdout


@pytest.mark.slow
def test_seed_decides_the_selection(tmp_path, monkeypatch):
    fake_cifar10(tmp_path / "dl", monkeypatch)
    common = ["--src", str(tmp_path / "dl"), "--imbalance", "10", "--max-per-class", "30"]
    lists = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert mcl.main(common + ["--out", str(tmp_path / name), "--seed", str(seed)]) == 0
        lists.append(read_cifar_list(tmp_path / name / "CIFAR10_LT_r10_train.txt"))
    assert lists[0] == lists[1]
    assert lists[0] != lists[2]
    assert sorted(y for _, y in lists[0]) == sorted(y for _, y in lists[2])  # same counts, other images


@pytest.mark.slow
def test_jpg_format(tmp_path, monkeypatch):
    fake_cifar10(tmp_path / "dl", monkeypatch, n_train=3, n_test=1)
    out = tmp_path / "j"
    assert mcl.main(["--src", str(tmp_path / "dl"), "--out", str(out), "--imbalance", "1",
                     "--max-per-class", "2", "--format", "jpg"]) == 0
    paths = [p for p, _ in read_cifar_list(out / "CIFAR10_LT_r1_train.txt")]
    assert len(paths) == 20 and all(p.endswith(".jpg") for p in paths)
    with Image.open(out / paths[0]) as im:
        assert (im.format, im.size) == ("JPEG", (32, 32))


@pytest.mark.slow
def test_refuses_non_empty_out(tmp_path):
    fake_cifar10(tmp_path / "dl", n_train=3, n_test=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, stdout, err = run(["--src", str(tmp_path / "dl"), "--out", str(out), "--max-per-class", "3",
                           "--imbalance", "1"])
    assert rc == 2 and stdout == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {out}: ")
    assert os.listdir(out) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["dl", "out"]


@pytest.mark.slow
def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    fake_cifar10(tmp_path / "dl", monkeypatch, n_train=3, n_test=1)
    calls = []

    def flaky(images, i):
        calls.append(i)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return Image.new("RGB", (32, 32))

    monkeypatch.setattr(mcl, "to_image", flaky)
    assert mcl.main(["--src", str(tmp_path / "dl"), "--out", str(tmp_path / "out"), "--max-per-class", "3",
                     "--imbalance", "1"]) == 130
    assert os.listdir(tmp_path) == ["dl"]


def _corrupt(dl):  # a batch of random bytes
    (dl / "cifar-10-batches-py" / "test_batch").write_bytes(random.Random(0).randbytes(500))


def _evil(dl):  # a pickle that would run a command: refused by its MD5 before anything unpickles it
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {dl / 'pwned'}",)
    (dl / "cifar-10-batches-py" / "data_batch_2").write_bytes(pickle.dumps(Evil(), protocol=2))


def _cifar100_file(dl):  # CIFAR-100's layout under CIFAR-10's name: no "labels"
    dump_like_the_download(make_batch(random.Random(0), [0, 1], "fine_labels")[0],
                           dl / "cifar-10-batches-py" / "test_batch")


def _missing(dl):  # a batch lost on the way
    (dl / "cifar-10-batches-py" / "data_batch_4").unlink()


def _renamed_class(dl):  # batches.meta edited: a class name a split list cannot hold
    dump_like_the_download({"label_names": ["air plane"] + C10_NAMES[1:], "num_vis": 3072},
                           dl / "cifar-10-batches-py" / "batches.meta")


@pytest.mark.slow
@pytest.mark.parametrize("case, args, blame", [
    ("missing src", ["--src", "{tmp}/nowhere"], "{tmp}/nowhere"),
    ("src is a file", ["--src", "{tmp}/dl/cifar-10-batches-py/test_batch"],
     "{tmp}/dl/cifar-10-batches-py/test_batch"),
    ("src without cifar", ["--src", "{tmp}"], "{tmp}"),
    ("wrong --dataset", ["--dataset", "cifar100"], "{tmp}/dl"),
    ("ratio < 1", ["--imbalance", "0.5"], "--imbalance"),
    ("too few images", ["--max-per-class", "31", "--imbalance", "2"], "{tmp}/dl/cifar-10-batches-py"),
    ("corrupt pickle", [_corrupt], "{tmp}/dl/cifar-10-batches-py/test_batch"),
    ("code in pickle", [_evil], "{tmp}/dl/cifar-10-batches-py/data_batch_2"),
    ("wrong pickle", [_cifar100_file], "{tmp}/dl/cifar-10-batches-py/test_batch"),
    ("missing batch", [_missing], "{tmp}/dl/cifar-10-batches-py/data_batch_4"),
    ("edited class names", [_renamed_class], "{tmp}/dl/cifar-10-batches-py/batches.meta"),
])
def test_user_errors_are_one_line(tmp_path, capsys, monkeypatch, case, args, blame):
    fake_cifar10(tmp_path / "dl", monkeypatch)  # trusted as it is written: the damage below comes after
    for a in args:
        if callable(a):
            a(tmp_path / "dl")
    argv = ["--src", str(tmp_path / "dl"), "--out", str(tmp_path / "out"), "--max-per-class", "30"]
    argv += [a.format(tmp=tmp_path) for a in args if not callable(a)]
    rc, stdout, err = convert(capsys, argv)
    assert (rc, stdout) == (2, ""), case
    assert err.count("\n") == 1 and err.startswith(f"error: {blame.format(tmp=tmp_path)}: "), err
    if callable(args[0]):  # a damaged download: named as not torchvision's, or as missing
        assert ("missing" if case == "missing batch" else "MD5 is not that of torchvision's CIFAR10") in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "dl" / "pwned").exists()


@pytest.mark.slow
def test_the_download_must_be_torchvisions_and_may_be_renamed(tmp_path, capsys, monkeypatch):
    """The MD5s are torchvision's own: an untrusted (here: fake) download is refused at its first file, with
    nothing unpickled or written. A trusted one is read from any folder name, or from the folder holding
    cifar-10-batches-py, with the same result."""
    fake_cifar10(tmp_path / "dl")
    rc, stdout, err = convert(capsys, ["--src", str(tmp_path / "dl"), "--out", str(tmp_path / "o1")])
    first = tmp_path / "dl" / "cifar-10-batches-py" / "data_batch_1"
    assert (rc, stdout) == (2, "")
    assert err == (f"error: {first}: its MD5 is not that of torchvision's CIFAR10 download: a damaged or "
                   "foreign file (download it again)\n")
    truth = fake_cifar10(tmp_path / "dl2", monkeypatch, n_train=5, n_test=2, folder="my_cifar")
    common = ["--imbalance", "1", "--max-per-class", "5"]
    assert mcl.main(["--src", str(tmp_path / "dl2" / "my_cifar"), "--out", str(tmp_path / "o2"),
                     *common]) == 0
    assert sorted(check_list(tmp_path / "o2", "CIFAR10_test.txt", "test", truth, C10_NAMES)) == \
        list(range(20))
    os.rename(tmp_path / "dl2" / "my_cifar", tmp_path / "dl2" / "cifar-10-batches-py")
    assert mcl.main(["--src", str(tmp_path / "dl2"), "--out", str(tmp_path / "o3"), *common]) == 0
    for name in ("CIFAR10_LT_r1_train.txt", "CIFAR10_test.txt"):
        assert (tmp_path / "o2" / name).read_text() == (tmp_path / "o3" / name).read_text()
    assert sorted(os.listdir(tmp_path)) == ["dl", "dl2", "o2", "o3"]


@pytest.mark.slow
def test_bad_option_is_one_line():
    rc, stdout, err = run(["--src", "x", "--out", "y", "--imbalance", "lots"])
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and "--imbalance" in err


# ==============================================================================================
# README.md
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# the copy-paste snippet runs as written


@pytest.mark.slow
def test_readme_snippet_runs_as_written(tmp_path, capsys, monkeypatch):
    """The "own training loop" snippet of README.md, on a small demo dataset where it looks, one epoch."""
    text = open(os.path.join(HERE, "README.md")).read()
    section = text[text.index("## Using the method in your own training loop"):]
    code = section[section.index("```python\n") + 10: section.index("\n```", section.index("```python"))]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the snippet reads the demo's folder as train.py does
    pipeline.make_demo_data(str(tmp_path / "ltaux" / "demo"), classes=12, train=(60, 5), val=2, test=3, size=32)
    assert "EPOCHS, S, Z = 4, 32, 4" in code
    exec(compile(code.replace("EPOCHS, S, Z = 4, 32, 4", "EPOCHS, S, Z = 1, 32, 4"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "epoch 0: cbs " in out and "'overall':" in out and "'few':" in out
