"""The PGD engine (minrr.backends.attacks) and the backends' ``pgd`` verb.

Closed forms pin the steps: for a linear model h(x) = W x and the loss <w, h(x)>, the
gradient is the constant W^T w, so k sign steps move every pixel by min(k alpha, eps) in
the direction of sign(W^T w) (before the [0, 1] box), and normalised l2 steps move along
the unit gradient until the ball's surface.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from minrr.backends import get_backend  # noqa: E402
from minrr.backends.attacks import PGD, frozen, pgd, project, uniform_start  # noqa: E402

SHAPE = (1, 3, 4)


class Linear(torch.nn.Module):
    """h(x) = W flatten(x), with a BatchNorm-free but mode-sensitive dropout to see eval mode."""

    def __init__(self, weights: np.ndarray):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.as_tensor(weights, dtype=torch.float64))
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.dropout(x.flatten(1) @ self.weight.T)


@pytest.fixture
def setup():
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(5, int(np.prod(SHAPE))))
    direction = rng.normal(size=5)
    images = rng.uniform(0.2, 0.8, size=(6, *SHAPE))
    return Linear(weights), weights, direction, images


def _loss(direction):
    w = torch.as_tensor(direction)
    return lambda out: out @ w


def test_sign_steps_follow_the_closed_form(setup):
    model, weights, direction, images = setup
    x = torch.as_tensor(images)
    sign = np.sign(weights.T @ direction).reshape(SHAPE)
    for steps, expected_move in ((1, 0.02), (3, 0.06), (10, 0.1)):
        adv = pgd(model, x, _loss(direction), eps=0.1, alpha=0.02, steps=steps).numpy()
        np.testing.assert_allclose(adv, np.clip(images + expected_move * sign, 0, 1), atol=1e-12)


def test_l2_steps_stop_at_the_sphere(setup):
    model, weights, direction, images = setup
    unit = (weights.T @ direction) / np.linalg.norm(weights.T @ direction)
    adv = pgd(model, torch.as_tensor(images), _loss(direction), eps=0.25, alpha=0.1, steps=2, norm="l2").numpy()
    np.testing.assert_allclose(adv, images + 0.2 * unit.reshape(SHAPE), atol=1e-12)
    adv = pgd(model, torch.as_tensor(images), _loss(direction), eps=0.25, alpha=0.1, steps=5, norm="l2").numpy()
    np.testing.assert_allclose(adv, images + 0.25 * unit.reshape(SHAPE), atol=1e-12)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("step", ["sign", "normalized"])
def test_iterates_stay_in_the_ball_and_the_box(setup, norm, step):
    model, _, direction, _ = setup
    images = np.random.default_rng(1).random((6, *SHAPE))  # pixels near 0 and 1: the box binds
    x = torch.as_tensor(images)
    eps = 0.3
    adv = pgd(model, x, _loss(direction), eps=eps, alpha=0.2, steps=7, norm=norm, step=step,
              random_start=True, seed=3).numpy()
    delta = (adv - images).reshape(len(images), -1)
    size = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    assert np.all(size <= eps + 1e-12)
    assert adv.min() >= 0 and adv.max() <= 1


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_is_uniform_in_the_ball_and_per_item(norm):
    x = torch.full((400, 2), 0.5, dtype=torch.float64)
    start = uniform_start(x, 0.3, norm, seed=7).numpy() - 0.5
    size = np.abs(start).max(1) if norm == "linf" else np.linalg.norm(start, axis=1)
    assert size.max() <= 0.3 + 1e-12
    if norm == "l2":  # uniform in a disc: P(r <= 0.3 t) = t^2
        assert abs(np.mean(size <= 0.15) - 0.25) < 0.07
    else:
        assert abs(np.mean(start[:, 0] <= 0.0) - 0.5) < 0.08
    again = uniform_start(x[5:9], 0.3, norm, seed=7, first_index=5).numpy() - 0.5
    np.testing.assert_array_equal(again, start[5:9])


def test_model_mode_and_flags_are_restored(setup):
    model, _, direction, images = setup
    model.train()
    model.dropout.eval()
    model.weight.requires_grad_(True)
    with frozen(model):
        assert not model.training and not model.weight.requires_grad
    assert model.training and not model.dropout.training and model.weight.requires_grad
    before = model.weight.detach().clone()
    pgd(model, torch.as_tensor(images), _loss(direction), eps=0.1, alpha=0.02, steps=3)
    assert model.training and not model.dropout.training and model.weight.requires_grad
    assert model.weight.grad is None
    assert torch.equal(model.weight, before)


def test_eval_mode_during_the_attack(setup):
    model, _, direction, images = setup
    model.train()  # dropout would make two identical runs differ
    a = pgd(model, torch.as_tensor(images), _loss(direction), eps=0.1, alpha=0.02, steps=4)
    b = pgd(model, torch.as_tensor(images), _loss(direction), eps=0.1, alpha=0.02, steps=4)
    assert torch.equal(a, b)


def test_keep_best_returns_the_best_iterate(setup):
    model, weights, direction, images = setup
    x = torch.as_tensor(images)
    target = model.eval()(x).detach() @ torch.as_tensor(direction) + 0.05  # overshot after a few steps

    def loss(out):
        return -(out @ torch.as_tensor(direction) - target).abs()

    iterates = [pgd(model, x, loss, eps=0.2, alpha=0.01, steps=t) for t in range(9)]
    values = torch.stack([loss(model(it)) for it in iterates])  # (9, N)
    best = pgd(model, x, loss, eps=0.2, alpha=0.01, steps=8, keep="best")
    expected = torch.stack([iterates[int(t)][i] for i, t in enumerate(values.argmax(0))])
    assert torch.allclose(best, expected)
    assert torch.all(loss(model(best)) >= loss(model(iterates[-1])) - 1e-12)


def test_stop_freezes_items_that_reached_the_goal(setup):
    model, weights, direction, images = setup
    x = torch.as_tensor(images)
    start = (model.eval()(x) @ torch.as_tensor(direction)).detach()
    goal = start + torch.linspace(0.0, 0.5, len(images), dtype=torch.float64)
    loss = _loss(direction)
    adv = pgd(model, x, loss, eps=0.2, alpha=0.01, steps=20, stop=lambda out: loss(out) >= goal)
    reached = loss(model(adv))
    free = pgd(model, x, loss, eps=0.2, alpha=0.01, steps=20)
    for i in range(len(images)):
        if loss(model(free))[i] >= goal[i]:  # reachable: stopped at the first iterate past the goal
            gain_per_step = loss(model(pgd(model, x[i:i + 1], loss, eps=0.2, alpha=0.01, steps=1)))[0] - start[i]
            assert goal[i] <= reached[i] < goal[i] + gain_per_step + 1e-9
        else:
            assert torch.allclose(adv[i], free[i])


def test_start_output_is_the_first_steps_forward_pass():
    """Given forward(x) with its graph, PGD takes its first step from it and ends where it would
    have ended running that pass itself; a different start_output moves the first step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 7), torch.nn.Tanh(),
                                torch.nn.Linear(7, 3)).double()
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).double()
    images = torch.as_tensor(np.random.default_rng(1).uniform(0.2, 0.8, size=(6, *SHAPE)))

    def loss(out):
        return out.pow(2).sum(dim=1)

    def leaf_and_output(net):
        x = images.clone().requires_grad_(True)
        with frozen(net):
            return x, net(x)

    for kwargs in ({"steps": 1}, {"steps": 4}, {"steps": 4, "keep": "best"},
                   {"steps": 4, "stop": lambda out: loss(out) > 0.5}):
        expected = pgd(model, images, loss, eps=0.1, alpha=0.02, **kwargs)
        x, out = leaf_and_output(model)
        assert torch.equal(pgd(model, x, loss, eps=0.1, alpha=0.02, start_output=out, **kwargs), expected)
    x, out = leaf_and_output(other)
    assert not torch.equal(pgd(model, x, loss, eps=0.1, alpha=0.02, steps=1, start_output=out),
                           pgd(model, images, loss, eps=0.1, alpha=0.02, steps=1))
    with pytest.raises(ValueError, match="start_output: needs the clean start"):
        pgd(model, x, loss, eps=0.1, alpha=0.02, steps=1, start_output=out, random_start=True)
    with pytest.raises(ValueError, match="start_output: needs the clean start"):
        pgd(model, images, loss, eps=0.1, alpha=0.02, steps=1, start_output=out)


