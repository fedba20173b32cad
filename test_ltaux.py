"""Sanity checks of ltaux (the method) and of train.py / evaluate.py (the entry points). CPU only.

    python -m pytest -q
"""

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torchvision
from PIL import Image

import ltaux
import train

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "shared", "data_lists")


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
# split lists and datasets


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


def test_class_counts_and_shot_group_boundaries():
    counts = ltaux.class_counts([0, 0, 2], 4)
    assert counts.tolist() == [2, 0, 1, 0]
    groups = ltaux.shot_groups(torch.tensor([101, 100, 21, 20, 19, 5]))
    assert groups.tolist() == [0, 1, 1, 1, 2, 2]
    assert ltaux.shot_groups(torch.tensor([100, 20]), many=99, few=21).tolist() == [0, 2]  # the paper's text


# ----------------------------------------------------------------------------------------------
# the sampler (Algorithm 1 lines 2-8)


def split_parts(sampler):
    b = sampler.epoch_batches()
    s = sampler.batch_size // sampler.world_size
    return (b[:, :s], b[:, s:]) if sampler.mode == "cbs_rrs" else (b, None)


def test_sampler_cbs_part_is_k_distinct_classes_of_z_distinct_images():
    labels, counts = lt_labels()
    L = torch.tensor(labels)
    s = ltaux.AuxBatchSampler(labels, 40, 4, num_batches=300)  # k = 10 does not divide C = 37
    cbs, rrs = split_parts(s)
    assert cbs.shape == (300, 40) and rrs.shape == (300, 40)
    for row in cbs:
        groups = row.view(10, 4)
        cls = L[groups]
        assert (cls == cls[:, :1]).all()  # Z consecutive images of one class
        assert len(set(cls[:, 0].tolist())) == 10  # k distinct classes
        for g, c in zip(groups.tolist(), cls[:, 0].tolist()):
            if counts[c] >= 4:
                assert len(set(g)) == 4  # distinct images whenever the class has Z of them


def test_sampler_covers_every_class_and_cycles_images_without_repeats():
    labels, counts = lt_labels(1)
    L = torch.tensor(labels)
    s = ltaux.AuxBatchSampler(labels, 40, 4, mode="cbs", num_batches=200)
    cbs = s.epoch_batches()
    first = cbs[: -(-37 // 10)]  # ceil(C / k) batches
    assert set(L[first].flatten().tolist()) == set(range(37))
    for c, n in enumerate(counts):
        drawn = [i for i in cbs.flatten().tolist() if labels[i] == c]
        assert len(drawn) >= n
        for start in range(0, len(drawn) - n + 1, n):  # every pass over the class is a permutation
            assert sorted(drawn[start:start + n]) == sorted(i for i, y in enumerate(labels) if y == c)
    assert any(labels[i] == 36 for i in cbs.flatten().tolist())  # a 1-image class is still drawn


def test_sampler_rrs_epoch_is_a_permutation_and_epoch_length():
    labels, _ = lt_labels()
    s = ltaux.AuxBatchSampler(labels, 64, 4, mode="rrs")
    b = s.epoch_batches()
    assert len(s) == -(-len(labels) // 64) == b.shape[0] and b.shape[1] == 64
    assert sorted(b.flatten()[: len(labels)].tolist()) == list(range(len(labels)))


def test_sampler_is_deterministic_per_seed_and_epoch_and_resumes_mid_epoch():
    labels, _ = lt_labels()
    a, b = ltaux.AuxBatchSampler(labels, 40, 4, seed=3), ltaux.AuxBatchSampler(labels, 40, 4, seed=3)
    a.set_epoch(2), b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)
    c = ltaux.AuxBatchSampler(labels, 40, 4, seed=4)
    c.set_epoch(2)
    assert list(a) != list(c)
    full = list(a)
    a.set_epoch(2, start_batch=5)
    assert list(a) == full[5:] and len(a) == len(full) - 5


@pytest.mark.parametrize("mode", ["cbs_rrs", "cbs", "rrs"])
@pytest.mark.parametrize("world", [2, 4])
def test_sampler_rank_slices_union_is_the_single_process_batch(mode, world):
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
    joined = torch.cat(slices, dim=2).view(len(full), -1)
    assert torch.equal(joined, full)
    for p in range(parts):  # within a part, ranks hold disjoint positions of the global batch
        assert all(len(set(torch.cat([x[i, p] for x in slices]).tolist())) == len(torch.cat(
            [x[i, p] for x in slices]).unique()) for i in range(3))


def test_sampler_seeds_are_paired_with_indices():
    labels, _ = lt_labels()
    s = ltaux.AuxBatchSampler(labels, 40, 4, with_seeds=True)
    plain = ltaux.AuxBatchSampler(labels, 40, 4)
    got, ref = list(s), list(plain)
    assert [[i for i, _ in b] for b in got] == ref
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


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED, "Places_LT_train.txt")), reason="no ../shared")
def test_sampler_on_places_lt_never_repeats_a_class_or_an_image():
    _, labels = ltaux.read_split(os.path.join(SHARED, "Places_LT_train.txt"))
    s = ltaux.AuxBatchSampler(labels, 256, 4, mode="cbs")
    cbs = s.epoch_batches()
    L = torch.tensor(labels)[cbs]
    assert all(len(L[i, ::4].unique()) == 64 for i in range(len(cbs)))
    groups = cbs.view(-1, 4)
    assert all(len(g.unique()) == 4 for g in groups)  # every Places-LT class has >= 5 images


