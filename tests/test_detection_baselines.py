"""Detection baselines: hand-computed scores, LID closed forms, FPR calibration, JSON, a tiny model."""

import importlib.util
import json
import math
import os
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minrr.hashing import detection_baselines as B
from minrr.hashing import transforms as T
from minrr.backends.detection import database_codes, detector_outputs
from minrr.cli import detect as cli_detect
from minrr.cli.main import main
from minrr.hashing.detection_baselines import BaselineDetector

# A 2 x 2 image of 8-bit values and a linear "model" f(x) = W vec(x) (K = 2), so that every
# squeezed output is computable by hand:
#   bit depth 5: round(31 x) / 31 -> x - t(x) = (0.2, -0.4, -0.2, 0.4) / 31
#   median 2 x 2 (window rows y-1..y, cols x-1..x, edges repeated): (a, max(a, b), max(a, c),
#     3rd smallest of a..d) = (0.2, 0.6, 0.8, 0.6) -> x - t(x) = (0, 0, 0, -0.2)
#   non-local means 13-3-2: the mirrored 2 x 2 image repeats with period 2, so only shifts
#     by even offsets (the pixel's own value) have similar patches -> t(x) = x
#   mean blur 3 x 3 (edges repeated): 9 t(x) = (4a + 2b + 2c + d, 2a + 4b + c + 2d,
#     2a + b + 4c + 2d, a + 2b + 2c + 4d) = (4.0, 4.4, 5.0, 4.6) -> x - t(x) = (-2.2, 1, 2.2, -1) / 9
#   FS-Adaptive: entropy 2 bits < 4, 8-bit values (51, 153, 204, 102) floored to multiples of
#     128 -> (0, 128, 128, 0), x - t(x) = (51, 25, 76, 102) / 255
# and for a flat image of 0.2 every filter is the identity, bit depth moves each pixel by
# 0.2 / 31, FS-Adaptive by 51 / 255.
IMAGES = np.array([[[[0.2, 0.6], [0.8, 0.4]]], [[[0.2, 0.2], [0.2, 0.2]]]])
W = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 2.0, 0.0]])
BY_HAND = {  # ||W (x - t(x))||_1 of the two images
    "f_bit_depth": [0.2 / 31, 1.2 / 31],  # (0, 0.2 / 31) and (0.8 / 31, 0.4 / 31)
    "f_median": [0.2, 0.0],
    "f_nlm": [0.0, 0.0],
    "f_t": [1.2 / 9, 0.0],
    "f_fs_adaptive": [432 / 255, 306 / 255],  # (254, 178) / 255 and (204, 102) / 255
}


def linear_model(batch):
    return batch.reshape(len(batch), -1) @ W.T


@pytest.mark.parametrize("detector", B.DETECTORS[:-1])
def test_squeezing_scores_on_a_hand_computed_case(detector):
    outputs = detector_outputs(linear_model, IMAGES, detector)
    assert set(outputs) == {"f", *B.INPUTS[detector]}
    np.testing.assert_allclose(outputs["f"], linear_model(IMAGES), atol=1e-12)
    for key in B.INPUTS[detector]:
        np.testing.assert_allclose(B.l1_change(outputs["f"], outputs[key]), BY_HAND[key], atol=1e-12)
    expected = np.max([BY_HAND[key] for key in B.INPUTS[detector]], axis=0)
    np.testing.assert_allclose(B.squeezing_score(outputs["f"], outputs, detector), expected, atol=1e-12)
    np.testing.assert_allclose(BaselineDetector(detector).statistic(outputs["f"], outputs), expected, atol=1e-12)


def test_feature_squeezing_takes_the_largest_change():
    # median wins on the first image (0.2 > 0.2 / 31), bit depth on the flat one
    outputs = detector_outputs(linear_model, IMAGES, "feature-squeezing")
    np.testing.assert_allclose(B.squeezing_score(outputs["f"], outputs), [0.2, 1.2 / 31], atol=1e-12)


