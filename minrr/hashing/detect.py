"""UMCD: unsupervised detection of adversarial queries to deep-hashing retrieval.

Xiao, Wang, Gao (SecureComm 2023); definitions and defaults in REFERENCE §2. A hashing
model gives continuous outputs f(x) = tanh(u(x)) in [-1, 1]^K and the binary code
b(x) = sign(f(x)) with sign(0) = +1. Three criteria score each query x:

====  =====================================================================  ==============
C1    mean Hamming distance from b(x) to its top-k database codes (Eq. 7)     large: suspect
C2    quantization loss ||b(x) - f(x)||_1 = sum_i (1 - |f_i(x)|) (Eq. 8)      small: suspect
C3    disagreement of f(t(x)) and f(x), t a denoising transform (Eq. 9)       large: suspect
====  =====================================================================  ==============

C3 comes in three forms: ``soft`` (default) (K - <f(t(x)), f(x)>) / 2, the relaxed Hamming
distance of the paper; ``hard`` (K - <b(t(x)), b(x)>) / 2, the Hamming distance of the
codes; ``soft-l1`` sum_i |f_i(t(x)) - f_i(x)| / 2. The hard and soft-l1 forms are 0 when t
is the identity; the soft form is then sum_i (1 - f_i^2) / 2, which is 0 only on +-1 outputs.

A query is benign iff C1 <= T1 and C2 >= T2 and C3 <= T3 (the paper's rule, with each
threshold a benign calibration value). :class:`Detector` learns T1..T3 from the criteria of
benign queries at a target false-positive rate; see :meth:`Detector.fit`.
"""

from __future__ import annotations

import json
import math

import numpy as np
from scipy import special

from . import hamming
from .distance_models import HammingDistanceModel
from ..io import (as_float_array, check_document, check_json_fingerprint, check_probability, json_fingerprint,
                 parse_json)
from ..metrics.detection import check_adversarial_labels, detection_rates, roc_auc
from ..options import C3_FORMS, CALIBRATION_METHODS

__all__ = ["CRITERIA", "C3_FORMS", "METHODS", "THREE_SIGMA", "binarize", "check_outputs",
           "hamming_criterion", "quantization_criterion", "inconsistency_criterion", "criteria",
           "check_scores", "allowed_false_positives", "benign_threshold", "Detector"]

CRITERIA = ("c1", "c2", "c3")
METHODS = CALIBRATION_METHODS
THREE_SIGMA = float(special.erf(3 / np.sqrt(2)))  # 2 Phi(3) - 1 = 0.99730...
# +1 where a large value is suspicious (C1, C3), -1 where a small one is (C2).
_SUSPICIOUS_SIGN = np.array([1.0, -1.0, 1.0])
_FORMAT = "minrr-detector"
_VERSION = 1


# ---------------------------------------------------------------------------
# Criteria
# ---------------------------------------------------------------------------


def check_outputs(f, *, name: str = "f") -> np.ndarray:
    """Validate continuous hashing outputs: ``(n, K)`` finite values in [-1, 1]; float64."""
    arr = as_float_array(f, name=name, ndim=2)
    outside = np.abs(arr) > 1
    if outside.any():
        row, bit = np.argwhere(outside)[0]
        raise ValueError(f"{name}: continuous outputs must lie in [-1, 1] (tanh of the logits); "
                         f"found {arr[row, bit]:g} at row {row}, bit {bit}")
    return arr


def binarize(f) -> np.ndarray:
    """b = sign(f) with sign(0) = +1: ``(n, K)`` int8 of +-1."""
    return np.where(np.asarray(f) >= 0, 1, -1).astype(np.int8)


def _check_choice(value, options, name: str) -> str:
    if value not in options:
        raise ValueError(f"{name}: expected one of {', '.join(options)}, got {value!r}")
    return value


