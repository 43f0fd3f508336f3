"""bench/reproduce_umcd.py --quick: every table of the expected shape, numbers in range, resumable."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ATTACKS = {"eps8": {"untargeted", "targeted", "cw"}, "eps32": {"untargeted", "targeted"}}
DETECTORS = {"umcd", "lid", "fs-median", "fs-nlm", "fs-adaptive", "mean-blur", "feature-squeezing",
             "umcd-c1-alone", "umcd-c2-alone", "umcd-c3-alone"}
SUBSETS = {"C3", "C1+C3", "C2+C3", "C1+C2+C3"}


def _run(work: Path):
    command = [sys.executable, "bench/reproduce_umcd.py", "--quick", "--work", str(work), "--out", str(work / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("umcd")
    first = _run(work)
    assert first.returncode == 0, first.stderr[-3000:]
    first_json = (work / "out" / "umcd.json").read_text()
    second = _run(work)
    assert second.returncode == 0, second.stderr[-3000:]
    return {"first": first, "first_json": first_json, "second": second, "out": work / "out",
            "numbers": json.loads(first_json)}


def _in_unit(value, name):
    assert 0.0 <= value <= 1.0, f"{name} = {value} outside [0, 1]"


def _check_rates(row, name):
    for key in ("tpr", "fnr", "fpr"):
        _in_unit(row[key], f"{name}.{key}")
    assert row["tpr"] + row["fnr"] == pytest.approx(1.0)
    _in_unit(row["auc"], f"{name}.auc")


def test_table1_rows_columns_and_measured_fpr(runs):
    table = runs["numbers"]["table1"]
    assert {eps: set(t) for eps, t in table.items()} == ATTACKS
    for eps, attacks in table.items():
        for attack, detectors in attacks.items():
            assert set(detectors) == DETECTORS
            for name, row in detectors.items():
                _check_rates(row, f"{eps}.{attack}.{name}")
                # 100 benign evaluation queries against a 5% target: a loose bound for the quick size
                assert row["fpr"] <= 0.2, (eps, attack, name, row["fpr"])
    for name, value in runs["numbers"]["benign"]["calibration_fpr"].items():
        assert value <= 0.05, name  # the calibration set's own FPR never exceeds the target


def test_table2_subsets_agree_with_the_detectors_own_rows(runs):
    table1, table2 = runs["numbers"]["table1"], runs["numbers"]["table2"]
    assert {eps: set(t) for eps, t in table2.items()} == {"eps8": {"untargeted", "targeted"},
                                                          "eps32": {"untargeted", "targeted"}}
    for eps, attacks in table2.items():
        for attack, subsets in attacks.items():
            assert set(subsets) == SUBSETS
            for name, row in subsets.items():
                _check_rates(row, f"{eps}.{attack}.{name}")
            # the masked calibration of C3 alone is C3's own 5% threshold; all three is the detector itself
            assert subsets["C3"]["tpr"] == table1[eps][attack]["umcd-c3-alone"]["tpr"]
            assert subsets["C3"]["fpr"] == table1[eps][attack]["umcd-c3-alone"]["fpr"]
            assert subsets["C1+C2+C3"] == table1[eps][attack]["umcd"]


def test_attacks_work_and_maps_in_range(runs):
    numbers = runs["numbers"]
    clean = numbers["benign"]["clean"]["map"]
    _in_unit(clean, "clean mAP")
    for key, row in numbers["attack_success"].items():
        for name, value in row.items():
            _in_unit(value, f"{key}.{name}")
    # at Fashion-MNIST's budget the untargeted attack must cut retrieval well below the clean mAP
    assert numbers["attack_success"]["untargeted-eps32"]["map"] < clean - 0.1
    assert numbers["attack_success"]["targeted-eps32"]["t_map"] > numbers["attack_success"]["targeted-eps8"]["t_map"]


def test_fig4_and_table4_and_table3(runs):
    numbers = runs["numbers"]
    assert set(numbers["fig4"]) == {"benign", "untargeted", "targeted", "cw", "untargeted-eps32", "targeted-eps32"}
    for name, s in numbers["fig4"].items():
        assert 0 <= s["q10"] <= s["median"] <= s["q90"] <= 64, name  # C2 = sum(1 - |f_i|) over K = 64 bits
    png = runs["out"] / "umcd-c2.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = numbers["table4"]
    assert sorted((r["lambda2"], r["lambda1"]) for r in rows) == [(0.3, 0.0), (0.3, 0.0075), (3.0, 0.0), (3.0, 0.0075)]
    for r in rows:
        for detector in ("umcd", "mean-blur"):
            assert set(r[detector]) == {"0.1", "0.2"}
            for fpr, row in r[detector].items():
                _check_rates(row, f"table4.{detector}.{fpr}")
                assert row["fpr"] <= 0.35, (detector, fpr, row["fpr"])
        for key in ("map", "t_map", "success_rate"):
            _in_unit(r[key], key)
        assert 0 <= r["evaders_successful"] <= r["evaders"] <= r["n"] == 100

    table3 = numbers["table3"]
    assert set(table3) == {"none", "2"}
    assert (table3["none"]["epochs"], table3["2"]["epochs"]) == (2, 1)
    for key, row in table3.items():
        assert set(row) == {"epochs", "clean", "pgd8", "pgd10"}
        for name in ("clean", "pgd8", "pgd10"):
            _in_unit(row[name], f"table3.{key}.{name}")


def test_claims_are_computed_and_explained(runs):
    claims = runs["numbers"]["claims"]
    assert len(claims) == 11
    for c in claims:
        assert isinstance(c["holds"], bool)
        assert bool(c["explanation"]) == (not c["holds"]), c["claim"]
        assert c["paper"] and c["ours"]
    page = (runs["out"] / "umcd.md").read_text()
    for heading in ("### Attack success", "### Table 1", "### Table 2", "### Fig. 4", "### Table 4", "### Table 3",
                    "### Claims"):
        assert heading in page
    assert "Regenerate: `python bench/reproduce_umcd.py --quick --train 2000 " in page
    assert "| UMCD | " in page and "| 0.075 | 0.004 |" in page  # ours beside the paper's CIFAR-10 / ImageNet


def test_rerun_loads_every_step_and_writes_the_same_json(runs):
    first, second = runs["first"].stderr, runs["second"].stderr
    ran = {line.split(": ")[1] for line in first.splitlines() if line.endswith(": running")}
    ran = {key for key in ran if not key.startswith("images-")}  # attacked images: inside their attack's step
    assert len(ran) == 1 + 5 + 4 + 2, ran  # benign, five attacks, four white-box settings, two Table 3 models
    for key in ran:
        assert f"{key}: finished before, loaded" in second, key
    assert ": running" not in second and "training (" not in second
    assert "trained before, loaded" in second
    assert (runs["out"] / "umcd.json").read_text() == runs["first_json"]
    assert not any(math.isnan(v) for v in json.loads(runs["first_json"])["benign"]["thresholds"].values())
