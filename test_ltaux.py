"""Sanity checks of ltaux (the method, in the order of ltaux.py) and of the entry points. CPU only.

    python -m pytest -q

The method tests check behaviour through the public API (what each head is given, which rows the
sampler puts where, what the loss adds up), so that a wrongly wired method fails: heads, halves,
labels or loss weights swapped, a CBS part that is not class-balanced, rotation labels that do not
match the rotation, a deployed model that uses another head.
"""

import collections
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import ltaux
import runtime
import train

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "shared")
SHARED_LISTS = os.path.join(SHARED, "data_lists")


def write_list(path, rows):
    with open(path, "w") as f:
        f.write("".join(rows))
    return str(path)


def lt_labels(seed=0):
    """37 classes: a few large ones, many with 5 images, two with fewer than Z = 4."""
    counts = [200, 120, 60, 33, 17, 9] + [5] * 29 + [2, 1]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))].tolist(), counts


# ----------------------------------------------------------------------------------------------
# Algorithm 1 lines 2-8: AuxBatchSampler


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
# the model: phi and the heads h (.fc), h_a (.aux_fc), h_s (.rot_fc)


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


# ----------------------------------------------------------------------------------------------
# Algorithm 1 line 9 and Eq. 2: rotate_batch, aux_loss, rotation_augment


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
    loss, parts = ltaux.aux_loss(m, x_c, y_c, x_r, y_r, lambdas, rotation, torch.Generator().manual_seed(1))
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
    loss, parts = ltaux.aux_loss(m, x_c, y_c, x_r, y_r)  # default: lambdas 0.5 : 1 : 1, one random angle
    assert len(heads_given(m.calls[-1])["rot_fc"]) == 16
    assert torch.allclose(loss, 0.5 * parts["cbs"] + parts["rrs"] + parts["ss"])
    loss, parts = ltaux.aux_loss(m, x_c, y_c, x_r, y_r, (0.5, 2.0, 1.0), rotation="off")
    assert set(heads_given(m.calls[-1])) == {"fc", "aux_fc"} and set(parts) == {"cbs", "rrs"}
    assert torch.allclose(loss, 0.5 * parts["cbs"] + 2.0 * parts["rrs"])


@pytest.mark.parametrize("which", ["rrs", "cbs"])
def test_baselines_train_h_alone_without_rotation_unless_asked(which):
    m = SpyModel()
    x_c, y_c, x_r, y_r = spy_batch()
    x, y = (x_r, y_r) if which == "rrs" else (x_c, y_c)
    args = (None, None, x_r, y_r) if which == "rrs" else (x_c, y_c, None, None)
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
    loss, _ = ltaux.aux_loss(m, x_c, y_c, x_r, y_r, lambdas)
    g = grad_sums(m, loss)
    assert g["phi"] > 0 and g["embed"] > 0
    assert {k for k in ("h", "h_a", "h_s") if g[k] > 0} == trained


def test_ltresnet_head_names_mean_h_h_a_h_s():
    m, x_c, y_c, x_r, y_r = real_model_and_batch()
    m.eval()  # BatchNorm by running statistics: rows do not interact, so each part can be recomputed
    _, parts = ltaux.aux_loss(m, x_c, y_c, x_r, y_r)
    with torch.no_grad():
        assert torch.allclose(parts["cbs"], F.cross_entropy(m(x_c), y_c), atol=1e-5)  # the deployed h
        assert torch.allclose(parts["rrs"], F.cross_entropy(m.aux_fc(m.features(x_r)), y_r), atol=1e-5)
    loss, parts = ltaux.aux_loss(m, None, None, x_r, y_r)
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
    counts = ltaux.class_counts([0, 0, 2], 4)
    assert counts.tolist() == [2, 0, 1, 0]
    groups = ltaux.shot_groups(torch.tensor([101, 100, 21, 20, 19, 5]))
    assert groups.tolist() == [0, 1, 1, 1, 2, 2]  # many > 100, few < 20 (OLTR / Decoupling code)
    assert ltaux.shot_groups(torch.tensor([100, 99, 21, 20]), many=99, few=21).tolist() == [0, 1, 1, 2]


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