def _check_database_width(database, n_bits: int, packed: bool):
    """Check that the database layout holds codes of the queries' length K."""
    db = np.asarray(database)
    if db.ndim != 2:
        raise ValueError(f"database: expected a 2-D array of codes (N, K), got shape {db.shape}")
    if not packed:
        width, unit = n_bits, "bits"
    elif db.dtype == np.uint8:
        width, unit = -(-n_bits // 8), "uint8 columns (np.packbits)"
    elif db.dtype == np.uint64:
        width, unit = -(-n_bits // 64), "uint64 words"
    else:
        raise TypeError(f"database: packed codes must be uint8 (np.packbits layout) or uint64 words, "
                        f"got dtype {db.dtype}")
    if db.shape[1] != width:
        raise ValueError(f"database: codes of {db.shape[1]} {unit}, but outputs f of {n_bits} bits "
                         f"need {width}")
    return db


def hamming_criterion(f, database, *, top_k: int = 100, packed: bool = False,
                      progress: bool = False) -> np.ndarray:
    """C1: mean Hamming distance from b(x) = sign(f(x)) to its top-k database codes.

    Parameters
    ----------
    f : (n, K) continuous outputs in [-1, 1].
    database : (N, K) codes in {-1, 1} or {0, 1}, or with ``packed=True`` (N, ceil(K / 8))
        uint8 (np.packbits) or (N, ceil(K / 64)) uint64 words; may be memory-mapped.
    top_k : k, 1 <= k <= N (default 100).
    packed : whether the database is packed.
    progress : show a progress bar of the search on stderr.

    Returns
    -------
    c1 : (n,) float64
    """
    f = check_outputs(f)
    database = _check_database_width(database, f.shape[1], packed)
    if isinstance(top_k, (bool, np.bool_)) or not isinstance(top_k, (int, np.integer)):
        raise TypeError(f"top_k: expected an integer, got {top_k!r}")
    if not 1 <= top_k <= len(database):
        raise ValueError(f"top_k: expected 1 <= top_k <= {len(database)} (the number of database codes), "
                         f"got {top_k}")
    codes = binarize(f)
    if packed:
        codes = np.packbits(codes > 0, axis=1) if database.dtype == np.uint8 else hamming.pack(codes)
    distances, _ = hamming.search(codes, database, int(top_k), packed=packed, progress=progress)
    return distances.mean(axis=1)


def quantization_criterion(f) -> np.ndarray:
    """C2 = ||b(x) - f(x)||_1 = sum_i (1 - |f_i(x)|): ``(n, K)`` outputs -> ``(n,)``."""
    return (1.0 - np.abs(check_outputs(f))).sum(axis=1)


def inconsistency_criterion(f, f_t, *, form: str = "soft") -> np.ndarray:
    """C3: disagreement between the outputs f_t = f(t(x)) on a transformed input and f = f(x).

    Parameters
    ----------
    f, f_t : (n, K) continuous outputs in [-1, 1].
    form : ``"soft"`` (K - <f_t, f>) / 2; ``"hard"`` (K - <b(f_t), b(f)>) / 2, the number of
        differing code bits; ``"soft-l1"`` sum_i |f_t,i - f_i| / 2.

    Returns
    -------
    c3 : (n,) float64
    """
    _check_choice(form, C3_FORMS, "form")
    f = check_outputs(f)
    f_t = check_outputs(f_t, name="f_t")
    if f_t.shape != f.shape:
        raise ValueError(f"f_t: shape {f_t.shape} does not match the shape {f.shape} of f")
    if form == "soft":
        return (f.shape[1] - np.einsum("ij,ij->i", f_t, f)) / 2.0
    if form == "hard":
        return np.count_nonzero(binarize(f_t) != binarize(f), axis=1).astype(np.float64)
    return np.abs(f_t - f).sum(axis=1) / 2.0


def criteria(f, f_t, database, *, top_k: int = 100, c3: str = "soft", packed: bool = False,
             progress: bool = False) -> np.ndarray:
    """C1, C2 and C3 of each query: ``(n, 3)`` float64, columns in :data:`CRITERIA` order.

    Parameters as :func:`hamming_criterion` and :func:`inconsistency_criterion` (``c3`` is
    the form of C3).
    """
    _check_choice(c3, C3_FORMS, "c3")
    c3_values = inconsistency_criterion(f, f_t, form=c3)
    return np.column_stack([hamming_criterion(f, database, top_k=top_k, packed=packed, progress=progress),
                            quantization_criterion(f), c3_values])


def check_scores(scores, *, name: str = "scores") -> np.ndarray:
    """Validate criteria scores: ``(n, 3)`` finite, columns C1, C2, C3; float64."""
    s = as_float_array(scores, name=name, ndim=2)
    if s.shape[1] != len(CRITERIA):
        raise ValueError(f"{name}: expected (n, 3) scores with columns C1, C2, C3, got shape {s.shape}")
    return s


# ---------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------


def allowed_false_positives(n: int, fpr: float) -> int:
    """a = floor(n fpr): how many of n benign calibration queries a detector at target ``fpr`` may flag."""
    return math.floor(n * fpr + 1e-9)


def benign_threshold(sorted_scores: np.ndarray, fpr: float):
    """The (1 - fpr) benign quantile T of suspiciousness scores: their (n - a)-th smallest, a = floor(n fpr).

    Flagging ``s > T`` flags at most a of the n benign scores, exactly a when none of them ties
    T. ``sorted_scores``: (n,) or (n, m) ascending along axis 0 (larger is more suspicious);
    returns a scalar or (m,), one threshold per column.
    """
    n = len(sorted_scores)
    return sorted_scores[n - 1 - allowed_false_positives(n, fpr)]


class Detector:
    """UMCD detector: criteria settings plus thresholds calibrated on benign queries.

    Parameters
    ----------
    fpr : target false-positive rate on benign queries, in (0, 1) (default 0.05).
    method : how the rate is shared among the criteria (default ``"joint"``):

        ``"joint"``
            rank each criterion in its suspicious direction against the n benign calibration
            scores, r_i(x) = #{benign j : s_i c_ij < s_i c_i(x)} (s = +1, -1, +1 for C1, C2,
            C3), take the largest rank, and flag above the (1 - fpr) benign quantile of it.
            Ties of the largest rank between criteria are broken in the fixed order C3, C2,
            C1, through the joint rank J(x) = max_i (4 r_i(x) + i) with i = 1, 2, 3, so that
            the calibration false-positive rate is exactly floor(n fpr) / n unless a criterion
            has tied benign values; it is never above.
        ``"bonferroni"``
            each criterion alone at fpr / 3 (conservative: the union is at most fpr).
        ``"per-criterion"``
            each criterion alone at fpr (the union can reach 3 fpr).

    top_k : k of C1 (default 100).
    c3 : form of C3, one of :data:`C3_FORMS` (default ``"soft"``).
    c1_model : optional :class:`~minrr.hashing.distance_models.HammingDistanceModel` (e.g.
        ``distance_models.untargeted(K, C)``, Theorem 1) that fixes T1 to the lower end of its
        central interval at ``c1_confidence`` instead of calibrating it. Its false positives
        on the benign calibration queries are spent from the budget first (an error if they
        exceed it); C2 and C3 share the rest by ``method``.
    c1_confidence : confidence of that interval (default 2 Phi(3) - 1, the three-sigma rule).
    database : optional JSON-serialisable record of where the C1 database codes came from;
        kept in the JSON so a later scoring run can find and check them.

    Attributes (after :meth:`fit`)
    ------------------------------
    thresholds_ : (3,) T1, T2, T3 in the criteria's own units.
    level_ : int, the joint-rank level L: a query is flagged iff J(x) > L; criterion i
        alone flags when r_i(x) > floor((L - i) / 4), i = 1, 2, 3.
    benign_ : (n, 3) the calibration scores.
    calibration_fpr_ : fraction of the calibration queries the detector flags.
    """

    def __init__(self, *, fpr: float = 0.05, method: str = "joint", top_k: int = 100, c3: str = "soft",
                 c1_model: HammingDistanceModel | None = None, c1_confidence: float = THREE_SIGMA,
                 database: dict | None = None):
        self.fpr = check_probability(fpr, name="fpr")
        self.method = _check_choice(method, METHODS, "method")
        if isinstance(top_k, (bool, np.bool_)) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ValueError(f"top_k: expected a whole number >= 1, got {top_k!r}")
        self.top_k = int(top_k)
        self.c3 = _check_choice(c3, C3_FORMS, "c3")
        if c1_model is not None and not isinstance(c1_model, HammingDistanceModel):
            raise TypeError(f"c1_model: expected a HammingDistanceModel or None, got {type(c1_model).__name__}")
        self.c1_model = c1_model
        self.c1_confidence = check_probability(c1_confidence, name="c1_confidence")
        if database is not None and not isinstance(database, dict):
            raise TypeError(f"database: expected a dict or None, got {type(database).__name__}")
        self.database = database

    @classmethod
    def from_model(cls, model, benign_images, *, database_images=None, database_codes=None, packed: bool = False,
                   batch_size: int = 256, progress: bool = False, **settings) -> Detector:
        """A detector calibrated straight from a hashing model and benign images, in one call.

        Runs the model over the benign images and their 3 x 3 mean-blurred copies (f and f_t,
        :func:`minrr.backends.detection.detector_outputs`, on the device of the model's
        parameters), takes the database codes sign(f) of ``database_images`` (or
        ``database_codes``), computes the criteria and fits.

        Parameters
        ----------
        model : torch ``nn.Module`` or NumPy callable, (b, C, H, W) images -> (b, K) outputs in [-1, 1].
        benign_images : (n, C, H, W) uint8 or floats in [0, 1], the calibration queries.
        database_images : (N, C, H, W) images of the retrieval database; or
        database_codes : (N, K) codes (packed with ``packed=True``), as for :func:`criteria`.
        batch_size, progress : as for ``detector_outputs``.
        **settings : the constructor's arguments (fpr, method, top_k, c3, c1_model, ...).
        """
        from minrr.backends.detection import detector_outputs

        if (database_images is None) == (database_codes is None):
            raise ValueError("database_images: give the database as images or as database_codes (one of the two)")
        detector = cls(**settings)
        benign = detector_outputs(model, benign_images, "umcd", batch_size=batch_size, progress=progress)
        if database_images is not None:
            # "lid" is the detector that reads f alone: the database's outputs, no transformed copies
            outputs = detector_outputs(model, database_images, "lid", batch_size=batch_size, progress=progress)
            database_codes, packed = binarize(check_outputs(outputs["f"], name="database_images")), False
        return detector.fit(detector.criteria(benign["f"], benign["f_t"], database_codes, packed=packed,
                                              progress=progress))

    # -- criteria -------------------------------------------------------------

    def criteria(self, f, f_t, database, *, packed: bool = False, progress: bool = False) -> np.ndarray:
        """C1, C2, C3 of queries with this detector's settings: ``(n, 3)``; see :func:`criteria`."""
        f = check_outputs(f)
        if self.c1_model is not None and self.c1_model.n_bits != f.shape[1]:
            raise ValueError(f"f: outputs of {f.shape[1]} bits, but the C1 model is for "
                             f"{self.c1_model.n_bits} bits")
        return criteria(f, f_t, database, top_k=self.top_k, c3=self.c3, packed=packed, progress=progress)

    # -- calibration ----------------------------------------------------------

    @property
    def c1_model_threshold(self) -> float | None:
        """T1 from the model: the lower end of its central interval, or None without a model."""
        if self.c1_model is None:
            return None
        return self.c1_model.interval(self.c1_confidence)[0]

    def fit(self, scores) -> Detector:
        """Calibrate the thresholds on benign queries' criteria ``scores``: ``(n, 3)``."""
        s = check_scores(scores)
        n = len(s)
        oriented = s * _SUSPICIOUS_SIGN
        fixed = self._model_flags(s)
        calibrated = [1, 2] if self.c1_model is not None else [0, 1, 2]
        allowed = allowed_false_positives(n, self.fpr)  # false positives the calibration set may have
        budget = allowed - int(fixed.sum())
        share = budget // len(calibrated) if self.method == "bonferroni" else budget
        if share < 1:
            detail = (f"; the C1 model threshold {self.c1_model_threshold:g} alone flags {int(fixed.sum())}"
                      if self.c1_model is not None else "")
            raise ValueError(f"scores: {n} benign calibration queries are too few for fpr = {self.fpr:g} "
                             f"with the {self.method} method{detail}")
        self._sorted = np.sort(oriented, axis=0)
        if self.method == "joint":
            level = int(np.sort(self._joint_rank(oriented, fixed))[n - allowed - 1])
        else:
            level = 4 * (n - 1 - share) + 3  # every criterion at rank level n - 1 - share
        rank_levels = (level - np.arange(1, 4)) // 4
        thresholds = self._sorted[rank_levels, [0, 1, 2]] * _SUSPICIOUS_SIGN
        if self.c1_model is not None:
            thresholds[0] = self.c1_model_threshold
        self.benign_, self.level_, self.thresholds_ = s, level, thresholds
        self.calibration_fpr_ = float(self.predict(s).mean())
        return self

    def _model_flags(self, s: np.ndarray) -> np.ndarray:
        if self.c1_model is None:
            return np.zeros(len(s), dtype=bool)
        return s[:, 0] > self.c1_model_threshold

    def _joint_rank(self, oriented: np.ndarray, fixed: np.ndarray) -> np.ndarray:
        """J(x) = max_i (4 r_i(x) + i) over the calibrated criteria; 4 n + 4 where the C1 model flags x."""
        n = len(self._sorted)
        first = 1 if self.c1_model is not None else 0
        joint = [4 * np.searchsorted(self._sorted[:, i], oriented[:, i], side="left") + i + 1
                 for i in range(first, 3)]
        return np.where(fixed, 4 * n + 4, np.max(joint, axis=0))

    def _check_fitted(self):
        if not hasattr(self, "thresholds_"):
            raise ValueError("detector: not calibrated yet; call fit with benign scores first")

    def score(self, scores) -> np.ndarray:
        """Joint suspiciousness J(x) / (4 n + 4) in (0, 1], 1 where the C1 model flags: ``(n,)``.

        About the largest rank-normalised criterion, max_i r_i(x) / n. ``predict(scores)``
        equals ``score(scores) > level_ / (4 n + 4)`` for every method, so this is the score
        behind the combined ROC curve.
        """
        self._check_fitted()
        s = check_scores(scores)
        n = len(self.benign_)
        return self._joint_rank(s * _SUSPICIOUS_SIGN, self._model_flags(s)) / (4 * n + 4)

    def flags(self, scores) -> np.ndarray:
        """Per-criterion decisions ``(n, 3)`` bool: C1 > T1, C2 < T2, C3 > T3."""
        self._check_fitted()
        s = check_scores(scores)
        return s * _SUSPICIOUS_SIGN > self.thresholds_ * _SUSPICIOUS_SIGN

    def predict(self, scores) -> np.ndarray:
        """``(n,)`` bool, True = adversarial: any criterion past its threshold."""
        return self.flags(scores).any(axis=1)

    # -- evaluation -----------------------------------------------------------

    def report(self, scores, is_adversarial) -> dict[str, dict[str, float]]:
        """TPR, miss rate (FNR), FPR and AUC on queries of known kind.

        Rows ``c1``, ``c2``, ``c3``: each criterion alone, thresholded at the (1 - fpr)
        quantile of its own benign calibration scores; AUC of its oriented score. Row
        ``combined``: this detector's decisions, and the AUC of :meth:`score`. AUC is NaN
        unless both kinds of query are present.
        """
        self._check_fitted()
        s = check_scores(scores)
        y = check_adversarial_labels(is_adversarial, len(s))
        oriented = s * _SUSPICIOUS_SIGN
        alone = benign_threshold(self._sorted, self.fpr)
        both_kinds = y.any() and not y.all()
        rows = {}
        for i, name in enumerate(CRITERIA):
            rows[name] = {**detection_rates(oriented[:, i] > alone[i], y),
                          "auc": roc_auc(oriented[:, i], y) if both_kinds else np.nan}
        rows["combined"] = {**detection_rates(self.predict(s), y),
                            "auc": roc_auc(self.score(s), y) if both_kinds else np.nan}
        return rows

    # -- persistence ----------------------------------------------------------

    def _settings(self) -> dict:
        model = self.c1_model
        return {"fpr": self.fpr, "method": self.method, "top_k": self.top_k, "c3": self.c3,
                "c1_model": None if model is None else {
                    "n_bits": model.n_bits, "n_classes": model.n_classes, "kind": model.kind,
                    "approximation": model.approximation},
                "c1_confidence": self.c1_confidence}

    def to_json(self) -> str:
        """The calibrated detector as JSON text: settings, thresholds and benign scores."""
        self._check_fitted()
        document = {
            "format": _FORMAT, "version": _VERSION, **self._settings(),
            "thresholds": dict(zip(CRITERIA, self.thresholds_.tolist())),
            "level": self.level_, "n_benign": len(self.benign_), "calibration_fpr": self.calibration_fpr_,
            "database": self.database,
            "benign_scores": {name: self.benign_[:, i].tolist() for i, name in enumerate(CRITERIA)},
        }
        return json.dumps({**document, "fingerprint": json_fingerprint(document)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Detector:
        """Rebuild a detector from :meth:`to_json` text; it refits on the stored benign scores
        and refuses a file whose thresholds do not follow from them, or that was edited in any
        other way (its ``fingerprint``, :func:`minrr.io.json_fingerprint`, does not match)."""
        return cls.from_dict(parse_json(text, name="detector"))

    @classmethod
    def from_dict(cls, doc) -> Detector:
        """:meth:`from_json` of the parsed JSON document (e.g. from :func:`minrr.io.read_json`)."""
        check_document(doc, name="detector", format=_FORMAT, version=_VERSION)
        try:
            model = doc["c1_model"]
            detector = cls(fpr=doc["fpr"], method=doc["method"], top_k=doc["top_k"], c3=doc["c3"],
                           c1_model=None if model is None else HammingDistanceModel(**model),
                           c1_confidence=doc["c1_confidence"], database=doc["database"])
            benign = np.column_stack([np.asarray(doc["benign_scores"][name], dtype=float) for name in CRITERIA])
            detector.fit(benign)
            stored = [doc["thresholds"][name] for name in CRITERIA]
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"detector: {' '.join(str(exc).split())}") from None
        if stored != detector.thresholds_.tolist() or doc.get("level") != detector.level_:
            raise ValueError("detector: the stored thresholds do not follow from the stored benign scores "
                             "(was the file edited?)")
        check_json_fingerprint(doc, name="detector")
        return detector
