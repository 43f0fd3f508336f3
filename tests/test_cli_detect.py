"""``minrr detect calibrate`` / ``score`` end to end, and every bad input: one line, exit 1, no output."""

import json
import re
import shutil

import numpy as np
import pytest

from minrr.hashing import detect
from minrr.cli.main import main

K, CLASSES = 32, 4


@pytest.fixture
def files(tmp_path):
    """A database of noisy class codes, 400 benign queries, 100 benign + 100 attacked queries."""
    rng = np.random.default_rng(0)
    centres = rng.choice([-1, 1], size=(CLASSES, K))
    labels = rng.integers(0, CLASSES, 600)
    database = np.where(rng.random((600, K)) < 0.1, -centres[labels], centres[labels]).astype(np.int8)

    def outputs(n, attacked=False):
        code = centres[rng.integers(0, CLASSES, n)] * (-1 if attacked else 1)
        logits = 2 * code + rng.normal(size=(n, K))
        return np.tanh(logits), np.tanh(logits + 0.3 * rng.normal(size=(n, K)))

    paths = {name: tmp_path / name for name in ("db.npy", "db8.npy", "benign.npz", "q.npz", "adv.npy")}
    np.save(paths["db.npy"], database)
    np.save(paths["db8.npy"], np.packbits(database > 0, axis=1))
    f, f_t = outputs(400)
    np.savez(paths["benign.npz"], f=f, f_t=f_t)
    (fb, ftb), (fa, fta) = outputs(100), outputs(100, attacked=True)
    np.savez(paths["q.npz"], f=np.r_[fb, fa], f_t=np.r_[ftb, fta])
    np.save(paths["adv.npy"], np.r_[np.zeros(100, int), np.ones(100, int)])
    return paths


def calibrate(files, out, *extra, db="db.npy"):
    return main(["detect", "calibrate", "--benign", str(files["benign.npz"]), "--database", str(files[db]),
                 "--fpr", "0.05", "--top-k", "20", "--out", str(out), *extra])


def read_tsv(path):
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    rows = np.array([[float(v) for v in line.split("\t")] for line in lines[1:]])
    return header, rows


def test_calibrate_then_score_agrees_with_the_library(files, tmp_path, capsys):
    detector_path, tsv = tmp_path / "detector.json", tmp_path / "flags.tsv"
    assert calibrate(files, detector_path) == 0
    assert "calibration FPR = 0.0" in capsys.readouterr().out
    assert main(["detect", "score", "--detector", str(detector_path), "--inputs", str(files["q.npz"]),
                 "--labels-known", str(files["adv.npy"]), "--out", str(tsv)]) == 0
    printed = capsys.readouterr().out

    with np.load(files["benign.npz"]) as benign, np.load(files["q.npz"]) as queries:
        database = np.load(files["db.npy"])
        library = detect.Detector(fpr=0.05, top_k=20)
        library.fit(library.criteria(benign["f"], benign["f_t"], database))
        scores = library.criteria(queries["f"], queries["f_t"], database)
    loaded = detect.Detector.from_json(detector_path.read_text())
    np.testing.assert_array_equal(loaded.thresholds_, library.thresholds_)
    assert loaded.database["path"] == str(files["db.npy"].resolve())

    header, rows = read_tsv(tsv)
    assert header == ["idx", "c1", "c2", "c3", "score", "flag_c1", "flag_c2", "flag_c3", "flag", "adversarial"]
    np.testing.assert_array_equal(rows[:, 0], np.arange(200))
    np.testing.assert_array_equal(rows[:, 1:4], scores)  # exact: shortest round-trip decimals
    np.testing.assert_array_equal(rows[:, 4], library.score(scores))
    np.testing.assert_array_equal(rows[:, 5:8], library.flags(scores))
    np.testing.assert_array_equal(rows[:, 8], library.predict(scores))
    np.testing.assert_array_equal(rows[:, 9], np.load(files["adv.npy"]))

    report = library.report(scores, np.load(files["adv.npy"]))
    for name, row in report.items():
        printed_row = re.search(rf"^{name}\t(\S+)\t(\S+)\t(\S+)\t(\S+)$", printed, re.M).groups()
        assert [float(v) for v in printed_row] == pytest.approx(
            [row["tpr"], row["fnr"], row["fpr"], row["auc"]], abs=5e-5)
    assert report["combined"]["tpr"] > 0.9  # the attacked codes sit far from the database


