"""Tests of data_lists/make_lt_split.py (stdlib only; a few seconds)."""

import importlib.util
import os
import re
import struct
import subprocess
import sys
import zlib

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
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


def read_list(path):
    rows = [line.split() for line in open(path)]
    assert all(len(r) == 2 for r in rows), path
    return [(p, int(y)) for p, y in rows]


def per_class(rows):
    counts = {}
    for _, y in rows:
        counts[y] = counts.get(y, 0) + 1
    return counts


def cli(*args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=60)


def one_error_line(res):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


SIZES = {"ant": 130, "bee": 115, "cat": 120, "dog": 112, "eel": 110, "fox": 140}  # >= 20 + 50 + 40 each


def test_default_run_holds_out_balanced_disjoint_val_and_test(tmp_path, capsys):
    tree = make_tree(tmp_path / "tree", SIZES)
    prefix = str(tmp_path / "My_LT")
    assert load_module().main(["--root", str(tree), "--prefix", prefix, "--max", "40", "--min", "2"]) == 0
    lists = {s: read_list(f"{prefix}_{s}.txt") for s in ("train", "val", "test")}
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
    assert per_class(read_list(tmp_path / "d_test.txt")) == {k: 3 for k in range(len(SIZES))}


@pytest.mark.parametrize("args, flag", [
    (["--max", "0"], "--max"),
    (["--min", "0"], "--min"),
    (["--min", "10", "--max", "5"], "--min"),
    (["--imbalance", "0.5"], "--imbalance"),
    (["--imbalance", "nan"], "--imbalance"),
    (["--imbalance", "1000", "--max", "500"], "--imbalance"),
    (["--imbalance", "10", "--min", "3"], "--imbalance"),
    (["--alpha", "0", "--profile", "pareto"], "--alpha"),
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


def test_missing_or_unusable_input_exits_2_naming_it(tmp_path):
    missing = tmp_path / "no_such_tree"
    assert str(missing) in one_error_line(cli("--root", missing, "--prefix", tmp_path / "X"))
    tree = make_tree(tmp_path / "tree", {"a": 80, "b": 80})
    out_dir = tmp_path / "no_such_dir"
    assert str(out_dir) in one_error_line(cli("--root", tree, "--prefix", out_dir / "X"))
    small = make_tree(tmp_path / "small", {"a": 80, "b": 30, "c": 10})
    line = one_error_line(cli("--root", small, "--prefix", tmp_path / "X"))  # defaults need 71 per class
    assert str(small) in line and "2 of 3 classes" in line and "b (30)" in line and "c (10)" in line
    spaced = make_tree(tmp_path / "spaced", {"a": 80, "b c": 80})
    assert "'b c'" in one_error_line(cli("--root", spaced, "--prefix", tmp_path / "X"))
    assert not [f for f in os.listdir(tmp_path) if f.startswith("X")]


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
    train = per_class(read_list(tmp_path / "S_train.txt"))
    assert count == sum(1 for i, c in enumerate(sorted(sizes)) if c.startswith("c")) == n_short
    assert all(train[i] == 4 for i, c in enumerate(sorted(sizes)) if c.startswith("c"))  # keeps what it has


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
    assert per_class(read_list(tmp_path / "O_test.txt")) == {k: 50 for k in range(len(SIZES))}
    assert (tmp_path / "O_train.txt").read_text() != before  # another seed, rewritten
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert os.stat(tmp_path / "O_train.txt").st_mode & 0o777 == 0o666 & ~current_umask()


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
