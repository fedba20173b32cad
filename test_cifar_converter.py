"""Tests of data_lists/make_cifar_lt.py on tiny fake CIFAR downloads, pickled the way the real files are."""

import importlib.util
import os
import pickle
import random
import subprocess
import sys

import pytest
from PIL import Image

CONVERTER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_lists", "make_cifar_lt.py")
_spec = importlib.util.spec_from_file_location("make_cifar_lt", CONVERTER)
mcl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mcl)

C10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ----------------------------------------------------------------------------------------------------------------------
# fake numpy arrays: pickled under our names, which are then swapped for numpy's in the bytes (protocol 2 names a
# global as the text line "c<module>\n<name>\n"), so the files look like the real download without numpy

def _reconstruct(*args):  # only pickled by name
    raise AssertionError


class _FakeDtype:
    def __reduce__(self):
        return _FakeDtype, ("u1", False, True), (3, "|", None, None, None, -1, -1, 0)


class _FakeArray:
    """Pickles like numpy.uint8 array of shape (N, 3072)."""

    def __init__(self, raw):
        self.raw = raw

    def __reduce__(self):
        shape = (len(self.raw) // 3072, 3072)
        return _reconstruct, (_FakeArray, (0,), b"b"), (1, shape, _FakeDtype(), False, self.raw)


def numpy_style_dump(obj, path):
    blob = pickle.dumps(obj, protocol=2)
    for ours, numpy_name in (("_reconstruct", "numpy.core.multiarray\n_reconstruct"),
                             ("_FakeArray", "numpy\nndarray"), ("_FakeDtype", "numpy\ndtype")):
        blob = blob.replace(f"c{__name__}\n{ours}\n".encode(), f"c{numpy_name}\n".encode())
    assert __name__.encode() not in blob
    with open(path, "wb") as f:
        f.write(blob)


def make_batch(rng, labels, key, extra=()):
    raw = rng.getrandbits(8 * 3072 * len(labels)).to_bytes(3072 * len(labels), "little")
    d = {b"batch_label": b"fake", key: labels, b"data": _FakeArray(raw),
         b"filenames": [b"img_%d.png" % i for i in range(len(labels))]}
    d.update(extra)
    return d


def fake_cifar10(root, n_train=30, n_test=10, seed=0):
    """root/cifar-10-batches-py with 10 classes; returns {split: (raw, labels)} as the converter should see it."""
    rng, folder = random.Random(seed), os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    numpy_style_dump({b"label_names": [n.encode() for n in C10_NAMES], b"num_vis": 3072},
                     os.path.join(folder, "batches.meta"))
    train = [c for c in range(10) for _ in range(n_train)]
    rng.shuffle(train)
    truth = {"train": (b"", [])}
    for b in range(5):  # five batches, as in the download
        d = make_batch(rng, train[b::5], b"labels")
        numpy_style_dump(d, os.path.join(folder, f"data_batch_{b + 1}"))
        truth["train"] = (truth["train"][0] + d[b"data"].raw, truth["train"][1] + d[b"labels"])
    test = [c for c in range(10) for _ in range(n_test)]
    rng.shuffle(test)
    d = make_batch(rng, test, b"labels")
    numpy_style_dump(d, os.path.join(folder, "test_batch"))
    truth["test"] = (d[b"data"].raw, test)
    return truth


def fake_cifar100(folder, C=12, n_train=20, n_test=5, seed=1):
    """cifar-100-python with C classes; coarse labels differ from the fine ones so taking the wrong key fails."""
    rng = random.Random(seed)
    os.makedirs(folder)
    names = [b"class_%02d" % c for c in range(C)]
    numpy_style_dump({b"fine_label_names": names, b"coarse_label_names": [b"superclass"]},
                     os.path.join(folder, "meta"))
    truth = {}
    for split, n in (("train", n_train), ("test", n_test)):
        fine = [c for c in range(C) for _ in range(n)]
        rng.shuffle(fine)
        d = make_batch(rng, fine, b"fine_labels", {b"coarse_labels": [(y + 1) % C for y in fine]})
        numpy_style_dump(d, os.path.join(folder, split))
        truth[split] = (d[b"data"].raw, fine)
    return truth


# ----------------------------------------------------------------------------------------------------------------------

def planar_to_rgb(row):
    """The expected decoded pixels, written independently of the converter: R, G, B planes -> RGB triples."""
    return bytes(v for px in zip(row[:1024], row[1024:2048], row[2048:]) for v in px)


def read_list(path):
    with open(path) as f:
        return [(p, int(y)) for p, y in (line.split() for line in f)]


def check_list(out, list_name, split, truth, names):
    """Every line names an existing image whose pixels and label are those of its pickle row; returns the rows."""
    raw, labels = truth[split]
    rows = []
    for rel, y in read_list(os.path.join(out, list_name)):
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


# ----------------------------------------------------------------------------------------------------------------------

def test_ldam_counts_cifar10_r100():
    assert mcl.ldam_counts(10, 5000, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(mcl.ldam_counts(100, 500, 100)) == 10847  # CIFAR-100-LT r100 as in LDAM's paper
    assert mcl.ldam_counts(100, 500, 100)[-1] == 5


def test_cifar10_tree_lists_pixels_and_counts(tmp_path, capsys):
    truth = fake_cifar10(tmp_path / "dl")
    out = tmp_path / "c10"
    assert mcl.main(["--src", str(tmp_path / "dl"), "--out", str(out), "--imbalance", "10",
                     "--max-per-class", "30"]) == 0
    train = check_list(out, "CIFAR10_LT_r10_train.txt", "train", truth, C10_NAMES)
    test = check_list(out, "CIFAR10_test.txt", "test", truth, C10_NAMES)
    per_class = [sum(truth["train"][1][i] == c for i in train) for c in range(10)]
    assert per_class == [int(30 * 0.1 ** (c / 9)) for c in range(10)] == [30, 23, 17, 13, 10, 8, 6, 5, 3, 3]
    assert sorted(test) == list(range(100))  # the whole test set
    listed = {p for p, _ in read_list(out / "CIFAR10_LT_r10_train.txt") + read_list(out / "CIFAR10_test.txt")}
    assert files_under(out) == listed | {"CIFAR10_LT_r10_train.txt", "CIFAR10_test.txt"}  # kept images only
    assert sorted(os.listdir(tmp_path)) == ["c10", "dl"]  # no temporary folder left
    text = capsys.readouterr().out
    assert "10 classes, 118 train images (3 ... 30 per class), 100 test images" in text
    assert "many-shot (> 100): 0 classes, medium: 2, few-shot (< 20): 8" in text
    assert (f"python train.py --recipe cifar10_lt --data {out} --split {out}/CIFAR10_LT_r10_train.txt "
            f"--test-split {out}/CIFAR10_test.txt") in text


def test_cifar100_fine_labels_and_detection(tmp_path):
    folder = tmp_path / "cifar-100-python"
    truth = fake_cifar100(folder)
    names = ["class_%02d" % c for c in range(12)]
    out = tmp_path / "out"
    out.mkdir()  # an empty --out is fine
    rc, stdout, err = run(["--src", str(folder), "--out", str(out), "--imbalance", "5", "--max-per-class", "20"])
    assert (rc, err) == (0, ""), err
    train = check_list(out, "CIFAR100_LT_r5_train.txt", "train", truth, names)
    assert [sum(truth["train"][1][i] == c for i in train) for c in range(12)] == \
        [int(20 * 0.2 ** (c / 11)) for c in range(12)]
    assert sorted(check_list(out, "CIFAR100_test.txt", "test", truth, names)) == list(range(60))
    assert "--recipe cifar100_lt" in stdout


def test_seed_decides_the_selection(tmp_path):
    fake_cifar10(tmp_path / "dl")
    common = ["--src", str(tmp_path / "dl"), "--imbalance", "10", "--max-per-class", "30"]
    lists = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert mcl.main(common + ["--out", str(tmp_path / name), "--seed", str(seed)]) == 0
        lists.append(read_list(tmp_path / name / "CIFAR10_LT_r10_train.txt"))
    assert lists[0] == lists[1]
    assert lists[0] != lists[2]
    assert sorted(y for _, y in lists[0]) == sorted(y for _, y in lists[2])  # same counts, other images


def test_jpg_format(tmp_path):
    fake_cifar10(tmp_path / "dl", n_train=3, n_test=1)
    out = tmp_path / "j"
    assert mcl.main(["--src", str(tmp_path / "dl"), "--out", str(out), "--imbalance", "1", "--max-per-class", "2",
                     "--format", "jpg"]) == 0
    paths = [p for p, _ in read_list(out / "CIFAR10_LT_r1_train.txt")]
    assert len(paths) == 20 and all(p.endswith(".jpg") for p in paths)
    with Image.open(out / paths[0]) as im:
        assert (im.format, im.size) == ("JPEG", (32, 32))


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


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    fake_cifar10(tmp_path / "dl", n_train=3, n_test=1)
    calls = []

    def flaky(raw, i):
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


def _evil(dl):  # a pickle that would run a command: the restricted unpickler must refuse it
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {dl / 'pwned'}",)
    (dl / "cifar-10-batches-py" / "data_batch_2").write_bytes(pickle.dumps(Evil(), protocol=2))


def _cifar100_file(dl):  # CIFAR-100's layout under CIFAR-10's name: no b"labels"
    d = make_batch(random.Random(0), [0, 1], b"fine_labels")
    numpy_style_dump(d, dl / "cifar-10-batches-py" / "test_batch")


@pytest.mark.parametrize("case, args, blame", [
    ("missing src", ["--src", "{tmp}/nowhere"], "{tmp}/nowhere"),
    ("src without cifar", ["--src", "{tmp}"], "{tmp}"),
    ("wrong --dataset", ["--dataset", "cifar100"], "{tmp}/dl"),
    ("ratio < 1", ["--imbalance", "0.5"], "--imbalance"),
    ("too few images", ["--max-per-class", "31", "--imbalance", "2"], "{tmp}/dl/cifar-10-batches-py"),
    ("corrupt pickle", [_corrupt], "{tmp}/dl/cifar-10-batches-py/test_batch"),
    ("code in pickle", [_evil], "{tmp}/dl/cifar-10-batches-py/data_batch_2"),
    ("wrong pickle", [_cifar100_file], "{tmp}/dl/cifar-10-batches-py/test_batch"),
])
def test_user_errors_are_one_line(tmp_path, case, args, blame):
    fake_cifar10(tmp_path / "dl")
    for a in args:
        if callable(a):
            a(tmp_path / "dl")
    argv = ["--src", str(tmp_path / "dl"), "--out", str(tmp_path / "out"), "--max-per-class", "30"]
    argv += [a.format(tmp=tmp_path) for a in args if not callable(a)]
    rc, stdout, err = run(argv)
    assert (rc, stdout) == (2, ""), case
    assert err.count("\n") == 1 and err.startswith(f"error: {blame.format(tmp=tmp_path)}: "), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "dl" / "pwned").exists()


def test_bad_option_is_one_line():
    rc, stdout, err = run(["--src", "x", "--out", "y", "--imbalance", "lots"])
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and "--imbalance" in err


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_reads_real_numpy_pickles_without_numpy(tmp_path, protocol):
    np = pytest.importorskip("numpy")  # only to write them; the converter never imports it
    data = np.frombuffer(random.Random(protocol).randbytes(3 * 3072), dtype=np.uint8).reshape(3, 3072)
    (tmp_path / "b").write_bytes(pickle.dumps({b"data": data, b"labels": [2, 0, 1]}, protocol=protocol))
    assert mcl.read_batch(str(tmp_path / "b"), b"labels") == (data.tobytes(), [2, 0, 1])
    assert "numpy" not in vars(mcl)