def test_score_without_labels_or_out_writes_nothing(files, tmp_path, capsys):
    assert calibrate(files, tmp_path / "detector.json") == 0
    before = set(tmp_path.iterdir())
    assert main(["detect", "score", "--detector", str(tmp_path / "detector.json"),
                 "--inputs", str(files["q.npz"])]) == 0
    assert re.search(r"scored 200 queries: \d+ flagged as adversarial", capsys.readouterr().out)
    assert set(tmp_path.iterdir()) == before


def test_packed_database_gives_the_same_detector(files, tmp_path):
    assert calibrate(files, tmp_path / "a.json") == 0
    assert calibrate(files, tmp_path / "b.json", "--packed", db="db8.npy") == 0
    a, b = (json.loads((tmp_path / name).read_text()) for name in ("a.json", "b.json"))
    assert a["thresholds"] == b["thresholds"] and b["database"]["packed"] is True
    for name in ("a", "b"):
        assert main(["detect", "score", "--detector", str(tmp_path / f"{name}.json"), "--inputs",
                     str(files["q.npz"]), "--out", str(tmp_path / f"{name}.tsv")]) == 0
    assert (tmp_path / "a.tsv").read_text() == (tmp_path / "b.tsv").read_text()


def test_moved_database_is_found_with_database_flag(files, tmp_path, capsys):
    assert calibrate(files, tmp_path / "detector.json") == 0
    moved = tmp_path / "moved.npy"
    shutil.move(files["db.npy"], moved)
    argv = ["detect", "score", "--detector", str(tmp_path / "detector.json"), "--inputs", str(files["q.npz"])]
    assert main(argv) == 1
    assert "give it with --database" in capsys.readouterr().err
    assert main([*argv, "--database", str(moved)]) == 0


@pytest.mark.parametrize("method", detect.METHODS)
def test_methods_c3_forms_and_c1_model(files, tmp_path, method, capsys):
    out = tmp_path / "detector.json"
    assert calibrate(files, out, "--method", method, "--c3", "hard", "--c1-model", "4") == 0
    assert "(from the C1 model)" in capsys.readouterr().out
    loaded = detect.Detector.from_json(out.read_text())
    assert (loaded.method, loaded.c3, loaded.c1_model.n_classes, loaded.c1_model.n_bits) == (method, "hard", 4, K)
    assert loaded.thresholds_[0] == loaded.c1_model.interval(detect.THREE_SIGMA)[0]


def bad_calibrate_cases(tmp_path, files):
    """name -> (replaced options, extra arguments, start of the message)."""
    rng = np.random.default_rng(1)
    f = np.tanh(rng.normal(size=(400, K)))
    np.savez(tmp_path / "no_ft.npz", f=f)
    np.savez(tmp_path / "big.npz", f=2 * f, f_t=f)
    np.savez(tmp_path / "ft_shape.npz", f=f, f_t=f[:, :16])
    np.savez(tmp_path / "bits.npz", f=f[:, :16], f_t=f[:, :16])
    np.savez(tmp_path / "few.npz", f=f[:10], f_t=f[:10])
    np.savez(tmp_path / "obj.npz", f=np.array([{"a": 1}], dtype=object), f_t=f)
    np.save(tmp_path / "twos.npy", np.full((50, K), 2, dtype=np.int8))
    return {
        "missing benign": ({"--benign": tmp_path / "none.npz"}, [], "--benign: file not found"),
        "pickled benign": ({"--benign": tmp_path / "obj.npz"}, [], "--benign: .* pickled"),
        "no f_t": ({"--benign": tmp_path / "no_ft.npz"}, [], "--benign: .* lacks the array 'f_t'"),
        "outputs above 1": ({"--benign": tmp_path / "big.npz"}, [], r"--benign array 'f': continuous outputs"),
        "f_t shape": ({"--benign": tmp_path / "ft_shape.npz"}, [], r"--benign: array 'f_t' has shape \(400, 16\)"),
        "bits mismatch": ({"--benign": tmp_path / "bits.npz"}, [],
                          "--database: codes of 32 bits, but outputs f of 16"),
        "bad code values": ({"--database": tmp_path / "twos.npy"}, [], "--database: code values must be"),
        "missing database": ({"--database": tmp_path / "none.npy"}, [], "--database: file not found"),
        "top-k above N": ({"--top-k": 601}, [], r"--top-k: expected 1 <= top_k <= 600"),
        "top-k zero": ({"--top-k": 0}, [], "--top-k: expected a whole number >= 1"),
        "fpr zero": ({"--fpr": 0}, [], "--fpr: expected a number strictly between 0 and 1"),
        "fpr above one": ({"--fpr": 1.5}, [], "--fpr: expected a number strictly between 0 and 1"),
        "too few benign": ({"--benign": tmp_path / "few.npz", "--top-k": 5}, [],
                           "--benign: 10 benign calibration queries are too few"),
        "confidence alone": ({}, ["--c1-confidence", "0.99"], "--c1-confidence: given without --c1-model"),
        "one class": ({}, ["--c1-model", "1"], "--c1-model: expected a whole number >= 2"),
        "bad confidence": ({}, ["--c1-model", "4", "--c1-confidence", "1"], "--c1-confidence: expected a number"),
        "packed int8": ({}, ["--packed"], "--database: packed codes must be uint8"),
        "missing out folder": ({"--out": tmp_path / "no" / "d.json"}, [], "--out: the folder of"),
    }


