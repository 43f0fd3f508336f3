"""``minrr evaluate`` and :func:`minrr.metrics.report.retrieval_metrics`: the library's numbers under
pytorch-metric-learning's keys, equal to its AccuracyCalculator where the definitions coincide."""

import importlib.util
import json
import os
import re

import numpy as np
import pytest

from minrr.cli.main import main
from minrr.metrics.clustering import kmeans, kmeans_nmi
from minrr.metrics.report import retrieval_metrics
from minrr.metrics.retrieval import map_at_r, mean_average_precision, r_precision, recall_at_k

KEYS = ["precision_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "mean_average_precision",
        "mean_average_precision_at_r", "r_precision", "NMI"]


def _data(seed=0, n=60, dim=5, classes=4):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centers = rng.normal(size=(classes, dim))
    return centers[labels] + 0.9 * rng.normal(size=(n, dim)), labels


def _r_precision_oracle(queries, labels, gallery=None, gallery_labels=None):
    """R-precision by sorting every row (stable: ties to the smaller index), self left out."""
    own = gallery is None
    gallery, gallery_labels = (queries, labels) if own else (gallery, gallery_labels)
    values = []
    for i, q in enumerate(queries):
        order = np.argsort(((gallery - q) ** 2).sum(axis=1), kind="stable")
        if own:
            order = order[order != i]
        relevant = gallery_labels[order] == labels[i]
        if relevant.sum():
            values.append(relevant[: relevant.sum()].mean())
    return float(np.mean(values))


def test_r_precision_by_hand():
    # 1-D points; query 0 (label 0) ranks 1 (label 1), 2 (label 0), 3 (label 0): R = 2, one of them in the top 2
    x = np.array([[0.0], [1.0], [2.0], [3.0]])
    y = np.array([0, 1, 0, 0])
    r_prec = r_precision(x[:1], y[:1], gallery=x[1:], gallery_labels=y[1:])
    assert r_prec == 0.5
    # leave-one-out: all have R = 2 and one of their two nearest (an l1 point ties to the smaller index); query 1
    # has no relevant item and is left out
    assert r_precision(x, y) == 0.5
    # x = 0, 0.4, 5, 6, 10 with labels 0, 0, 1, 1, 0: top R are {1, 2}, {0, 2}, {3}, {2}, {3, 2}
    x, y = np.array([[0.0], [0.4], [5.0], [6.0], [10.0]]), np.array([0, 0, 1, 1, 0])
    assert r_precision(x, y) == pytest.approx((0.5 + 0.5 + 1 + 1 + 0) / 5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_report_equals_the_library_functions_and_an_oracle(seed):
    x, y = _data(seed)
    metrics = retrieval_metrics(x, y, ks=[8, 2, 4])
    assert list(metrics) == KEYS
    assert [metrics[k] for k in KEYS[:4]] == list(recall_at_k(x, y, [1, 2, 4, 8]))
    assert metrics["mean_average_precision"] == mean_average_precision(x, y)
    assert metrics["mean_average_precision_at_r"] == map_at_r(x, y)
    assert metrics["r_precision"] == r_precision(x, y) == pytest.approx(_r_precision_oracle(x, y), abs=1e-12)
    assert metrics["NMI"] == kmeans_nmi(x, y, seed=0)
    g, gy = _data(seed + 10, n=40)
    with_gallery = retrieval_metrics(x, y, ks=1, gallery=g, gallery_labels=gy)
    assert with_gallery["r_precision"] == pytest.approx(_r_precision_oracle(x, y, g, gy), abs=1e-12)
    assert list(with_gallery) == ["precision_at_1"] + KEYS[4:]
    multi = retrieval_metrics(x, np.eye(4, dtype=int)[y], ks=2)
    assert "NMI" not in multi and multi["recall_at_2"] == metrics["recall_at_2"]


@pytest.mark.skipif(importlib.util.find_spec("pytorch_metric_learning") is None and not os.environ.get("CI"),
                    reason="pytorch-metric-learning is not installed (CI requires it)")
@pytest.mark.parametrize("seed", [0, 1])
def test_report_equals_pytorch_metric_learning(seed):
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    x, y = _data(seed)
    ours = retrieval_metrics(x, y, ks=1, seed=seed)
    # distinct continuous embeddings: no ties, so both rankings agree; NMI through minrr's clusters,
    # since pytorch-metric-learning's own k-means is faiss's (another clustering)
    calculator = AccuracyCalculator(include=("precision_at_1", "mean_average_precision",
                                             "mean_average_precision_at_r", "r_precision", "NMI"),
                                    kmeans_func=lambda q, k: kmeans(q.cpu().numpy(), k, seed=seed), device="cpu")
    theirs = calculator.get_accuracy(x.astype(np.float32), y)
    assert set(theirs) == set(ours)
    for key in theirs:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-6), key
    g, gy = _data(seed + 10, n=40)
    ours = retrieval_metrics(x, y, ks=1, gallery=g, gallery_labels=gy)
    theirs = calculator.get_accuracy(x.astype(np.float32), y, g.astype(np.float32), gy, ref_includes_query=False)
    for key in ("precision_at_1", "mean_average_precision", "mean_average_precision_at_r", "r_precision"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-6), key


@pytest.fixture
def files(tmp_path):
    x, y = _data()
    g, gy = _data(7, n=40)
    for name, arr in (("e.npy", x), ("y.npy", y), ("g.npy", g), ("gy.npy", gy)):
        np.save(tmp_path / name, arr)
    return tmp_path