# ----------------------------------------------------------------------------------------------
# the model, the rotation task and the loss


@pytest.mark.parametrize("arch", ltaux.LTResNet.ARCHS)
def test_every_arch_has_the_three_heads(arch):
    torch.manual_seed(0)
    m = ltaux.LTResNet(arch, num_classes=7, embed_dim=16).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = m.features(x)
        assert f.shape == (2, 16)
        assert m(x).shape == (2, 7)
        assert torch.equal(m(x), m.fc(f))
        assert m.aux_fc(f).shape == (2, 7) and m.rot_fc(f).shape == (2, 4)


def test_embed_dim_zero_uses_backbone_width():
    m = ltaux.LTResNet("resnet18", 5, embed_dim=0)
    assert m.feat_dim == 512 and m.fc.in_features == 512
    assert ltaux.LTResNet("resnet50", 5, embed_dim=0).feat_dim == 2048
    assert ltaux.LTResNet("resnet32", 5, embed_dim=0).feat_dim == 64


def test_pretrained_backbone_loads_torchvision_weights(tmp_path):
    tv = torchvision.models.resnet18(weights=None)
    torch.save(tv.state_dict(), tmp_path / "r18.pth")  # torchvision format, fc.* included
    m = ltaux.LTResNet("resnet18", 5, pretrained=str(tmp_path / "r18.pth"))
    assert torch.equal(m.backbone.conv1.weight, tv.conv1.weight)
    with pytest.raises(ltaux.LTauxError, match="r18.pth: not resnet50 weights"):
        ltaux.LTResNet("resnet50", 5, pretrained=str(tmp_path / "r18.pth"))
    with pytest.raises(ltaux.LTauxError, match="missing.pth: pretrained weights not found"):
        ltaux.LTResNet("resnet18", 5, pretrained=str(tmp_path / "missing.pth"))


def test_rotate_batch_labels_match_rot90():
    x = torch.randn(10, 3, 6, 6)
    x_rot, y_rot = ltaux.rotate_batch(x, generator=torch.Generator().manual_seed(0))
    assert x_rot.shape == x.shape and y_rot.shape == (10,)
    assert torch.bincount(y_rot, minlength=4).tolist() in ([3, 3, 2, 2],)  # balanced quarters
    used = []
    for xi, k in zip(x_rot, y_rot.tolist()):
        back = torch.rot90(xi, -k, dims=(1, 2))
        j = [j for j in range(10) if torch.equal(x[j], back)]
        assert len(j) == 1
        used += j
    assert sorted(used) == list(range(10))  # every image rotated exactly once
    x_all, y_all = ltaux.rotate_batch(x, "all")
    assert x_all.shape == (40, 3, 6, 6) and y_all.tolist() == [0] * 10 + [1] * 10 + [2] * 10 + [3] * 10
    assert torch.equal(x_all[25], torch.rot90(x[5], 2, dims=(1, 2)))
    with pytest.raises(ValueError, match="square"):
        ltaux.rotate_batch(torch.randn(2, 3, 4, 6))


