"""``minrr train`` -> ``minrr embed`` -> ``minrr certify --model``, resuming, and bad inputs."""

import importlib.util
import json
import os
import re

import numpy as np
import pytest

from conftest import interrupt_after
from minrr.cli.main import main
from minrr.data import fashion_mnist_subset

if importlib.util.find_spec("torch") is None and not os.environ.get("CI"):
    pytest.skip("torch is not installed (CI requires it)", allow_module_level=True)

from minrr.backends import get_backend  # noqa: E402
from minrr.backends.checkpoint import load_checkpoint  # noqa: E402
from minrr.backends.torch_backend import TorchBackend  # noqa: E402
from minrr.certify import certify  # noqa: E402
from minrr.cli.certify import TSV_COLUMNS, tsv_row  # noqa: E402

CERTIFY = ["--sigma", "0.25", "--samples", "64", "--batch-size", "24", "--device", "cpu"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Real Fashion-MNIST images as .npz files and a tiny model trained on them by minrr train."""
    root = tmp_path_factory.mktemp("cli_model")
    data = fashion_mnist_subset()
    np.savez(root / "train.npz", images=data["train_images"][:200], labels=data["train_labels"][:200])
    np.savez(root / "test.npz", images=data["test_images"][:6], labels=data["test_labels"][:6])
    code = main(["train", "--task", "dml", "--data", str(root / "train.npz"), "--test-data", str(root / "test.npz"),
                 "--out", str(root / "m.pt"), "--width", "4", "--dim", "8", "--epochs", "1", "--batch-size", "64",
                 "--noise-sigma", "0.25", "--device", "cpu"])
    assert code == 0
    return root


def _certify(work, out, *extra):
    return main(["certify", "--model", str(work / "m.pt"), *CERTIFY, "--out", str(out), *extra])


def _without_time(text):
    """The TSV of certify --model without its last column, ``time`` (seconds per query, which vary)."""
    rows = [line.split("\t") for line in text.splitlines()]
    assert rows[0][-1] == "time" and all(float(row[-1]) >= 0 for row in rows[1:])
    return "".join("\t".join(row[:-1]) + "\n" for row in rows)


def test_train_writes_weights_and_model_card(work):
    card = json.loads((work / "m.json").read_text())
    assert card["format"] == "minrr-model-card/1" and card["weights"]["file"] == "m.pt"
    assert card["model"] == {"arch": "small-cnn", "in_channels": 1, "head": "embedding", "dim": 8, "width": 4,
                             "mean": card["model"]["mean"], "std": card["model"]["std"], "stem": "small"}
    assert 0.2 < card["model"]["mean"][0] < 0.4  # Fashion-MNIST's mean pixel is about 0.29
    assert card["embedding"]["norm_bound"] == 1.0 and card["input"]["shape"] == [1, 28, 28]
    assert card["data"]["train"] == str(work / "train.npz") and card["data"]["train_items"] == 200
    assert card["training"]["noise_sigma"] == 0.25 and card["training"]["steps"] >= 4
    assert 0 <= card["metrics"]["precision_at_1"] <= 1


def test_embed_writes_the_model_embeddings(work, capsys):
    out, labels = work / "e.npy", work / "y.npy"
    assert main(["embed", "--model", str(work / "m.pt"), "--data", str(work / "test.npz"), "--out", str(out),
                 "--labels-out", str(labels), "--device", "cpu"]) == 0
    model, _ = load_checkpoint(work / "m.pt")
    expected = get_backend("torch", device="cpu").embed(model, fashion_mnist_subset()["test_images"][:6, None])
    np.testing.assert_array_equal(np.load(out), expected)
    assert np.array_equal(np.load(labels), fashion_mnist_subset()["test_labels"][:6])
    assert "6 x 8 embeddings" in capsys.readouterr().out


def test_certify_from_a_model_equals_the_library(work, capsys):
    out, summary = work / "full.tsv", work / "s.json"
    assert _certify(work, out, "--json", str(summary)) == 0
    source = capsys.readouterr().out.splitlines()[0]
    assert "test.npz (the model card's test data)" in source and "train.npz (the model card's train data)" in source
    backend = get_backend("torch", device="cpu")
    model, _ = load_checkpoint(work / "m.pt")
    data = fashion_mnist_subset()
    gallery = backend.embed(model, data["train_images"][:200, None])
    lines = ["\t".join(TSV_COLUMNS) + "\n"]
    for i in range(6):
        estimate = backend.sample_noisy(model, data["test_images"][i:i + 1, None], 0.25, 64, seed=0, first_index=i,
                                        batch_size=24)
        result = certify(estimate, data["test_labels"][i:i + 1], sigma=0.25, gallery=gallery,
                         gallery_labels=data["train_labels"][:200], norm_bound=1.0)
        lines.append(tsv_row(i, result, 0))
    assert _without_time(out.read_text()) == "".join(lines)
    run = json.loads(summary.read_text())["runs"][0]
    assert run["queries"] == 6 and run["settings"]["n"] == 64 and run["settings"]["gallery"] == "exact"
    assert not (work / "full.tsv.partial").exists()


def test_an_interrupted_run_resumes_to_the_same_file(work, monkeypatch, capsys):
    reference, out = work / "reference.tsv", work / "resumed.tsv"
    assert _certify(work, reference) == 0
    with monkeypatch.context() as patch:
        interrupt_after(patch, 3)
        assert _certify(work, out) == 130
    partial = work / "resumed.tsv.partial"
    assert not out.exists() and len(partial.read_text().splitlines()) == 2 + 3
    with open(partial, "a") as fh:
        fh.write("3\t0\t0")  # a row cut short by the interruption
    with monkeypatch.context() as patch:
        interrupt_after(patch, 1)
        assert _certify(work, out) == 130
    assert len(partial.read_text().splitlines()) == 2 + 4
    assert _certify(work, out) == 0
    assert _without_time(out.read_text()) == _without_time(reference.read_text()) and not partial.exists()
    err = capsys.readouterr().err
    assert "interrupted" in err and "resuming at row 3 of 6" in err and "resuming at row 4 of 6" in err
    assert f"3 of 6 rows are in {partial}; run the same command again to resume" in err


def test_a_dask_cluster_writes_the_rows_of_one_process(work, monkeypatch):
    pytest.importorskip("dask.distributed")
    reference = work / "one-process.tsv"
    assert _certify(work, reference) == 0
    for workers, chunk in (("2", "1"), ("2", "4")):
        out = work / f"dask-{workers}-{chunk}.tsv"
        assert _certify(work, out, "--workers", workers, "--chunk-size", chunk) == 0
        assert _without_time(out.read_text()) == _without_time(reference.read_text())
    out = work / "dask-resumed.tsv"  # a run interrupted after 2 rows, resumed on the cluster
    with monkeypatch.context() as patch:
        interrupt_after(patch, 2)
        assert _certify(work, out) == 130
    assert _certify(work, out, "--workers", "2", "--chunk-size", "3") == 0
    assert _without_time(out.read_text()) == _without_time(reference.read_text())


def test_skip_and_max_select_queries_as_cohen_et_al(work):
    full, some = work / "all.tsv", work / "some.tsv"
    assert _certify(work, full) == 0 and _certify(work, some, "--skip", "2", "--max", "4") == 0
    rows = _without_time(full.read_text()).splitlines(keepends=True)
    assert _without_time(some.read_text()) == "".join([rows[0]] + [rows[1 + i] for i in (0, 2)])  # 4 is not < 4
    assert _certify(work, some, "--skip", "4") == 0
    assert [line.split("\t")[0] for line in some.read_text().splitlines()] == ["idx", "0", "4"]


def test_resuming_with_other_settings_is_refused(work, monkeypatch, capsys):
    out = work / "other.tsv"
    with monkeypatch.context() as patch:
        interrupt_after(patch, 2)
        assert _certify(work, out) == 130
    before = (work / "other.tsv.partial").read_text()
    capsys.readouterr()
    code = main(["certify", "--model", str(work / "m.pt"), "--sigma", "0.5", "--samples", "64", "--batch-size", "24",
                 "--device", "cpu", "--seed", "3", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert re.search(r"--out: .*other settings \(.*seed 0 there, 3 now; sigma 0.25 there, 0.5 now\)", err), err
    assert (work / "other.tsv.partial").read_text() == before and not out.exists()


def test_hash_model_codes_and_norm_bound(work, capsys):
    model = work / "h.pt"
    assert main(["train", "--task", "hash", "--data", str(work / "train.npz"), "--out", str(model), "--width", "4",
                 "--dim", "16", "--epochs", "1", "--batch-size", "64", "--device", "cpu"]) == 0
    codes = work / "codes.npy"
    assert main(["embed", "--model", str(model), "--data", str(work / "test.npz"), "--out", str(codes), "--codes"]) == 0
    values = np.load(codes)
    assert values.dtype == np.int8 and values.shape == (6, 16) and set(np.unique(values)) <= {-1, 1}
    capsys.readouterr()
    assert main(["certify", "--model", str(model), *CERTIFY, "--data", str(work / "test.npz"),
                 "--gallery-data", str(work / "train.npz")]) == 0
    assert "F 4," in capsys.readouterr().out  # sqrt(16) for 16-bit tanh codes


def test_image_folders_are_resized_to_the_model_input(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "train" / f"c{c}").mkdir(parents=True)
        (tmp_path / "query" / f"c{c}").mkdir(parents=True)
        for k in range(6):
            pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "train" / f"c{c}" / f"{k}.png")
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "query" / f"c{c}" / "q.png")
    model = tmp_path / "m.pt"
    assert main(["train", "--task", "dml", "--data", str(tmp_path / "train"), "--image-size", "8", "--out", str(model),
                 "--width", "2", "--dim", "4", "--epochs", "1", "--batch-size", "8", "--device", "cpu"]) == 0
    card = json.loads((tmp_path / "m.json").read_text())
    assert card["input"]["shape"] == [3, 8, 8] and len(card["model"]["mean"]) == 3
    assert main(["embed", "--model", str(model), "--data", str(tmp_path / "query"), "--out", str(tmp_path / "e.npy"),
                 "--device", "cpu"]) == 0
    assert np.load(tmp_path / "e.npy").shape == (2, 4)


def _bad_cases(work, tmp_path):
    model = str(work / "m.pt")
    np.savez(tmp_path / "rgb.npz", images=np.zeros((2, 3, 28, 28), np.uint8), labels=np.array([0, 1]))
    np.save(tmp_path / "g.npy", np.zeros((3, 8)))
    return {
        "no sigma": (["certify", "--model", model, "--samples", "8"], "--sigma: required with --model"),
        "no samples": (["certify", "--model", model, "--sigma", "0.1"], "--samples: required with --model"),
        "bad sigma": (["certify", "--model", model, "--sigma", "-1", "--samples", "8"],
                      "--sigma: expected a finite number above 0"),
        "data without model": (["certify", "--data", "bundled:test"], "--data: given without --model"),
        "both inputs": (["certify", "--model", model, "--embeddings", str(tmp_path / "g.npy"), "--sigma", "1",
                         "--samples", "8"], "--model: give either --model or --embeddings"),
        "gallery embeddings": (["certify", "--model", model, "--gallery", str(tmp_path / "g.npy"), "--sigma", "1",
                                "--samples", "8"], "--gallery: with --model, give gallery images with --gallery-data"),
        "missing model": (["certify", "--model", str(tmp_path / "none.pt"), "--sigma", "1", "--samples", "8"],
                          "--model: file not found"),
        "device": (["certify", "--model", model, "--sigma", "1", "--samples", "8", "--device", "nonsense"],
                   "--device: 'nonsense' is not usable"),
        "channels": (["certify", "--model", model, "--sigma", "1", "--samples", "8", "--data",
                      str(tmp_path / "rgb.npz")], "--data: images with 3 channels; the model takes 1"),
        "batch size": (["certify", "--model", model, "--sigma", "1", "--samples", "8", "--batch-size", "0"],
                       "--batch-size: expected a whole number >= 1"),
        "missing data": (["certify", "--model", model, "--sigma", "1", "--samples", "8", "--data",
                          str(tmp_path / "nope")], "--data: .*neither a file, a folder"),
        "card json as weights": (["train", "--task", "dml", "--out", str(tmp_path / "m.json")],
                                 "--out: .*would be the weights file"),
        "epochs": (["train", "--task", "dml", "--out", str(tmp_path / "x.pt"), "--epochs", "0", "--data",
                    str(work / "test.npz")], "--epochs: expected a whole number >= 1"),
        "test labels alone": (["train", "--task", "dml", "--out", str(tmp_path / "x.pt"), "--test-labels",
                               str(tmp_path / "g.npy")], "--test-labels: given without --test-data"),
        "codes of embeddings": (["embed", "--model", model, "--data", "bundled:test", "--out",
                                 str(tmp_path / "c.npy"), "--codes"], "--codes: .* is an embedding model"),
    }


@pytest.mark.parametrize("case", ["no sigma", "no samples", "bad sigma", "data without model", "both inputs",
                                  "gallery embeddings", "missing model", "device", "channels", "batch size",
                                  "missing data", "card json as weights", "epochs", "test labels alone",
                                  "codes of embeddings"])
def test_bad_input_one_line_exit_1_no_output(work, tmp_path, capsys, case):
    argv, pattern = _bad_cases(work, tmp_path)[case]
    out = tmp_path / "r.tsv"
    code = main([*argv, *(["--out", str(out)] if argv[0] == "certify" else [])])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"minrr {argv[0]}: error: ") and re.search(pattern, err), err
    assert not any(p.name.startswith(("r.tsv", ".r.tsv", "x.", "c.")) for p in tmp_path.iterdir())
