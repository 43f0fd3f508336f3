"""Deep-hashing attacks (minrr.backends.hashing_attacks) on a tiny CSQ model trained here.

The model (small-cnn, width 8, K = 16 bits) is trained for a second on 1,000 bundled
Fashion-MNIST images, which are also the database; it reaches mAP@all of about 0.6 on the
test images. Attack budgets are larger than UMCD's CIFAR settings (a tiny network on 28 x 28
images needs more than 8/255), and fewer steps keep the tests fast.
"""

import numba
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from minrr.hashing import detect  # noqa: E402
from minrr.hashing import transforms  # noqa: E402
from minrr.backends import hashing_attacks as H  # noqa: E402
from minrr.backends.attacks import pgd  # noqa: E402
from minrr.backends.models import ModelSpec, build_model  # noqa: E402
from minrr.backends.training import train  # noqa: E402
from minrr.data.loaders import load_dataset  # noqa: E402
from minrr.metrics.hashing import hamming_map  # noqa: E402

PGD = {"eps": 0.1, "alpha": 0.01, "steps": 20}


@pytest.fixture(scope="module")
def setup():
    # Numba's OpenMP layer shares libgomp with torch: starting it (the mAP and C1 kernels) sets
    # torch's threads to Numba's count, which on a busy 2-core machine slows torch tenfold.
    # One Numba thread, and torch's own count put back, keep the tests fast; both are restored.
    threads = torch.get_num_threads(), numba.get_num_threads()
    numba.set_num_threads(1)
    torch.set_num_threads(threads[0])
    database = load_dataset("bundled:train")
    queries = load_dataset("bundled:test")
    model = build_model(ModelSpec("small-cnn", 1, "hash", 16, width=8), seed=0)
    train(model, database.images[:1000], database.labels[:1000], task="hash", epochs=8, batch_size=64, lr=1e-2,
          seed=0)
    db_labels = database.labels[:1000]
    with torch.no_grad():
        db_codes = np.where(model(torch.as_tensor(database.images[:1000]).float() / 255).numpy() >= 0, 1, -1)
    x = torch.as_tensor(queries.images[:300]).float() / 255
    yield {"model": model, "db_codes": db_codes, "db_labels": db_labels, "x": x[:100],
           "labels": queries.labels[:100], "benign": x[100:300]}
    numba.set_num_threads(threads[1])
    torch.set_num_threads(threads[0])


def _map(setup, adv, labels=None):
    with torch.no_grad():
        f = setup["model"](adv).numpy()
    labels = setup["labels"] if labels is None else labels
    return hamming_map(np.where(f >= 0, 1, -1), setup["db_codes"], labels, setup["db_labels"])


def _in_ball_and_box(adv, x, eps):
    return float((adv - x).abs().max()) <= eps + 1e-6 and float(adv.min()) >= 0 and float(adv.max()) <= 1


def _anchors(setup):
    target_labels, anchors = H.dhta_targets(setup["labels"], setup["db_codes"], setup["db_labels"], seed=0)
    return target_labels, torch.as_tensor(anchors, dtype=torch.float32)


# ---- the transform t ------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 2, 3, 5])
@pytest.mark.parametrize("shape", [(4, 1, 28, 28), (2, 3, 7, 9)])
def test_mean_blur_equals_the_numpy_transform(size, shape):
    x = np.random.default_rng(size).random(shape)
    ours = H.mean_blur(torch.as_tensor(x), size).numpy()
    np.testing.assert_allclose(ours, transforms.mean_blur(x, size), atol=1e-12)


def test_mean_blur_by_hand():
    x = torch.arange(9, dtype=torch.float64).reshape(1, 1, 3, 3) / 8
    out = H.mean_blur(x)[0, 0].numpy()
    # corner: the window mirrors row 0 and column 0 (edge repeated): 4 x0 + 2 x1 + 2 x3 + x4
    assert out[0, 0] == pytest.approx((4 * 0 + 2 * 1 + 2 * 3 + 4) / 9 / 8)
    assert out[1, 1] == pytest.approx(0.5)


# ---- the attacks reach their goals -----------------------------------------------------------

def test_untargeted_attack_drives_map_towards_zero(setup):
    clean = _map(setup, setup["x"])
    adv = H.hamming_attack(setup["model"], setup["x"], eps=0.15, alpha=0.02, steps=20)
    assert clean > 0.5
    assert _map(setup, adv) < 0.2 * clean
    assert _in_ball_and_box(adv, setup["x"], 0.15)


def test_dhta_raises_the_target_label_map(setup):
    target_labels, anchors = _anchors(setup)
    assert np.all(target_labels != setup["labels"])
    adv = H.dhta(setup["model"], setup["x"], anchors, **PGD)
    clean, attacked = _map(setup, setup["x"], target_labels), _map(setup, adv, target_labels)
    assert attacked > 2.5 * clean
    assert _in_ball_and_box(adv, setup["x"], PGD["eps"])


