"""``minrr certify`` end to end, and every bad input: one line, exit 1, no output file."""

import json
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

from minrr.certify import certify
from minrr.cli.main import main
from minrr.cli.certify import TSV_COLUMNS


@pytest.fixture
def files(tmp_path):
    """Unit-norm noisy samples of 12 queries in 3 classes, and an exact gallery."""
    rng = np.random.default_rng(0)
    centers = np.linalg.qr(rng.normal(size=(5, 5)))[0][:3]
    labels = np.repeat(np.arange(3), 4)
    samples = centers[labels][:, None, :] + 0.15 * rng.normal(size=(12, 300, 5))
    samples /= np.linalg.norm(samples, axis=2, keepdims=True)
    paths = {
        "emb": tmp_path / "emb.npy", "labels": tmp_path / "y.npy",
        "gallery": tmp_path / "g.npy", "glabels": tmp_path / "gy.npy",
    }
    np.save(paths["emb"], samples.astype(np.float32))
    np.save(paths["labels"], labels)
    np.save(paths["gallery"], centers)
    np.save(paths["glabels"], np.arange(3))
    return paths


def _read_tsv(path):
    lines = path.read_text().splitlines()
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]


def test_certify_files_against_exact_gallery(files, tmp_path, capsys):
    out, summary = tmp_path / "r.tsv", tmp_path / "s.json"
    code = main(["certify", "--embeddings", str(files["emb"]), "--labels", str(files["labels"]),
                 "--gallery", str(files["gallery"]), "--gallery-labels", str(files["glabels"]),
                 "--sigma", "0.5", "--out", str(out), "--json", str(summary)])
    assert code == 0
    header, rows = _read_tsv(out)
    assert tuple(header) == TSV_COLUMNS and len(rows) == 12
    expected = certify(np.load(files["emb"]), np.load(files["labels"]), sigma=0.5,
                       gallery=np.load(files["gallery"]), gallery_labels=np.arange(3))
    np.testing.assert_allclose([float(r[6]) for r in rows], expected.radius, rtol=1e-5)
    assert [r[1] for r in rows] == [str(v) for v in np.load(files["labels"])]
    assert {r[7] for r in rows} == {"empirical-bernstein"} and {r[10] for r in rows} == {"300"}
    data = json.loads(summary.read_text())
    run = data["runs"][0]
    assert run["settings"]["gallery"] == "exact" and run["queries"] == 12
    assert run["certified_recall"][0]["recall"] == pytest.approx(expected.certified.mean())
    assert "certified Recall@1" in capsys.readouterr().out


def test_certify_leave_one_out_means_and_top_k(files, tmp_path):
    means = tmp_path / "means.npy"
    np.save(means, np.load(files["emb"]).mean(axis=1))
    out = tmp_path / "r.tsv"
    code = main(["certify", "--embeddings", str(means), "--labels", str(files["labels"]), "--sigma", "0.25",
                 "--samples", "300", "--norm-bound", "1", "--top-k", "2", "--bound", "bernstein",
                 "--radius-form", "linear", "--out", str(out)])
    assert code == 0
    _, rows = _read_tsv(out)
    assert len(rows) == 12 and {r[7] for r in rows} == {"bernstein"}


def test_multilabel_labels_are_written_as_class_lists(files, tmp_path):
    multi = np.zeros((12, 4), int)
    multi[np.arange(12), np.repeat(np.arange(3), 4)] = 1
    multi[:, 3] = np.arange(12) % 2
    np.save(files["labels"], multi)
    out = tmp_path / "r.tsv"
    assert main(["certify", "--embeddings", str(files["emb"]), "--labels", str(files["labels"]),
                 "--sigma", "0.5", "--out", str(out)]) == 0
    _, rows = _read_tsv(out)
    assert rows[1][1] == "0,3" and rows[0][1] == "0"


