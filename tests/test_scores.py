"""ERS and ARS: REFERENCE §3's test vectors, the attack-record format and its validation."""

import copy
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import act_cub_record
from minrr.scores import (
    ARS_TERMS,
    ATTACKS,
    ERS_TERMS,
    ars_rank,
    ars_recall,
    average_ars,
    ers,
    ers_terms,
    load_attack_record,
    parse_attack_record,
    score,
)

# REFERENCE §3, in the papers' table units: CA+, CA-, QA+, QA-, TMA, ES:D, ES:R, LTM, GTM, GTT -> ERS.
ERS_VECTORS = [
    ((0.0, 100.0, 0.0, 99.9, 0.883, 1.762, 0.0, 0.0, 14.1, 0.0), 3.78),
    ((15.5, 37.7, 15.1, 32.2, 0.472, 0.821, 11.1, 9.4, 14.9, 1.0), 33.95),
    ((30.6, 4.7, 31.2, 3.5, 0.466, 0.266, 38.6, 40.3, 38.6, 44.3), 61.73),
]


@pytest.mark.parametrize("raw, expected", ERS_VECTORS)
def test_ers_reference_vectors(raw, expected):
    assert ers(dict(zip(ERS_TERMS, raw))) == pytest.approx(expected, abs=0.0051)  # printed to 2 decimals


def test_ars_reference_vectors():
    benign = 27.5
    assert [round(ars_recall(v, benign), 1) for v in (11.1, 9.4, 14.9)] == [40.4, 34.2, 54.2]
    eight = dict(zip(ARS_TERMS, (64.6, 97.2, 73.2, 98.0, 90.2, 92.9, 83.3, 53.6)))
    assert round(average_ars(eight), 1) == 81.6


def test_ars_rank_is_the_share_of_the_intended_move_that_did_not_happen():
    # CA+ aims for the top (0): from 50 on average to 15.5 -> 31% of the way left.
    assert ars_rank([40.0, 60.0], [15.5, 15.5], goal=0.0) == pytest.approx(31.0)
    # CA- aims for the bottom (1 in fractions): 0.01 -> 0.377.
    assert ars_rank(0.01, 0.377, goal=1.0) == pytest.approx(100 * 0.623 / 0.99)
    assert ars_rank(0.5, 0.5, goal=0.0) == 100.0  # no effect: fully resistant
    assert ars_rank(0.5, 0.0, goal=0.0) == 0.0  # goal reached
    assert ars_rank(0.3, 0.6, goal=0.0) == pytest.approx(200.0)  # backfired: not clipped
    with pytest.raises(ValueError, match="rank_before: its mean is the attack's goal"):
        ars_rank(0.0, 0.1, goal=0.0)
    with pytest.raises(ValueError, match="r1_benign"):
        ars_recall(0.1, 0.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 100), min_size=10, max_size=10))
def test_ers_is_the_mean_of_terms_that_rise_with_robustness(values):
    raw = dict(zip(ERS_TERMS, values))
    raw["TMA"] = values[4] / 50 - 1  # cosine in [-1, 1]
    raw["ES:D"] = values[5] / 50  # shift in [0, 2]
    terms = ers_terms(raw)
    assert ers(raw) == pytest.approx(np.mean(list(terms.values())))
    assert all(0.0 <= terms[t] <= 100.0 for t in ERS_TERMS if t not in ("CA+", "QA+", "TMA"))
    # A stronger attack (better for the attacker) never raises a term.
    worse = dict(raw)
    for t, direction in (("CA+", -1), ("CA-", +1), ("TMA", +1), ("ES:D", +1), ("GTM", -1)):
        worse[t] = raw[t] + direction * 0.01
    lower = ers_terms(worse)
    assert all(lower[t] < terms[t] for t in ("CA+", "CA-", "TMA", "ES:D", "GTM"))


def test_ers_and_average_ars_name_missing_terms():
    with pytest.raises(ValueError, match="raw: missing GTT"):
        ers({t: 1.0 for t in ERS_TERMS if t != "GTT"})
    with pytest.raises(ValueError, match="ars: missing CA-, QA-"):
        average_ars({t: 1.0 for t in ARS_TERMS if t not in ("CA-", "QA-")})


# ---------------------------------------------------------------- records


def test_scoring_a_record_reproduces_the_papers_row():
    scores = score(parse_attack_record(act_cub_record()))
    assert [t.name for t in scores.terms] == list(ERS_TERMS)
    terms = {t.name: t for t in scores.terms}
    assert terms["CA+"].raw == pytest.approx(15.5) and terms["CA+"].ers == pytest.approx(31.0)
    assert terms["TMA"].raw == pytest.approx(0.472) and terms["TMA"].ars is None
    assert terms["ES:D"].ers == pytest.approx(58.95) and terms["ES:D"].ars is None
    assert terms["GTT"].raw == pytest.approx(1.0) and terms["GTT"].ars == pytest.approx(1.0)
    assert scores.ers == pytest.approx(33.95, abs=0.0051)  # ERS_VECTORS[1]
    # COLO-TRIDE Table 2, ACT on CUB: 31, 62.9, 30.2, 68.5, 40.3, 34.2, 54.2, 1.0 -> 40.3.
    ars = [round(terms[t].ars, 1) for t in ARS_TERMS]
    assert ars == [31.0, 62.9, 30.2, 68.5, 40.4, 34.2, 54.2, 1.0]
    assert round(scores.ars, 1) == 40.3
    assert scores.to_dict()["terms"][0] == {"name": "CA+", "raw": terms["CA+"].raw,
                                            "ers": terms["CA+"].ers, "ars": terms["CA+"].ars}


