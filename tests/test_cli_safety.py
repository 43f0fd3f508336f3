"""The command line never loses the user's data and fails in one line.

For every subcommand: an output that is an input (or another output, or a file written
beside one) is refused before any work; an output location that cannot be written is
refused before any work; a failed run leaves no output; outputs get the user's umask;
every failure a user can cause is exit 1, one stderr line naming the flag, no traceback,
inputs byte-identical and no output left. Plus: resuming ``certify --model`` checks every
row, detector files are refused after any edit, and ``--help`` imports nothing heavy.
"""

import errno
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import act_cub_record, interrupt_after
from minrr.cli.main import main
from minrr.cli.outputs import Files, same_file
from minrr.io import atomic_paths, load_npy

HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH and not os.environ.get("CI"), reason="torch is not installed")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Tiny inputs of every command: codes, embeddings, a detector, an attack record, and
    (with torch) a model trained by minrr train on 40 random 12 x 12 images."""
    root = tmp_path_factory.mktemp("safety")
    rng = np.random.default_rng(0)
    np.save(root / "db.npy", rng.choice([-1, 1], size=(40, 16)).astype(np.int8))
    np.save(root / "q.npy", rng.choice([-1, 1], size=(5, 16)).astype(np.int8))
    labels = np.repeat(np.arange(3), 8)
    emb = np.eye(8)[labels] + 0.1 * rng.normal(size=(24, 8))
    np.save(root / "emb.npy", emb / np.linalg.norm(emb, axis=1, keepdims=True))
    np.save(root / "y.npy", labels)
    f = np.tanh(rng.normal(size=(60, 16)) * 2)
    np.savez(root / "benign.npz", f=f, f_t=np.tanh(np.arctanh(f) + 0.3 * rng.normal(size=f.shape)))
    assert main(["detect", "calibrate", "--benign", str(root / "benign.npz"), "--database", str(root / "db.npy"),
                 "--fpr", "0.1", "--top-k", "5", "--out", str(root / "det.json")]) == 0
    (root / "attacks.json").write_text(json.dumps(act_cub_record()))
    if HAS_TORCH:
        images = rng.random((40, 1, 12, 12)).astype(np.float32)
        np.savez(root / "train.npz", images=images, labels=np.repeat(np.arange(4), 10))
        np.savez(root / "test.npz", images=images[::5] * 0.9, labels=np.repeat(np.arange(4), 2))
        assert main(["train", "--task", "dml", "--data", str(root / "train.npz"), "--test-data",
                     str(root / "test.npz"), "--out", str(root / "m.pt"), "--width", "2", "--dim", "4",
                     "--epochs", "1", "--batch-size", "20", "--per-class", "2", "--device", "cpu"]) == 0
    return root


def _certify_files(w):
    return ["certify", "--embeddings", str(w / "emb.npy"), "--labels", str(w / "y.npy"), "--sigma", "0.5",
            "--samples", "1000", "--norm-bound", "1"]


def _certify_model(w):
    return ["certify", "--model", str(w / "m.pt"), "--sigma", "0.25", "--samples", "16", "--batch-size", "16",
            "--device", "cpu"]


def _search(w):
    return ["search", "--database", str(w / "db.npy"), "--queries", str(w / "q.npy"), "--top-k", "3"]


def _snapshot(*folders):
    return {p: p.read_bytes() for folder in folders for p in Path(folder).iterdir() if p.is_file()}


def assert_refused(argv, pattern, capsys, *folders):
    """Exit 1, one stderr line matching ``pattern``, no traceback; every file of ``folders``
    byte-identical afterwards, and no file added (no output, no temporary)."""
    before = _snapshot(*folders)
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 1, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err
    assert _snapshot(*folders) == before


# -- an output is never an input, another output, or a file written beside one ------------

SAME_FILE = {
    "search --out = --database": (lambda w, t: _search(w) + ["--out", w / "db.npy"], "--out: .*--database"),
    "search --out is a symlink to --queries": (
        lambda w, t: _search(w) + ["--out", _link(w / "q.npy", t / "l.npy", os.symlink)], "--out: .*--queries"),
    "search --out is a hard link to --database": (
        lambda w, t: _search(w) + ["--out", _link(w / "db.npy", t / "h.npy", os.link)], "--out: .*--database"),
    "search --out = --database via ..": (
        lambda w, t: _search(w) + ["--out", w / ".." / w.name / "db.npy"], "--out: .*--database"),
    "certify --out = --embeddings": (lambda w, t: _certify_files(w) + ["--out", w / "emb.npy"],
                                     "--out: .*--embeddings"),
    "certify --json = --labels": (lambda w, t: _certify_files(w) + ["--json", w / "y.npy"], "--json: .*--labels"),
    "certify --out = --json": (lambda w, t: _certify_files(w) + ["--out", t / "x", "--json", t / "x"],
                               "--json: .*also --out"),
    "certify --plot = --out": (lambda w, t: _certify_files(w) + ["--out", t / "x.png", "--plot", t / "x.png"],
                               "--plot: .*also --out"),
    "detect calibrate --out = --benign": (
        lambda w, t: ["detect", "calibrate", "--benign", w / "benign.npz", "--database", w / "db.npy",
                      "--out", w / "benign.npz"], "--out: .*--benign"),
    "detect score --out = --detector": (
        lambda w, t: ["detect", "score", "--detector", w / "det.json", "--inputs", w / "benign.npz",
                      "--out", w / "det.json"], "--out: .*--detector"),
    "detect score --out = the detector's database": (
        lambda w, t: ["detect", "score", "--detector", w / "det.json", "--inputs", w / "benign.npz",
                      "--out", w / "db.npy"], "--out: .*--detector's database"),
    "score --json = --attacks": (lambda w, t: ["score", "--attacks", w / "attacks.json", "--json",
                                               w / "attacks.json"], "--json: .*--attacks"),
}
MODEL_SAME_FILE = {
    "certify --model --out = --model": (lambda w, t: _certify_model(w) + ["--out", w / "m.pt"], "--out: .*--model"),
    "certify --model --out = its model card": (lambda w, t: _certify_model(w) + ["--out", w / "m.json"],
                                               "--out: .*--model"),
    "certify --model --json = the partial file": (
        lambda w, t: _certify_model(w) + ["--out", t / "r.tsv", "--json", t / "r.tsv.partial"],
        "--json: .*partial result written beside --out"),
    "embed --out = --data": (lambda w, t: ["embed", "--model", w / "m.pt", "--data", w / "test.npz",
                                           "--out", w / "test.npz"], "--out: .*--data"),
    "embed --labels-out = --out": (lambda w, t: ["embed", "--model", w / "m.pt", "--data", w / "test.npz",
                                                 "--out", t / "e.npy", "--labels-out", t / "e.npy"],
                                   "--labels-out: .*also --out"),
    "train --out = --data": (lambda w, t: ["train", "--task", "dml", "--data", w / "train.npz", "--out",
                                           w / "train.npz"], "--out: .*--data"),
    "train: the model card of --out = --test-data": (
        lambda w, t: ["train", "--task", "dml", "--data", w / "train.npz", "--test-data", _copy(w / "test.npz",
                      t / "c.json"), "--out", t / "c.pt"], "--out: .*c.json is the input file of --test-data"),
}


def _link(target, path, how):
    if not path.exists():
        how(target, path)
    return path


def _copy(source, path):
    path.write_bytes(source.read_bytes())
    return path


@pytest.mark.parametrize("case", SAME_FILE)
def test_an_output_that_is_an_input_or_another_output_is_refused(work, tmp_path, capsys, case):
    build, pattern = SAME_FILE[case]
    assert_refused(build(work, tmp_path), pattern, capsys, work, tmp_path)


@needs_torch
@pytest.mark.parametrize("case", MODEL_SAME_FILE)
def test_model_commands_refuse_an_output_that_is_an_input(work, tmp_path, capsys, case):
    build, pattern = MODEL_SAME_FILE[case]
    assert_refused(build(work, tmp_path), pattern, capsys, work, tmp_path)


@needs_torch
def test_train_never_replaces_a_json_that_is_not_a_model_card(work, tmp_path, capsys):
    (tmp_path / "detector.json").write_text('{"format": "minrr-detector"}\n')
    argv = ["train", "--task", "dml", "--data", work / "train.npz", "--out", tmp_path / "detector.pt"]
    assert_refused(argv, "--out: its model card would replace .*detector.json, which is not a minrr model card",
                   capsys, work, tmp_path)
    # the card of an earlier run is replaced, as its weights are
    (tmp_path / "m.pt").write_bytes((work / "m.pt").read_bytes())
    (tmp_path / "m.json").write_bytes((work / "m.json").read_bytes())
    assert main(["train", "--task", "dml", "--data", str(work / "train.npz"), "--out", str(tmp_path / "m.pt"),
                 "--width", "2", "--dim", "4", "--epochs", "1", "--batch-size", "20", "--seed", "1"]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["training"]["seed"] == 1


# -- output locations are checked before any work ------------------------------------------

def _fifo(t):
    os.mkfifo(t / "fifo")
    return t / "fifo"


UNWRITABLE = {
    "missing folder": (lambda t: t / "no" / "r.tsv", "the folder of .* does not exist"),
    "a folder": (lambda t: (t / "d").mkdir() or t / "d", "is a folder; expected a file path"),
    "a trailing slash": (lambda t: f"{t}/new/", "names a folder; expected a file path"),
    "a dangling symlink": (lambda t: _link(t / "gone", t / "dangling", os.symlink),
                           "symbolic link to a missing file"),
    "not a regular file": (_fifo, "exists and is not a regular file"),
}


@pytest.mark.parametrize("case", UNWRITABLE)
@pytest.mark.parametrize("flag", ["--out", "--json", "--plot"])
def test_certify_checks_every_output_location_first(work, tmp_path, capsys, case, flag):
    """e.g. ``certify --out r.tsv --json dir/`` leaves no r.tsv."""
    make, pattern = UNWRITABLE[case]
    others = [f for f in ("--out", "--json") if f != flag]
    argv = _certify_files(work) + [flag, make(tmp_path)] + [a for f in others for a in (f, tmp_path / f"ok{f[2:]}")]
    assert_refused(argv, f"{flag}: .*{pattern}", capsys, work, tmp_path)


@pytest.mark.parametrize("command", ["search", "score", "detect calibrate", "detect score"])
def test_other_commands_check_their_output_location_first(work, tmp_path, capsys, command):
    argv = {"search": _search(work) + ["--out"],
            "score": ["score", "--attacks", work / "attacks.json", "--json"],
            "detect calibrate": ["detect", "calibrate", "--benign", work / "benign.npz", "--database",
                                 work / "db.npy", "--out"],
            "detect score": ["detect", "score", "--detector", work / "det.json", "--inputs", work / "benign.npz",
                             "--out"]}[command]
    (tmp_path / "d").mkdir()
    assert_refused(argv + [tmp_path / "d"], "is a folder", capsys, work, tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes everywhere")
def test_an_unwritable_folder_is_refused(work, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert_refused(_search(work) + ["--out", folder / "r.npz"], "--out: cannot write to the folder", capsys,
                       work, folder)
    finally:
        folder.chmod(0o700)


# -- all or nothing, with the user's umask ---------------------------------------------------

def test_a_failure_while_writing_leaves_none_of_the_outputs(work, tmp_path, capsys, monkeypatch):
    real = Path.write_text

    def disk_full(self, *args, **kwargs):
        if self.name.startswith(".s.json."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full)
    argv = _certify_files(work) + ["--out", tmp_path / "r.tsv", "--json", tmp_path / "s.json"]
    assert_refused(argv, r"--json .*s.json: No space left on device", capsys, work, tmp_path)


def test_atomic_paths_is_all_or_nothing(tmp_path, monkeypatch):
    old = tmp_path / "a.txt"
    old.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_paths(old, tmp_path / "b.txt") as (a, b):
            a.write_text("new")
            raise RuntimeError
    assert old.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    real, calls = os.replace, []

    def second_rename_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EXDEV, "cross-device link")
        real(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OSError):
        with atomic_paths(tmp_path / "c.txt", tmp_path / "d.txt") as (c, d):
            c.write_text("c")
            d.write_text("d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # c.txt, renamed first, was taken back


def test_outputs_get_the_permissions_of_the_umask(work, tmp_path):
    previous = os.umask(0o027)
    try:
        assert main([str(a) for a in _search(work) + ["--out", tmp_path / "r.npz"]]) == 0
        assert main([str(a) for a in _certify_files(work) + ["--out", tmp_path / "r.tsv", "--json",
                                                             tmp_path / "s.json"]]) == 0
        with atomic_paths(tmp_path / "a.txt") as (a,):
            a.write_text("x")
    finally:
        os.umask(previous)
    for name in ("r.npz", "r.tsv", "s.json", "a.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name
    if HAS_TORCH:  # written by minrr train under the umask of the test run
        for name in ("m.pt", "m.json"):
            assert (work / name).stat().st_mode & 0o777 == 0o666 & ~previous, name


def test_same_file(tmp_path):
    (tmp_path / "a").write_text("a")
    os.link(tmp_path / "a", tmp_path / "b")
    os.symlink(tmp_path / "a", tmp_path / "c")
    (tmp_path / "d").mkdir()
    assert same_file(tmp_path / "a", tmp_path / "b") and same_file(tmp_path / "c", tmp_path / "a")
    assert same_file(tmp_path / "d" / ".." / "new", tmp_path / "new")  # neither exists
    assert not same_file(tmp_path / "a", tmp_path / "new")
    files = Files()
    files.input("--in", tmp_path / "a")
    files.output("--out", tmp_path / "new", beside={"card": tmp_path / "b"})
    with pytest.raises(ValueError, match="--out: .*b is the input file of --in"):
        files.check()


# -- one line, exit 1, no traceback, naming the flag ----------------------------------------

def _npy_with_header(path, shape):
    header = f"{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}"
    header = header + " " * (118 - len(header)) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + bytes(64))
    return path


FAILURES = {
    "deeply nested JSON": (lambda w, t: ["score", "--attacks", _text(t / "deep.json", "[" * 100_000)],
                           "--attacks: .*deep.json: JSON nested too deeply"),
    "/dev/zero as JSON": (lambda w, t: ["score", "--attacks", "/dev/zero"], "--attacks: /dev/zero: larger than"),
    "/dev/zero as .npy": (lambda w, t: _search(w) + ["--database", "/dev/zero"],
                          "--database: /dev/zero is not a regular file"),
    "invalid UTF-8 JSON": (lambda w, t: ["score", "--attacks", _bytes(t / "bad.json", b'{"a": "\xff"}')],
                           "--attacks: .*bad.json: not a UTF-8 text file"),
    "a folder as JSON": (lambda w, t: ["score", "--attacks", t], "--attacks: .*is a folder"),
    "a number too large": (
        lambda w, t: ["score", "--attacks", _text(t / "big.json", json.dumps({**act_cub_record(), "benign_r1": 0})
                                                  .replace('"benign_r1": 0', '"benign_r1": 1' + "0" * 400))],
        "--attacks: .*big.json: int too large to convert to float"),
    "negative .npy shape": (lambda w, t: _search(w) + ["--queries", _npy_with_header(t / "neg.npy", (-1, 16))],
                            r"--queries: .*damaged header \(shape \(-1, 16\)\)"),
    "overflowing .npy shape": (
        lambda w, t: _search(w) + ["--database", _npy_with_header(t / "huge.npy", (2 ** 62, 2 ** 62))],
        "--database: .*truncated"),
    "absurd shape in an .npz": (
        lambda w, t: ["detect", "calibrate", "--benign", _absurd_npz(t / "a.npz"), "--database", w / "db.npy",
                      "--out", t / "d.json"], "--benign: .*a.npz array 'f' is truncated"),
    "empty --database": (lambda w, t: _search(w) + ["--database", _npy(t / "e.npy", np.zeros((0, 16), np.int8))],
                         "--database: .*holds no codes"),
    "empty --database of detect calibrate": (
        lambda w, t: ["detect", "calibrate", "--benign", w / "benign.npz", "--database",
                      _npy(t / "e.npy", np.zeros((0, 16), np.int8)), "--out", t / "d.json"],
        "--database: .*holds no codes"),
    "--top-k above the non-relevant gallery": (
        lambda w, t: _certify_files(w) + ["--top-k", "17"],
        r"--top-k: expected at most 16, the fewest non-relevant gallery items"),
    "disk full while writing": (lambda w, t: _search(w) + ["--out", t / "r.npz"], "--out: No space left on device"),
    "permission denied reading an input": (lambda w, t: _search(w), r"--queries .*q.npy: Permission denied"),
}


def _absurd_npz(path):
    import zipfile

    _npy_with_header(path.with_suffix(".npy"), (2 ** 40, 16))
    with zipfile.ZipFile(path, "w") as archive:
        archive.write(path.with_suffix(".npy"), "f.npy")
        archive.write(path.with_suffix(".npy"), "f_t.npy")
    path.with_suffix(".npy").unlink()
    return path


def _text(path, text):
    path.write_text(text)
    return path


def _bytes(path, data):
    path.write_bytes(data)
    return path


def _npy(path, arr):
    np.save(path, arr)
    return path


@pytest.mark.parametrize("case", FAILURES)
def test_failures_are_one_line_naming_the_flag(work, tmp_path, capsys, monkeypatch, case):
    build, pattern = FAILURES[case]
    argv = build(work, tmp_path)
    if case == "disk full while writing":
        def no_space(file, **arrays):  # as a write through a file object fails: no file name
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(np, "savez", no_space)
    if case == "permission denied reading an input":
        real = np.load

        def denied(path, *args, **kwargs):
            if Path(path).name == "q.npy":
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(np, "load", denied)
    assert_refused(argv, pattern, capsys, work, tmp_path)


def test_load_npy_refuses_impossible_headers_before_reading(tmp_path):
    for shape in [(-1,), (3, -2), (2 ** 62, 2 ** 62), (10 ** 30,)]:
        with pytest.raises(ValueError, match="--x: .*(damaged header|truncated)"):
            load_npy(_npy_with_header(tmp_path / "x.npy", shape), name="--x")


def test_ctrl_c_during_start_up_is_one_line_and_130(monkeypatch, capsys):
    import minrr.cli.main as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["search", "--help"]) == 130
    assert capsys.readouterr().err == "minrr: interrupted\n"


@needs_torch
def test_model_failures_are_one_line_naming_the_flag(work, tmp_path, capsys):
    def model_copy(stem, edit_card=None, weights=None):
        path = tmp_path / f"{stem}.pt"
        path.write_bytes((work / "m.pt").read_bytes() if weights is None else weights)
        card = json.loads((work / "m.json").read_text())
        if weights is not None:
            import hashlib

            card["weights"]["sha256"] = hashlib.sha256(weights).hexdigest()
        if edit_card:
            edit_card(card)
        path.with_suffix(".json").write_text(json.dumps(card))
        return path

    embed = ["embed", "--data", work / "test.npz", "--out", tmp_path / "e.npy", "--model"]
    cases = [
        (embed + [model_copy("a", lambda c: c["embedding"].pop("norm_bound"))],
         "--model: .*lacks embedding.norm_bound"),
        (embed + [model_copy("b", lambda c: c["input"].update(shape=[1, -3, 12]))], "--model: .*bad input.shape"),
        (embed + [model_copy("f", lambda c: c["input"].update(shape=[1, 1, 1]))],
         r"--model: the input shape \[1, 1, 1\] of its model card .*f.json does not fit its network"),
        (embed + [model_copy("c", lambda c: c["embedding"].update(norm_bound=10 ** 400))],
         "--model: .*bad embedding.norm_bound"),
        (embed + [model_copy("d", weights=b"")], "--model: .*d.pt is not a state_dict of tensors"),
        (embed + [_invalid_utf8_card(model_copy("e"))], "--model: .*e.json: not a UTF-8 text file"),
        (["train", "--task", "dml", "--data", _npz_images(tmp_path / "tiny.npz", 1), "--out", tmp_path / "t.pt",
          "--width", "2"], "--data: images of 1 x 1 pixels are too small for small-cnn"),
        (["train", "--task", "dml", "--data", work / "train.npz", "--out", tmp_path / "t.pt", "--lr", "-1"],
         "--lr: expected a finite number above 0"),
        (["train", "--task", "dml", "--data", work / "train.npz", "--out", tmp_path / "t.pt", "--seed", "-1"],
         "--seed: expected a whole number >= 0"),
        (_certify_model(work) + ["--seed", "-1"], "--seed: expected a whole number >= 0"),
        (_certify_model(work) + ["--top-k", "40"], "--top-k: expected at most 30"),
        (_certify_model(work) + ["--sigma", "1e308"], "--sigma: expected a noise level .* at most 1e30"),
    ]
    for argv, pattern in cases:
        assert_refused(argv, pattern, capsys, work, tmp_path)


def _invalid_utf8_card(weights):
    weights.with_suffix(".json").write_bytes(b'{"format": "\xff"}')
    return weights


def _npz_images(path, size):
    np.savez(path, images=np.zeros((8, 1, size, size), np.float32), labels=np.repeat([0, 1], 4))
    return path


# -- resuming certify --model: every row checked, the partial file kept ---------------------

def _edit_row(k, column, value):
    def edit(lines, full):
        header = lines[1].split("\t")
        row = lines[2 + k].split("\t")
        row[header.index(column)] = value
        lines[2 + k] = "\t".join(row)
        return lines
    return edit


def _flipped(lines):
    header, row = lines[1].split("\t"), lines[2].split("\t")
    return "0" if row[header.index("correct")] == "1" else "1"


DAMAGED = {
    "a malformed row": lambda lines, full: lines + ["garbage"],
    "a forged label": _edit_row(1, "label", "3"),  # query 1 has label 0
    "an idx out of sequence": _edit_row(1, "idx", "2"),
    "a radius that is no number": _edit_row(0, "radius", "abc"),
    "a negative radius": _edit_row(0, "radius", "-1"),
    "correct against its margin": lambda lines, full: _edit_row(0, "correct", _flipped(lines))(lines, full),
    "another sigma": _edit_row(0, "sigma", "0.5"),
    "a damaged settings line": lambda lines, full: ["# minrr certify --model settings: {"] + lines[1:],
    "a row past the data": lambda lines, full: lines[:2] + full + [f"{len(full)}\t" + full[-1].split("\t", 1)[1]],
}


@needs_torch
def test_a_damaged_partial_file_is_refused_and_kept(work, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.tsv"
    argv = _certify_model(work) + ["--out", out]
    with monkeypatch.context() as patch:
        interrupt_after(patch, 2)
        assert main([str(a) for a in argv]) == 130
    partial = tmp_path / "r.tsv.partial"
    good = partial.read_text().splitlines()
    assert len(good) == 4
    assert main([str(a) for a in _certify_model(work) + ["--out", tmp_path / "full.tsv"]]) == 0
    full = (tmp_path / "full.tsv").read_text().splitlines()[1:]
    for case, edit in DAMAGED.items():
        lines = edit(list(good), full)
        partial.write_text("\n".join(lines) + "\n")
        assert_refused(argv, rf"--out: .*r.tsv.partial.*(damaged|not of this run|rows, but this run has only 8)",
                       capsys, work, tmp_path)
    partial.write_text("\n".join(good) + "\n")
    assert main([str(a) for a in argv]) == 0 and not partial.exists()
    assert [r.split("\t")[:-1] for r in out.read_text().splitlines()[1:]] == [r.split("\t")[:-1] for r in full]


@needs_torch
def test_the_partial_file_is_kept_until_the_final_file_is_in_place(work, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.tsv"
    argv = _certify_model(work) + ["--out", out, "--json", tmp_path / "s.json"]
    with monkeypatch.context() as patch:
        interrupt_after(patch, 2)
        assert main([str(a) for a in argv]) == 130
    real = Path.write_text

    def disk_full(self, *args, **kwargs):
        if self.name.startswith(".s.json."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full)
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "s.json").exists()
    assert len((tmp_path / "r.tsv.partial").read_text().splitlines()) == 2 + 8  # every row kept for a rerun


# -- detector files are refused after any edit ----------------------------------------------

@pytest.mark.parametrize("edit", [
    lambda d: d.update(top_k=d["top_k"] + 1),
    lambda d: d.update(c3="hard"),
    lambda d: d.update(fpr=d["fpr"] + 0.001),
    lambda d: d["benign_scores"]["c2"].__setitem__(0, d["benign_scores"]["c2"][0] + 1e-9),
    lambda d: d.pop("fingerprint"),
], ids=["top_k", "c3", "fpr", "one benign score", "no fingerprint"])
def test_an_edited_detector_is_refused(work, tmp_path, capsys, edit):
    doc = json.loads((work / "det.json").read_text())
    edit(doc)
    (tmp_path / "det.json").write_text(json.dumps(doc))
    argv = ["detect", "score", "--detector", tmp_path / "det.json", "--inputs", work / "benign.npz",
            "--out", tmp_path / "flags.tsv"]
    assert_refused(argv, "--detector: .*(fingerprint|do not follow)", capsys, work, tmp_path)


# -- conventions and start-up ---------------------------------------------------------------

def test_the_parser_imports_nothing_heavy():
    code = ("import sys\nfrom minrr.cli.main import build_parser\nbuild_parser()\n"
            "print(' '.join(sorted(m for m in sys.modules if m in ('numba', 'scipy.stats', 'scipy.special', 'torch',"
            " 'matplotlib', 'sklearn', 'faiss'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_search_k_is_an_alias_of_top_k(work, tmp_path):
    argv = ["search", "--database", str(work / "db.npy"), "--queries", str(work / "q.npy")]
    assert main(argv + ["--k", "3", "--out", str(tmp_path / "a.npz")]) == 0
    assert main(argv + ["--top-k", "3", "--out", str(tmp_path / "b.npz")]) == 0
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        np.testing.assert_array_equal(a["indices"], b["indices"])


def test_non_relevant_counts_match_the_relevance_matrix():
    from minrr.labels import check_top_k, non_relevant_counts, relevance

    rng = np.random.default_rng(1)
    for q, g in [(rng.integers(0, 5, 50), rng.integers(0, 4, 70)),
                 (rng.random((50, 6)) < 0.3, rng.random((70, 6)) < 0.3)]:
        np.testing.assert_array_equal(non_relevant_counts(q, g, chunk=7), (~relevance(q, g)).sum(axis=1))
    q, g = np.array([0, 1]), np.array([0, 0, 0, 1, 2])
    assert check_top_k(2, q, g) == 2  # query 0 has 2 non-relevant items, query 1 has 4
    with pytest.raises(ValueError, match="k: expected at most 2, .*query 0 has 2"):
        check_top_k(3, q, g)


def test_a_missing_optional_framework_is_one_line(tmp_path):
    code = ("import sys\nsys.modules['torch'] = None  # as if torch were not installed\n"
            "from minrr.cli.main import main\n"
            f"sys.exit(main(['train', '--task', 'dml', '--out', {str(tmp_path / 'm.pt')!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr == "minrr train: error: this needs torch, which is not installed (pip install 'minrr[torch]')\n"
    assert list(tmp_path.iterdir()) == []