def test_bundled_default_runs_on_real_images(tmp_path, capsys):
    out, summary, plot = tmp_path / "r.tsv", tmp_path / "s.json", tmp_path / "c.png"
    code = main(["certify", "--sigma", "0.25", "--samples", "300", "--out", str(out), "--json", str(summary),
                 "--plot", str(plot)])
    assert code == 0
    captured = capsys.readouterr()
    assert "bundled default" in captured.err and "bundled default" in captured.out
    _, rows = _read_tsv(out)
    assert len(rows) == 1000
    run = json.loads(summary.read_text())["runs"][0]
    assert 0.6 < run["clean_recall"] < 0.95  # an LDA embedding of Fashion-MNIST
    assert 0 < run["certified_recall"][0]["recall"] <= run["clean_recall"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _bad(tmp_path, name, writer):
    path = tmp_path / name
    writer(path)
    return str(path)


def _cases(files, tmp_path):
    emb, y, g, gy = (str(files[k]) for k in ("emb", "labels", "gallery", "glabels"))
    base = ["--embeddings", emb, "--labels", y, "--sigma", "0.5"]
    (tmp_path / "y.txt").write_text("0 1 2\n")
    pickled = _bad(tmp_path, "pickled.npy", lambda p: np.save(p, np.array([{"a": 1}], dtype=object)))
    truncated = _bad(tmp_path, "trunc.npy", lambda p: p.write_bytes(files["emb"].read_bytes()[:500]))
    as_pickle = _bad(tmp_path, "real.pkl", lambda p: p.write_bytes(pickle.dumps([1, 2])))
    nan = np.load(files["emb"])
    nan[3, 4, 1] = np.nan
    inf = np.load(files["emb"])
    inf[0, 0, 0] = np.inf
    return {
        "missing file": (["--embeddings", str(tmp_path / "nope.npy"), "--labels", y, "--sigma", "1"], "--embeddings: file not found"),
        "pickled npy": (["--embeddings", pickled, "--labels", y, "--sigma", "1"], "--embeddings: .* pickled"),
        "raw pickle": (["--embeddings", as_pickle, "--labels", y, "--sigma", "1"], "--embeddings: .* pickled Python object"),
        "not npy": (["--embeddings", y.replace("y.npy", "y.txt"), "--labels", y, "--sigma", "1"], "--embeddings: .* not a .npy file"),
        "truncated npy": (["--embeddings", truncated, "--labels", y, "--sigma", "1"], "--embeddings: .*truncated"),
        "wrong ndim": (["--embeddings", y, "--labels", y, "--sigma", "1"], r"--embeddings: expected \(N, dim\)"),
        "wrong dtype": (["--embeddings", _bad(tmp_path, "s.npy", lambda p: np.save(p, np.array([["a", "b"]]))),
                         "--labels", y, "--sigma", "1"], "--embeddings: expected a real numeric array"),
        "complex": (["--embeddings", _bad(tmp_path, "c.npy", lambda p: np.save(p, np.ones((12, 3), complex))),
                     "--labels", y, "--sigma", "1", "--samples", "9"], "--embeddings: expected a real numeric"),
        "nan": (["--embeddings", _bad(tmp_path, "nan.npy", lambda p: np.save(p, nan)), "--labels", y, "--sigma", "1"],
                "--embeddings: contains NaN"),
        "inf": (["--embeddings", _bad(tmp_path, "inf.npy", lambda p: np.save(p, inf)), "--labels", y, "--sigma", "1"],
                "--embeddings: contains NaN or inf"),
        "label count": (["--embeddings", emb, "--labels", _bad(tmp_path, "y5.npy", lambda p: np.save(p, np.arange(5))),
                         "--sigma", "1"], "--labels: 5 labels for 12 items"),
        "float labels": (["--embeddings", emb, "--labels", _bad(tmp_path, "yf.npy", lambda p: np.save(p, np.full(12, 0.5))),
                          "--sigma", "1"], "--labels: labels must be integers"),
        "alpha": (base + ["--alpha", "1"], "--alpha: expected a number strictly between 0 and 1"),
        "alpha zero": (base + ["--alpha", "0"], "--alpha: expected a number strictly between 0 and 1"),
        "sigma": (["--embeddings", emb, "--labels", y, "--sigma", "-0.1"], "--sigma: expected a finite number above 0"),
        "norm above bound": (base + ["--norm-bound", "0.5"], "--norm-bound: an embedding has norm"),
        "norm bound needed": (["--embeddings", _bad(tmp_path, "half.npy", lambda p: np.save(p, 0.5 * np.load(files["emb"]))),
                               "--labels", y, "--sigma", "1"], "--norm-bound: required unless"),
        "means need samples": (["--embeddings", g, "--labels", gy, "--sigma", "1"], "--samples: required"),
        "too few for paper": (["--embeddings", _bad(tmp_path, "m.npy", lambda p: np.save(p, np.load(files["emb"]).mean(1))),
                               "--labels", y, "--sigma", "1", "--samples", "50", "--norm-bound", "1", "--bound", "paper"],
                              "--samples: the paper's bound needs n >= "),
        "empty gallery": (base + ["--gallery", _bad(tmp_path, "e.npy", lambda p: np.save(p, np.zeros((0, 5)))),
                                  "--gallery-labels", _bad(tmp_path, "ey.npy", lambda p: np.save(p, np.zeros(0, int)))],
                          "--gallery: is empty"),
        "gallery dim": (base + ["--gallery", _bad(tmp_path, "g4.npy", lambda p: np.save(p, np.zeros((3, 4)))),
                                "--gallery-labels", gy], "gallery: dimension 4"),
        "lonely query": (base + ["--gallery", g, "--gallery-labels",
                                 _bad(tmp_path, "gy2.npy", lambda p: np.save(p, np.array([0, 1, 1])))],
                         "--labels: query 8 has no same-label item"),
        "gallery labels alone": (base + ["--gallery", g], "--gallery-labels: --gallery and --gallery-labels go together"),
        "labels without embeddings": (["--labels", y], "--labels: given without --embeddings"),
        "top-k": (base + ["--top-k", "0"], "--top-k: expected a whole number >= 1"),
        "radii": (base + ["--radii", "0,x"], "--radii: expected comma-separated numbers"),
        "output folder": (base + ["--json", str(tmp_path / "no" / "s.json")], "--json: the folder"),
    }


BAD_INPUTS = ["missing file", "pickled npy", "raw pickle", "not npy", "truncated npy", "wrong ndim", "wrong dtype", "complex",
              "nan", "inf", "label count", "float labels", "alpha", "alpha zero", "sigma", "norm above bound",
              "norm bound needed", "means need samples", "too few for paper", "empty gallery", "gallery dim",
              "lonely query", "gallery labels alone", "labels without embeddings", "top-k", "radii",
              "output folder"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_one_line_exit_1_no_output(files, tmp_path, capsys, case):
    argv, pattern = _cases(files, tmp_path)[case]
    out = tmp_path / "out.tsv"
    code = main(["certify", *argv, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1, err
    assert err.startswith("minrr certify: error: ")
    assert re.search(pattern, err), err
    assert not out.exists()
    assert not any(p.name.startswith(".out.tsv") for p in tmp_path.iterdir())


def test_usage_errors_exit_2():
    process = subprocess.run([sys.executable, "-m", "minrr.cli.main", "certify", "--sigma", "abc"],
                             capture_output=True, text=True)
    assert process.returncode == 2 and "usage:" in process.stderr
    process = subprocess.run([sys.executable, "-m", "minrr.cli.main", "certify", "--bound", "nope"],
                             capture_output=True, text=True)
    assert process.returncode == 2
