"""``minrr plot`` and ``certify --plot``: real PDF/SVG/PNG files of exact certified-recall curves."""

import importlib.util
import os
import re

import numpy as np
import pytest

from minrr.certify import certified_recall, certify
from minrr.cli.main import main
from minrr.cli.plotting import curves_from_results, read_curves

if importlib.util.find_spec("matplotlib") is None and not os.environ.get("CI"):
    pytest.skip("matplotlib is not installed (CI requires it)", allow_module_level=True)

MAGIC = {"pdf": b"%PDF-", "svg": b"<?xml", "png": b"\x89PNG\r\n\x1a\n"}


def _samples(seed, n=200):
    """Unit-norm noisy samples of 12 queries in 3 classes, and an exact gallery."""
    rng = np.random.default_rng(seed)
    centers = np.linalg.qr(rng.normal(size=(5, 5)))[0][:3]
    labels = np.repeat(np.arange(3), 4)
    samples = centers[labels][:, None, :] + 0.15 * rng.normal(size=(12, n, 5))
    samples /= np.linalg.norm(samples, axis=2, keepdims=True)
    return samples, labels, centers


@pytest.fixture
def tsvs(tmp_path):
    """Two TSV files of minrr certify --out: sigma 0.25 and 0.5 (n = 200, 100)."""
    paths = []
    for sigma, n in ((0.25, 200), (0.5, 100)):
        samples, labels, centers = _samples(int(n), n)
        for name, arr in (("e", samples), ("y", labels), ("g", centers), ("gy", np.arange(3))):
            np.save(tmp_path / f"{name}{n}.npy", arr)
        out = tmp_path / f"r{n}.tsv"
        assert main(["certify", "--embeddings", str(tmp_path / f"e{n}.npy"), "--labels", str(tmp_path / f"y{n}.npy"),
                     "--sigma", str(sigma), "--gallery", str(tmp_path / f"g{n}.npy"), "--gallery-labels",
                     str(tmp_path / f"gy{n}.npy"), "--out", str(out)]) == 0
        paths.append(out)
    return paths


@pytest.mark.parametrize("fmt", ["pdf", "svg", "png"])
def test_plot_writes_the_format_of_the_extension(tsvs, tmp_path, capsys, fmt):
    out = tmp_path / f"fig.{fmt}"
    assert main(["plot", *map(str, tsvs), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(MAGIC[fmt])
    assert "2 curves from 2 files" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["pdf", "svg", "png"])
def test_certify_plot_follows_the_extension(tmp_path, fmt):
    samples, labels, _ = _samples(0)
    np.save(tmp_path / "e.npy", samples)
    np.save(tmp_path / "y.npy", labels)
    out = tmp_path / f"curve.{fmt}"
    assert main(["certify", "--embeddings", str(tmp_path / "e.npy"), "--labels", str(tmp_path / "y.npy"),
                 "--sigma", "0.25", "--plot", str(out)]) == 0
    assert out.read_bytes().startswith(MAGIC[fmt])


def test_curves_read_back_are_the_certified_recall(tsvs):
    samples, labels, centers = _samples(200, 200)
    result = certify(samples, labels, sigma=0.25, gallery=centers, gallery_labels=np.arange(3))
    (curve,) = read_curves(tsvs[0], name="results.tsv")
    assert {key: curve.settings[key] for key in ("sigma", "n", "alpha", "bound")} == {
        "sigma": 0.25, "n": 200, "alpha": 0.001, "bound": "empirical-bernstein"}
    assert curve.settings.get("certificate") == result.settings.get("certificate")  # when the TSV has the column
    assert curve.clean_recall == result.correct.mean()
    np.testing.assert_array_equal(curve.certified, result.certified)
    (from_result,) = curves_from_results([result])
    assert result.certified.sum() > 3 and np.isfinite(result.radius).all()
    for c in (curve, from_result):
        right = 1.05 * c.radius[c.certified].max()
        x, y = c.recall_steps(right)
        assert x[0] == 0 and x[-1] == right and np.all(np.diff(x) > 0) and np.all(np.diff(y) <= 0)
        # the drawn step function (value y[i] on [x[i], x[i+1])) is certified_recall away from its corners
        grid = np.linspace(0, right, 997)
        grid = grid[~np.isin(grid, x)]
        drawn = y[np.searchsorted(x, grid, side="right") - 1]
        # the TSV holds radii to 6 significant digits: a grid point between the two may count one query more
        np.testing.assert_allclose(drawn, certified_recall(result, grid), atol=1 / len(c.radius) if c is curve else 0)


def test_one_file_with_several_runs_gives_one_curve_per_run(tsvs, tmp_path, capsys):
    lines = tsvs[0].read_text().splitlines(keepends=True)
    other = tsvs[1].read_text().splitlines(keepends=True)[1:]
    both = tmp_path / "both.tsv"
    both.write_text("".join(lines + other))
    assert [c.settings["sigma"] for c in read_curves(both, name="results.tsv")] == [0.25, 0.5]
    assert main(["plot", str(both), "--out", str(tmp_path / "both.pdf")]) == 0
    assert "2 curves from 1 file" in capsys.readouterr().out


@pytest.mark.parametrize("make, out, message", [
    (None, "fig.jpg", "--out: expected a file name ending in .pdf, .svg, .png"),
    (None, "r200.tsv", "--out: expected a file name ending in .pdf"),
    (lambda p: p.write_text("idx\tradius\n0\t0.1\n"), "fig.pdf", "results.tsv: .*bad.tsv is not a TSV of minrr certify"),
    (lambda p: p.write_bytes(b"\x80\x81\xff"), "fig.pdf", "results.tsv: .*bad.tsv is not a text TSV file"),
    (lambda p: p.write_text(""), "fig.pdf", "results.tsv: .*bad.tsv is empty"),
    (lambda p: p.write_text("idx\tcorrect\tradius\tbound\tsigma\talpha\tn\n0\t1\tx\tb\t1\t0.1\t10\n"), "fig.pdf",
     "results.tsv: .*bad.tsv has a non-numeric 'radius' value"),
    (lambda p: p.write_text("idx\tcorrect\tradius\tbound\tsigma\talpha\tn\n0\t1\t0.1\n"), "fig.pdf",
     "results.tsv: line 2 of .*bad.tsv has 3 fields"),
])
def test_bad_input_one_line_exit_1_no_output(tsvs, tmp_path, capsys, make, out, message):
    inputs = [str(tsvs[0])]
    if make is not None:
        make(tmp_path / "bad.tsv")
        inputs.append(str(tmp_path / "bad.tsv"))
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert main(["plot", *inputs, "--out", str(tmp_path / out)]) == 1
    err = capsys.readouterr().err
    assert re.match(f"minrr plot: error: {message}", err) and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_without_matplotlib_nothing_is_computed(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["certify", "--plot", str(tmp_path / "c.pdf")]) == 1
    assert capsys.readouterr().err == ("minrr certify: error: --plot: matplotlib is not installed "
                                       "(pip install 'minrr[plot]')\n")
    assert list(tmp_path.iterdir()) == []