def test_loss_must_give_one_value_per_item(setup):
    model, _, _, images = setup
    with pytest.raises(ValueError, match=r"loss: expected a tensor of shape \(6,\)"):
        pgd(model, torch.as_tensor(images), lambda out: out, eps=0.1, alpha=0.1, steps=1)
    with pytest.raises(ValueError, match="loss: expected \\(6,\\) per-item values"):
        pgd(model, torch.as_tensor(images), lambda out: out.sum(), eps=0.1, alpha=0.1, steps=1, keep="best")
    with pytest.raises(ValueError, match="alpha: expected a finite number above 0"):
        pgd(model, torch.as_tensor(images), lambda out: out.sum(), eps=0.1, alpha=0.0, steps=1)
    with pytest.raises(ValueError, match="step: expected one of sign, normalized"):
        pgd(model, torch.as_tensor(images), lambda out: out.sum(), eps=0.1, alpha=0.1, steps=1, step="adam")


# ---- the backends' pgd verb ---------------------------------------------------------------

@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_numpy_and_torch_backends_agree(setup, norm):
    model, weights, direction, images = setup
    grad = weights.T @ direction
    numpy_adv = get_backend("numpy").pgd(
        lambda x: x.reshape(len(x), -1) @ weights.T, images, eps=0.1, alpha=0.03, steps=5, norm=norm,
        grad=lambda x: np.broadcast_to(grad.reshape(SHAPE), x.shape).copy())
    torch_adv = get_backend("torch", device="cpu", dtype="float64").pgd(
        model, images, eps=0.1, alpha=0.03, steps=5, norm=norm, loss=_loss(direction))
    np.testing.assert_allclose(numpy_adv, torch_adv, atol=1e-12)


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_the_same_seed_gives_the_same_images_for_any_batch_size(setup, name):
    model, weights, direction, images = setup
    grad = weights.T @ direction
    if name == "numpy":
        backend, run = get_backend("numpy"), (lambda x: x.reshape(len(x), -1) @ weights.T)
        kwargs = {"grad": lambda x: np.broadcast_to(grad.reshape(SHAPE), x.shape).copy()}
    else:
        backend, run = get_backend("torch", device="cpu", dtype="float64"), model
        kwargs = {"loss": _loss(direction)}
    whole = backend.pgd(run, images, eps=0.1, alpha=0.01, steps=3, random_start=True, seed=5, batch_size=6, **kwargs)
    pieces = backend.pgd(run, images, eps=0.1, alpha=0.01, steps=3, random_start=True, seed=5, batch_size=4,
                         **kwargs)
    np.testing.assert_array_equal(whole, pieces)
    other = backend.pgd(run, images, eps=0.1, alpha=0.01, steps=3, random_start=True, seed=6, **kwargs)
    assert not np.array_equal(whole, other)