def test_evaluate_prints_and_writes_the_report(files, capsys):
    out = files / "m.json"
    assert main(["evaluate", "--embeddings", str(files / "e.npy"), "--labels", str(files / "y.npy"),
                 "--recall-at", "1,4", "--json", str(out)]) == 0
    expected = retrieval_metrics(*_data(), ks=[1, 4])
    written = json.loads(out.read_text())
    assert written["metrics"] == expected and written["queries"] == 60
    printed = capsys.readouterr().out
    assert f"mean_average_precision_at_r  {expected['mean_average_precision_at_r']:.4f}" in printed
    assert main(["evaluate", "--embeddings", str(files / "e.npy"), "--labels", str(files / "y.npy"),
                 "--gallery", str(files / "g.npy"), "--gallery-labels", str(files / "gy.npy"), "--json",
                 str(out)]) == 0
    x, y = _data()
    g, gy = _data(7, n=40)
    assert json.loads(out.read_text())["metrics"] == retrieval_metrics(x, y, gallery=g, gallery_labels=gy)
    assert main(["evaluate", "--embeddings", str(files / "e.npy"), "--labels", str(files / "y.npy"),
                 "--exclude", "nearest", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"] == retrieval_metrics(x, y, exclude="nearest")
    assert main(["evaluate", "--embeddings", str(files / "e.npy"), "--labels", str(files / "y.npy"),
                 "--no-nmi", "--json", str(out)]) == 0
    without = json.loads(out.read_text())["metrics"]
    assert without == retrieval_metrics(x, y, nmi=False) and "NMI" not in without
    assert without.items() <= retrieval_metrics(x, y).items()  # the same values, NMI aside


@pytest.mark.skipif(importlib.util.find_spec("torch") is None and not os.environ.get("CI"),
                    reason="torch is not installed (CI requires it)")
def test_evaluate_a_model_equals_its_embeddings(tmp_path):
    from minrr.backends import get_backend
    from minrr.backends.checkpoint import load_checkpoint
    from minrr.data import fashion_mnist_subset

    data = fashion_mnist_subset()
    np.savez(tmp_path / "train.npz", images=data["train_images"][:120], labels=data["train_labels"][:120])
    np.savez(tmp_path / "test.npz", images=data["test_images"][:50], labels=data["test_labels"][:50])
    assert main(["train", "--task", "dml", "--data", str(tmp_path / "train.npz"), "--test-data",
                 str(tmp_path / "test.npz"), "--out", str(tmp_path / "m.pt"), "--width", "4", "--dim", "8",
                 "--epochs", "1", "--batch-size", "40", "--device", "cpu"]) == 0
    out = tmp_path / "m_metrics.json"
    assert main(["evaluate", "--model", str(tmp_path / "m.pt"), "--device", "cpu", "--json", str(out)]) == 0
    model, card = load_checkpoint(tmp_path / "m.pt")
    embeddings = get_backend("torch", device="cpu").embed(model, data["test_images"][:50, None])
    expected = retrieval_metrics(embeddings, data["test_labels"][:50])
    assert json.loads(out.read_text())["metrics"] == expected
    # the model card of minrr train holds the same numbers under the same keys
    assert {key: card["metrics"][key] for key in expected} == expected
    card_text = (tmp_path / "m.json").read_text()
    assert main(["evaluate", "--model", str(tmp_path / "m.pt"), "--json", str(tmp_path / "m.json")]) == 1
    assert (tmp_path / "m.json").read_text() == card_text  # the card beside the weights is an input


@pytest.mark.parametrize("extra, message", [
    (["--recall-at", "0,2"], "--recall-at: expected whole numbers >= 1"),
    (["--recall-at", "a"], "--recall-at: expected comma-separated whole numbers"),
    (["--gallery", "g.npy"], "--gallery-labels: --gallery and --gallery-labels go together"),
    (["--gallery", "g.npy", "--gallery-labels", "gy.npy", "--exclude", "index"], "--exclude: only without a gallery"),
    (["--gallery", "g.npy", "--gallery-labels", "y.npy"], "--gallery-labels: .*"),
    (["--data", "bundled:test"], "--data: given without --model"),
    (["--json", "e.npy"], "--json: .*e.npy is the input file of --embeddings"),
    (["--seed", "-1"], "--seed: expected a whole number >= 0"),
    (["--gallery", "empty", "--gallery-labels", "gy.npy"], "--gallery: .*empty holds no .npy shard"),
    (["--gallery", "pickled", "--gallery-labels", "gy.npy"],
     "--gallery: shard a.npy: .*a.npy is a pickled Python object"),
    (["--workers", "0"], "--workers: expected a whole number >= 1, got 0"),
    (["--chunk-size", "0"], "--chunk-size: expected a whole number >= 1, got 0"),
])
def test_bad_input_one_line_exit_1_no_output(files, capsys, extra, message):
    (files / "empty").mkdir()
    (files / "pickled").mkdir()
    (files / "pickled" / "a.npy").write_bytes(b"\x80\x04K\x01.")
    before = sorted(p.name for p in files.iterdir())
    argv = ["evaluate", "--embeddings", str(files / "e.npy"), "--labels", str(files / "y.npy"), "--json",
            str(files / "out.json")] + [str(files / v) if v.endswith(".npy") or v in ("empty", "pickled") else v
                                        for v in extra]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert re.match(f"minrr evaluate: error: {message}", err) and err.count("\n") == 1
    assert sorted(p.name for p in files.iterdir()) == before


def test_labels_of_another_length_are_refused(files, capsys):
    np.save(files / "short.npy", np.arange(5))
    assert main(["evaluate", "--embeddings", str(files / "e.npy"), "--labels", str(files / "short.npy")]) == 1
    assert capsys.readouterr().err.startswith("minrr evaluate: error: --labels:")
