"""UMCD criteria and calibration: exact values, the target FPR, JSON round trips, bad inputs."""

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minrr.hashing import detect, distance_models, hamming
from minrr.hashing.detect import Detector

ORIENT = np.array([1, -1, 1])  # larger is more suspicious after this sign


def outputs(rng, n, k, scale=2.0):
    return np.tanh(scale * rng.normal(size=(n, k)))


def benign_scores(rng, n):
    """Correlated continuous C1, C2, C3 with no ties."""
    z = rng.normal(size=(n, 3))
    return np.column_stack([10 + 2 * z[:, 0], 20 + 3 * (0.6 * z[:, 0] + 0.8 * z[:, 1]), 5 + np.exp(z[:, 2])])


# -- criteria ------------------------------------------------------------------------------


@given(st.integers(1, 20), st.integers(1, 70), st.integers(0, 2**32 - 1))
def test_c2_is_zero_exactly_on_sign_outputs(n, k, seed):
    f = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n, k))
    assert np.all(detect.quantization_criterion(f) == 0.0)


@given(st.integers(1, 20), st.integers(1, 70), st.integers(0, 2**32 - 1))
def test_c2_and_c3_values(n, k, seed):
    rng = np.random.default_rng(seed)
    f, f_t = outputs(rng, n, k), outputs(rng, n, k)
    np.testing.assert_allclose(detect.quantization_criterion(f), np.abs(np.sign(f) - f).sum(axis=1))
    np.testing.assert_allclose(detect.inconsistency_criterion(f, f_t), (k - (f * f_t).sum(axis=1)) / 2)
    hard = detect.inconsistency_criterion(f, f_t, form="hard")
    np.testing.assert_array_equal(hard, ((f >= 0) != (f_t >= 0)).sum(axis=1))
    soft_l1 = detect.inconsistency_criterion(f, f_t, form="soft-l1")
    np.testing.assert_allclose(soft_l1, np.abs(f - f_t).sum(axis=1) / 2)
    # t = identity: the hard and soft-l1 forms vanish; the soft form keeps sum (1 - f^2) / 2
    assert np.all(detect.inconsistency_criterion(f, f, form="hard") == 0)
    assert np.all(detect.inconsistency_criterion(f, f, form="soft-l1") == 0)
    np.testing.assert_allclose(detect.inconsistency_criterion(f, f), (1 - f**2).sum(axis=1) / 2)
    signs = np.sign(f) + (f == 0)
    assert np.all(detect.inconsistency_criterion(signs, signs) == 0)


def test_sign_of_zero_is_plus_one():
    np.testing.assert_array_equal(detect.binarize([[0.0, -0.0, -0.2, 0.3]]), [[1, 1, -1, 1]])


@given(st.integers(1, 130), st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_c1_is_the_mean_distance_to_the_top_k(k_bits, top_k, seed):
    rng = np.random.default_rng(seed)
    database = rng.choice(np.array([-1, 1], dtype=np.int8), size=(60, k_bits))
    f = outputs(rng, 7, k_bits)
    f[0, 0] = 0.0  # sign(0) = +1
    distances = (detect.binarize(f)[:, None, :] != database[None]).sum(axis=2)
    expected = np.sort(distances, axis=1)[:, :top_k].mean(axis=1)
    np.testing.assert_allclose(detect.hamming_criterion(f, database, top_k=top_k), expected)
    np.testing.assert_allclose(detect.hamming_criterion(f, (database > 0).astype(np.uint8), top_k=top_k), expected)
    packed = np.packbits(database > 0, axis=1)
    np.testing.assert_allclose(detect.hamming_criterion(f, packed, top_k=top_k, packed=True), expected)
    words = hamming.pack(database)
    np.testing.assert_allclose(detect.hamming_criterion(f, words, top_k=top_k, packed=True), expected)


def test_criteria_stacks_the_three():
    rng = np.random.default_rng(0)
    database = rng.choice([-1, 1], size=(50, 16))
    f, f_t = outputs(rng, 5, 16), outputs(rng, 5, 16)
    scores = detect.criteria(f, f_t, database, top_k=4, c3="hard")
    np.testing.assert_array_equal(scores[:, 0], detect.hamming_criterion(f, database, top_k=4))
    np.testing.assert_array_equal(scores[:, 1], detect.quantization_criterion(f))
    np.testing.assert_array_equal(scores[:, 2], detect.inconsistency_criterion(f, f_t, form="hard"))
    np.testing.assert_array_equal(Detector(top_k=4, c3="hard").criteria(f, f_t, database), scores)


# -- calibration ---------------------------------------------------------------------------


@given(st.integers(40, 400), st.floats(0.03, 0.5), st.integers(0, 2**32 - 1))
def test_joint_calibration_hits_the_target_fpr_exactly_without_ties(n, fpr, seed):
    scores = benign_scores(np.random.default_rng(seed), n)
    detector = Detector(fpr=fpr).fit(scores)
    assert detector.predict(scores).sum() == math.floor(n * fpr + 1e-9)
    assert detector.calibration_fpr_ == math.floor(n * fpr + 1e-9) / n


def joint_rule_oracle(scores, fpr):
    """Calibration flags of the joint rule: the largest rank, ties between criteria going to
    the later one, above the smallest level that flags at most floor(n fpr) queries."""
    v = scores * ORIENT
    ranks = (v[None, :, :] < v[:, None, :]).sum(axis=1)  # ranks[j, i] = #{benign b: b_i < v_ji}
    keys = [max((r, i) for i, r in enumerate(row)) for row in ranks.tolist()]
    allowed = math.floor(len(v) * fpr + 1e-9)
    level = min(key for key in keys if sum(k > key for k in keys) <= allowed)
    return np.array([k > level for k in keys])


@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 4)), min_size=20, max_size=80),
       st.floats(0.05, 0.5))
