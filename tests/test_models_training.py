"""Models, losses, training on real Fashion-MNIST images, checkpoints, and CSQ hash centres."""

import hashlib
import importlib.util
import json
import os

import numpy as np
import pytest

from minrr.data import fashion_mnist_subset
from minrr.hashing.hash_centers import hash_centers, is_hadamard_case, multilabel_centers
from minrr.metrics.retrieval import recall_at_k

if importlib.util.find_spec("torch") is None and not os.environ.get("CI"):
    pytest.skip("torch is not installed (CI requires it)", allow_module_level=True)

import torch  # noqa: E402

from minrr.backends import get_backend  # noqa: E402
from minrr.backends.checkpoint import card_path, load_checkpoint, save_checkpoint  # noqa: E402
from minrr.backends.models import ModelSpec, build_model  # noqa: E402
from minrr.backends.training import (csq_loss, evaluate, train, training_batches,  # noqa: E402
                                     triplet_semihard_loss)

CPU = get_backend("torch", device="cpu")


@pytest.fixture(scope="module")
def fashion():
    """256 training and 100 test images of the bundled subset, (N, 1, 28, 28) uint8."""
    data = fashion_mnist_subset()
    return (data["train_images"][:256, None], data["train_labels"][:256].astype(np.int64),
            data["test_images"][:100, None], data["test_labels"][:100].astype(np.int64))


def tiny(head="embedding", dim=16, arch="small-cnn", width=4, **kwargs):
    return build_model(ModelSpec(arch, 1, head, dim, width=width, mean=(0.29,), std=(0.35,), **kwargs), seed=0)


# ---- models ----------------------------------------------------------------------------------

def test_heads_shapes_and_ranges():
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        emb = tiny().eval()(x)
        codes = tiny("hash", 12).eval()(x)
        res = tiny(arch="resnet18", width=4).eval()(x)
        big = tiny(arch="resnet18", width=4, stem="imagenet").eval()(torch.rand(2, 1, 64, 64))
    assert emb.shape == (3, 16) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-6)
    assert codes.shape == (3, 12) and codes.abs().max() < 1
    assert res.shape == (3, 16) and big.shape == (2, 16)
    assert tiny("hash", 12).spec.norm_bound == pytest.approx(np.sqrt(12)) and tiny().spec.norm_bound == 1.0


def test_resnet18_has_resnet18_parameters():
    """The trunk at width 64 on RGB has ResNet-18's 11,176,512 parameters (torchvision's, without fc)."""
    model = build_model(ModelSpec("resnet18", 3, "embedding", 512, stem="imagenet"))
    assert sum(p.numel() for p in model.trunk.parameters()) == 11_176_512
    assert model.trunk.features == 512


def test_normalisation_is_inside_the_model():
    model = tiny().eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        manual = torch.nn.functional.normalize(model.head(model.trunk((x - 0.29) / 0.35)), dim=1)
        assert torch.allclose(model(x), manual, atol=1e-6)
    assert {"normalize.mean", "normalize.std"} <= set(model.state_dict())


def test_spec_round_trip_and_validation():
    spec = ModelSpec("resnet18", 3, "hash", 64, mean=(0.1, 0.2, 0.3), std=(1, 2, 3))
    assert spec.width == 64 and ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="arch: expected one of small-cnn, resnet18"):
        ModelSpec("vgg", 1, "embedding", 8)
    with pytest.raises(ValueError, match="head: expected one of embedding, hash"):
        ModelSpec("small-cnn", 1, "softmax", 8)
    with pytest.raises(ValueError, match="dim: expected a whole number >= 1"):
        ModelSpec("small-cnn", 1, "embedding", 0)
    with pytest.raises(ValueError, match="mean, std: expected 3 values each"):
        ModelSpec("small-cnn", 3, "embedding", 8, mean=(0.5,), std=(1.0,))
    with pytest.raises(ValueError, match="std: expected finite values above 0"):
        ModelSpec("small-cnn", 1, "embedding", 8, std=(0.0,))
    with pytest.raises(ValueError, match="model: .*unexpected keyword"):
        ModelSpec.from_dict({**spec.to_dict(), "dropout": 0.5})