def _broken(edit):
    record = act_cub_record()
    edit(record)
    return record


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.pop("format"), "^format: expected 'minrr-attacks/1', missing$"),
        (lambda r: r.update(format="minrr-attacks/2"), "format: expected 'minrr-attacks/1', got 'minrr-attacks/2'"),
        (lambda r: r.pop("benign_r1"), "^benign_r1: missing$"),
        (lambda r: r.update(benign_r1=27.5), r"^benign_r1: expected values in \[0, 1\]"),
        (lambda r: r.update(benign_r1=0), "benign_r1: must be above 0"),
        (lambda r: r.update(benign_r1="0.3"), "benign_r1: expected a number"),
        (lambda r: r.update(benign_r1=True), "benign_r1: expected a number"),
        (lambda r: r.update(extra=1), "^extra: unknown field"),
        (lambda r: r.update(meta=[]), "^meta: expected a JSON object"),
        (lambda r: r.pop("attacks"), "^attacks: missing$"),
        (lambda r: r.update(attacks={}), "^attacks: expected a list"),
        (lambda r: r["attacks"].pop(), r"^attacks: no entry for GTT \(ERS and ARS need all of"),
        (lambda r: r["attacks"].__setitem__(3, 5), r"^attacks\[3\]: expected a JSON object, got int"),
        (lambda r: r["attacks"][3].pop("attack"), r"^attacks\[3\]: attack: expected one of CA\+, .*missing$"),
        (lambda r: r["attacks"][3].update(attack="QA"), r"^attacks\[3\]: attack: expected one of .*got 'QA'"),
        (lambda r: r["attacks"][3].update(attack=["QA+"]), r"^attacks\[3\]: attack: expected one of .*got \['QA\+'\]"),
        (lambda r: r["attacks"].append({"attack": "LTM", "r1_after": 0.1}),
         r"^attacks\[9\] \(LTM\): attack: a second entry for LTM$"),
        (lambda r: r["attacks"][5].pop("shift"), r"^attacks\[5\] \(ES\): shift: missing$"),
        (lambda r: r["attacks"][5].update(shfit=0.1), r"^attacks\[5\] \(ES\): shfit: unknown field"),
        (lambda r: r["attacks"][5].update(shift=2.5), r"^attacks\[5\] \(ES\): shift: expected values in \[0, 2\]"),
        (lambda r: r["attacks"][4].update(cosine=float("nan")), r"attacks\[4\] \(TMA\): cosine: expected values"),
        (lambda r: r["attacks"][0].update(rank_after=[0.1, 15.5]),
         r"^attacks\[0\] \(CA\+\): rank_after: expected values in \[0, 1\] .* got 15.5$"),
        (lambda r: r["attacks"][0].update(rank_after=[]), r"attacks\[0\] \(CA\+\): rank_after: expected a number or"),
        (lambda r: r["attacks"][0].update(rank_after=[0.1, 0.2, 0.3]),
         r"attacks\[0\] \(CA\+\): rank_after: 3 trials against 2 in rank_before"),
        (lambda r: r["attacks"][1].update(rank_before=1.0), r"attacks\[1\] \(CA-\): rank_before: its mean is already"),
        (lambda r: r["attacks"][8].update(params=3), r"attacks\[8\] \(GTT\): params: expected a JSON object"),
    ],
)
def test_malformed_records_name_the_field(edit, message):
    with pytest.raises(ValueError, match=message):
        parse_attack_record(_broken(edit))


def test_record_is_not_an_object():
    with pytest.raises(ValueError, match="record: expected a JSON object, got list"):
        parse_attack_record([])


def test_attack_order_does_not_matter_and_lists_average():
    record = act_cub_record()
    shuffled = copy.deepcopy(record)
    shuffled["attacks"].reverse()
    shuffled["attacks"][0]["retained"] = [0.0, 0.02]  # GTT, same mean
    a, b = score(parse_attack_record(record)), score(parse_attack_record(shuffled))
    assert a.ers == pytest.approx(b.ers) and a.ars == pytest.approx(b.ars)


def test_load_attack_record(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(act_cub_record()))
    record = load_attack_record(path)
    assert record.benign_r1 == 0.275 and set(record.outcomes) == set(ATTACKS)
    np.testing.assert_array_equal(record.outcomes["CA+"]["rank_before"], [0.4, 0.6])
    with pytest.raises(ValueError, match="file not found"):
        load_attack_record(tmp_path / "missing.json")
    path.write_text('{"format": ')
    with pytest.raises(ValueError, match=r"results.json: not valid JSON \(line 1"):
        load_attack_record(path)
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="not a UTF-8 text file"):
        load_attack_record(path)
    path.write_text(json.dumps(_broken(lambda r: r["attacks"][6].pop("r1_after"))))
    with pytest.raises(ValueError, match=r"results.json: attacks\[6\] \(LTM\): r1_after: missing"):
        load_attack_record(path)
