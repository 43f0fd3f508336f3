"""``minrr attack``: train -> attack -> detect end to end, resumable batches, bad input."""

import json

import numba
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from minrr.backends import hashing_attacks  # noqa: E402
from minrr.backends.checkpoint import load_checkpoint  # noqa: E402
from minrr.cli.attack import ATTACK_NAMES, fraction  # noqa: E402
from minrr.cli.main import main  # noqa: E402
from minrr.data.loaders import load_dataset  # noqa: E402
from minrr.hashing.transforms import mean_blur  # noqa: E402

FAST = ["--eps", "0.1", "--alpha", "1/100", "--steps", "4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A hashing model of minrr train on 600 bundled images (also the database), and test queries."""
    threads = torch.get_num_threads(), numba.get_num_threads()
    numba.set_num_threads(1)  # and torch's threads put back: see the fixture of tests/test_hashing_attacks.py
    torch.set_num_threads(threads[0])
    folder = tmp_path_factory.mktemp("attack")
    data = load_dataset("bundled:train")
    np.savez(folder / "db.npz", images=data.images[:600], labels=data.labels[:600])
    queries = load_dataset("bundled:test")
    np.savez(folder / "queries.npz", images=queries.images[:200], labels=queries.labels[:200])
    assert main(["train", "--task", "hash", "--data", str(folder / "db.npz"), "--out", str(folder / "model.pt"),
                 "--dim", "16", "--width", "8", "--epochs", "6", "--batch-size", "64", "--lr", "0.01",
                 "--device", "cpu"]) == 0
    yield folder
    numba.set_num_threads(threads[1])
    torch.set_num_threads(threads[0])


def _attack(folder, out, *extra):
    return main(["attack", "--model", str(folder / "model.pt"), "--data", str(folder / "queries.npz"),
                 "--device", "cpu", "--out", str(out), *extra])


def test_attack_names_are_the_library_attacks():
    assert ATTACK_NAMES == hashing_attacks.ATTACKS


def test_fractions():
    assert fraction("8/255") == 8 / 255 and fraction(" 0.5 ") == 0.5 and fraction("1e-2") == 0.01


def test_attack_then_detect_score_end_to_end(trained, tmp_path, capsys):
    out = tmp_path / "adv.npz"
    assert _attack(trained, out, "--attack", "dhta", "--max", "60", "--batch-size", "25", "--seed", "2", *FAST) == 0
    assert "wrote" in capsys.readouterr().out
    adv = np.load(out, allow_pickle=False)
    assert set(adv.files) == {"x_adv", "f", "f_t", "index", "labels", "target_labels", "anchors", "settings"}
    settings = json.loads(str(adv["settings"]))
    assert settings["attack"] == "dhta" and settings["eps"] == 0.1 and settings["alpha"] == 0.01
    assert settings["n_t"] == 9 and settings["targeted_label"] == "random" and settings["seed"] == 2
    np.testing.assert_array_equal(adv["index"], np.arange(60))
    queries = np.load(trained / "queries.npz")
    np.testing.assert_array_equal(adv["labels"], queries["labels"][:60])
    x = queries["images"][:60].astype(np.float32) / 255
    assert adv["x_adv"].dtype == np.float32 and np.abs(adv["x_adv"] - x).max() <= 0.1 + 1e-6
    assert adv["x_adv"].min() >= 0 and adv["x_adv"].max() <= 1

    # the images are exactly what the library makes, f and f_t the model's outputs on them
    model, _ = load_checkpoint(trained / "model.pt")
    db = np.load(trained / "db.npz")
    with torch.no_grad():
        db_codes = np.where(model(torch.as_tensor(db["images"]).float() / 255).numpy() >= 0, 1, -1)
    target_labels, anchors = hashing_attacks.dhta_targets(adv["labels"], db_codes, db["labels"], seed=2)
    np.testing.assert_array_equal(adv["target_labels"], target_labels)
    np.testing.assert_array_equal(adv["anchors"], anchors)
    for rows in (slice(0, 25), slice(25, 50), slice(50, 60)):  # the run's batches: the same float rounding
        expected = hashing_attacks.dhta(model, torch.as_tensor(x[rows]), torch.as_tensor(anchors[rows]).float(),
                                        eps=0.1, alpha=0.01, steps=4)
        np.testing.assert_array_equal(adv["x_adv"][rows], expected.numpy())
        with torch.no_grad():
            np.testing.assert_array_equal(adv["f"][rows], model(expected).numpy())
            blurred = torch.as_tensor(mean_blur(adv["x_adv"][rows]))
            np.testing.assert_allclose(adv["f_t"][rows], model(blurred).numpy(), atol=1e-5)

    # minrr detect reads the archive as it is
    with torch.no_grad():
        clean = torch.as_tensor(queries["images"][60:200]).float() / 255
        f, f_t = model(clean).numpy(), model(torch.as_tensor(mean_blur(clean.numpy()))).numpy()
    np.savez(tmp_path / "benign.npz", f=f, f_t=f_t)
    np.save(tmp_path / "db.npy", db_codes.astype(np.int8))
    np.save(tmp_path / "known.npy", np.ones(60, dtype=np.int64))
    assert main(["detect", "calibrate", "--benign", str(tmp_path / "benign.npz"), "--database",
                 str(tmp_path / "db.npy"), "--fpr", "0.1", "--top-k", "10", "--out", str(tmp_path / "det.json")]) == 0
    assert main(["detect", "score", "--detector", str(tmp_path / "det.json"), "--inputs", str(out),
                 "--labels-known", str(tmp_path / "known.npy")]) == 0
    assert "scored 60 queries" in capsys.readouterr().out


@pytest.mark.parametrize("attack", ["hamming", "cw", "detector"])
def test_each_attack_writes_an_archive(trained, tmp_path, attack):
    extra = ["--steps", "3"] if attack == "cw" else FAST
    assert _attack(trained, tmp_path / "adv.npz", "--attack", attack, "--max", "8", *extra) == 0
    adv = np.load(tmp_path / "adv.npz", allow_pickle=False)
    assert adv["x_adv"].shape == (8, 1, 28, 28) and adv["f"].shape == adv["f_t"].shape == (8, 16)
    assert "anchors" not in adv.files  # untargeted
    assert json.loads(str(adv["settings"]))["attack"] == attack
    assert not (tmp_path / "adv.npz.partial").exists()
    if attack == "hamming":  # the archive is a data source of every command: its x_adv and labels
        data = load_dataset(tmp_path / "adv.npz")
        np.testing.assert_array_equal(data.images, adv["x_adv"])
        np.testing.assert_array_equal(data.labels, adv["labels"])


def test_an_interrupted_run_resumes_to_the_same_file(trained, tmp_path, monkeypatch, capsys):
    args = ("--attack", "hamming", "--max", "50", "--batch-size", "20", "--random-start", *FAST)
    assert _attack(trained, tmp_path / "whole.npz", *args) == 0
    real, calls = hashing_attacks.hashing_attack, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(hashing_attacks, "hashing_attack", interrupted)
    out = tmp_path / "adv.npz"
    assert _attack(trained, out, *args) == 130
    partial = tmp_path / "adv.npz.partial"
    assert partial.exists() and not out.exists()
    monkeypatch.setattr(hashing_attacks, "hashing_attack", real)

    # other settings: refused, the partial file kept
    capsys.readouterr()
    assert _attack(trained, out, *args[:-1], "5") == 1
    assert "was made with other settings (steps 4 there, 5 now)" in capsys.readouterr().err and partial.exists()

    # a batch cut short is dropped; the run goes on from the last complete batch
    size = partial.stat().st_size
    with open(partial, "r+b") as fh:
        fh.truncate(size - 100)
    monkeypatch.setattr(hashing_attacks, "hashing_attack", lambda *a, **k: calls.append(2) or real(*a, **k))
    assert _attack(trained, out, *args) == 0
    assert calls.count(2) == 2  # batch 1 (cut) and batch 2 again; batch 0 resumed
    whole, resumed = np.load(tmp_path / "whole.npz"), np.load(out)
    assert whole.files == resumed.files
    for key in whole.files:
        np.testing.assert_array_equal(whole[key], resumed[key])
    assert not partial.exists()


def test_a_damaged_partial_file_is_refused(trained, tmp_path, capsys):
    out = tmp_path / "adv.npz"
    (tmp_path / "adv.npz.partial").write_bytes(b"not a partial file")
    assert _attack(trained, out, "--attack", "hamming", "--max", "4", *FAST) == 1
    assert "is not a partial result of minrr attack" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("flags, status, message", [
    (["--attack", "hamming", "--eps", "eight"], 2, "expected a number or a fraction such as 8/255, got 'eight'"),
    (["--attack", "hamming", "--eps", "8/0"], 2, "expected a number or a fraction"),
    (["--attack", "hamming", "--lambda1", "0.1"], 1, "--lambda1: not a setting of the hamming attack"),
    (["--attack", "cw", "--alpha", "0.1"], 1, "--alpha: not a setting of the cw attack"),
    (["--attack", "hamming", "--targeted-label", "3"], 1, "--targeted-label: the hamming attack is untargeted"),
    (["--attack", "dhta", "--targeted-label", "cat"], 1, "--targeted-label: expected a class label"),
    (["--attack", "dhta", "--database", "db.npy"], 1, "--database-labels: required with --database"),
    (["--attack", "hamming", "--eps", "-1"], 1, "--eps: expected a finite number above 0"),
    (["--attack", "hamming", "--batch-size", "0"], 1, "--batch-size: expected a whole number >= 1"),
    ([], 1, "--attack: required"),
    (["--attack", "hamming", "--max-queries", "3"], 1, "--max-queries: only with --suite"),
])
def test_bad_input_exits_with_one_line_and_no_output(trained, tmp_path, capsys, flags, status, message):
    np.save(tmp_path / "db.npy", np.ones((4, 16), dtype=np.int8))
    out = tmp_path / "adv.npz"
    flags = [str(tmp_path / f) if f == "db.npy" else f for f in flags]
    if status == 2:
        with pytest.raises(SystemExit) as info:
            _attack(trained, out, "--max", "4", *flags)
        assert info.value.code == 2
    else:
        assert _attack(trained, out, "--max", "4", *flags) == 1
    err = capsys.readouterr().err
    assert message in err and (status == 2 or len(err.strip().splitlines()) == 1)
    assert not out.exists() and not (tmp_path / "adv.npz.partial").exists()


def test_output_over_an_input_is_refused_before_any_work(trained, tmp_path, capsys):
    before = (trained / "queries.npz").read_bytes()
    assert _attack(trained, trained / "queries.npz", "--attack", "hamming", *FAST) == 1
    assert "is the input file of --data" in capsys.readouterr().err
    assert (trained / "queries.npz").read_bytes() == before
    assert _attack(trained, tmp_path / "missing" / "adv.npz", "--attack", "hamming", *FAST) == 1
    assert "--out: the folder of" in capsys.readouterr().err