@pytest.mark.parametrize("content, reason", [
    (None, "file not found"),
    (b"", "UnidentifiedImageError"),
    (b"this is not an image at all", "UnidentifiedImageError"),
    ("truncated", "truncated"),
])
def test_dataset_bad_image_names_path_and_line(tmp_path, content, reason):
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
    ds = ltaux.SplitDataset(root, split)
    ds[0]
    with pytest.raises(ltaux.LTauxError) as e:
        ds[1]
    msg = str(e.value)
    assert "s.txt:3" in msg and str(root / "bad.jpg") in msg and reason in msg


def test_read_split_drops_a_byte_order_mark_and_bounds_labels(tmp_path):
    f = tmp_path / "bom.txt"
    f.write_bytes("\ufeffa/1.jpg 0\nb/2.jpg 1\n".encode("utf-8"))
    assert ltaux.read_split(f)[0] == ["a/1.jpg", "b/2.jpg"]
    big = write_list(tmp_path / "big.txt", ["a.jpg 0\n", "b.jpg 1000000000\n"])
    with pytest.raises(ltaux.LTauxError, match=r"big.txt:2: label 1000000000 is larger than"):
        ltaux.read_split(big)


def test_wide_greyscale_is_rescaled_and_extreme_aspect_ratios_refused(tmp_path):
    ramp = Image.new("I;16", (64, 2))
    ramp.putdata([v * 1000 for v in range(64)] * 2)  # 0 .. 63000 of 65535: Pillow alone clips to white
    ramp.save(tmp_path / "g16.png")
    Image.new("RGB", (4000, 8)).save(tmp_path / "strip.png")
    split = write_list(tmp_path / "w.txt", ["g16.png 0\n", "strip.png 1\n"])
    ds = ltaux.SplitDataset(tmp_path, split, transform=torchvision.transforms.PILToTensor())
    x = ds[0][0][0, 0].float()
    assert x[0] == 0 and x[-1] == 255 and len(x.unique()) > 32  # the ramp survives
    with pytest.raises(ltaux.LTauxError, match=r"w.txt:2: .*aspect ratio 4000x8"):
        ds[1]


# ----------------------------------------------------------------------------------------------
# the official lists (read from ../shared when present; never shipped)


def need(name):
    path = os.path.join(SHARED_LISTS, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} absent")
    return path


def test_places_lt_train_figures():
    paths, labels = ltaux.read_split(need("Places_LT_train.txt"))
    counts = ltaux.class_counts(labels, max(labels) + 1)
    assert len(paths) == 62500 and len(counts) == 365
    assert int(counts.min()) == 5 and int(counts.max()) == 4980
    assert torch.bincount(ltaux.shot_groups(counts)).tolist() == [131, 163, 71]


def test_imagenet_lt_test_is_balanced():
    _, labels = ltaux.read_split(need("ImageNet_LT_test.txt"))
    counts = ltaux.class_counts(labels, 1000)
    assert len(labels) == 50000 and counts.min() == counts.max() == 50


def test_shipped_checksums_match_the_official_lists_and_train_py_says_so(tmp_path):
    with open(os.path.join(HERE, "data_lists", "SHA256SUMS")) as f:
        sums = dict(line.split() for line in f if line.strip() and not line.startswith("#"))
    assert len(sums) == 11 and "ImageNet_LT_train.txt" in sums.values()
    for digest, name in sums.items():
        path = os.path.join(SHARED_LISTS, name)
        if os.path.exists(path):
            assert hashlib.sha256(open(path, "rb").read()).hexdigest() == digest, name
    official = need("Places_LT_val.txt")
    assert train.describe_lists([official]) == [f"{official}: official Places_LT_val.txt (sha256 ok)"]
    mine = write_list(tmp_path / "Places_LT_val.txt", ["a.jpg 0\n"])
    with pytest.warns(UserWarning, match="named like an official list, but its sha256 differs"):
        assert train.describe_lists([mine, write_list(tmp_path / "own.txt", ["a.jpg 0\n"])]) == []


