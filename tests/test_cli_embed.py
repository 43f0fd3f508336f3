"""``minrr embed --sigma`` and ``--detector`` feed ``certify --embeddings`` and ``detect``; the one-call API."""

import importlib.util
import json
import os
import re

import numpy as np
import pytest

import minrr
from minrr.cli.main import build_parser, main
from minrr.data import fashion_mnist_subset
from minrr.data.loaders import to_unit_float

if importlib.util.find_spec("torch") is None and not os.environ.get("CI"):
    pytest.skip("torch is not installed (CI requires it)", allow_module_level=True)

from minrr.backends import get_backend  # noqa: E402
from minrr.backends.checkpoint import load_checkpoint  # noqa: E402
from minrr.certify import certify, certify_model  # noqa: E402
from minrr.hashing.detect import Detector, binarize  # noqa: E402
from minrr.hashing.detection_baselines import DETECTORS, INPUTS  # noqa: E402
from minrr.hashing.transforms import mean_blur, median_filter  # noqa: E402

CPU = get_backend("torch", device="cpu")
SMALL = ["--width", "4", "--epochs", "1", "--batch-size", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Real Fashion-MNIST images, a tiny embedding model and a tiny 16-bit hashing model (minrr train)."""
    root = tmp_path_factory.mktemp("cli_embed")
    data = fashion_mnist_subset()
    np.savez(root / "train.npz", images=data["train_images"][:200], labels=data["train_labels"][:200])
    np.savez(root / "test.npz", images=data["test_images"][:10], labels=data["test_labels"][:10])
    for task, name, dim in (("dml", "m.pt", "8"), ("hash", "h.pt", "16")):
        assert main(["train", "--task", task, "--data", str(root / "train.npz"), "--out", str(root / name),
                     "--dim", dim, *SMALL]) == 0
    return root


def _embed(work, model, out, *extra):
    return main(["embed", "--model", str(work / model), "--data", str(work / "test.npz"), "--out", str(out),
                 "--device", "cpu", *extra])


def _test_images():
    return fashion_mnist_subset()["test_images"][:10, None]


def test_noisy_embeddings_are_the_draws_of_sample_noisy_for_any_batch_size(work, capsys):
    a, b = work / "noisy4.npy", work / "noisy7.npy"
    noisy = ["--sigma", "0.25", "--samples", "10"]
    assert _embed(work, "m.pt", a, *noisy, "--batch-size", "4") == 0
    assert "10 x 10 x 8 noisy embeddings (sigma 0.25)" in capsys.readouterr().out
    assert _embed(work, "m.pt", b, *noisy, "--batch-size", "7") == 0
    draws = np.load(a)
    assert draws.shape == (10, 10, 8) and draws.dtype == np.float32
    np.testing.assert_array_equal(draws, np.load(b))
    model, _ = load_checkpoint(work / "m.pt")
    estimate = CPU.sample_noisy(model, _test_images(), 0.25, 10, seed=0)
    np.testing.assert_allclose(draws.astype(np.float64).mean(axis=1), estimate.mean, rtol=0, atol=1e-6)
    # the draws are noisy: distinct copies, around the clean embedding
    clean = CPU.embed(model, _test_images())
    assert np.all(np.abs(np.diff(draws, axis=1)).max(axis=2) > 0)
    assert np.linalg.norm(estimate.mean - clean, axis=1).max() < 1.0
    assert _embed(work, "m.pt", work / "noisy_seed1.npy", *noisy, "--seed", "1") == 0
    assert not np.array_equal(np.load(work / "noisy_seed1.npy"), draws)


def test_noisy_embeddings_feed_certify(work):
    noisy, gallery, gallery_y, y = (work / n for n in ("feed.npy", "g.npy", "gy.npy", "y.npy"))
    assert _embed(work, "m.pt", noisy, "--sigma", "0.25", "--samples", "16", "--labels-out", str(y)) == 0
    assert main(["embed", "--model", str(work / "m.pt"), "--data", str(work / "train.npz"), "--out", str(gallery),
                 "--labels-out", str(gallery_y), "--device", "cpu"]) == 0
    out = work / "feed.tsv"
    assert main(["certify", "--embeddings", str(noisy), "--labels", str(y), "--sigma", "0.25", "--gallery",
                 str(gallery), "--gallery-labels", str(gallery_y), "--out", str(out)]) == 0
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    margin = np.array([float(r[rows[0].index("margin")]) for r in rows[1:]])
    model, _ = load_checkpoint(work / "m.pt")
    expected = certify(CPU.sample_noisy(model, _test_images(), 0.25, 16, seed=0), np.load(y), sigma=0.25,
                       gallery=np.load(gallery), gallery_labels=np.load(gallery_y))
    np.testing.assert_allclose(margin, expected.margin, rtol=0, atol=1e-5)


def test_detector_archive_feeds_detect(work, capsys):
    archive, db = work / "q.npz", work / "db.npy"
    assert _embed(work, "h.pt", archive, "--detector", "umcd") == 0
    assert "f, f_t (umcd), 10 x 16 each" in capsys.readouterr().out
    model, _ = load_checkpoint(work / "h.pt")
    with np.load(archive) as saved:
        assert sorted(saved.files) == ["f", "f_t"]
        f, f_t = saved["f"], saved["f_t"]
    np.testing.assert_array_equal(f, CPU.embed(model, _test_images()))
    np.testing.assert_array_equal(f_t, CPU.embed(model, mean_blur(to_unit_float(_test_images()))))
    assert not np.array_equal(f, f_t)
    assert main(["embed", "--model", str(work / "h.pt"), "--data", str(work / "train.npz"), "--codes",
                 "--out", str(db), "--device", "cpu"]) == 0
    detector = work / "det.json"
    assert main(["detect", "calibrate", "--benign", str(archive), "--database", str(db), "--fpr", "0.2",
                 "--top-k", "5", "--out", str(detector)]) == 0
    # the one-call API calibrates the same detector from the model and the images
    train = fashion_mnist_subset()["train_images"][:200, None]
    from_model = Detector.from_model(model, _test_images(), database_images=train, fpr=0.2, top_k=5)
    assert json.loads(detector.read_text())["thresholds"] == dict(zip(("c1", "c2", "c3"),
                                                                       from_model.thresholds_.tolist()))
    from_codes = Detector.from_model(model, _test_images(), database_codes=np.load(db), fpr=0.2, top_k=5)
    np.testing.assert_array_equal(from_codes.benign_, from_model.benign_)
    np.testing.assert_array_equal(np.load(db), binarize(CPU.embed(model, train)))


def test_certify_model_equals_sampling_then_certify(work):
    model, _ = load_checkpoint(work / "m.pt")
    data = fashion_mnist_subset()
    images, labels = data["test_images"][:6, None], data["test_labels"][:6]
    gallery, gallery_labels = data["train_images"][:200, None], data["train_labels"][:200]
    result = certify_model(model, images, labels, sigma=0.25, n_samples=32, gallery=gallery,
                           gallery_labels=gallery_labels, seed=3, batch_size=10, device="cpu", alpha=0.01)
    expected = certify(CPU.sample_noisy(model, images, 0.25, 32, seed=3), labels, sigma=0.25,
                       gallery=CPU.embed(model, gallery), gallery_labels=gallery_labels, alpha=0.01, norm_bound=1.0)
    for field in ("nearest", "margin", "margin_lower", "radius"):
        np.testing.assert_allclose(getattr(result, field), getattr(expected, field), rtol=0, atol=1e-12)
    assert result.settings == expected.settings and result.settings["gallery"] == "exact"
    assert minrr.certify_model is certify_model  # the top-level name, imported on first use


def test_certify_model_runs_numpy_callables_leave_one_out():
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(16, 4))

    def model(x):  # a fixed linear embedding, l2-normalised
        out = x.reshape(len(x), -1) @ weights
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    images = rng.random((12, 4, 4))
    labels = np.arange(12) % 3
    result = certify_model(model, images, labels, sigma=0.1, n_samples=20)
    expected = certify(get_backend("numpy").sample_noisy(model, images, 0.1, 20), labels, sigma=0.1)
    np.testing.assert_array_equal(result.margin_lower, expected.margin_lower)
    assert result.settings["gallery"] == "leave-one-out"
    with pytest.raises(ValueError, match="gallery_labels: gallery and gallery_labels go together"):
        certify_model(model, images, labels, sigma=0.1, n_samples=20, gallery=images)


def test_baseline_archives_hold_what_the_baseline_reads(work):
    archive = work / "fs.npz"
    assert _embed(work, "h.pt", archive, "--detector", "fs-median") == 0
    model, _ = load_checkpoint(work / "h.pt")
    with np.load(archive) as saved:
        assert sorted(saved.files) == ["f", *INPUTS["fs-median"]]
        np.testing.assert_array_equal(saved["f_median"], CPU.embed(model, median_filter(to_unit_float(_test_images()))))


def test_help_lists_every_detector():
    embed = build_parser()._subparsers._group_actions[0].choices["embed"]
    (help_text,) = [action.help for action in embed._actions if action.dest == "detector"]
    assert all(name in help_text for name in ("umcd", *DETECTORS))


@pytest.mark.parametrize("extra, model, out, message", [
    (["--sigma", "0.25"], "m.pt", "x.npy", "--samples: --sigma and --samples go together"),
    (["--samples", "4"], "m.pt", "x.npy", "--samples: --sigma and --samples go together"),
    (["--sigma", "0.25", "--samples", "1"], "m.pt", "x.npy", "--samples: expected a whole number >= 2"),
    (["--sigma", "-1", "--samples", "4"], "m.pt", "x.npy", "--sigma: expected a finite number above 0"),
    (["--sigma", "0.25", "--samples", "4", "--seed", "-1"], "m.pt", "x.npy", "--seed: expected a whole number >= 0"),
    (["--sigma", "0.25", "--samples", "4", "--codes"], "h.pt", "x.npy", "--sigma: not with --codes"),
    (["--detector", "umcd"], "m.pt", "x.npz", "--detector: .*m.pt is an embedding model"),
    (["--detector", "blur"], "h.pt", "x.npz", "--detector: expected one of umcd, feature-squeezing"),
    (["--detector", "umcd"], "h.pt", "x.npy", "--out: with --detector, expected an .npz archive name"),
    (["--detector", "umcd", "--codes"], "h.pt", "x.npz", "--detector: not with --codes"),
    (["--sigma", "0.25", "--samples", "4", "--batch-size", "0"], "m.pt", "x.npy", "--batch-size: expected"),
])
def test_bad_input_one_line_exit_1_no_output(work, tmp_path, capsys, extra, model, out, message):
    capsys.readouterr()
    assert _embed(work, model, tmp_path / out, *extra) == 1
    err = capsys.readouterr().err
    assert re.match(f"minrr embed: error: {message}", err) and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