def test_cw_lowers_map_and_succeeds_on_the_relaxed_code(setup):
    model, x = setup["model"], setup["x"][:50]
    adv = H.cw(model, x, steps=60)
    assert _map(setup, adv, setup["labels"][:50]) < 0.5 * _map(setup, x, setup["labels"][:50])
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    with torch.no_grad():
        similarity = (model(adv) * H.codes_of(model, x)).sum(1) / 16
    assert float((similarity <= 0).float().mean()) > 0.4  # success: the relaxed code disagrees on half the bits
    bounded = H.cw(model, x[:10], steps=20, eps=0.05)
    assert _in_ball_and_box(bounded, x[:10], 0.05)


def _detector_view(setup, images):
    """(f, f_t) on images, with the NumPy transform of minrr.hashing.detect's users."""
    with torch.no_grad():
        f = setup["model"](images).double().numpy()
        f_t = setup["model"](torch.as_tensor(transforms.mean_blur(images.numpy()))).double().numpy()
    return f, f_t


def test_white_box_attack_evades_the_detector_better_than_the_plain_attack(setup):
    detector = detect.Detector(fpr=0.1, top_k=20)
    detector.fit(detector.criteria(*_detector_view(setup, setup["benign"]), setup["db_codes"]))
    target_labels, anchors = _anchors(setup)
    settings = {"eps": 32 / 255, "alpha": 2 / 255, "steps": 30}
    rates, criteria = {}, {}
    for name, lambdas in (("plain", (0.0, 0.0)), ("white-box", (0.0075, 0.3)), ("C3 weighted", (0.0, 3.0)),
                          ("C2 weighted", (0.5, 0.0))):
        adv = H.detector_attack(setup["model"], setup["x"], anchors, lambda1=lambdas[0], lambda2=lambdas[1],
                                **settings)
        assert _in_ball_and_box(adv, setup["x"], 32 / 255)
        scores = detector.criteria(*_detector_view(setup, adv), setup["db_codes"])
        rates[name], criteria[name] = detector.predict(scores).mean(), scores.mean(axis=0)
        if name == "white-box":
            assert _map(setup, adv, target_labels) > 2.5 * _map(setup, setup["x"], target_labels)
    assert rates["white-box"] < rates["plain"] - 0.05
    # the signs of Eq. 13: lambda2 lowers C3 (blur disagreement), lambda1 raises C2 (quantization loss)
    assert criteria["C3 weighted"][2] < criteria["plain"][2]
    assert criteria["C2 weighted"][1] > criteria["plain"][1]


def test_untargeted_white_box_moves_away_from_the_clean_code(setup):
    adv = H.detector_attack(setup["model"], setup["x"], eps=32 / 255, alpha=2 / 255, steps=20, lambda1=0.0,
                            lambda2=0.0)
    assert _map(setup, adv) < 0.3 * _map(setup, setup["x"])


# ---- anchors and the DHTA schedule -----------------------------------------------------------

def test_anchor_is_the_vote_of_n_t_distinct_codes_of_the_target_class():
    rng = np.random.default_rng(0)
    codes = rng.choice([-1, 1], size=(12, 8))
    labels = np.repeat([0, 1, 2], 4)
    # every class has exactly n_t = 4 codes: a draw without replacement takes all of them,
    # and ties of the sum (even n_t) go to +1
    target_labels, anchors = H.dhta_targets(np.zeros(6, dtype=int), codes, labels, n_t=4, seed=1)
    assert set(target_labels) <= {1, 2}
    for t, a in zip(target_labels, anchors):
        votes = codes[labels == t].sum(axis=0)
        np.testing.assert_array_equal(a, np.where(votes >= 0, 1, -1))
    fixed, anchors_fixed = H.dhta_targets(np.zeros(3, dtype=int), codes > 0, labels, target=2, n_t=4)
    assert np.all(fixed == 2)
    np.testing.assert_array_equal(anchors_fixed[0], np.where(codes[8:].sum(0) >= 0, 1, -1))


def test_targets_and_anchors_are_per_query(setup):
    args = (setup["labels"][:30], setup["db_codes"], setup["db_labels"])
    whole = H.dhta_targets(*args, seed=4)
    part = H.dhta_targets(setup["labels"][10:30], setup["db_codes"], setup["db_labels"], seed=4, first_index=10)
    np.testing.assert_array_equal(whole[0][10:], part[0])
    np.testing.assert_array_equal(whole[1][10:], part[1])
    other = H.dhta_targets(*args, seed=5)
    assert not np.array_equal(whole[1], other[1])
    assert len({tuple(a) for a in whole[1]}) > 5  # anchors vary from query to query


def test_dhta_schedule():
    assert [H.dhta_scale(t) for t in (0, 999, 1000, 1199, 1200, 1400, 1600, 1799, 1800, 5000)] == \
        [0.1, 0.1, 0.2, 0.2, 0.3, 0.5, 0.7, 0.7, 1.0, 1.0]


