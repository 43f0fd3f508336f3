"""The backend contract, run on every backend through one parametrised fixture.

The torch backend runs on the CPU here. Without torch, its cases are skipped
with a reason, except under CI (env CI set), where they fail.
"""

import importlib.util
import os

import numpy as np
import pytest

from minrr.backends import BACKENDS, available_backends, backend_for, get_backend, is_torch_module, is_torch_tensor
from minrr.backends.base import MIN_BLOCK_DRAWS, NOISE_BLOCK_ELEMENTS, noise_block, pgd_update, query_seed
from minrr.certify import certify, error_bound

HAVE_TORCH = importlib.util.find_spec("torch") is not None


def _require_torch():
    if not HAVE_TORCH:
        if os.environ.get("CI"):
            pytest.fail("torch is not installed, and CI runs every backend")
        pytest.skip("torch is not installed")


def _cuda_available() -> bool:
    if not HAVE_TORCH:
        return False
    import torch

    return torch.cuda.is_available()


@pytest.fixture(params=[*BACKENDS, pytest.param("torch-cuda", marks=pytest.mark.skipif(
    not _cuda_available(), reason="no CUDA device: the torch backend's contract on a GPU"))])
def backend(request):
    """Every backend; torch on the CPU, and on the GPU where there is one."""
    if request.param.startswith("torch"):
        _require_torch()
        return get_backend("torch", device="cuda" if request.param == "torch-cuda" else "cpu")
    return get_backend(request.param)


def identity_model(backend):
    """h(x) = x flattened: the noisy inputs themselves come back as embeddings."""
    if backend.name == "numpy":
        return lambda x: x.reshape(len(x), -1)
    import torch

    return torch.nn.Flatten()


def linear_model(backend, weights):
    """h(x) = W^T x / ||W^T x||, weights (p, k), on flattened inputs."""
    if backend.name == "numpy":
        return lambda x: _normalize(x.reshape(len(x), -1) @ weights)
    import torch

    layer = torch.nn.Linear(*weights.shape, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weights.T, dtype=torch.float32))
    return torch.nn.Sequential(torch.nn.Flatten(), layer, _TorchNormalize())


def _normalize(z):
    return z / np.linalg.norm(z, axis=1, keepdims=True)


if HAVE_TORCH:
    import torch

    class _TorchNormalize(torch.nn.Module):
        def forward(self, z):
            return torch.nn.functional.normalize(z, dim=1)


def loss_for(backend, direction):
    """Keyword arguments of attack_step for L(x) = sum <direction, h(x)> with the identity model."""
    if backend.name == "numpy":
        return {"grad": lambda x: np.broadcast_to(direction.reshape(x.shape[1:]), x.shape).copy()}
    return {"loss": lambda out: (out * torch.as_tensor(direction, dtype=out.dtype, device=out.device)).sum()}


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return rng.random((5, 1, 3, 4))


# ---- registry ----------------------------------------------------------------------------

def test_registry_names_and_errors():
    assert "numpy" in available_backends()
    assert ("torch" in available_backends()) == HAVE_TORCH
    with pytest.raises(ValueError, match="backend: expected one of numpy, torch"):
        get_backend("jax")
    assert backend_for(lambda x: x).name == "numpy"
    with pytest.raises(TypeError, match="model: expected a torch nn.Module or a NumPy callable"):
        backend_for(3)
    assert not is_torch_tensor(np.zeros(3)) and not is_torch_module(np.zeros(3))
    with pytest.raises(TypeError, match="options: the numpy backend takes no arguments"):
        get_backend("numpy", device="cpu")


def test_torch_objects_are_recognised():
    _require_torch()
    assert is_torch_tensor(torch.zeros(2)) and is_torch_module(torch.nn.Flatten())
    assert backend_for(torch.nn.Flatten(), device="cpu").name == "torch"
    # device None: where the model's weights are (here "meta", never the default device), not moved
    on_meta = torch.nn.Linear(2, 2, device="meta")
    assert backend_for(on_meta).device.type == "meta" and on_meta.weight.device.type == "meta"
    assert backend_for(on_meta, device="cpu").device.type == "cpu"
    with pytest.raises(ValueError, match="device: 'nonsense' is not usable"):
        get_backend("torch", device="nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: 'cuda' is not usable"):
            get_backend("torch", device="cuda")