def test_seeded_build_is_reproducible_and_leaves_the_global_generator_alone():
    state = torch.random.get_rng_state()
    a, b = tiny(), tiny()
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ---- losses ------------------------------------------------------------------------------------

def _semihard_reference(emb, labels, margin):
    d = np.linalg.norm(emb[:, None] - emb[None], axis=2)
    losses = []
    for a in range(len(emb)):
        for p in range(len(emb)):
            if a == p or labels[a] != labels[p]:
                continue
            negatives = [d[a, n] for n in range(len(emb)) if labels[n] != labels[a]]
            if not negatives:
                continue
            farther = [v for v in negatives if v > d[a, p]]
            chosen = min(farther) if farther else max(negatives)
            losses.append(max(0.0, d[a, p] - chosen + margin))
    return np.mean(losses)


def test_triplet_semihard_loss_matches_a_direct_count():
    rng = np.random.default_rng(0)
    for trial in range(5):
        emb = rng.normal(size=(12, 5))
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        labels = rng.integers(0, 3, 12)
        value = triplet_semihard_loss(torch.tensor(emb), torch.tensor(labels), margin=0.3)
        assert float(value) == pytest.approx(_semihard_reference(emb, labels, 0.3), rel=1e-9)
    lonely = torch.nn.functional.normalize(torch.randn(4, 3, requires_grad=True), dim=1)
    zero = triplet_semihard_loss(lonely, torch.arange(4))
    assert float(zero.detach()) == 0.0 and zero.requires_grad


def test_csq_loss_formula():
    f = torch.tensor([[0.9, -0.5], [-0.99, 0.2]])
    c = torch.tensor([[1.0, -1.0], [1.0, 1.0]])
    p, t = (f + 1) / 2, (c + 1) / 2
    bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()
    expected = bce + 0.01 * ((f.abs() - 1) ** 2).mean()
    assert float(csq_loss(f, c, 0.01)) == pytest.approx(float(expected), rel=1e-6)


def test_training_batches_cover_every_item_once():
    labels = np.repeat(np.arange(5), 7)
    rng = np.random.default_rng(0)
    for per_class in (None, 4):
        batches = training_batches(labels, 12, per_class, rng)
        assert sorted(np.concatenate(batches)) == list(range(35))
        assert max(len(b) for b in batches) <= 12
    for batch in training_batches(labels, 12, 4, rng):
        counts = np.bincount(labels[batch])
        assert set(counts[counts > 0]) <= {3, 4}  # groups of 4, or a class's remainder of 3


# ---- training on real images -------------------------------------------------------------

def _loss_on(model, loss, images, labels):
    model.eval()
    with torch.no_grad():
        x = torch.as_tensor(images, dtype=torch.float32) / 255.0
        return float(loss(model(x), torch.as_tensor(labels)))


def test_dml_training_lowers_the_loss_on_fashion_mnist(fashion):
    images, labels, _, _ = fashion
    model = tiny(width=8)
    probe = (images[:128], labels[:128])
    before = _loss_on(model, triplet_semihard_loss, *probe)
    history = train(model, images, labels, task="dml", epochs=6, batch_size=64, lr=3e-3, backend=CPU)
    assert len(history) >= 6 * 256 // 64 and not model.training
    assert _loss_on(model, triplet_semihard_loss, *probe) < 0.85 * before


