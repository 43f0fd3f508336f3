"""``minrr search`` end to end, and every bad input: one line, exit 1, no output file."""

import pickle
import re

import numpy as np
import pytest

from minrr.hashing import hamming
from minrr.cli.main import main
from minrr.metrics.hashing import map_at_k


@pytest.fixture
def files(tmp_path):
    """300 database codes of 40 bits in 3 classes (noisy class centres), 12 queries."""
    rng = np.random.default_rng(0)
    centres = rng.choice([-1, 1], size=(3, 40))
    db_labels, q_labels = rng.integers(0, 3, 300), rng.integers(0, 3, 12)

    def noisy(labels):
        flips = rng.random((len(labels), 40)) < 0.2
        return np.where(flips, -centres[labels], centres[labels]).astype(np.int8)

    database, queries = noisy(db_labels), noisy(q_labels)
    paths = {name: tmp_path / f"{name}.npy" for name in ("db", "q", "dl", "ql", "db8", "q8")}
    for name, arr in [("db", database), ("q", queries), ("dl", db_labels), ("ql", q_labels),
                      ("db8", np.packbits(database > 0, axis=1)), ("q8", np.packbits(queries > 0, axis=1))]:
        np.save(paths[name], arr)
    return paths


def _search(files, out, *extra, db="db", q="q"):
    return main(["search", "--database", str(files[db]), "--queries", str(files[q]), "--k", "25",
                 "--out", str(out), *extra])


def test_search_writes_distances_and_indices_and_reports_map(files, tmp_path, capsys):
    out = tmp_path / "result.npz"
    code = _search(files, out, "--labels", str(files["ql"]), "--database-labels", str(files["dl"]))
    assert code == 0
    database, queries = np.load(files["db"]), np.load(files["q"])
    with np.load(out, allow_pickle=False) as result:
        assert sorted(result.files) == ["distances", "indices"]
        distances, indices = result["distances"], result["indices"]
    assert distances.shape == indices.shape == (12, 25)
    all_distances = (queries[:, None, :] != database[None, :, :]).sum(axis=2)
    np.testing.assert_array_equal(distances, np.take_along_axis(all_distances, indices, axis=1))
    np.testing.assert_array_equal(indices, np.argsort(all_distances, axis=1, kind="stable")[:, :25])

    printed = capsys.readouterr().out
    reported = [float(v) for v in re.findall(r"mAP@25 = ([0-9.]+)", printed)]
    labels = np.load(files["ql"]), np.load(files["dl"])
    assert reported[0] == pytest.approx(map_at_k(indices, *labels), abs=5e-5)
    assert reported[1] == pytest.approx(map_at_k(indices, *labels, variant="dhta"), abs=5e-5)
    assert reported[0] > 0.9  # noisy class centres: the top 25 are mostly the query's class


def test_packed_files_give_the_same_result(files, tmp_path):
    assert _search(files, tmp_path / "a.npz") == 0
    assert _search(files, tmp_path / "b.npz", "--packed", db="db8", q="q8") == 0
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        for key in ("distances", "indices"):
            np.testing.assert_array_equal(a[key], b[key])


def test_without_out_nothing_is_written(files, tmp_path, capsys):
    code = main(["search", "--database", str(files["db"]), "--queries", str(files["q"]), "--k", "3"])
    assert code == 0
    assert "searched 12 queries against 300 codes of 40 bits, k = 3" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.npy" for n in files)


def _bad_cases(tmp_path, files):
    """name -> (options replacing the defaults, extra arguments, start of the message)."""
    np.save(tmp_path / "short.npy", np.ones((4, 39), dtype=np.int8))
    np.save(tmp_path / "twos.npy", np.full((4, 40), 2, dtype=np.int8))
    np.save(tmp_path / "ql5.npy", np.zeros(5, dtype=np.int64))
    late = np.load(files["db"])
    late[-1, -1] = 3
    np.save(tmp_path / "late.npy", late)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "pickle.npy").write_bytes(pickle.dumps(np.ones((4, 40))))
    (tmp_path / "cut.npy").write_bytes(files["q"].read_bytes()[:-50])  # data cut short
    labels = {"--labels": files["ql"], "--database-labels": files["dl"]}
    return {
        "mixed code lengths": ({"--queries": tmp_path / "short.npy"}, [], "--queries: codes of 39 bits"),
        "values outside the alphabet": ({"--queries": tmp_path / "twos.npy"}, [], "--queries: code values"),
        "bad value in the last row": ({"--database": tmp_path / "late.npy"}, [], "--database: code values .* row 299"),
        "k above N": ({"--k": 301}, [], "--top-k: expected 1 <= k <= 300"),
        "k below 1": ({"--top-k": 0}, [], "--top-k: expected 1 <= k <= 300"),
        "label count mismatch": ({**labels, "--labels": tmp_path / "ql5.npy"}, [], "--labels: 5 labels for 12"),
        "labels alone": ({"--labels": files["ql"]}, [], "--labels: --labels and --database-labels go together"),
        "missing file": ({"--database": tmp_path / "none.npy"}, [], "--database: file not found"),
        "object array": ({"--queries": tmp_path / "obj.npy"}, [], "--queries: .* Python objects"),
        "pickle file": ({"--queries": tmp_path / "pickle.npy"}, [], "--queries: .* pickled"),
        "truncated file": ({"--queries": tmp_path / "cut.npy"}, [], "--queries: .* truncated"),
        "packed int8": ({}, ["--packed"], "--database: packed codes must be uint8"),
        "missing out folder": ({"--out": tmp_path / "no" / "r.npz"}, [], "--out: the folder of"),
    }


def test_bad_inputs_give_one_line_and_no_output(files, tmp_path, capsys):
    for name, (replace, extra, message) in _bad_cases(tmp_path, files).items():
        options = {"--database": files["db"], "--queries": files["q"], "--k": 25,
                   "--out": tmp_path / "result.npz", **replace}
        argv = ["search", *[str(t) for pair in options.items() for t in pair], *extra]
        before = set(tmp_path.iterdir())
        assert main(argv) == 1, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1, (name, err)
        assert re.match(rf"minrr search: error: {message}", err), (name, err)
        assert set(tmp_path.iterdir()) == before, name  # no result and no temporary file


def test_usage_errors_exit_2(files):
    with pytest.raises(SystemExit) as exc:
        main(["search", "--database", str(files["db"]), "--queries", str(files["q"]), "--k", "many"])
    assert exc.value.code == 2


def test_library_search_agrees_with_cli(files, tmp_path):
    assert _search(files, tmp_path / "r.npz") == 0
    distances, indices = hamming.search(np.load(files["q"]), np.load(files["db"]), 25)
    with np.load(tmp_path / "r.npz") as result:
        np.testing.assert_array_equal(result["distances"], distances)
        np.testing.assert_array_equal(result["indices"], indices)