# ----------------------------------------------------------------------------------------------
# train.py and evaluate.py end to end, on tiny generated data

TRAIN_COUNTS = [40, 25, 12, 6, 5, 4]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """6 classes of 16 px PNGs (40 ... 4 training images), balanced val and test lists."""
    root = tmp_path_factory.mktemp("tiny")
    g = torch.Generator().manual_seed(0)
    lists = {}
    for split, counts in (("train", TRAIN_COUNTS), ("val", [3] * 6), ("test", [4] * 6)):
        rows = []
        for c, n in enumerate(counts):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            for i in range(n):
                x = (torch.rand(3, 16, 16, generator=g) * 80 + c * 30).to(torch.uint8)
                train.save_png(x, str(root / split / f"c{c}" / f"{i}.png"))
                rows.append(f"{split}/c{c}/{i}.png {c}\n")
        lists[split] = write_list(root / f"tiny_{split}.txt", rows)
    return root, lists


def base_args(tiny, out, *extra):
    root, lists = tiny
    return ["--data", str(root), "--split", lists["train"], "--val-split", lists["val"], "--test-split",
            lists["test"], "--arch", "resnet10", "--image-size", "16", "--batch-size", "8", "--per-class", "2",
            "--embed-dim", "8", "--epochs", "2", "--workers", "0", "--device", "cpu", "--print-freq", "4",
            "--lr", "0.05", "--out", str(out), *extra]


def run_train(tiny, out, *extra, capsys=None):
    rc = train.main(base_args(tiny, out, *extra))
    captured = capsys.readouterr() if capsys else None
    return rc, captured


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def weights(out, name="last.pt"):
    return runtime.load_checkpoint(str(os.path.join(out, name)))["model"]


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
    ckpt = runtime.load_checkpoint(str(out / "last.pt"))
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (2, 0, 2 * 12)
    assert ckpt["train_counts"].tolist() == TRAIN_COUNTS
    assert json.load(open(out / "test_metrics.json")).keys() >= {"overall", "many", "medium", "few"}
    assert sorted(os.listdir(out)) == ["best.pt", "last.pt", "log.jsonl", "test_metrics.json"]


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

    def __call__(self, model, x_cbs, y_cbs, x_rrs, y_rrs, lambdas, rotation, generator):
        self.calls.append((x_cbs, y_cbs, x_rrs, y_rrs, list(lambdas), rotation))
        return self.real(model, x_cbs, y_cbs, x_rrs, y_rrs, lambdas, rotation, generator)


def balanced(y, k, z):
    """y (S,) laid out as k distinct classes of z consecutive images each."""
    groups = y.view(k, z)
    return bool((groups == groups[:, :1]).all()) and len(groups[:, 0].unique()) == k


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


def test_recipes_defaults_and_explicit_flags():
    a, _ = train.parse_args(["--data", "/d", "--split", "s", "--recipe", "places_lt_r152", "--lr", "0.5"])
    assert a.arch == "resnet152" and a.backbone_lr_scale == 0.01 and a.lr == 0.5 and a.epochs == 30
    demo, _ = train.parse_args([])
    assert demo.recipe == "demo" and demo.image_size == 32
    plain, _ = train.parse_args(["--data", "/d"])
    assert plain.image_size == 224 and plain.per_class == 4 and plain.lambdas == [0.5, 1.0, 1.0]
    c10, _ = train.parse_args(["--data", "/d", "--recipe", "cifar10_lt"])
    assert c10.arch == "resnet32" and c10.batch_size // c10.per_class <= 10  # k <= C = 10
    text = " ".join(train.get_args_parser().format_help().split())
    assert "(default: 256)" in text and "(default: cbs_rrs_ss)" in text and "lr = 0.1 * S / 256" in text
    assert "(default: 4)" in text and "(default: [0.5, 1.0, 1.0])" in text
    assert train.ARCHS == ltaux.LTResNet.ARCHS