def test_hash_training_lowers_the_csq_loss_on_fashion_mnist(fashion):
    images, labels, test_images, test_labels = fashion
    model = tiny("hash", 16, width=8)
    centers = torch.as_tensor(hash_centers(10, 16), dtype=torch.float32)

    def loss(out, y):
        return csq_loss(out, centers[y])

    before = _loss_on(model, loss, images[:128], labels[:128])
    train(model, images, labels, task="hash", epochs=6, batch_size=64, lr=3e-3, backend=CPU)
    assert _loss_on(model, loss, images[:128], labels[:128]) < 0.9 * before
    metrics = evaluate(model, "hash", test_images, test_labels, database=images, database_labels=labels, backend=CPU)
    assert 0.1 < metrics["mean_average_precision"] <= 1.0


def test_gdml_training_is_reproducible(fashion):
    images, labels, test_images, test_labels = fashion
    runs = []
    for _ in range(2):
        model = tiny()
        runs.append(train(model, images[:128], labels[:128], task="dml", epochs=1, batch_size=32,
                          noise_sigma=0.25, seed=4, backend=CPU))
    assert runs[0] == runs[1]
    clean = train(tiny(), images[:128], labels[:128], task="dml", epochs=1, batch_size=32, seed=4, backend=CPU)
    assert clean != runs[0]
    metrics = evaluate(model, "dml", test_images, test_labels, backend=CPU)
    assert list(metrics) == ["precision_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "mean_average_precision",
                             "mean_average_precision_at_r", "r_precision", "NMI"]  # pytorch-metric-learning's keys
    assert 0 <= metrics["precision_at_1"] <= metrics["recall_at_8"] <= 1
    embeddings = CPU.embed(model, test_images)
    assert metrics["recall_at_4"] == recall_at_k(embeddings, test_labels, 4)


@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"task": "triplet"}, ValueError, "task: expected one of dml, hash"),
    ({"task": "hash"}, ValueError, "task: 'hash' trains a model with a hash head"),
    ({"task": "dml", "epochs": 0}, ValueError, "epochs: expected a whole number >= 1"),
    ({"task": "dml", "noise_sigma": -1.0}, ValueError, "noise_sigma: expected a finite number >= 0"),
    ({"task": "dml", "lr": 0.0}, ValueError, "lr: expected a finite number above 0"),
])
def test_training_arguments_are_checked(fashion, kwargs, error, pattern):
    images, labels, _, _ = fashion
    with pytest.raises(error, match=pattern):
        train(tiny(), images[:8], labels[:8], backend=CPU, **kwargs)
    with pytest.raises(ValueError, match=r"labels: expected \(8,\) integer labels"):
        train(tiny(), images[:8], labels[:7], task="dml", backend=CPU)
    with pytest.raises(TypeError, match="model: expected a RetrievalNet"):
        train(torch.nn.Flatten(), images[:8], labels[:8], task="dml", backend=CPU)