def assert_one_line_and_nothing_written(argv, tmp_path, capsys, name, message, command="detect"):
    before = set(tmp_path.iterdir())
    assert main(argv) == 1, name
    err = capsys.readouterr().err
    assert err.count("\n") == 1, (name, err)
    assert re.match(rf"minrr {command}: error: {message}", err), (name, err)
    assert set(tmp_path.iterdir()) == before, name  # no result and no temporary file


def test_bad_calibrate_inputs(files, tmp_path, capsys):
    for name, (replace, extra, message) in bad_calibrate_cases(tmp_path, files).items():
        options = {"--benign": files["benign.npz"], "--database": files["db.npy"], "--top-k": 20,
                   "--out": tmp_path / "detector.json", **replace}
        argv = ["detect", "calibrate", *[str(t) for pair in options.items() for t in pair], *extra]
        assert_one_line_and_nothing_written(argv, tmp_path, capsys, name, message)


def test_bad_score_inputs(files, tmp_path, capsys):
    detector_path = tmp_path / "detector.json"
    assert calibrate(files, detector_path) == 0
    document = json.loads(detector_path.read_text())
    edited = {**document, "thresholds": {**document["thresholds"], "c1": 99.0}}
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    (tmp_path / "broken.json").write_text("{")
    other = np.load(files["db.npy"])
    other[0] *= -1
    np.save(tmp_path / "other.npy", other)
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "q16.npz", f=np.tanh(rng.normal(size=(5, 16))), f_t=np.tanh(rng.normal(size=(5, 16))))
    np.save(tmp_path / "adv5.npy", np.zeros(5, int))
    np.save(tmp_path / "adv2.npy", np.full(200, 2))
    cases = {
        "missing detector": ({"--detector": tmp_path / "none.json"}, [], "--detector: .*none.json: file not found"),
        "broken detector": ({"--detector": tmp_path / "broken.json"}, [], "--detector: .*broken.json: not valid JSON"),
        "edited detector": ({"--detector": tmp_path / "edited.json"}, [], "--detector: the stored thresholds"),
        "other database": ({}, ["--database", tmp_path / "other.npy"], "--database: .* is not the database"),
        "packed again": ({}, ["--packed"], "--packed: the detector records the layout"),
        "bits mismatch": ({"--inputs": tmp_path / "q16.npz"}, [],
                          "--database: codes of 32 bits, but outputs f of 16"),
        "missing inputs": ({"--inputs": tmp_path / "none.npz"}, [], "--inputs: file not found"),
        "label count": ({}, ["--labels-known", tmp_path / "adv5.npy"], "--labels-known: 5 labels for 200 queries"),
        "label values": ({}, ["--labels-known", tmp_path / "adv2.npy"], "--labels-known: labels must be 0"),
        "missing out folder": ({"--out": tmp_path / "no" / "f.tsv"}, [], "--out: the folder of"),
    }
    for name, (replace, extra, message) in cases.items():
        options = {"--detector": detector_path, "--inputs": files["q.npz"], "--out": tmp_path / "flags.tsv",
                   **replace}
        argv = ["detect", "score", *[str(t) for pair in options.items() for t in pair], *map(str, extra)]
        assert_one_line_and_nothing_written(argv, tmp_path, capsys, name, message)


@pytest.mark.parametrize("argv", [
    ["detect"],
    ["detect", "calibrate", "--database", "db.npy", "--out", "d.json"],
    ["detect", "calibrate", "--benign", "b.npz", "--database", "db.npy", "--out", "d.json", "--method", "vote"],
    ["detect", "calibrate", "--benign", "b.npz", "--database", "db.npy", "--out", "d.json", "--fpr", "low"],
    ["detect", "score", "--inputs", "q.npz"],
])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