def test_help_is_fast_and_needs_no_torch():
    code = "import runpy, sys; sys.argv = ['train.py', '--help']; runpy.run_path('train.py', run_name='__main__')"
    p = subprocess.run([sys.executable, "-c", code + "\n"], capture_output=True, text=True, cwd=HERE)
    assert p.returncode == 0 and "--batch-size" in p.stdout
    p = subprocess.run([sys.executable, "-X", "importtime", os.path.join(HERE, "train.py"), "--help"],
                       capture_output=True, text=True, cwd=HERE)
    assert p.returncode == 0 and " torch\n" not in p.stderr and "| torch" not in p.stderr


@pytest.mark.parametrize("lambdas, flag", [(["0", "1", "0"], "--method rrs"), (["1", "0", "0"], "--method cbs")])
def test_table4_endpoints_name_the_baseline_to_run(tiny, tmp_path, capsys, lambdas, flag):
    msg = bad_run(tiny, tmp_path, capsys, "--method", "cbs_rrs", "--lambdas", *lambdas)
    assert "Table 4" in msg and flag in msg


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


# ----------------------------------------------------------------------------------------------
# bad input: one clear line, exit status 2, nothing written


def bad_run(tiny, tmp_path, capsys, *extra, lists=None, out="o"):
    root, base = tiny
    rc = train.main(base_args((root, {**base, **(lists or {})}), tmp_path / out, *extra))
    cap = capsys.readouterr()
    assert rc == 2, cap.out + cap.err
    err = [line for line in cap.err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "Traceback" not in cap.err, cap.err
    return err[0]


@pytest.mark.parametrize("rows, expect", [
    (["train/c0/0.png 0\n", "train/c0/1.png zero\n"], "bad_train.txt:2: label 'zero' is not an integer"),
    (["train/c0/0.png 0\n", "train/c0/1.png\n"], "bad_train.txt:2: expected 'relative/path label'"),
    (["train/c0/0.png 0\n", "train/c0/1.png -3\n"], "bad_train.txt:2: label -3 is negative"),
    ([], "bad_train.txt: split list is empty"),
    (["train/c0/%d.png 0\n" % i for i in range(10)] + ["train/c2/%d.png 2\n" % i for i in range(10)],
     "bad_train.txt: classes [1] have no training image"),
])
def test_bad_train_list(tiny, tmp_path, capsys, rows, expect):
    bad = write_list(tmp_path / "bad_train.txt", rows)
    assert expect in bad_run(tiny, tmp_path, capsys, "--per-class", "1", lists={"train": bad})
    assert not os.path.exists(tmp_path / "o")  # a run that fails on its inputs creates nothing


def test_val_label_unknown_to_train(tiny, tmp_path, capsys):
    bad = write_list(tmp_path / "v.txt", ["val/c0/0.png 0\n", "val/c0/1.png 6\n"])
    assert "v.txt:2: label 6 is not a class of the training list" in bad_run(tiny, tmp_path, capsys, lists={"val": bad})


def test_missing_list_and_wrong_root_say_what_to_do(tiny, tmp_path, capsys):
    msg = bad_run(tiny, tmp_path, capsys, lists={"train": str(tmp_path / "t_trian.txt")})
    assert "t_trian.txt: split list not found" in msg and "data_lists/README.md" in msg and "SHA256SUMS" in msg
    root, lists = tiny
    rc = train.main(base_args((tmp_path, lists), tmp_path / "o"))
    err = capsys.readouterr().err
    assert rc == 2 and "the root is probably wrong" in err and str(tmp_path / "train/c0/0.png") in err


def test_duplicate_paths_warn(tiny, tmp_path, capsys):
    root, lists = tiny
    rows = open(lists["train"]).readlines()
    dup = write_list(tmp_path / "dup_train.txt", rows + rows[:1])
    with pytest.warns(UserWarning, match=f"dup_train.txt:{len(rows) + 1}: duplicate path"):
        assert train.main(base_args((root, {**lists, "train": dup}), tmp_path / "o", "--epochs", "1")) == 0


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_image_during_training_names_path_and_line(tiny, tmp_path, capsys, workers):
    root, lists = tiny
    rows = open(lists["train"]).readlines()
    rows[7] = "train/c0/missing.png 0\n"
    bad = write_list(tmp_path / "img_train.txt", rows)
    msg = bad_run(tiny, tmp_path, capsys, "--workers", str(workers), lists={"train": bad})
    assert "img_train.txt:8: cannot read image" in msg and "missing.png (file not found)" in msg
    assert not os.path.exists(tmp_path / "o")  # nothing written: the folder it made is gone again


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
    assert len((tmp_path / "o2" / "unreadable.txt").read_text().splitlines()) == 32


@pytest.mark.parametrize("extra, expect", [
    (["--batch-size", "9", "--per-class", "2"], "not divisible by per-class Z=2"),
    (["--batch-size", "16", "--per-class", "2"], "k = S/Z = 8 classes per batch, but only 6 classes"),
    (["--method", "cbs_rrs_ss", "--rotation-aug"], "--rotation-aug is the augmentation baseline"),
    (["--lr", "-1"], "--lr -1.0: must be >= 0"),
    (["--momentum", "-0.1"], "--momentum -0.1: must be >= 0"),
    (["--weight-decay", "-1"], "--weight-decay -1.0: must be >= 0"),
    (["--print-freq", "0"], "--print-freq 0: must be at least 1"),
    (["--eval-freq", "0"], "--eval-freq 0: must be at least 1"),
    (["--workers", "-1"], "--workers -1: must be >= 0"),
    (["--image-size", "0"], "--image-size 0: must be at least 1"),
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--lambdas", "0.5", "-1", "1"], "weights must be finite and >= 0"),
    (["--lambdas", "0", "0", "0"], "leaves h untrained"),
    (["--embed-dim", "-2"], "--embed-dim -2: must be >= 0"),
])
def test_bad_arguments(tiny, tmp_path, capsys, extra, expect):
    assert expect in bad_run(tiny, tmp_path, capsys, *extra)
    assert not os.path.exists(tmp_path / "o")


def test_device_and_out_mistakes(tiny, tmp_path, capsys):
    if not torch.cuda.is_available():
        assert "no CUDA device is available" in bad_run(tiny, tmp_path, capsys, "--device", "cuda")
    (tmp_path / "afile").write_text("x")
    assert "is a file, not a folder" in bad_run(tiny, tmp_path, capsys, out="afile")
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        assert "is not writable" in bad_run(tiny, tmp_path, capsys, out="ro/run")


def test_non_finite_loss_stops_before_anything_is_saved(tiny, tmp_path, capsys):
    msg = bad_run(tiny, tmp_path, capsys, "--lr", "1e30")
    assert "non-finite loss at step" in msg and "cbs" in msg and "last good checkpoint: none yet" in msg
    assert not os.path.exists(tmp_path / "o")


# ----------------------------------------------------------------------------------------------
# outputs: a finished run is never lost to a new command


def test_another_run_in_out_is_refused_until_every_input_is_valid(runs, tiny, tmp_path, capsys):
    out = tmp_path / "o"
    shutil.copytree(runs["cbs_rrs_ss"][0], out)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    msg = bad_run(tiny, tmp_path, capsys, "--epochs", "1")
    assert "holds another run" in msg and "--resume" in msg and "--overwrite" in msg
    msg = bad_run(tiny, tmp_path, capsys, "--overwrite", lists={"train": str(tmp_path / "t_trian.txt")})
    assert "split list not found" in msg  # a typo with --overwrite: the finished run is still there
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    other = tmp_path / "other"
    shutil.copytree(runs["rrs"][0], other)
    rc = train.main(["--resume", str(other / "last.pt"), "--out", str(out), "--epochs", "3"])
    assert rc == 2 and "holds another run" in capsys.readouterr().err  # resume into a third run's folder
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert run_train(tiny, out, "--epochs", "1", "--overwrite", capsys=capsys)[0] == 0
    assert len(read_log(out)) == 1


def test_a_running_training_owns_its_folder(tiny, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\nf = open(sys.argv[1], 'a+')\n"
                               "fcntl.flock(f, fcntl.LOCK_EX)\nf.write('pid 4242 on elsewhere'); f.flush()\n"
                               "print('locked', flush=True)\nsys.stdin.read()", str(out / ".lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        msg = bad_run(tiny, tmp_path, capsys, "--epochs", "1")
        assert "in use by a running training (pid 4242 on elsewhere)" in msg
    finally:
        holder.communicate("")  # the holder exits: the OS drops its lock, nothing stale is left
    assert run_train(tiny, out, "--epochs", "1", capsys=capsys)[0] == 0
    assert not os.path.exists(out / ".lock")


def test_best_pt_is_written_before_last_pt(runs, tiny, tmp_path, capsys, monkeypatch):
    """A crash between the two writes must not leave a last.pt whose best accuracy best.pt lacks."""
    order = []
    real = runtime.atomic_save
    monkeypatch.setattr(runtime, "atomic_save", lambda obj, path: (order.append(os.path.basename(path)), real(obj, path)))
    assert run_train(tiny, tmp_path / "o", "--epochs", "2", capsys=capsys)[0] == 0
    for i, name in enumerate(order):
        if name == "last.pt":  # every last.pt's best accuracy is already in a best.pt
            assert "best.pt" in order[:i]
    best, last = (runtime.load_checkpoint(str(tmp_path / "o" / f)) for f in ("best.pt", "last.pt"))
    assert best["best_acc"] == last["best_acc"]


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
    ckpt = runtime.load_checkpoint(str(out / "last.pt"))
    assert all(g["momentum"] == 0.5 and g["weight_decay"] == 0 for g in ckpt["optimizer"]["param_groups"])
    assert [r["epoch"] for r in read_log(out)] == [0, 1, 2]


def test_saved_unsafe_paths_flag_is_not_honoured_on_resume(runs, tmp_path, capsys):
    ckpt = runtime.load_checkpoint(str(runs["rrs"][0] / "last.pt"))
    ckpt["args"]["allow_unsafe_paths"] = True
    ckpt["args"]["split"] = write_list(tmp_path / "u_train.txt", ["../../etc/x.png 0\n"] + open(
        ckpt["args"]["split"]).readlines())
    runtime.atomic_save(ckpt, str(tmp_path / "last.pt"))
    rc = train.main(["--resume", str(tmp_path / "last.pt"), "--epochs", "3"])
    assert rc == 2 and "is absolute or contains '..'" in capsys.readouterr().err


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoints_that_are_not_ours_are_refused_in_one_line(runs, tmp_path, capsys):
    torch.save({"format": runtime.CKPT_FORMAT, "payload": Evil()}, tmp_path / "evil.pt")
    rc = train.main(["--resume", str(tmp_path / "evil.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and "evil.pt: refused: it holds pickled Python objects" in err and "pwned" not in err
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    assert train.main(["--resume", str(tmp_path / "junk.pt")]) == 2
    assert "junk.pt: not a readable checkpoint" in capsys.readouterr().err
    good = runtime.load_checkpoint(str(runs["rrs"][0] / "last.pt"))
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


# ----------------------------------------------------------------------------------------------
# processes: pre-emption, a kill during a save, torchrun


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


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_to_the_process_group_saves_and_resume_matches_an_uninterrupted_run(runs, tiny, tmp_path, workers):
    straight = runs["cbs_rrs_ss"][0]
    p = start(base_args(tiny, tmp_path / "cut", "--print-freq", "1", "--workers", str(workers)))
    out = signal_when(p, "epoch 1 [ 4/", signal.SIGTERM)
    assert p.wait(timeout=120) == 0, out
    assert "stopped at epoch 1 step" in out and "--resume" in out and "Traceback" not in out
    cut = runtime.load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    assert cut["epoch"] == 1 and 4 <= cut["step_in_epoch"] < 12
    assert cut["global_step"] == 12 + cut["step_in_epoch"]
    assert not [f for f in os.listdir(tmp_path / "cut") if ".tmp" in f]
    p = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--resume", str(tmp_path / "cut" / "last.pt"),
                        "--workers", str(workers)], capture_output=True, text=True, cwd=HERE, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    a, b = weights(straight), weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit, BN buffers too
    log_a, log_b = read_log(straight), read_log(tmp_path / "cut")
    assert [r["epoch"] for r in log_b] == [0, 1]
    assert log_b[1]["loss"] == pytest.approx(log_a[1]["loss"], rel=1e-5)  # the whole epoch, not the resumed part


def test_a_second_signal_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    stop = train.StopFlag(torch.device("cpu"), 1)
    try:
        stop.handle(signal.SIGINT, None)
        assert stop.agreed() and exits == []
        stop.handle(signal.SIGINT, None)
        assert exits == [128 + signal.SIGINT]
    finally:
        stop.restore()


KILLER = r"""
import os, signal, sys, torch
sys.path.insert(0, sys.argv[1])
import runtime
path = sys.argv[2]
runtime.atomic_save({"v": torch.zeros(3)}, path)   # the good, old checkpoint
class Bomb:
    def __reduce__(self):                          # runs while torch.save is writing the new one
        os.kill(os.getpid(), signal.SIGKILL)
if sys.argv[3] == "during-write":
    runtime.atomic_save({"v": torch.ones(1 << 20), "x": Bomb()}, path)
else:                                              # after the bytes are written, before the rename
    os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
    runtime.atomic_save({"v": torch.ones(1 << 20)}, path)
"""


@pytest.mark.parametrize("when", ["during-write", "before-rename"])
def test_kill_during_save_leaves_the_old_checkpoint(tmp_path, when):
    path = tmp_path / "last.pt"
    p = subprocess.run([sys.executable, "-c", KILLER, HERE, str(path), when], capture_output=True)
    assert p.returncode == -signal.SIGKILL
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.zeros(3))


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
    ckpt = runtime.load_checkpoint(str(out / "last.pt"))
    assert ckpt["global_step"] == 12 and ckpt["args"]["batch_size"] == 8
    model, _, counts = runtime.model_from_checkpoint(str(out / "best.pt"), torch.device("cpu"))
    ds = ltaux.SplitDataset(tiny[0], tiny[1]["test"], runtime.build_transform(16, train=False))
    pred, target = runtime.predict(model, torch.utils.data.DataLoader(ds, batch_size=7), torch.device("cpu"))
    single = ltaux.shot_accuracy(pred, target, counts)
    ddp = json.load(open(out / "test_metrics.json"))
    assert ddp["overall"] == pytest.approx(single["overall"])  # gathered: no test image lost or counted twice


# ----------------------------------------------------------------------------------------------
# the demo and bench.py


def test_demo_data_is_long_tailed_and_never_written_into_a_users_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    with pytest.raises(ltaux.LTauxError, match="exists but holds no demo lists"):
        train.make_demo_data(str(tmp_path / "mine"))
    lists = train.make_demo_data(str(tmp_path / "demo"), classes=12, head=150, tail=5, val=2, test=3, size=8)
    _, labels = ltaux.read_split(lists["train"])
    groups = ltaux.shot_groups(ltaux.class_counts(labels, 12))
    assert set(groups.tolist()) == {0, 1, 2}  # the demo spans many, medium and few
    assert ltaux.class_counts(ltaux.read_split(lists["test"])[1], 12).tolist() == [3] * 12
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_bench_runs_and_reports_every_figure(tmp_path, capsys):
    import bench
    res = bench.main(["--image-size", "16", "--batch-size", "4", "--num-classes", "5", "--steps", "2", "--warmup", "1",
                      "--loader-images", "64", "--demo-dir", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert json.loads(out[: out.index("\n}\n") + 2])["step"]["images_per_step"] == 16
    assert res["sampler"]["S"] == 4 and res["sampler"]["batches_per_s"] > 0 and res["sampler"]["fraction_of_step"] > 0
    assert res["step"]["ratio"] > 0 and res["loader"]["images_per_s_per_worker"] > 0
    assert "| ratio method / plain |" in out
    with pytest.raises(SystemExit):
        bench.main(["--steps", "0"])