# ---- checkpoints -------------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path):
    model = tiny("hash", 8)
    path = tmp_path / "model.pt"
    card = save_checkpoint(path, model, input_shape=(1, 28, 28), data={"train": "bundled:train"},
                           training={"task": "hash"}, metrics={"mean_average_precision": 0.5})
    assert card_path(path).is_file() and json.loads(card_path(path).read_text()) == card
    assert card["embedding"] == {"head": "hash", "dim": 8, "norm_bound": pytest.approx(np.sqrt(8))}
    loaded, read = load_checkpoint(path)
    assert read == card and loaded.spec == model.spec and not loaded.training
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_bad_checkpoints_are_refused(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, tiny(), input_shape=(1, 28, 28))
    good_card = card_path(path).read_text()
    with pytest.raises(ValueError, match="out: .*would be the weights file"):
        save_checkpoint(tmp_path / "model.json", tiny(), input_shape=(1, 28, 28))
    with pytest.raises(ValueError, match="model: file not found"):
        load_checkpoint(tmp_path / "missing.pt")

    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(ValueError, match="does not match its model card"):
        load_checkpoint(path)

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"weights": Payload()}, path)  # a pickle that would run code
    card = json.loads(good_card)
    card["weights"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    card_path(path).write_text(json.dumps(card))
    with pytest.raises(ValueError, match="model: .* is not a state_dict of tensors"):
        load_checkpoint(path)

    torch.save({"head.weight": torch.zeros(3)}, path)
    card["weights"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    card_path(path).write_text(json.dumps(card))
    with pytest.raises(ValueError, match="does not fit its model card"):
        load_checkpoint(path)

    card["model"]["arch"] = "vgg"
    card_path(path).write_text(json.dumps(card))
    with pytest.raises(ValueError, match="bad model card .*arch: expected one of"):
        load_checkpoint(path)
    card_path(path).write_text("{not json")
    with pytest.raises(ValueError, match="is not a JSON model card"):
        load_checkpoint(path)
    card_path(path).unlink()
    with pytest.raises(ValueError, match="the model card .* is missing"):
        load_checkpoint(path)


# ---- hash centres ------------------------------------------------------------------------------

def _hamming(codes):
    return (codes.shape[1] - codes.astype(int) @ codes.T.astype(int)) // 2


@pytest.mark.parametrize("n_classes, n_bits", [(10, 16), (32, 16), (3, 8), (100, 64)])
def test_hadamard_centres(n_classes, n_bits):
    centers = hash_centers(n_classes, n_bits)
    assert is_hadamard_case(n_classes, n_bits)
    assert centers.shape == (n_classes, n_bits) and centers.dtype == np.int8 and set(np.unique(centers)) <= {-1, 1}
    distance = _hamming(centers)
    off = ~np.eye(n_classes, dtype=bool)
    negation = np.zeros_like(off)
    for i in range(min(n_classes, n_bits)):
        if i + n_bits < n_classes:
            negation[i, i + n_bits] = negation[i + n_bits, i] = True
    assert np.all(distance[off & ~negation] == n_bits // 2) and np.all(distance[negation] == n_bits)
    assert np.all((centers[1:n_bits] == 1).sum(1) == n_bits // 2)  # every row of H but the first is balanced


@pytest.mark.parametrize("n_classes, n_bits", [(10, 12), (40, 16), (5, 33)])
def test_random_centres_are_balanced_and_seeded(n_classes, n_bits):
    centers = hash_centers(n_classes, n_bits, seed=1)
    assert not is_hadamard_case(n_classes, n_bits)
    assert np.all((centers == -1).sum(1) == n_bits // 2)
    assert np.array_equal(centers, hash_centers(n_classes, n_bits, seed=1))
    assert not np.array_equal(centers, hash_centers(n_classes, n_bits, seed=2))
    assert len(np.unique(centers, axis=0)) == n_classes


def test_multilabel_centres():
    centers = hash_centers(4, 8)
    labels = np.array([[1, 0, 0, 0], [0, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 1, 1]])
    out = multilabel_centers(labels, centers, seed=3)
    assert np.array_equal(out[0], centers[0])
    assert np.array_equal(out[2], np.sign(centers[:3].sum(0)))  # three classes: no ties
    total = centers[1].astype(int) + centers[2]
    tied = total == 0
    assert np.array_equal(out[1][~tied], np.sign(total[~tied])) and tied.any()
    # the ties of every row come from one fixed vector: the empty row is that vector
    assert np.array_equal(out[1][tied], out[3][tied])
    assert np.array_equal(out, multilabel_centers(labels, centers, seed=3))
    assert not np.array_equal(out[3], multilabel_centers(labels, centers, seed=4)[3])


def test_hash_centre_arguments_are_checked():
    with pytest.raises(ValueError, match="n_bits: expected a whole number >= 1"):
        hash_centers(3, 0)
    with pytest.raises(ValueError, match="n_classes: expected a whole number >= 1"):
        hash_centers(2.5, 8)
    with pytest.raises(ValueError, match=r"centers: expected \(3, K\) values \+-1"):
        multilabel_centers(np.eye(3, dtype=int), np.zeros((3, 8)))
    with pytest.raises(ValueError, match=r"labels: expected \(N, C\) multi-hot"):
        multilabel_centers(np.arange(3), hash_centers(3, 8))