def test_squeezers_are_the_papers_settings():
    x = np.random.default_rng(0).random((2, 3, 9, 9))
    np.testing.assert_array_equal(B.squeeze(x, "f_bit_depth"), T.bit_depth(x, 5))
    np.testing.assert_array_equal(B.squeeze(x, "f_median"), T.median_filter(x, 2))
    np.testing.assert_array_equal(B.squeeze(x, "f_nlm"), T.non_local_means(x, 13, 3, 2 / 255))
    np.testing.assert_array_equal(B.squeeze(x, "f_t"), T.mean_blur(x, 3))
    np.testing.assert_array_equal(B.squeeze(x, "f_fs_adaptive"), T.fs_adaptive(x, 3))
    assert B.transformed_outputs("umcd") == ("f_t",) and B.transformed_outputs("lid") == ()
    assert cli_detect.DETECTOR_TYPES == ("umcd", *B.DETECTORS)  # the command line's copy, for a fast --help


# -- LID ------------------------------------------------------------------------------------


def lid_oracle(query, reference, k):
    """-1 / mean_i log(r_i / r_k) over the k smallest distances, one query at a time."""
    r = sorted(math.dist(query, row) for row in reference)[:k]
    if r[0] == 0:
        return 0.0
    total = sum(math.log(r_i / r[-1]) for r_i in r)
    return math.inf if total == 0 else -k / total


@pytest.mark.parametrize("k", [1, 2, 5, 20])
def test_lid_of_equally_spaced_radii(k):
    """r_i = c i: LID = k / log(k^k / k!)."""
    direction = np.array([0.6, -0.8, 0.0])
    reference = 0.1 * np.arange(1, 101)[::-1, None] * direction  # any order
    expected = k / (k * math.log(k) - math.lgamma(k + 1)) if k > 1 else math.inf
    np.testing.assert_allclose(B.lid(np.zeros((1, 3)), reference, k=k), [expected], rtol=1e-12)


@pytest.mark.parametrize("q", [1.1, 2.0, 5.0])
def test_lid_of_geometric_radii(q):
    """r_i = q^i: log(r_i / r_k) = (i - k) log q, so LID = 2 / ((k - 1) log q)."""
    k = B.LID_K
    reference = np.zeros((100, 4))
    reference[:, 2] = q ** np.arange(1, 101)
    np.testing.assert_allclose(B.lid(np.zeros((1, 4)), reference), [2 / ((k - 1) * math.log(q))], rtol=1e-10)


def test_lid_edge_cases():
    reference = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [3.0, 4.0]])
    # a query on a reference row: 0; k equal distances: unbounded
    np.testing.assert_array_equal(B.lid(np.array([[3.0, 4.0], [0.0, 0.0]]), reference, k=3), [0.0, 0.0])
    assert B.lid(np.array([[0.0, 0.0]]), reference[1:4], k=3)[0] == math.inf