def test_query_seed_is_the_spawned_child():
    children = np.random.SeedSequence(7).spawn(5)
    for i in range(5):
        assert np.array_equal(query_seed(7, i).generate_state(4), children[i].generate_state(4))


@pytest.mark.parametrize("n, numel", [(2, 784), (1000, 784), (100_000, 784), (1000, 3 * 224 * 224), (5, 1 << 21)])
def test_noise_blocks_are_equal_and_bounded(n, numel):
    block = noise_block(n, numel)
    blocks = -(-n // block)
    assert block * numel <= max(NOISE_BLOCK_ELEMENTS, MIN_BLOCK_DRAWS * numel)
    assert block * blocks >= n and block * (blocks - 1) < n and block <= n
    assert block >= min(n, MIN_BLOCK_DRAWS)


# ---- embed -------------------------------------------------------------------------------

def test_embed_matches_the_model_for_any_batch_size(backend, images):
    weights = np.random.default_rng(1).normal(size=(12, 4))
    model = linear_model(backend, weights)
    expected = _normalize(images.reshape(5, -1) @ weights)
    for batch_size in (1, 2, 64):
        np.testing.assert_allclose(backend.embed(model, images, batch_size=batch_size), expected, atol=1e-6)


def test_uint8_images_are_divided_by_255(backend):
    raw = np.arange(24, dtype=np.uint8).reshape(2, 1, 3, 4) * 10
    model = identity_model(backend)
    np.testing.assert_allclose(backend.embed(model, raw), raw.reshape(2, -1) / 255.0, rtol=1e-6)
    a = backend.sample_noisy(model, raw, 0.1, 20, seed=3)
    b = backend.sample_noisy(model, raw / 255.0, 0.1, 20, seed=3)
    np.testing.assert_allclose(a.mean, b.mean, atol=1e-6)


@pytest.mark.parametrize("bad, pattern, error", [
    (np.full((2, 3), 1.5), r"x: pixel values must lie in \[0, 1\]", ValueError),
    (np.full((2, 3), np.nan), "x: contains NaN", ValueError),
    (np.ones((2, 3), dtype=np.int64), "x: expected uint8 pixels or floats", TypeError),
    (np.ones(3), "x: expected a non-empty", ValueError),
])
def test_bad_images_are_refused(backend, bad, pattern, error):
    with pytest.raises(error, match=pattern):
        backend.embed(identity_model(backend), bad)


def test_bad_models_are_refused(backend, images):
    with pytest.raises(TypeError, match="model: "):
        backend.embed(42, images)
    if backend.name == "numpy":
        flat = lambda x: x.reshape(-1)  # noqa: E731
    else:
        flat = torch.nn.Flatten(0)
    with pytest.raises(ValueError, match=r"model: expected \(batch, dim\) outputs"):
        backend.embed(flat, images)


# ---- sample_noisy --------------------------------------------------------------------------

def recording_model(backend, seen):
    """The identity model, appending every batch it sees to ``seen``."""
    flat = identity_model(backend)

    if backend.name == "numpy":
        def run(x):
            seen.append(np.array(x))
            return flat(x)
        return run

    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen.append(x.detach().cpu().numpy().copy())
            return flat(x)
    return Recorder()


def test_noise_does_not_depend_on_batch_size(backend, images):
    draws, estimates = {}, {}
    for batch_size in (50, 1, 7, 1000):
        seen = []
        estimates[batch_size] = backend.sample_noisy(recording_model(backend, seen), images, 0.3, 50, seed=11,
                                                     batch_size=batch_size)
        draws[batch_size] = np.concatenate(seen)
        assert max(len(batch) for batch in seen) == min(batch_size, 50)
    for batch_size in (1, 7, 1000):
        np.testing.assert_array_equal(draws[batch_size], draws[50])  # the very same noisy inputs
        for field in ("mean", "sq_norm_mean", "sq_norm_var", "norm_min", "norm_max"):  # float64 sums, any order
            np.testing.assert_allclose(getattr(estimates[batch_size], field), getattr(estimates[50], field),
                                       rtol=1e-12)


def test_each_query_has_its_own_stream(backend, images):
    model = identity_model(backend)
    everything = backend.sample_noisy(model, images, 0.3, 40, seed=5)
    alone = backend.sample_noisy(model, images[3:4], 0.3, 40, seed=5, first_index=3)
    np.testing.assert_array_equal(alone.mean, everything.mean[3:4])
    first_as_query_three = backend.sample_noisy(model, images[:1], 0.3, 40, seed=5, first_index=3)
    assert not np.array_equal(first_as_query_three.mean - images[0].ravel(), everything.mean[:1] - images[0].ravel())
    other_seed = backend.sample_noisy(model, images, 0.3, 40, seed=6)
    assert not np.array_equal(other_seed.mean, everything.mean)


def test_estimate_statistics_are_those_of_gaussian_noise(backend, images):
    sigma, n = 0.5, 4000
    est = backend.sample_noisy(identity_model(backend), images, sigma, n, seed=0, batch_size=333)
    x = images.reshape(5, -1)
    p = x.shape[1]
    assert est.n_samples == n and est.mean.shape == (5, p)
    # g_hat - x is the mean of n draws of N(0, sigma^2 I): 5 standard errors per coordinate
    assert np.all(np.abs(est.mean - x) < 5 * sigma / np.sqrt(n))
    # E ||x + z||^2 = ||x||^2 + p sigma^2, sd of one draw = sqrt(2 p sigma^4 + 4 sigma^2 ||x||^2)
    expected = (x ** 2).sum(1) + p * sigma ** 2
    sd = np.sqrt(2 * p * sigma ** 4 + 4 * sigma ** 2 * (x ** 2).sum(1))
    assert np.all(np.abs(est.sq_norm_mean - expected) < 5 * sd / np.sqrt(n))
    np.testing.assert_allclose(est.sq_norm_var, sd ** 2, rtol=0.15)
    assert np.all(est.norm_min <= np.sqrt(est.sq_norm_mean)) and np.all(np.sqrt(est.sq_norm_mean) <= est.norm_max)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"sigma": 0.0}, "sigma: expected a finite number above 0"),
    ({"n_samples": 1}, "n_samples: expected a whole number >= 2"),
    ({"batch_size": 0}, "batch_size: expected a whole number >= 1"),
    ({"seed": -1}, "seed: expected a whole number >= 0"),
    ({"first_index": 1.5}, "first_index: expected a whole number >= 0"),
])
def test_sampling_arguments_are_checked(backend, images, kwargs, pattern):
    call = {"sigma": 0.1, "n_samples": 10, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        backend.sample_noisy(identity_model(backend), images, call.pop("sigma"), call.pop("n_samples"), **call)


def test_statistics_kept_on_the_device_equal_the_host_ones(images):
    """The GPU path (float64 moments merged on the device, read once per query), run on the CPU,
    against NumPy's accumulation of the same draws; NaN still fails, at the end of the query."""
    _require_torch()
    host = get_backend("torch", device="cpu")
    on_device = get_backend("torch", device="cpu")
    on_device._host_statistics = False
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))  # norms vary: every statistic counts
    fields = ("mean", "sq_norm_mean", "sq_norm_var", "norm_min", "norm_max")
    for batch_size in (7, 60, 1000):
        want = host.sample_noisy(model, images, 0.3, 60, seed=2, batch_size=batch_size)
        got = on_device.sample_noisy(model, images, 0.3, 60, seed=2, batch_size=batch_size)
        assert got.n_samples == want.n_samples == 60
        for field in fields:
            assert getattr(got, field).dtype == np.float64
            np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-12, atol=1e-15)

    class NaNAfterTenDraws(torch.nn.Module):
        seen = 0

        def forward(self, x):
            out = x.flatten(1).clone()
            if self.seen + len(x) > 10:
                out[10 - self.seen if self.seen < 10 else 0] = float("nan")
            self.seen += len(x)
            return out

    with pytest.raises(ValueError, match="model: returned NaN or infinity"):
        on_device.sample_noisy(NaNAfterTenDraws(), images[:1], 0.3, 40, seed=2, batch_size=8)


