"""bench/reproduce_retrievalguard.py in quick mode: the page's table has every (model, sigma, curve),
each certified recall is a share that falls with the radius, the halfspace certificate is never
below RetrievalGuard's (a theorem), the numbers agree with the per-query radii, and a second run
with the same work folder loads every finished model and step and writes the same JSON."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "reproduce_retrievalguard.py"
MODELS = ("plain (DML)", "GDML (noise-trained)")
SIGMAS = ("0.1", "0.25", "0.5")
CURVES = ("RetrievalGuard, paper's bound", "RetrievalGuard, minrr's bound", "halfspace (minrr)")
STEPS = 6  # the plain model at three sigmas, one GDML model per sigma
MODELS_TRAINED = 4


def _run(work: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--quick", "--work", str(work), "--out", str(work)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two quick runs in one work folder: (folder, first run, its JSON text, second run)."""
    work = tmp_path_factory.mktemp("retrievalguard")
    first = _run(work)
    assert first.returncode == 0, first.stderr[-3000:]
    first_json = (work / "retrievalguard.json").read_text()
    second = _run(work)
    assert second.returncode == 0, second.stderr[-3000:]
    return work, first, first_json, second


def _table(text: str, heading: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the first markdown table after ``heading``."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    block = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block]
    assert set(block[1].replace("|", "")) == {"-"}, block[1]
    return cells[0], cells[2:]


def _certified_table(work: Path) -> tuple[list[float], dict]:
    """Radii of the columns, and {(model, sigma, curve): (clean, [recall at each radius])}."""
    header, rows = _table((work / "retrievalguard.md").read_text(), "### Certified Recall@1")
    assert header[:4] == ["model", "sigma", "curve", "clean"]
    assert header[-2:] == ["median radius", "mean radius"]
    radii = [float(h.removeprefix("r=")) for h in header[4:-2]]
    assert radii[0] == 0.0 and np.all(np.diff(radii) > 0)
    table = {}
    for row in rows:
        assert len(row) == len(header), row
        key = tuple(row[:3])
        assert key not in table, f"row {key} twice"
        table[key] = (float(row[3]), [float(v) for v in row[4:-2]])
    return radii, table


def test_the_table_has_every_model_sigma_and_curve(runs):
    work = runs[0]
    _, table = _certified_table(work)
    assert set(table) == set(itertools.product(MODELS, SIGMAS, CURVES))
    png = (work / "retrievalguard.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_recalls_are_shares_falling_with_the_radius(runs):
    _, table = _certified_table(runs[0])
    for key, (clean, recall) in table.items():
        assert 0.0 <= clean <= 1.0 and all(0.0 <= v <= 1.0 for v in recall), key
        assert np.all(np.diff(recall) <= 0), (key, recall)
        assert recall[0] <= clean, (key, "a certified query must be retrieved correctly")


def test_halfspace_is_never_below_retrievalguard(runs):
    work = runs[0]
    _, table = _certified_table(work)
    for model, sigma in itertools.product(MODELS, SIGMAS):
        halfspace, retrievalguard = table[model, sigma, CURVES[2]][1], table[model, sigma, CURVES[1]][1]
        assert all(h >= r for h, r in zip(halfspace, retrievalguard)), (model, sigma, halfspace, retrievalguard)
    record = json.loads((work / "retrievalguard.json").read_text())
    radius = {(r["model"], r["sigma"], r["curve"]): np.asarray(r["radius"]) for r in record["runs"]}
    for model, sigma in itertools.product(("plain", "gdml"), (0.1, 0.25, 0.5)):
        assert np.all(radius[model, sigma, "halfspace"] >= radius[model, sigma, "retrievalguard"]), (model, sigma)
    # not vacuous: the quick models are certified somewhere
    assert max(r.max() for r in radius.values()) > 0


def test_the_numbers_follow_from_the_per_query_radii(runs):
    work = runs[0]
    radii, table = _certified_table(work)
    record = json.loads((work / "retrievalguard.json").read_text())
    names = {"plain": MODELS[0], "gdml": MODELS[1], "paper": CURVES[0], "retrievalguard": CURVES[1],
             "halfspace": CURVES[2]}
    assert len(record["runs"]) == len(MODELS) * len(SIGMAS) * len(CURVES)
    for run in record["runs"]:
        r = np.asarray(run["radius"])
        assert r.shape == (len(record["queries"]),) and np.all(r >= 0)
        expected = [np.count_nonzero((r > 0) & (r >= rho)) / len(r) for rho in radii]
        assert [c["radius"] for c in run["certified_recall"]] == radii
        assert np.allclose([c["recall"] for c in run["certified_recall"]], expected, rtol=0, atol=1e-12)
        assert run["median_radius"] == pytest.approx(float(np.median(r)))
        assert run["mean_radius"] == pytest.approx(float(np.mean(r)))
        clean, recall = table[names[run["model"]], f"{run['sigma']:g}", names[run["curve"]]]
        assert np.allclose(recall, np.round(expected, 3), atol=5e-4)
        assert clean == pytest.approx(run["clean_recall"], abs=5e-4)
        if run["curve"] != "halfspace":  # the paper's ceiling, 2 sigma Phi^-1(3/4)
            assert r.max() <= 2 * run["sigma"] * 0.6744897501960817


def test_claims_say_whether_they_hold_and_why_not(runs):
    header, rows = _table((runs[0] / "retrievalguard.md").read_text(), "### Claims")
    assert header == ["claim", "source", "paper", "ours", "holds here", "why not"]
    assert len(rows) >= 5
    for claim, _, _, ours, holds, why in rows:
        assert holds in ("yes", "no", "not measurable"), claim
        assert ours and (holds == "yes") == (why == ""), claim
    theorems = [row for row in rows if "never exceeds" in row[0] or "at least RetrievalGuard's radius" in row[0]]
    assert len(theorems) == 2 and all(row[4] == "yes" for row in theorems)


def test_a_second_run_loads_every_finished_step(runs):
    work, first, first_json, second = runs

    def count(run, ending):  # log lines "reproduce retrievalguard [m:ss]: KEY: what"
        return sum(line.split("]: ", 1)[-1].split(": ", 1)[-1].startswith(ending) for line in run.stderr.splitlines())

    assert count(first, "running") == STEPS and count(first, "training (") == MODELS_TRAINED
    assert count(second, "finished before, loaded from") == STEPS
    assert count(second, "trained before, loaded from") == MODELS_TRAINED
    assert count(second, "running") == 0 and count(second, "training (") == 0
    assert (work / "retrievalguard.json").read_text() == first_json