@given(st.integers(1, 12), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_lid_matches_the_formula_one_query_at_a_time(k, dim, seed):
    rng = np.random.default_rng(seed)
    reference = rng.normal(size=(12, dim))
    queries = np.r_[rng.normal(size=(7, dim)), reference[:1]]
    expected = [lid_oracle(q, reference, k) for q in queries]
    np.testing.assert_allclose(B.lid(queries, reference, k=k), expected, rtol=1e-10)
    np.testing.assert_array_equal(B.lid(queries, reference, k=k, chunk=3), B.lid(queries, reference, k=k))


def test_lid_estimates_the_dimension_of_the_data():
    rng = np.random.default_rng(1)
    for dim in (2, 6):
        reference = np.zeros((20000, 10))
        reference[:, :dim] = rng.random((20000, dim))  # a dim-dimensional cube inside R^10
        queries = np.zeros((300, 10))
        queries[:, :dim] = 0.25 + 0.5 * rng.random((300, dim))  # away from the cube's faces
        assert abs(np.median(B.lid(queries, reference)) - dim) < 0.15 * dim


def test_split_reference_is_seeded_and_disjoint():
    reference, rest = B.split_reference(500, seed=3)
    assert len(reference) == 100 and len(rest) == 400
    np.testing.assert_array_equal(np.sort(np.r_[reference, rest]), np.arange(500))
    np.testing.assert_array_equal(B.split_reference(500, seed=3)[0], reference)
    assert not np.array_equal(B.split_reference(500, seed=4)[0], reference)


# -- calibration -----------------------------------------------------------------------------


def detector_for(name, rng, dim=8):
    return BaselineDetector(name, reference=rng.normal(size=(100, dim))) if name == "lid" else BaselineDetector(name)


@given(st.integers(40, 400), st.floats(0.03, 0.5), st.integers(0, 2**32 - 1))
def test_calibration_hits_the_target_fpr_exactly_without_ties(n, fpr, seed):
    scores = np.random.default_rng(seed).exponential(size=n)
    detector = BaselineDetector("mean-blur", fpr=fpr).fit(scores)
    allowed = math.floor(n * fpr + 1e-9)
    assert detector.predict(scores).sum() == allowed
    assert detector.calibration_fpr_ == allowed / n


@given(st.lists(st.integers(0, 4), min_size=20, max_size=120), st.floats(0.05, 0.5))
def test_calibration_with_ties_is_the_smallest_benign_threshold_within_budget(values, fpr):
    scores = np.array(values, dtype=float)
    detector = BaselineDetector("fs-adaptive", fpr=fpr).fit(scores)
    allowed = math.floor(len(scores) * fpr + 1e-9)
    oracle = min(v for v in values if sum(s > v for s in values) <= allowed)
    assert detector.threshold_ == oracle
    assert detector.predict(scores).sum() <= allowed
    n = len(scores)
    np.testing.assert_array_equal(detector.predict(scores), detector.score(scores) >= (n - allowed) / n)


def test_fresh_benign_fpr_is_within_binomial_error():
    rng = np.random.default_rng(7)
    n, fresh_n, fpr = 2000, 20000, 0.05
    detector = BaselineDetector("lid", fpr=fpr, reference=rng.normal(size=(100, 3))).fit(rng.gamma(3, size=n))
    sd = math.sqrt(fpr * (1 - fpr) * (1 / n + 1 / fresh_n))
    assert abs(detector.predict(rng.gamma(3, size=fresh_n)).mean() - fpr) < 5 * sd


def test_report_and_infinite_lid():
    rng = np.random.default_rng(4)
    detector = BaselineDetector("feature-squeezing", fpr=0.05).fit(rng.exponential(size=1000))
    queries = np.r_[rng.exponential(size=300), 3 + rng.exponential(size=200), np.inf]
    known = np.r_[np.zeros(300, bool), np.ones(201, bool)]
    row = detector.report(queries, known)["feature-squeezing"]
    flags = detector.predict(queries)
    assert row["tpr"] == flags[known].mean() and row["fpr"] == flags[~known].mean() and row["fnr"] == 1 - row["tpr"]
    # the exact AUC: every shifted score beats a benign one unless the benign is above 3 + its excess
    s_adv, s_ben = queries[known], queries[~known]
    pairs = (s_adv[:, None] > s_ben[None]).mean() + 0.5 * (s_adv[:, None] == s_ben[None]).mean()
    assert row["auc"] == pytest.approx(pairs) and row["auc"] > 0.9
    assert flags[-1] and detector.score(queries)[-1] == 1.0
    assert np.isnan(detector.report(queries[known], np.ones(201))["feature-squeezing"]["auc"])


# -- JSON ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", B.DETECTORS)
def test_json_round_trip_gives_identical_predictions(name):
    rng = np.random.default_rng(5)
    detector = detector_for(name, rng).fit(rng.exponential(size=300))
    loaded = BaselineDetector.from_json(detector.to_json())
    queries = rng.exponential(size=400) * 1.5
    np.testing.assert_array_equal(loaded.predict(queries), detector.predict(queries))
    np.testing.assert_array_equal(loaded.score(queries), detector.score(queries))
    assert (loaded.detector, loaded.fpr, loaded.k, loaded.threshold_) == \
           (name, detector.fpr, detector.k, detector.threshold_)
    if name == "lid":
        np.testing.assert_array_equal(loaded.reference, detector.reference)
    assert loaded.to_json() == detector.to_json()


def test_tampered_json_is_refused():
    rng = np.random.default_rng(6)
    doc = json.loads(detector_for("lid", rng).fit(rng.exponential(size=200)).to_json())
    for key, value in [("threshold", doc["threshold"] + 1.0), ("n_benign", 199), ("calibration_fpr", 0.04)]:
        with pytest.raises(ValueError, match="detector: the stored threshold does not follow"):
            BaselineDetector.from_json(json.dumps({**doc, key: value}))
    # any other edit, even one that leaves the threshold as it was, breaks the fingerprint
    lowest = int(np.argmin(doc["benign_scores"]))
    edits = [("benign_scores", [v / 2 if i == lowest else v for i, v in enumerate(doc["benign_scores"])]),
             ("k", 19), ("reference", [[v + 1e-9 for v in row] for row in doc["reference"]])]
    for key, value in edits:
        with pytest.raises(ValueError, match="detector: the file does not match its fingerprint"):
            BaselineDetector.from_json(json.dumps({**doc, key: value}))
    with pytest.raises(ValueError, match="detector: the file has no fingerprint"):
        BaselineDetector.from_json(json.dumps({k: v for k, v in doc.items() if k != "fingerprint"}))
    for broken, message in [("{", "detector: not valid JSON .line 1, column 2: Expecting"),
                            ("[]", "detector: not a minrr-baseline-detector"),
                            (json.dumps({**doc, "version": 9}), "detector: version 9"),
                            (json.dumps({k: v for k, v in doc.items() if k != "k"}), "detector: 'k'"),
                            (json.dumps({**doc, "detector": "vote"}), "detector: detector: expected one of"),
                            (json.dumps({**doc, "reference": None}), "detector: reference: the lid detector needs"),
                            (json.dumps({**doc, "benign_scores": ["a"]}), "detector: scores: expected real")]:
        with pytest.raises(ValueError, match=message):
            BaselineDetector.from_json(broken)


# -- bad inputs ------------------------------------------------------------------------------


def test_bad_inputs():
    rng = np.random.default_rng(8)
    f = rng.normal(size=(4, 6))
    cases = [
        (lambda: BaselineDetector("vote"), "detector: expected one of feature-squeezing"),
        (lambda: BaselineDetector("lid"), "reference: the lid detector needs"),
        (lambda: BaselineDetector("mean-blur", k=5), "k: only the lid detector takes it"),
        (lambda: BaselineDetector("lid", reference=f, k=5), r"k: expected a whole number in 1\.\.4"),
        (lambda: BaselineDetector("mean-blur", fpr=1.0), "fpr: expected a number strictly between 0 and 1"),
        (lambda: BaselineDetector("mean-blur").fit(np.ones(19)), "scores: 19 benign calibration queries are too "
                                                                 "few for fpr = 0.05 \\(at least 20"),
        (lambda: BaselineDetector("mean-blur").fit(np.r_[np.ones(30), np.nan]), "scores: contains NaN"),
        (lambda: BaselineDetector("mean-blur").predict(np.ones(3)), "detector: not calibrated yet"),
        (lambda: B.squeezing_score(f, {"f_median": f}), "squeezed: the feature-squeezing detector needs "
                                                         "the outputs f_bit_depth, f_median, f_nlm; missing "
                                                         "f_bit_depth, f_nlm"),
        (lambda: B.squeezing_score(f, {}, "lid"), "detector: 'lid' reads no transformed outputs"),
        (lambda: B.l1_change(f, f[:, :3]), r"f_squeezed: shape \(4, 3\) does not match"),
        (lambda: B.lid(f, f[:, :2]), "reference: rows of 2 values, but f has 6"),
        (lambda: B.split_reference(100), "size: a reference batch of 100 leaves none"),
        (lambda: B.transformed_outputs("vote"), "detector: expected one of umcd, feature-squeezing"),
        (lambda: B.squeeze(np.zeros((1, 2, 2)), "f_blur"), "key: expected one of f_t"),
        (lambda: detector_outputs(linear_model, IMAGES[:, 0], "lid"), r"images: expected \(N, C, H, W\)"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


# -- a tiny model ----------------------------------------------------------------------------

torch_missing = importlib.util.find_spec("torch") is None and not os.environ.get("CI")


@pytest.fixture(scope="module")
def fashion():
    """512 training and 400 test images of the bundled subset, (N, 1, 28, 28) uint8, and the training labels."""
    from minrr.data import fashion_mnist_subset

    data = fashion_mnist_subset()
    return (data["train_images"][:512, None], data["train_labels"][:512].astype(np.int64),
            data["test_images"][:400, None])


@pytest.fixture(scope="module")
def tiny_model(fashion):
    """A 16-bit CSQ hashing model, three epochs on 512 images (about a second on a CPU)."""
    from minrr.backends import get_backend
    from minrr.backends.models import ModelSpec, build_model
    from minrr.backends.training import train

    model = build_model(ModelSpec("small-cnn", 1, "hash", 16, width=4, mean=(0.29,), std=(0.35,)), seed=0)
    train(model, fashion[0], fashion[1], task="hash", epochs=3, batch_size=64, lr=3e-3,
          backend=get_backend("torch", device="cpu"))
    return model


@pytest.mark.skipif(torch_missing, reason="torch is not installed (CI requires it)")
def test_outputs_from_a_torch_model_match_direct_forward_passes(tiny_model):
    import torch

    x = np.random.default_rng(0).integers(0, 256, (7, 1, 12, 12), dtype=np.uint8)
    tiny_model.train()
    outputs = detector_outputs(tiny_model, x, "feature-squeezing", batch_size=3)
    assert tiny_model.training  # mode restored, yet the passes ran in eval mode (BatchNorm statistics fixed)
    tiny_model.eval()
    unit = x.astype(np.float32) / 255
    with torch.no_grad():
        for key in ("f", *B.INPUTS["feature-squeezing"]):
            images = unit if key == "f" else B.squeeze(unit, key)
            np.testing.assert_allclose(outputs[key], tiny_model(torch.from_numpy(images)).numpy(), atol=1e-6)
    again = detector_outputs(tiny_model, x, "feature-squeezing", batch_size=7)
    for key in outputs:
        np.testing.assert_allclose(again[key], outputs[key], atol=1e-6)


@pytest.mark.skipif(torch_missing, reason="torch is not installed (CI requires it)")
@pytest.mark.parametrize("name, tpr, auc", [("feature-squeezing", 0.9, 0.95), ("mean-blur", 0.9, 0.95),
                                            ("lid", 0.25, 0.75)])
def test_detectors_flag_noisy_inputs_more_than_clean_ones(tiny_model, fashion, name, tpr, auc):
    """Calibrated on 300 clean test images at FPR 5%, scored on 100 others, clean and with
    Gaussian noise of sd 0.25. (FS-NLM and FS-Adaptive do not pass this: 13-3-2 non-local
    means leaves such noise in place, and FS-Adaptive quantises the low-entropy clean images
    more coarsely than the noisy ones.)"""
    clean = fashion[2][:400].astype(np.float32) / 255
    noisy = np.clip(clean[300:] + np.random.default_rng(0).normal(0, 0.25, clean[300:].shape), 0, 1)
    benign = detector_outputs(tiny_model, clean[:300], name)
    queries = detector_outputs(tiny_model, np.r_[clean[300:], noisy.astype(np.float32)], name)
    if name == "lid":
        reference, calibration = B.split_reference(300, seed=0)
        detector = BaselineDetector(name, fpr=0.05, reference=benign["f"][reference])
        benign = {key: value[calibration] for key, value in benign.items()}
    else:
        detector = BaselineDetector(name, fpr=0.05)
    detector.fit(detector.statistic(benign["f"], benign))
    known = np.r_[np.zeros(100, bool), np.ones(100, bool)]
    row = detector.report(detector.statistic(queries["f"], queries), known)[name]
    assert row["tpr"] > tpr and row["fpr"] <= 0.1 and row["auc"] > auc, row


# -- minrr detect with --model --------------------------------------------------------------


@pytest.fixture(scope="module")
def model_files(tiny_model, fashion, tmp_path_factory):
    """The tiny model as a checkpoint, 200 benign images, 60 clean + 60 noisy queries, 150 database images."""
    from minrr.backends.checkpoint import save_checkpoint
    from minrr.backends.models import ModelSpec, build_model

    root = tmp_path_factory.mktemp("detect-model")
    save_checkpoint(root / "model.pt", tiny_model, input_shape=(1, 28, 28), training={"task": "hash"})
    embedding = build_model(ModelSpec("small-cnn", 1, "embedding", 8, width=4), seed=0)
    save_checkpoint(root / "embedding.pt", embedding, input_shape=(1, 28, 28))
    test = fashion[2]
    noisy = np.clip(test[340:] / 255 + np.random.default_rng(1).normal(0, 0.25, test[340:].shape), 0, 1)
    np.savez(root / "benign.npz", images=test[:200], labels=np.zeros(200, np.int64))
    np.savez(root / "queries.npz", images=np.r_[test[340:] / 255, noisy].astype(np.float32),
             labels=np.zeros(120, np.int64))
    np.save(root / "adv.npy", np.r_[np.zeros(60, np.int64), np.ones(60, np.int64)])
    np.savez(root / "database.npz", images=fashion[0][:150], labels=fashion[1][:150])
    return root


def cli_calibrate(root, out, *extra):
    model = [] if "--model" in extra else ["--model", str(root / "model.pt")]
    return main(["detect", "calibrate", *model, "--data", str(root / "benign.npz"), "--out", str(out),
                 *[str(root / e) if e.endswith((".pt", ".npy")) else e for e in extra]])


def cli_score(root, detector, out, *extra):
    return main(["detect", "score", "--detector", str(detector), "--model", str(root / "model.pt"),
                 "--data", str(root / "queries.npz"), "--labels-known", str(root / "adv.npy"), "--out", str(out),
                 *extra])


@pytest.mark.skipif(torch_missing, reason="torch is not installed (CI requires it)")
@pytest.mark.parametrize("name", ["feature-squeezing", "lid"])
def test_cli_baseline_from_a_model_agrees_with_the_library(model_files, tiny_model, tmp_path, name, capsys):
    detector_path, tsv = tmp_path / "detector.json", tmp_path / "flags.tsv"
    assert cli_calibrate(model_files, detector_path, "--detector-type", name, "--fpr", "0.1") == 0
    assert "calibration FPR = 0.1000" in capsys.readouterr().out
    assert cli_score(model_files, detector_path, tsv) == 0
    printed = capsys.readouterr().out

    with np.load(model_files / "benign.npz") as benign, np.load(model_files / "queries.npz") as queries:
        benign_out = detector_outputs(tiny_model, benign["images"], name)
        query_out = detector_outputs(tiny_model, queries["images"], name)
    if name == "lid":
        reference, calibration = B.split_reference(200, size=100, seed=0)
        expected = BaselineDetector(name, fpr=0.1, reference=benign_out["f"][reference])
        benign_out = {key: value[calibration] for key, value in benign_out.items()}
    else:
        expected = BaselineDetector(name, fpr=0.1)
    expected.fit(expected.statistic(benign_out["f"], benign_out))
    loaded = BaselineDetector.from_json(detector_path.read_text())
    assert loaded.threshold_ == pytest.approx(expected.threshold_, rel=1e-5)
    statistic = expected.statistic(query_out["f"], query_out)
    lines = tsv.read_text().splitlines()
    assert lines[0].split("\t") == ["idx", "s", "score", "flag", "adversarial"]
    rows = np.array([[float(v) for v in line.split("\t")] for line in lines[1:]])
    np.testing.assert_allclose(rows[:, 1], statistic, rtol=1e-5)
    np.testing.assert_array_equal(rows[:, 3], expected.predict(statistic))
    assert f"{name}\t" in printed and "60 adversarial, 60 benign" in printed


@pytest.mark.skipif(torch_missing, reason="torch is not installed (CI requires it)")
def test_cli_umcd_from_a_model_and_database_images(model_files, tiny_model, tmp_path, capsys):
    from minrr.hashing import detect

    detector_path, tsv = tmp_path / "umcd.json", tmp_path / "flags.tsv"
    assert cli_calibrate(model_files, detector_path, "--database-data", str(model_files / "database.npz"),
                         "--top-k", "10") == 0
    with np.load(model_files / "benign.npz") as benign, np.load(model_files / "database.npz") as database:
        outputs = detector_outputs(tiny_model, benign["images"], "umcd")
        codes = database_codes(tiny_model, database["images"])
        f_database = detector_outputs(tiny_model, database["images"], "lid")["f"]
    np.testing.assert_array_equal(codes, np.where(f_database >= 0, 1, -1))
    expected = detect.Detector(top_k=10)
    expected.fit(expected.criteria(outputs["f"], outputs["f_t"], codes))
    loaded = detect.Detector.from_json(detector_path.read_text())
    np.testing.assert_allclose(loaded.thresholds_, expected.thresholds_, rtol=1e-5)
    assert loaded.database["data"] == str((model_files / "database.npz").resolve())
    # scoring recomputes the recorded database's codes through --model, or reads them from a file
    assert cli_score(model_files, detector_path, tsv) == 0
    np.save(tmp_path / "codes.npy", codes)
    assert cli_score(model_files, detector_path, tmp_path / "flags2.tsv",
                     "--database", str(tmp_path / "codes.npy")) == 0
    assert tsv.read_text() == (tmp_path / "flags2.tsv").read_text()
    np.save(tmp_path / "other.npy", -codes)
    assert cli_score(model_files, detector_path, tmp_path / "x.tsv", "--database", str(tmp_path / "other.npy")) == 1
    assert "is not the database the detector was calibrated with" in capsys.readouterr().err
    assert not (tmp_path / "x.tsv").exists()


@pytest.mark.skipif(torch_missing, reason="torch is not installed (CI requires it)")
def test_cli_baseline_from_an_archive_equals_the_model_path(model_files, tiny_model, tmp_path):
    with np.load(model_files / "benign.npz") as benign:
        outputs = detector_outputs(tiny_model, benign["images"], "fs-median")
    np.savez(tmp_path / "benign_out.npz", **outputs)
    assert main(["detect", "calibrate", "--benign", str(tmp_path / "benign_out.npz"), "--detector-type", "fs-median",
                 "--out", str(tmp_path / "a.json")]) == 0
    assert cli_calibrate(model_files, tmp_path / "b.json", "--detector-type", "fs-median") == 0
    a, b = (BaselineDetector.from_json((tmp_path / name).read_text()) for name in ("a.json", "b.json"))
    np.testing.assert_allclose(a.benign_, b.benign_, rtol=1e-5)


@pytest.mark.skipif(torch_missing, reason="torch is not installed (CI requires it)")
@pytest.mark.parametrize("extra, message", [
    (["--detector-type", "lid", "--database", "db.npy"], "--database: applies to --detector-type umcd only"),
    (["--detector-type", "mean-blur", "--top-k", "5"], "--top-k: applies to --detector-type umcd only"),
    (["--detector-type", "mean-blur", "--lid-k", "5"], "--lid-k: applies to --detector-type lid only"),
    (["--seed", "3"], "--seed: applies to --detector-type lid only, not umcd"),
    (["--detector-type", "lid", "--lid-reference", "200"], "--lid-reference: a reference batch of 200 leaves none"),
    (["--detector-type", "lid", "--lid-k", "101"], r"--lid-k: expected a whole number in 1\.\.100"),
    ([], "--database: give the database codes with --database or --database-data"),
    (["--detector-type", "mean-blur", "--model", "embedding.pt"], "--model: .*embedding.pt is an embedding model"),
])
def test_cli_bad_model_options(model_files, tmp_path, capsys, extra, message):
    out = tmp_path / "detector.json"
    assert cli_calibrate(model_files, out, *extra) == 1
    assert_one_error_line(capsys.readouterr().err, message)
    assert not out.exists()


def assert_one_error_line(err, message):
    errors = [line for line in err.splitlines() if line.startswith("minrr detect: error: ")]  # progress lines aside
    assert len(errors) == 1 and re.match(f"minrr detect: error: {message}", errors[0]), err


@pytest.mark.skipif(torch_missing, reason="torch is not installed (CI requires it)")
def test_cli_bad_score_options(model_files, tmp_path, capsys):
    detector_path = tmp_path / "lid.json"
    assert cli_calibrate(model_files, detector_path, "--detector-type", "lid") == 0
    capsys.readouterr()
    cases = [(["--detector-type", "mean-blur"], "--detector-type: mean-blur, but .*lid.json is a lid detector"),
             (["--database", str(tmp_path / "db.npy")], "--database: a lid detector reads no database"),
             (["--database-data", "bundled:train"], "--database-data: a lid detector reads no database")]
    for extra, message in cases:
        assert cli_score(model_files, detector_path, tmp_path / "flags.tsv", *extra) == 1
        assert_one_error_line(capsys.readouterr().err, message)
    assert main(["detect", "score", "--detector", str(detector_path), "--data", "bundled:test"]) == 1
    assert_one_error_line(capsys.readouterr().err, "--model: required with --data")
    assert not (tmp_path / "flags.tsv").exists()