def test_sampling_feeds_certify(backend):
    rng = np.random.default_rng(2)
    centers = np.clip(0.5 + 0.3 * rng.normal(size=(3, 1, 4, 4)), 0, 1)
    labels = np.repeat(np.arange(3), 2)
    queries = np.clip(centers[labels] + 0.02 * rng.normal(size=(6, 1, 4, 4)), 0, 1)
    weights = rng.normal(size=(16, 8))
    model = linear_model(backend, weights)
    estimate = backend.sample_noisy(model, queries, 0.05, 500, seed=1)
    result = certify(estimate, labels, sigma=0.05, gallery=backend.embed(model, centers),
                     gallery_labels=np.arange(3))
    assert result.settings["n"] == 500 and result.settings["norm_bound"] == pytest.approx(1.0, abs=1e-6)
    assert result.certified.mean() > 0.5


# ---- attack_step ---------------------------------------------------------------------------

def test_linf_step_moves_along_the_gradient_sign_inside_the_ball(backend, images):
    direction = np.random.default_rng(3).normal(size=12)
    model = identity_model(backend)
    x = backend.attack_step(model, images, images, eps=0.05, alpha=0.02, **loss_for(backend, direction))
    expected = np.clip(images + 0.02 * np.sign(direction).reshape(1, 1, 3, 4), 0, 1)
    np.testing.assert_allclose(x, expected, atol=1e-7)
    for _ in range(5):
        x = backend.attack_step(model, x, images, eps=0.05, alpha=0.02, **loss_for(backend, direction))
    assert np.all(np.abs(x - images) <= 0.05 + 1e-7) and x.min() >= 0 and x.max() <= 1
    np.testing.assert_allclose(x, np.clip(images + 0.05 * np.sign(direction).reshape(1, 1, 3, 4), 0, 1), atol=1e-7)