def test_dhta_applies_the_scale_to_the_logits(setup):
    model, x = setup["model"], setup["x"][:16]
    _, anchors = _anchors(setup)
    anchors = anchors[:16]
    scheduled = H.dhta(model, x, anchors, eps=0.1, alpha=0.01, steps=8)  # steps < 1000: s = 0.1 throughout
    np.testing.assert_array_equal(scheduled, H.dhta(model, x, anchors, eps=0.1, alpha=0.01, steps=8, scale=0.1))
    plain = pgd(model, x, lambda f: (f * anchors).sum(1), eps=0.1, alpha=0.01, steps=8)
    np.testing.assert_array_equal(H.dhta(model, x, anchors, eps=0.1, alpha=0.01, steps=8, scale=1.0), plain)
    logits = H.hash_logits(model, x)

    def scaled(z):
        return torch.tanh(0.1 * H.hash_logits(model, z))
    by_hand = pgd(model, x, lambda f: (f * anchors).sum(1), eps=0.1, alpha=0.01, steps=8, forward=scaled)
    np.testing.assert_array_equal(scheduled, by_hand)
    assert not torch.equal(scheduled, plain)
    torch.testing.assert_close(torch.tanh(logits), model(x))


# ---- invariances -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", H.ATTACKS)
def test_same_seed_same_images_for_any_batch_size(setup, name):
    model, x = setup["model"], setup["x"][:12]
    _, anchors = _anchors(setup)
    targets = anchors[:12] if name in ("dhta", "detector") else None
    settings = {"steps": 6} if name == "cw" else {"steps": 6, "random_start": True}

    def run(rows, first_index):
        return H.hashing_attack(name, model, x[rows], None if targets is None else targets[rows], seed=3,
                                first_index=first_index, **settings)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # with more, a convolution's rounding can depend on the batch size
    try:
        whole = run(slice(0, 12), 0)
        pieces = torch.cat([run(slice(0, 5), 0), run(slice(5, 12), 5)])
        other = H.hashing_attack(name, model, x, targets, seed=4, **settings)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(whole, pieces)
    if name != "cw":  # CW draws nothing
        assert float((whole != other).float().mean()) > 0.5


@pytest.mark.parametrize("name", H.ATTACKS)
def test_model_mode_parameters_and_flags_are_unchanged(setup, name):
    model, x = setup["model"], setup["x"][:4]
    _, anchors = _anchors(setup)
    model.train()
    model.trunk.eval()
    model.head.weight.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        H.hashing_attack(name, model, x, anchors[:4] if name == "dhta" else None, steps=2)
        assert model.training and not model.trunk.training and model.normalize.training
        assert not model.head.weight.requires_grad and model.head.bias.requires_grad
        assert all(p.grad is None for p in model.parameters())
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    finally:
        model.eval()
        model.head.weight.requires_grad_(True)


# ---- bad input -------------------------------------------------------------------------------

def test_bad_input_raises_one_line_naming_the_argument(setup):
    model, x = setup["model"], setup["x"][:2]
    cases = [
        (lambda: H.hashing_attack("fgsm", model, x), "attack: expected one of hamming, dhta, cw, detector"),
        (lambda: H.hashing_attack("hamming", model, x, lambda1=0.1), "lambda1: not a setting of the hamming"),
        (lambda: H.hashing_attack("dhta", model, x), "targets: the dhta attack needs anchor codes"),
        (lambda: H.hashing_attack("cw", model, x, torch.ones(2, 16)), "targets: the cw attack is untargeted"),
        (lambda: H.dhta(model, x, torch.ones(3, 16)), r"targets: expected a \(2, 16\) tensor"),
        (lambda: H.dhta(model, x, torch.ones(2, 16), scale=0), "scale: expected 'dhta' or a number above 0"),
        (lambda: H.detector_attack(model, x, lambda2=-1), "lambda2: expected a finite number >= 0"),
        (lambda: H.detector_attack(model, x, blur=60), "blur: a 60 x 60 window needs"),
        (lambda: H.cw(model, x, lr=0), "lr: expected a finite number above 0"),
        (lambda: H.cw(model, x, kappa=-1), "kappa: expected a finite number >= 0"),
        (lambda: H.hamming_attack(model, x, eps=0), "eps: expected a finite number above 0"),
        (lambda: H.dhta_targets([0], setup["db_codes"][:20], setup["db_labels"][:20], target=3, n_t=9),
         "targeted_label: class 3 has"),
        (lambda: H.dhta_targets([0], setup["db_codes"], setup["db_labels"][:5]),
         r"database_labels: expected \(1000,\)"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 16), torch.nn.Tanh())
    with pytest.raises(TypeError, match="model: a tanh scale other than 1 needs a minrr hashing model"):
        H.dhta(linear, x, torch.ones(2, 16), steps=1)