def tiny_model_and_batch(seed=0):
    torch.manual_seed(seed)
    m = ltaux.LTResNet("resnet10", num_classes=5, embed_dim=8)
    x_c, x_r = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    y_c, y_r = torch.randint(0, 5, (8,)), torch.randint(0, 5, (8,))
    return m, x_c, y_c, x_r, y_r


def grads(m, loss):
    m.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    g = lambda mod: sum(float(p.grad.abs().sum()) for p in mod.parameters() if p.grad is not None)
    return g(m.fc), g(m.aux_fc), g(m.rot_fc), g(m.backbone)


def test_gradient_isolation_between_heads():
    m, x_c, y_c, x_r, y_r = tiny_model_and_batch()
    _, parts = ltaux.aux_loss(m, x_c, y_c, x_r, y_r)
    # recompute the parts with graphs to look at their gradients one by one
    feats = m.features(torch.cat([x_c, x_r]))
    l_cbs = torch.nn.functional.cross_entropy(m.fc(feats[:8]), y_c)
    l_rrs = torch.nn.functional.cross_entropy(m.aux_fc(feats[8:]), y_r)
    h, h_a, h_s, phi = grads(m, l_rrs)
    assert h == 0 and h_a > 0 and phi > 0  # the RRS loss gives h no gradient
    h, h_a, h_s, phi = grads(m, l_cbs)
    assert h > 0 and h_a == 0 and phi > 0  # the CBS loss gives h_a none
    loss, parts = ltaux.aux_loss(m, x_c, y_c, x_r, y_r, lambdas=(0.0, 0.0, 1.0))
    h, h_a, h_s, phi = grads(m, loss)
    assert h == 0 and h_a == 0 and h_s > 0 and phi > 0


def test_aux_loss_is_the_weighted_sum_of_its_parts_with_one_backbone_pass():
    m, x_c, y_c, x_r, y_r = tiny_model_and_batch()
    sizes = []
    m.backbone.register_forward_hook(lambda mod, inp, out: sizes.append(inp[0].shape[0]))
    loss, parts = ltaux.aux_loss(m, x_c, y_c, x_r, y_r, lambdas=(0.5, 1.0, 1.0))
    assert set(parts) == {"cbs", "rrs", "ss"} and sizes == [32]  # [B_cbs; B_rrs; B_rot] in one pass
    assert torch.allclose(loss, 0.5 * parts["cbs"] + parts["rrs"] + parts["ss"])
    assert all(not p.requires_grad for p in parts.values())
    loss, parts = ltaux.aux_loss(m, x_c, y_c, x_r, y_r, lambdas=(0.3, 2.0, 0.0))
    assert set(parts) == {"cbs", "rrs"} and sizes[-1] == 16  # lambda3 = 0: no rotated rows
    assert torch.allclose(loss, 0.3 * parts["cbs"] + 2.0 * parts["rrs"])
    loss, parts = ltaux.aux_loss(m, x_c, y_c, x_r, y_r, rotation=None)
    assert sizes[-1] == 16 and "ss" not in parts
    _, parts = ltaux.aux_loss(m, x_c, y_c, x_r, y_r, rotation="all")
    assert sizes[-1] == 16 + 64