def test_l2_step_is_projected_onto_the_ball(backend, images):
    direction = np.random.default_rng(4).normal(size=12)
    model = identity_model(backend)
    x = images
    for _ in range(6):
        x = backend.attack_step(model, x, images, eps=0.3, alpha=0.1, norm="l2", **loss_for(backend, direction))
        distance = np.sqrt(((x - images) ** 2).reshape(5, -1).sum(1))
        assert np.all(distance <= 0.3 + 1e-6)
    assert x.min() >= 0 and x.max() <= 1
    first = backend.attack_step(model, images, images, eps=0.3, alpha=0.1, norm="l2",
                                **loss_for(backend, direction))
    unclipped = images + 0.1 * (direction / np.linalg.norm(direction)).reshape(1, 1, 3, 4)
    np.testing.assert_allclose(first, np.clip(unclipped, 0, 1), atol=1e-7)


def test_attack_needs_the_right_loss(backend, images):
    model = identity_model(backend)
    if backend.name == "numpy":
        with pytest.raises(ValueError, match="grad: required by the numpy backend"):
            backend.attack_step(model, images, images, eps=0.1, alpha=0.1)
        with pytest.raises(ValueError, match="loss: the numpy backend cannot differentiate"):
            backend.attack_step(model, images, images, eps=0.1, alpha=0.1, loss=lambda out: out.sum())
    else:
        with pytest.raises(ValueError, match="loss: required by the torch backend"):
            backend.attack_step(model, images, images, eps=0.1, alpha=0.1)
        with pytest.raises(ValueError, match="loss: expected a scalar tensor"):
            backend.attack_step(model, images, images, eps=0.1, alpha=0.1, loss=lambda out: out)
    with pytest.raises(ValueError, match="norm: expected one of linf, l2"):
        backend.attack_step(model, images, images, eps=0.1, alpha=0.1, norm="l1")


