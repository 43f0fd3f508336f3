"""``minrr score`` end to end, in process: the table, --json, and malformed records."""

import json
import re

import pytest

from conftest import act_cub_record
from minrr.cli.main import main
from minrr.scores import ARS_TERMS, ERS_TERMS

RECORD = act_cub_record()


@pytest.fixture
def record_path(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(RECORD))
    return path


def test_prints_every_term_then_ers_and_ars(record_path, capsys):
    assert main(["score", "--attacks", str(record_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in out[2:12]}
    assert list(rows) == list(ERS_TERMS)
    assert rows["CA+"] == ["15.500", "31.00", "31.00"]
    assert rows["TMA"] == ["0.472", "52.80", "-"]
    assert rows["ES:R"] == ["11.100", "11.10", "40.36"]
    assert out[12].startswith("ERS 33.95") and out[13].startswith("ARS 40.29")


def test_json_output_matches_the_table(record_path, tmp_path, capsys):
    out_path = tmp_path / "scores.json"
    assert main(["score", "--attacks", str(record_path), "--json", str(out_path)]) == 0
    data = json.loads(out_path.read_text())
    assert data["attacks"] == str(record_path) and data["benign_r1"] == 0.275
    assert [t["name"] for t in data["terms"]] == list(ERS_TERMS)
    assert [t["name"] for t in data["terms"] if t["ars"] is not None] == list(ARS_TERMS)
    assert data["ers"] == pytest.approx(33.945) and round(data["ars"], 1) == 40.3
    assert f"ERS {data['ers']:.2f}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "scores.json"]  # no temporary left


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r["attacks"][5].pop("shift"), r"results.json: attacks\[5\] \(ES\): shift: missing"),
        (lambda r: r["attacks"][0].update(rank_after=15.5), r"attacks\[0\] \(CA\+\): rank_after: expected values"),
        (lambda r: r.pop("benign_r1"), "results.json: benign_r1: missing"),
        (lambda r: r["attacks"].pop(), "attacks: no entry for GTT"),
    ],
)
def test_malformed_record_is_one_line_and_exit_1(tmp_path, capsys, edit, message):
    record = json.loads(json.dumps(RECORD))
    edit(record)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(record))
    out_path = tmp_path / "scores.json"
    assert main(["score", "--attacks", str(path), "--json", str(out_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("minrr score: error: ")
    assert re.search(message, lines[0])
    assert not out_path.exists()


def test_unreadable_files_exit_1(tmp_path, capsys):
    assert main(["score", "--attacks", str(tmp_path / "none.json")]) == 1
    assert "none.json: file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["score", "--attacks", str(bad)]) == 1
    assert "bad.json: not valid JSON" in capsys.readouterr().err


def test_json_into_a_missing_folder_exits_1_and_writes_nothing(record_path, tmp_path, capsys):
    assert main(["score", "--attacks", str(record_path), "--json", str(tmp_path / "no" / "s.json")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    assert not (tmp_path / "no").exists()


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["score"])
    assert exc.value.code == 2
    assert "--attacks" in capsys.readouterr().err