def test_baselines_train_only_the_primary_head():
    m, x_c, y_c, x_r, y_r = tiny_model_and_batch()
    m.eval()  # identical BatchNorm behaviour for the reference computation
    loss, parts = ltaux.aux_loss(m, None, None, x_r, y_r, rotation=None)
    ref = torch.nn.functional.cross_entropy(m(x_r), y_r)
    assert torch.allclose(loss, ref) and set(parts) == {"rrs"}
    h, h_a, _, _ = grads(m, loss)
    assert h > 0 and h_a == 0
    loss, parts = ltaux.aux_loss(m, x_c, y_c, None, None, rotation=None)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(m(x_c), y_c)) and set(parts) == {"cbs"}


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


# ----------------------------------------------------------------------------------------------
# the official lists (read from ../shared when present; never shipped)


def need(name):
    path = os.path.join(SHARED, name)
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


def test_shipped_checksums_match_the_official_lists():
    sums = train.official_lists()
    assert len(sums) == 11 and "ImageNet_LT_train.txt" in sums.values()
    for digest, name in sums.items():
        path = os.path.join(SHARED, name)
        if os.path.exists(path):
            assert hashlib.sha256(open(path, "rb").read()).hexdigest() == digest, name


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
            (root / split / str(c)).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                x = (torch.rand(3, 16, 16, generator=g) * 80 + c * 30).to(torch.uint8)
                train.save_png(x, str(root / split / str(c) / f"{i}.png"))
                rows.append(f"{split}/{c}/{i}.png {c}\n")
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


@pytest.mark.parametrize("method, extra", [
    ("rrs", []), ("cbs", []), ("cbs_rrs", []), ("cbs_rrs_ss", []), ("cbs_rrs", ["--rotation-aug"]),
    ("cbs_rrs_ss", ["--rotation", "all", "--lambdas", "1", "1", "0.5", "--warmup-epochs", "0.5"]),
])
def test_every_method_trains_logs_and_tests(tiny, tmp_path, capsys, method, extra):
    rc, cap = run_train(tiny, tmp_path / "o", "--method", method, *extra, capsys=capsys)
    assert rc == 0, cap.err
    log = read_log(tmp_path / "o")
    assert [r["epoch"] for r in log] == [0, 1]
    parts = {"rrs": ["loss_rrs"], "cbs": ["loss_cbs"], "cbs_rrs": ["loss_cbs", "loss_rrs"],
             "cbs_rrs_ss": ["loss_cbs", "loss_rrs", "loss_ss"]}[method]
    for key in parts + ["loss", "lr", "images_per_s", "epoch_time_s", "val_overall", "val_many", "val_medium", "val_few"]:
        assert key in log[-1], key
    assert not set(k for k in log[-1] if k.startswith("loss_")) - set(parts)
    assert all(math_finite(r["loss"]) for r in log)
    progress = [line for line in cap.out.splitlines() if line.startswith("epoch 0 [")]
    assert progress and all(w in progress[0] for w in ("loss", "lr", "img/s", "eta"))
    assert "args: {" in cap.out and "device: cpu" in cap.out and "not an official list" in cap.out
    assert "| many | medium | few | overall |" in cap.out
    ckpt = train.load_checkpoint(str(tmp_path / "o" / "last.pt"))
    assert ckpt["epoch"] == 2 and ckpt["step_in_epoch"] == 0 and ckpt["global_step"] == 2 * 12
    assert ckpt["train_counts"].tolist() == TRAIN_COUNTS
    assert json.load(open(tmp_path / "o" / "test_metrics.json")).keys() >= {"overall", "many", "medium", "few"}


def math_finite(x):
    return x == x and abs(x) != float("inf")


def test_recipes_defaults_and_explicit_flags():
    a = train.parse_args(["--data", "/d", "--split", "s", "--recipe", "places_lt_r152", "--lr", "0.5"])
    assert a.arch == "resnet152" and a.backbone_lr_scale == 0.1 and a.lr == 0.5 and a.epochs == 30
    demo = train.parse_args([])
    assert demo.recipe == "demo" and demo.image_size == 32
    assert train.parse_args(["--data", "/d"]).image_size == 224
    text = train.get_args_parser().format_help()
    assert "(default: 256)" in text and "(default: cbs_rrs_ss)" in text and "lr = 0.1 * S / 256" in text


