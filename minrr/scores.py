"""ERS and ARS: robustness scores of a metric-learning model from attack outcomes.

Running the attacks and scoring them are separate steps joined by an *attack
record*, a JSON object that keeps each attack's raw outputs::

    {"format": "minrr-attacks/1",
     "benign_r1": 0.275,
     "attacks": [
       {"attack": "CA+", "rank_before": [0.48, 0.61], "rank_after": [0.17, 0.14]},
       {"attack": "CA-", "rank_before": 0.004, "rank_after": 0.377},
       {"attack": "QA+", ...}, {"attack": "QA-", ...},
       {"attack": "TMA", "cosine": 0.472},
       {"attack": "ES", "shift": 0.821, "r1_after": 0.111},
       {"attack": "LTM", "r1_after": 0.094},
       {"attack": "GTM", "r1_after": 0.149},
       {"attack": "GTT", "retained": 0.01, "params": {"eps": 0.0314}}]}

Every proportion is a fraction in [0, 1]: ``rank_*`` is a candidate's rank
divided by the gallery size (0 is the top), ``r1_after`` and ``benign_r1`` are
Recall@1, ``retained`` the fraction of queries keeping their clean top-1 item
in the top 4. ``cosine`` is in [-1, 1]; ``shift`` is an l2 distance between
l2-normalised embeddings, in [0, 2]. Each measured field is a number or a list
of per-trial numbers, whose mean is used. ``params`` (per attack) and ``meta``
(top level) are free-form objects carried for provenance and not read here.

ERS (robrank) is the mean of ten terms computed from the *raw* values as the
papers' tables print them (percent for ranks, Recall@1 and GTT; TMA's cosine;
ES:D's shift)::

    2 CA+, 100 - CA-, 2 QA+, 100 - QA-, 100 (1 - TMA), 100 (2 - ES:D) / 2,
    ES:R, LTM, GTM, GTT

ARS (COLO-TRIDE) is the percentage of the attack's intended change that did
not happen: ``100 |G - mean(after)| / |G - mean(before)|`` for the rank attacks
(goal G = top for CA+ and QA+, bottom for CA- and QA-), ``100 R@1_after /
R@1_benign`` for ES:R, LTM and GTM, and ``100 retained`` for GTT. TMA and ES:D
have none; the averaged ARS is the mean of the other eight. Neither score is
clipped: an attack that backfires gives an ARS above 100.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

__all__ = [
    "RECORD_FORMAT",
    "ATTACKS",
    "ERS_TERMS",
    "ARS_TERMS",
    "ers_terms",
    "ers",
    "ars_rank",
    "ars_recall",
    "average_ars",
    "AttackRecord",
    "parse_attack_record",
    "load_attack_record",
    "Term",
    "Scores",
    "score",
]

RECORD_FORMAT = "minrr-attacks/1"
ATTACKS = ("CA+", "CA-", "QA+", "QA-", "TMA", "ES", "LTM", "GTM", "GTT")
ERS_TERMS = ("CA+", "CA-", "QA+", "QA-", "TMA", "ES:D", "ES:R", "LTM", "GTM", "GTT")
ARS_TERMS = ("CA+", "CA-", "QA+", "QA-", "ES:R", "LTM", "GTM", "GTT")

_FIELDS = {  # measured fields of each attack
    "CA+": ("rank_before", "rank_after"),
    "CA-": ("rank_before", "rank_after"),
    "QA+": ("rank_before", "rank_after"),
    "QA-": ("rank_before", "rank_after"),
    "TMA": ("cosine",),
    "ES": ("shift", "r1_after"),
    "LTM": ("r1_after",),
    "GTM": ("r1_after",),
    "GTT": ("retained",),
}
_RANGES = {  # field: (low, high, what the field is)
    "rank_before": (0.0, 1.0, "rank / gallery size, 0 is the top"),
    "rank_after": (0.0, 1.0, "rank / gallery size, 0 is the top"),
    "r1_after": (0.0, 1.0, "Recall@1 as a fraction"),
    "retained": (0.0, 1.0, "a fraction of the queries"),
    "cosine": (-1.0, 1.0, "a cosine similarity"),
    "shift": (0.0, 2.0, "an l2 shift of l2-normalised embeddings"),
}
_RANK_GOAL = {"CA+": 0.0, "QA+": 0.0, "CA-": 1.0, "QA-": 1.0}  # the rank each attack aims for

_ERS_NORMALISE = {  # raw table value -> ERS term, 0..100 with higher more robust
    "CA+": lambda v: 2.0 * v,
    "CA-": lambda v: 100.0 - v,
    "QA+": lambda v: 2.0 * v,
    "QA-": lambda v: 100.0 - v,
    "TMA": lambda v: 100.0 * (1.0 - v),
    "ES:D": lambda v: 100.0 * (2.0 - v) / 2.0,
    "ES:R": lambda v: v,
    "LTM": lambda v: v,
    "GTM": lambda v: v,
    "GTT": lambda v: v,
}


def _require_terms(values: Mapping[str, float], terms: tuple[str, ...], name: str) -> None:
    missing = [t for t in terms if t not in values]
    if missing:
        raise ValueError(f"{name}: missing {', '.join(missing)} (needs all of {', '.join(terms)})")


def ers_terms(raw: Mapping[str, float]) -> dict[str, float]:
    """ERS-normalised value of each of the ten terms.

    Parameters
    ----------
    raw : mapping from each name in :data:`ERS_TERMS` to its raw table value
        Percent (0..100) for the ranks, Recall@1 and GTT; the mean cosine for
        TMA; the mean shift (0..2) for ES:D.
    """
    _require_terms(raw, ERS_TERMS, "raw")
    return {t: float(_ERS_NORMALISE[t](float(raw[t]))) for t in ERS_TERMS}


def ers(raw: Mapping[str, float]) -> float:
    """Empirical robustness score: the mean of :func:`ers_terms`."""
    return float(np.mean(list(ers_terms(raw).values())))


def ars_rank(rank_before, rank_after, goal: float) -> float:
    """ARS of a rank attack, ``100 |G - mean(after)| / |G - mean(before)|``.

    ``rank_before``, ``rank_after``: a number or per-trial numbers; ``goal`` G
    in the same units (0 for the top; the bottom is 1, or 100 for percents).
    """
    gap = abs(goal - float(np.mean(rank_before)))
    if gap == 0.0:
        raise ValueError(f"rank_before: its mean is the attack's goal ({goal:g}), so ARS is undefined")
    return 100.0 * abs(goal - float(np.mean(rank_after))) / gap


def ars_recall(r1_after: float, r1_benign: float) -> float:
    """ARS of a Recall@1 attack, ``100 R@1_after / R@1_benign`` (any common units)."""
    if not r1_benign > 0:
        raise ValueError(f"r1_benign: must be above 0 for ARS, got {r1_benign:g}")
    return 100.0 * r1_after / r1_benign


def average_ars(ars: Mapping[str, float]) -> float:
    """Averaged ARS: the mean over the eight names in :data:`ARS_TERMS`."""
    _require_terms(ars, ARS_TERMS, "ars")
    return float(np.mean([float(ars[t]) for t in ARS_TERMS]))


@dataclass(frozen=True)
class AttackRecord:
    """A validated attack record.

    benign_r1 : Recall@1 of the clean queries, a fraction in (0, 1].
    outcomes : attack name -> measured field -> (n_trials,) float64 values.
    """

    benign_r1: float
    outcomes: Mapping[str, Mapping[str, np.ndarray]]


def _measurement(value, label: str, kind: str) -> np.ndarray:
    """A number or non-empty list of numbers, checked against the range of field ``kind``.

    ``label`` names the field in error messages.
    """
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{label}: expected a number or a non-empty list of numbers, got {value!r}")
    arr = np.asarray(values, dtype=np.float64)
    low, high, meaning = _RANGES[kind]
    bad = ~((arr >= low) & (arr <= high))  # NaN is bad too
    if bad.any():
        raise ValueError(f"{label}: expected values in [{low:g}, {high:g}] ({meaning}), got {arr[bad][0]:g}")
    return arr


def _parse_entry(i: int, entry) -> tuple[str, dict[str, np.ndarray]]:
    """Validate ``attacks[i]``; return its attack name and measured fields."""
    where = f"attacks[{i}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    name = entry.get("attack")
    if not isinstance(name, str) or name not in _FIELDS:
        got = "missing" if "attack" not in entry else f"got {name!r}"
        raise ValueError(f"{where}: attack: expected one of {', '.join(ATTACKS)}, {got}")
    where = f"{where} ({name}): "
    allowed = ("attack", "params") + _FIELDS[name]
    unknown = [k for k in entry if k not in allowed]
    if unknown:
        raise ValueError(f"{where}{unknown[0]}: unknown field (expected {', '.join(allowed)})")
    if "params" in entry and not isinstance(entry["params"], dict):
        raise ValueError(f"{where}params: expected a JSON object")
    missing = [f for f in _FIELDS[name] if f not in entry]
    if missing:
        raise ValueError(f"{where}{missing[0]}: missing")
    fields = {f: _measurement(entry[f], where + f, f) for f in _FIELDS[name]}
    if name in _RANK_GOAL:
        before, after = fields["rank_before"], fields["rank_after"]
        paired = isinstance(entry["rank_before"], list) and isinstance(entry["rank_after"], list)
        if paired and len(before) != len(after):
            raise ValueError(f"{where}rank_after: {len(after)} trials against {len(before)} in rank_before")
        if before.mean() == _RANK_GOAL[name]:
            raise ValueError(f"{where}rank_before: its mean is already the attack's goal "
                             f"({_RANK_GOAL[name]:g}), so ARS is undefined")
    return name, fields


def parse_attack_record(data) -> AttackRecord:
    """Validate a decoded attack record (see the module docstring).

    Raises ``ValueError`` naming the first missing or wrong field, e.g.
    ``attacks[2] (QA+): rank_after: missing``.
    """
    if not isinstance(data, dict):
        raise ValueError(f"record: expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - {"format", "benign_r1", "attacks", "meta"})
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown field (expected format, benign_r1, attacks, meta)")
    if data.get("format") != RECORD_FORMAT:
        got = "missing" if "format" not in data else f"got {data['format']!r}"
        raise ValueError(f"format: expected {RECORD_FORMAT!r}, {got}")
    if "meta" in data and not isinstance(data["meta"], dict):
        raise ValueError("meta: expected a JSON object")
    if "benign_r1" not in data:
        raise ValueError("benign_r1: missing")
    benign = float(_measurement(data["benign_r1"], "benign_r1", "r1_after").mean())
    if benign == 0.0:
        raise ValueError("benign_r1: must be above 0 (ARS divides by it)")
    entries = data.get("attacks")
    if not isinstance(entries, list):
        raise ValueError("attacks: " + ("missing" if entries is None else "expected a list of attack entries"))
    outcomes: dict[str, dict[str, np.ndarray]] = {}
    for i, entry in enumerate(entries):
        name, fields = _parse_entry(i, entry)
        if name in outcomes:
            raise ValueError(f"attacks[{i}] ({name}): attack: a second entry for {name}")
        outcomes[name] = fields
    absent = [a for a in ATTACKS if a not in outcomes]
    if absent:
        raise ValueError(f"attacks: no entry for {', '.join(absent)} (ERS and ARS need all of {', '.join(ATTACKS)})")
    return AttackRecord(benign_r1=benign, outcomes=outcomes)


def load_attack_record(path, *, name: str | None = None) -> AttackRecord:
    """Read and validate an attack record from a JSON file (at most ``minrr.io.MAX_JSON_BYTES``).

    name : the argument or flag the path came from, to start error messages.
    """
    from .io import read_json

    data = read_json(path, name=name)
    try:
        return parse_attack_record(data)
    except (ValueError, OverflowError) as exc:  # OverflowError: an integer too large for a float
        raise ValueError(f"{name + ': ' if name else ''}{path}: {exc}") from None


@dataclass(frozen=True)
class Term:
    """One ERS term of a scored record.

    name : a name in :data:`ERS_TERMS`.
    raw : the value as the papers' tables print it (percent, cosine or shift).
    ers : its ERS-normalised value (0..100, higher is more robust).
    ars : its ARS in percent, or None (TMA and ES:D have none).
    """

    name: str
    raw: float
    ers: float
    ars: float | None


@dataclass(frozen=True)
class Scores:
    """ERS, averaged ARS and the ten terms behind them."""

    benign_r1: float
    terms: tuple[Term, ...]
    ers: float
    ars: float

    def to_dict(self) -> dict:
        """JSON-ready form: ``{"benign_r1", "terms": [{"name", "raw", "ers", "ars"}], "ers", "ars"}``."""
        return {
            "benign_r1": self.benign_r1,
            "terms": [{"name": t.name, "raw": t.raw, "ers": t.ers, "ars": t.ars} for t in self.terms],
            "ers": self.ers,
            "ars": self.ars,
        }


def score(record: AttackRecord) -> Scores:
    """ERS and averaged ARS of a validated record, with every term's raw, ERS and ARS values."""
    out = record.outcomes
    raw = {t: 100.0 * float(out[t]["rank_after"].mean()) for t in _RANK_GOAL}
    raw["TMA"] = float(out["TMA"]["cosine"].mean())
    raw["ES:D"] = float(out["ES"]["shift"].mean())
    raw["ES:R"] = 100.0 * float(out["ES"]["r1_after"].mean())
    raw["LTM"] = 100.0 * float(out["LTM"]["r1_after"].mean())
    raw["GTM"] = 100.0 * float(out["GTM"]["r1_after"].mean())
    raw["GTT"] = 100.0 * float(out["GTT"]["retained"].mean())
    ars = {t: ars_rank(out[t]["rank_before"], out[t]["rank_after"], _RANK_GOAL[t]) for t in _RANK_GOAL}
    for term in ("ES:R", "LTM", "GTM"):
        ars[term] = ars_recall(raw[term], 100.0 * record.benign_r1)
    ars["GTT"] = raw["GTT"]
    normalised = ers_terms(raw)
    terms = tuple(Term(t, raw[t], normalised[t], ars.get(t)) for t in ERS_TERMS)
    return Scores(benign_r1=record.benign_r1, terms=terms, ers=ers(raw), ars=average_ars(ars))