def test_targets_reach_the_loss_a_batch_at_a_time(setup):
    model, weights, _, images = setup
    backend = get_backend("torch", device="cpu", dtype="float64")
    signs = np.where(np.arange(6) % 2 == 0, 1.0, -1.0)
    adv = backend.pgd(model, images, eps=0.05, alpha=0.05, steps=1, targets=signs, batch_size=4,
                      loss=lambda out, s: out[:, 0] * s)
    expected = np.clip(images + 0.05 * signs[:, None, None, None] * np.sign(weights[0]).reshape(SHAPE), 0, 1)
    np.testing.assert_allclose(adv, expected, atol=1e-12)


def test_project_clips_to_the_ball_then_the_box():
    x0 = torch.tensor([[0.05, 0.5, 0.97]])
    moved = torch.tensor([[-0.5, 0.9, 1.5]])
    np.testing.assert_allclose(project(moved, x0, 0.1, "linf").numpy(), [[0.0, 0.6, 1.0]], atol=1e-7)
    out = project(moved, x0, 0.1, "l2").numpy()
    assert np.linalg.norm(out - x0.numpy()) <= 0.1 + 1e-7


# ---- torchattacks-style object -------------------------------------------------------------

def _classifier(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def test_pgd_object_raises_the_classifier_loss():
    model = _classifier()
    images = torch.rand(32, *SHAPE, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(2))
    attack = PGD(model, eps=0.1, alpha=0.02, steps=10, random_start=False)
    adv = attack(images, labels)
    clean = torch.nn.functional.cross_entropy(model(images), labels, reduction="none")
    after = torch.nn.functional.cross_entropy(model(adv), labels, reduction="none")
    assert (after > clean).float().mean() > 0.9
    assert (adv - images).abs().max() <= 0.1 + 1e-6


def test_pgd_object_without_labels_moves_embeddings():
    model = _classifier(3)
    images = torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(4))
    for random_start in (True, False):  # without a random start, the first step starts where ||h - h0|| = 0
        adv = PGD(model, eps=0.1, alpha=0.02, steps=5, random_start=random_start)(images)
        assert torch.all((model(adv) - model(images)).norm(dim=1) > 0.01)


def test_pgd_object_equals_torchattacks_without_random_start():
    torchattacks = pytest.importorskip("torchattacks")
    model = _classifier(5)
    images = torch.rand(64, *SHAPE, generator=torch.Generator().manual_seed(6))
    labels = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(7))
    for ours, theirs in ((PGD(model, eps=8 / 255, alpha=2 / 255, steps=10, random_start=False),
                          torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=10, random_start=False)),
                         (PGD(model, eps=0.5, alpha=0.1, steps=10, random_start=False, norm="l2"),
                          torchattacks.PGDL2(model, eps=0.5, alpha=0.1, steps=10, random_start=False))):
        a, b = ours(images, labels), theirs(images, labels)
        differ = (a - b).abs() > 1e-6
        assert differ.float().mean() < 1e-3