def test_pgd_update_checks_its_inputs(images):
    with pytest.raises(ValueError, match="grad: expected the shape of x"):
        pgd_update(images, np.ones(3), images, eps=0.1, alpha=0.1)
    with pytest.raises(ValueError, match="eps: expected a finite number above 0"):
        pgd_update(images, images, images, eps=0.0, alpha=0.1)
    zero = pgd_update(images, np.zeros_like(images), images, eps=0.1, alpha=0.1, norm="l2")
    np.testing.assert_array_equal(zero, images)


# ---- train_step ----------------------------------------------------------------------------

def test_train_step(backend, images):
    if backend.name == "numpy":
        with pytest.raises(TypeError, match="model: the numpy backend cannot train"):
            backend.train_step(lambda x: x, None, None, images, np.zeros(5))
        return
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    target = images.reshape(5, -1).sum(1, keepdims=True)

    def loss(out, y):
        return ((out - y) ** 2).mean()

    values = [backend.train_step(model, optimizer, loss, images, target.astype(np.float32), noise_sigma=0.01,
                                 noise_seed=step) for step in range(40)]
    assert values[-1] < 0.2 * values[0] and model.training


def test_torch_restores_the_train_mode():
    _require_torch()
    backend = get_backend("torch", device="cpu")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(12))
    model.train()
    backend.embed(model, np.random.default_rng(0).random((4, 1, 3, 4)))
    assert model.training
    model.eval()
    backend.sample_noisy(model, np.random.default_rng(0).random((2, 1, 3, 4)), 0.1, 4)
    assert not model.training


# ---- the two backends agree ----------------------------------------------------------------

def test_numpy_and_torch_certificates_agree_within_monte_carlo_error():
    """The same linear model sampled by both backends: ||g_np - g_torch|| <= eps_np + eps_torch, and the
    margins (2-Lipschitz in g) within twice that, each bound failing with probability at most 1e-6."""
    _require_torch()
    rng = np.random.default_rng(5)
    centers = np.clip(0.5 + 0.25 * rng.normal(size=(4, 1, 6, 6)), 0, 1)
    labels = np.repeat(np.arange(4), 3)
    queries = np.clip(centers[labels] + 0.05 * rng.normal(size=(12, 1, 6, 6)), 0, 1)
    weights = rng.normal(size=(36, 6))
    sigma, n, delta = 0.25, 3000, 1e-6
    results, estimates = {}, {}
    for name in ("numpy", "torch"):
        backend = get_backend(name, **({"device": "cpu"} if name == "torch" else {}))
        model = linear_model(backend, weights)
        estimates[name] = backend.sample_noisy(model, queries, sigma, n, seed=9, batch_size=512)
        results[name] = certify(estimates[name], labels, sigma=sigma, gallery=backend.embed(model, centers),
                                gallery_labels=np.arange(4), norm_bound=1.0)
    eps = sum(error_bound(estimates[name], "empirical-bernstein", delta, 1.0) for name in estimates)
    gap = np.linalg.norm(estimates["numpy"].mean - estimates["torch"].mean, axis=1)
    assert np.all(gap <= eps) and np.any(gap > 0)
    assert np.all(np.abs(results["numpy"].margin - results["torch"].margin) <= 2 * eps + 1e-5)
    both = results["numpy"].certified & results["torch"].certified
    assert both.sum() >= 6
    # radius is increasing in the margin with slope <= sigma sqrt(pi/2) / 2 (F = 1)
    slope = sigma * np.sqrt(np.pi / 2) / 2
    radius_gap = np.abs(results["numpy"].radius - results["torch"].radius)[both]
    assert np.all(radius_gap <= slope * (2 * eps[both] + 1e-5) + 1e-9)