def test_joint_rule_with_ties_matches_its_definition(rows, fpr):
    scores = np.array(rows, dtype=float)
    detector = Detector(fpr=fpr).fit(scores)
    np.testing.assert_array_equal(detector.predict(scores), joint_rule_oracle(scores, fpr))
    assert detector.predict(scores).sum() <= math.floor(len(scores) * fpr + 1e-9)
    assert_score_agrees(detector, scores)


def assert_score_agrees(detector, scores):
    np.testing.assert_array_equal(detector.predict(scores),
                                  detector.score(scores) > detector.level_ / (4 * len(detector.benign_) + 4))


def test_fresh_benign_fpr_is_within_binomial_error():
    rng = np.random.default_rng(7)
    n, fresh_n, fpr = 2000, 20000, 0.05
    fresh = benign_scores(rng, fresh_n)
    detector = Detector(fpr=fpr).fit(benign_scores(rng, n))
    # the calibrated threshold's true rate varies by about sqrt(fpr (1 - fpr) / n), its estimate on
    # fresh data by sqrt(fpr (1 - fpr) / fresh_n)
    sd = math.sqrt(fpr * (1 - fpr) * (1 / n + 1 / fresh_n))
    assert abs(detector.predict(fresh).mean() - fpr) < 5 * sd
    per_criterion = Detector(fpr=fpr, method="per-criterion").fit(benign_scores(rng, n))
    assert per_criterion.predict(fresh).mean() > fpr + 5 * sd  # three criteria at fpr each inflate the union
    bonferroni = Detector(fpr=fpr, method="bonferroni").fit(benign_scores(rng, n))
    assert bonferroni.predict(fresh).mean() < fpr + 5 * sd


@pytest.mark.parametrize("method, share", [("bonferroni", lambda n, a: math.floor(n * a / 3)),
                                           ("per-criterion", lambda n, a: math.floor(n * a))])
def test_separate_methods_give_each_criterion_its_share(method, share):
    scores = benign_scores(np.random.default_rng(1), 600)
    detector = Detector(fpr=0.1, method=method).fit(scores)
    np.testing.assert_array_equal(detector.flags(scores).sum(axis=0), share(600, 0.1))
    assert_score_agrees(detector, scores)


def test_thresholds_are_the_papers_rule():
    """benign iff C1 <= T1 and C2 >= T2 and C3 <= T3."""
    rng = np.random.default_rng(2)
    detector = Detector(fpr=0.1).fit(benign_scores(rng, 300))
    queries = benign_scores(rng, 500) * rng.uniform(0.7, 1.3, (500, 3))
    t1, t2, t3 = detector.thresholds_
    benign = (queries[:, 0] <= t1) & (queries[:, 1] >= t2) & (queries[:, 2] <= t3)
    np.testing.assert_array_equal(detector.predict(queries), ~benign)
    assert set(detector.thresholds_[[0, 2]]) <= set(detector.benign_[:, [0, 2]].ravel())


def test_c1_model_fixes_t1_and_spends_its_benign_flags_first():
    rng = np.random.default_rng(3)
    scores = benign_scores(rng, 1000)
    model = distance_models.untargeted(32, 10)  # T1 = K (1 - p) - 3 sd, about 5.8
    scores[:, 0] = rng.uniform(0, 5, 1000)
    scores[:20, 0] = 30.0  # 20 benign queries past T1
    detector = Detector(fpr=0.05, c1_model=model).fit(scores)
    assert detector.thresholds_[0] == model.interval(detect.THREE_SIGMA)[0]
    assert detector.predict(scores).sum() == 50  # 20 from the model, 30 from the joint C2 / C3
    assert detector.flags(scores)[:20, 0].all() and detector.score(scores)[:20].min() == 1.0
    assert_score_agrees(detector, scores)
    with pytest.raises(ValueError, match="scores: 1000 benign .* the C1 model threshold 5.78948 alone flags 20"):
        Detector(fpr=0.01, c1_model=model).fit(scores)