def state_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tiny, tmp_path, capsys, workers):
    assert run_train(tiny, tmp_path / "straight", capsys=capsys)[0] == 0
    rc, cap = run_train(tiny, tmp_path / "cut", "--stop-after-steps", "17", capsys=capsys)
    assert rc == 0 and "stopped at epoch 1 step 5" in cap.out
    cut = train.load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    assert (cut["epoch"], cut["step_in_epoch"], cut["global_step"]) == (1, 5, 17)
    rc = train.main(["--resume", str(tmp_path / "cut" / "last.pt"), "--workers", str(workers)])
    assert rc == 0
    a = train.load_checkpoint(str(tmp_path / "straight" / "last.pt"))
    b = train.load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    assert state_equal(a["model"], b["model"])  # every parameter and BN buffer, bit for bit
    assert all(state_equal(a["optimizer"]["state"][k], b["optimizer"]["state"][k]) for k in a["optimizer"]["state"])
    assert [r["epoch"] for r in read_log(tmp_path / "cut")] == [0, 1]


def test_evaluate_writes_metrics_csv_and_figures(tiny, tmp_path, capsys):
    import evaluate
    assert run_train(tiny, tmp_path / "a", "--epochs", "1", capsys=capsys)[0] == 0
    assert run_train(tiny, tmp_path / "b", "--epochs", "1", "--method", "rrs", capsys=capsys)[0] == 0
    root, lists = tiny
    rc = evaluate.main(["--checkpoint", str(tmp_path / "b" / "best.pt"), "--workers", "0", "--out", str(tmp_path / "eb")])
    assert rc == 0
    rc = evaluate.main(["--checkpoint", str(tmp_path / "a" / "best.pt"), "--data", str(root), "--split", lists["test"],
                        "--workers", "0", "--compare", str(tmp_path / "eb" / "metrics.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "| cbs_rrs_ss |" in out
    folder = tmp_path / "a" / "eval-tiny_test"
    m = json.load(open(folder / "metrics.json"))
    assert len(m["per_class"]) == 6 and m["train_counts"] == TRAIN_COUNTS and m["test_counts"] == [4] * 6
    rows = list(__import__("csv").DictReader(open(folder / "per_class.csv")))
    assert [r["shot_group"] for r in rows] == ["medium", "medium", "few", "few", "few", "few"]
    assert set(rows[0]) == {"cls", "train_count", "shot_group", "test_count", "accuracy", "weight_norm"}
    assert float(rows[0]["weight_norm"]) > 0
    for png in ("accuracy.png", "weight_norms.png", "gain.png"):
        with Image.open(folder / png) as im:
            assert im.size == (1200, 560) and len(im.getcolors(1 << 16)) > 4  # drawn, not blank


def test_init_loads_phi_only_and_checks_the_checkpoint(tiny, tmp_path, capsys):
    assert run_train(tiny, tmp_path / "rrs", "--epochs", "1", "--method", "rrs", capsys=capsys)[0] == 0
    src = train.load_checkpoint(str(tmp_path / "rrs" / "last.pt"))["model"]
    rc, _ = run_train(tiny, tmp_path / "ft", "--epochs", "1", "--method", "cbs", "--lr", "0", "--init",
                      str(tmp_path / "rrs" / "last.pt"), capsys=capsys)
    assert rc == 0
    got = train.load_checkpoint(str(tmp_path / "ft" / "last.pt"))["model"]
    assert torch.equal(got["backbone.conv1.weight"], src["backbone.conv1.weight"])  # lr 0: phi as loaded
    assert not torch.equal(got["fc.weight"], src["fc.weight"])  # heads fresh
    rc, cap = run_train(tiny, tmp_path / "bad", "--arch", "resnet18", "--init", str(tmp_path / "rrs" / "last.pt"),
                        capsys=capsys)
    assert rc == 2 and "checkpoint is resnet10 with 6 classes, this run is resnet18" in cap.err
    root, lists = tiny
    five = write_list(tmp_path / "five_train.txt", [r for r in open(lists["train"]) if not r.endswith(" 5\n")])
    rc = train.main(base_args((root, {**lists, "train": five, "val": five, "test": five}), tmp_path / "bad5",
                              "--init", str(tmp_path / "rrs" / "last.pt")))
    assert rc == 2 and "checkpoint is resnet10 with 6 classes, this run is resnet10 with 5 classes" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# bad input: one clear line, exit status 2, nothing half-written


def bad_run(tiny, tmp_path, capsys, *extra, lists=None):
    root, base = tiny
    args = base_args((root, {**base, **(lists or {})}), tmp_path / "o", *extra)
    rc = train.main(args)
    cap = capsys.readouterr()
    assert rc == 2
    err = [line for line in cap.err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "Traceback" not in cap.err, cap.err
    return err[0]


@pytest.mark.parametrize("rows, expect", [
    (["train/0/0.png 0\n", "train/0/1.png zero\n"], "bad_train.txt:2: label 'zero' is not an integer"),
    (["train/0/0.png 0\n", "train/0/1.png\n"], "bad_train.txt:2: expected 'relative/path label'"),
    (["train/0/0.png 0\n", "train/0/1.png -3\n"], "bad_train.txt:2: label -3 is negative"),
    ([], "bad_train.txt: split list is empty"),
    (["train/0/%d.png 0\n" % i for i in range(10)] + ["train/2/%d.png 2\n" % i for i in range(10)],
     "bad_train.txt: classes [1] have no training image"),
])
def test_bad_train_list(tiny, tmp_path, capsys, rows, expect):
    bad = write_list(tmp_path / "bad_train.txt", rows)
    assert expect in bad_run(tiny, tmp_path, capsys, "--per-class", "1", lists={"train": bad})


def test_val_label_unknown_to_train(tiny, tmp_path, capsys):
    bad = write_list(tmp_path / "v.txt", ["val/0/0.png 0\n", "val/0/1.png 6\n"])
    msg = bad_run(tiny, tmp_path, capsys, lists={"val": bad})
    assert "v.txt:2: label 6 is not a class of the training list" in msg


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
    rows[7] = "train/0/missing.png 0\n"
    bad = write_list(tmp_path / "img_train.txt", rows)
    msg = bad_run(tiny, tmp_path, capsys, "--workers", str(workers), lists={"train": bad})
    assert "img_train.txt:8: cannot read image" in msg and "missing.png (file not found)" in msg
    assert not os.path.exists(tmp_path / "o" / "last.pt")


def test_check_files_lists_every_failure(tiny, tmp_path, capsys):
    root, lists = tiny
    (tmp_path / "zero.png").write_bytes(b"")
    rows = open(lists["train"]).readlines()
    rows[3], rows[9] = "train/0/gone.png 0\n", f"../{tmp_path.name}/zero.png 0\n"
    bad = write_list(tmp_path / "cf_train.txt", rows)
    rc = train.main(base_args((root, {**lists, "train": bad}), tmp_path / "o", "--check-files", "--allow-unsafe-paths"))
    cap = capsys.readouterr()
    assert rc == 2 and "error: 2 unreadable images" in cap.err
    assert "cf_train.txt:4:" in cap.err and "cf_train.txt:10:" in cap.err and "UnidentifiedImageError" in cap.err
    assert "check-files: 134/134 images, 2 unreadable" in cap.out


@pytest.mark.parametrize("extra, expect", [
    (["--batch-size", "9", "--per-class", "2"], "not divisible by per-class Z=2"),
    (["--batch-size", "16", "--per-class", "2"], "k = S/Z = 8 classes per batch, but only 6 classes"),
    (["--method", "cbs_rrs_ss", "--rotation-aug"], "--rotation-aug is the augmentation baseline"),
])
def test_bad_arguments(tiny, tmp_path, capsys, extra, expect):
    assert expect in bad_run(tiny, tmp_path, capsys, *extra)


def test_world_size_must_divide_the_batch(tiny, monkeypatch, tmp_path):
    labels = ltaux.read_split(tiny[1]["train"])[1]
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        ltaux.AuxBatchSampler(labels, 8, 2, world_size=3)


def test_output_folder_of_another_run_is_refused(tiny, tmp_path, capsys):
    assert run_train(tiny, tmp_path / "o", "--epochs", "1", capsys=capsys)[0] == 0
    before = open(tmp_path / "o" / "last.pt", "rb").read()
    msg = bad_run(tiny, tmp_path, capsys, "--epochs", "1")
    assert "holds another run" in msg and "--resume" in msg and "--overwrite" in msg
    assert open(tmp_path / "o" / "last.pt", "rb").read() == before
    assert run_train(tiny, tmp_path / "o", "--epochs", "1", "--overwrite", capsys=capsys)[0] == 0
    assert len(read_log(tmp_path / "o")) == 1


def test_resume_of_another_arch_is_refused(tiny, tmp_path, capsys):
    assert run_train(tiny, tmp_path / "o", "--epochs", "1", capsys=capsys)[0] == 0
    rc = train.main(["--resume", str(tmp_path / "o" / "last.pt"), "--arch", "resnet18", "--epochs", "2"])
    assert rc == 2 and "checkpoint is resnet10 with 6 classes, this run is resnet18" in capsys.readouterr().err


def test_non_finite_loss_stops_with_step_and_parts(tiny, tmp_path, capsys):
    msg = bad_run(tiny, tmp_path, capsys, "--lr", "1e30")
    assert "non-finite loss at step" in msg and "cbs" in msg and "last good checkpoint: none yet" in msg
    assert not os.path.exists(tmp_path / "o" / "last.pt")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoints_with_pickled_objects_or_garbage_are_refused(tiny, tmp_path, capsys):
    torch.save({"format": train.CKPT_FORMAT, "payload": Evil()}, tmp_path / "evil.pt")
    rc = train.main(["--resume", str(tmp_path / "evil.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and "evil.pt: refused: it holds pickled Python objects" in err and "pwned" not in err
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    rc = train.main(["--resume", str(tmp_path / "junk.pt")])
    assert rc == 2 and "junk.pt: not a readable checkpoint" in capsys.readouterr().err
    import evaluate
    assert evaluate.main(["--checkpoint", str(tmp_path / "evil.pt")]) == 2


# ----------------------------------------------------------------------------------------------
# processes: pre-emption, a kill during a save, torchrun


def test_sigterm_saves_position_and_exits_cleanly(tiny, tmp_path):
    args = base_args(tiny, tmp_path / "o", "--epochs", "50", "--print-freq", "1")
    p = subprocess.Popen([sys.executable, "-u", os.path.join(HERE, "train.py"), *args], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, cwd=HERE)
    lines = []
    for line in p.stdout:  # wait for training to be under way: the first progress line
        lines.append(line)
        if line.startswith("epoch 0 [ 2/"):
            p.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + p.stdout.read()
    assert p.wait(timeout=120) == 0, out
    assert "stopped at epoch" in out and "--resume" in out
    ckpt = train.load_checkpoint(str(tmp_path / "o" / "last.pt"))
    assert 0 < ckpt["global_step"] < 50 * 12
    assert ckpt["epoch"] * 12 + ckpt["step_in_epoch"] == ckpt["global_step"]
    assert not [f for f in os.listdir(tmp_path / "o") if ".tmp" in f]


KILLER = r"""
import os, signal, sys, torch
sys.path.insert(0, sys.argv[1])
import train
path = sys.argv[2]
train.atomic_save({"v": torch.zeros(3)}, path)   # the good, old checkpoint
class Bomb:
    def __reduce__(self):                          # runs while torch.save is writing the new one
        os.kill(os.getpid(), signal.SIGKILL)
if sys.argv[3] == "during-write":
    train.atomic_save({"v": torch.ones(1 << 20), "x": Bomb()}, path)
else:                                              # after the bytes are written, before the rename
    os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
    train.atomic_save({"v": torch.ones(1 << 20)}, path)
"""


@pytest.mark.parametrize("when", ["during-write", "before-rename"])
def test_kill_during_save_leaves_the_old_checkpoint(tmp_path, when):
    path = tmp_path / "last.pt"
    p = subprocess.run([sys.executable, "-c", KILLER, HERE, str(path), when], capture_output=True)
    assert p.returncode == -signal.SIGKILL
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.zeros(3))


def test_torchrun_two_processes_on_cpu(tiny, tmp_path):
    import evaluate
    out = tmp_path / "ddp"
    args = base_args(tiny, out, "--epochs", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(HERE, "train.py"), *args], capture_output=True, text=True, cwd=HERE,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("epoch 0 done") == 1  # rank 0 alone logs
    assert "device: cpu x 2" in p.stdout
    assert sorted(os.listdir(out)) == ["best.pt", "last.pt", "log.jsonl", "test_metrics.json"]  # rank 0 alone writes
    ckpt = train.load_checkpoint(str(out / "last.pt"))
    assert ckpt["global_step"] == 12 and ckpt["args"]["batch_size"] == 8
    ddp = json.load(open(out / "test_metrics.json"))
    assert evaluate.main(["--checkpoint", str(out / "best.pt"), "--workers", "0", "--out", str(tmp_path / "e")]) == 0
    single = json.load(open(tmp_path / "e" / "metrics.json"))
    assert ddp["overall"] == pytest.approx(single["overall"])  # gathered: no test image lost or counted twice


def test_demo_data_and_split_maker(tmp_path):
    (tmp_path / "mine").mkdir()
    with pytest.raises(ltaux.LTauxError, match="exists but holds no demo lists"):
        train.make_demo_data(str(tmp_path / "mine"))  # a user's folder is never written into
    lists = train.make_demo_data(str(tmp_path / "demo"), classes=12, head=150, tail=5, val=2, test=3, size=8)
    _, labels = ltaux.read_split(lists["train"])
    groups = ltaux.shot_groups(ltaux.class_counts(labels, 12))
    assert set(groups.tolist()) == {0, 1, 2}  # the demo spans many, medium and few
    assert ltaux.class_counts(ltaux.read_split(lists["test"])[1], 12).tolist() == [3] * 12
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    sys.path.insert(0, os.path.join(HERE, "data_lists"))
    import make_lt_split
    tree = tmp_path / "tree"
    for c in range(5):
        (tree / f"c{c}").mkdir(parents=True)
        for i in range(30):
            (tree / f"c{c}" / f"{i}.jpg").write_bytes(b"x")
    for profile in ("exp", "pareto"):
        prefix = str(tmp_path / f"My_{profile}")
        make_lt_split.main(["--root", str(tree), "--prefix", prefix, "--profile", profile, "--max", "20",
                            "--min", "2", "--test-per-class", "5", "--val-per-class", "2"])
        tr, te = ltaux.read_split(prefix + "_train.txt"), ltaux.read_split(prefix + "_test.txt")
        counts = sorted(ltaux.class_counts(tr[1], 5).tolist(), reverse=True)
        assert counts[0] == 20 and counts[-1] == 2
        assert ltaux.class_counts(te[1], 5).tolist() == [5] * 5
        assert not set(tr[0]) & set(te[0])  # held-out images never train


def test_bench_runs_and_reports_every_figure(tmp_path, capsys):
    import bench
    res = bench.main(["--image-size", "16", "--batch-size", "4", "--num-classes", "5", "--steps", "2", "--warmup", "1",
                      "--loader-images", "64", "--demo-dir", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert json.loads(out[: out.index("\n}\n") + 2])["step"]["images_per_step"] == 16
    assert res["sampler"]["batches_per_s"] > 0 and res["sampler"]["fraction_of_step"] > 0
    assert res["step"]["ratio"] > 0 and res["loader"]["images_per_s_per_worker"] > 0
    assert "| ratio method / plain |" in out