def test_report_rows():
    rng = np.random.default_rng(4)
    detector = Detector(fpr=0.05).fit(benign_scores(rng, 1000))
    attacked = benign_scores(rng, 200)
    attacked[:, 0] += 8  # untargeted-looking: far from the database
    queries = np.r_[benign_scores(rng, 300), attacked]
    known = np.r_[np.zeros(300, bool), np.ones(200, bool)]
    report = detector.report(queries, known)
    assert set(report) == {"c1", "c2", "c3", "combined"}
    assert report["c1"]["auc"] > 0.95 and report["combined"]["tpr"] > 0.9
    assert report["c2"]["auc"] == pytest.approx(0.5, abs=0.1)
    flags = detector.predict(queries)
    assert report["combined"]["tpr"] == flags[known].mean() and report["combined"]["fpr"] == flags[~known].mean()
    assert np.isnan(detector.report(attacked, np.ones(200))["combined"]["auc"])


# -- JSON ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", detect.METHODS)
@pytest.mark.parametrize("with_model", [False, True])
def test_json_round_trip_gives_identical_predictions(method, with_model):
    rng = np.random.default_rng(5)
    scores = benign_scores(rng, 500)
    scores[:, 0] = np.minimum(scores[:, 0], 2.0) if with_model else scores[:, 0]
    model = distance_models.untargeted(32, 10) if with_model else None
    detector = Detector(fpr=0.1, method=method, top_k=7, c3="soft-l1", c1_model=model,
                        database={"path": "/data/db.npy"}).fit(scores)
    loaded = Detector.from_json(detector.to_json())
    queries = benign_scores(rng, 400) * rng.uniform(0.5, 1.5, (400, 3))
    np.testing.assert_array_equal(loaded.predict(queries), detector.predict(queries))
    np.testing.assert_array_equal(loaded.score(queries), detector.score(queries))
    np.testing.assert_array_equal(loaded.thresholds_, detector.thresholds_)
    assert (loaded.method, loaded.top_k, loaded.c3, loaded.c1_model, loaded.database) == \
           (method, 7, "soft-l1", model, {"path": "/data/db.npy"})
    assert loaded.to_json() == detector.to_json()


def test_json_that_does_not_follow_from_its_benign_scores_is_refused():
    detector = Detector().fit(benign_scores(np.random.default_rng(6), 200))
    doc = json.loads(detector.to_json())
    doc["thresholds"]["c2"] += 1.0
    with pytest.raises(ValueError, match="detector: the stored thresholds do not follow"):
        Detector.from_json(json.dumps(doc))
    for broken, message in [("{", "detector: not valid JSON .line 1, column 2: Expecting"), ("[]", "detector: not a minrr-detector"),
                            (json.dumps({**doc, "version": 9}), "detector: version 9"),
                            (json.dumps({k: v for k, v in doc.items() if k != "fpr"}), "detector: 'fpr'"),
                            (json.dumps({**doc, "method": "vote"}), "detector: method: expected one of")]:
        with pytest.raises(ValueError, match=message):
            Detector.from_json(broken)


# -- bad inputs ---------------------------------------------------------------------------


def test_bad_inputs():
    rng = np.random.default_rng(8)
    database = rng.choice([-1, 1], size=(30, 16))
    f = outputs(rng, 4, 16)
    cases = [
        (lambda: detect.quantization_criterion(f * 2), r"f: continuous outputs must lie in \[-1, 1\]"),
        (lambda: detect.inconsistency_criterion(f, f[:, :8]), r"f_t: shape \(4, 8\) does not match"),
        (lambda: detect.inconsistency_criterion(f, f, form="l2"), "form: expected one of soft, hard, soft-l1"),
        (lambda: detect.hamming_criterion(f, database, top_k=31), r"top_k: expected 1 <= top_k <= 30"),
        (lambda: detect.hamming_criterion(f, database[:, :12]), "database: codes of 12 bits, but outputs f of 16"),
        (lambda: detect.hamming_criterion(f, np.packbits(database > 0, axis=1)[:, :1], packed=True),
         "database: codes of 1 uint8 columns"),
        (lambda: detect.hamming_criterion(f, database * 3, top_k=5), "database: code values must be"),
        (lambda: Detector(fpr=0.0), "fpr: expected a number strictly between 0 and 1"),
        (lambda: Detector(method="vote"), "method: expected one of joint, bonferroni, per-criterion"),
        (lambda: Detector(top_k=0), "top_k: expected a whole number >= 1"),
        (lambda: Detector().fit(np.zeros((30, 2))), r"scores: expected \(n, 3\) scores"),
        (lambda: Detector(fpr=0.05).fit(benign_scores(rng, 19)), "scores: 19 benign calibration queries are too few"),
        (lambda: Detector(fpr=0.05, method="bonferroni").fit(benign_scores(rng, 59)), "scores: 59 benign"),
        (lambda: Detector().predict(benign_scores(rng, 5)), "detector: not calibrated yet"),
        (lambda: Detector(c1_model=distance_models.untargeted(32, 10)).criteria(f, f, database),
         "f: outputs of 16 bits, but the C1 model is for 32 bits"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(TypeError, match="c1_model: expected a HammingDistanceModel"):
        Detector(c1_model=3)
    with pytest.raises(TypeError, match="database: packed codes must be uint8"):
        detect.hamming_criterion(f, database, packed=True)
