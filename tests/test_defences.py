"""Adversarial training defences (naive AT, ACT, HM, COLO-TRIDE, FreeAT) and collapse diagnostics."""

import importlib.util
import math
import os

import numpy as np
import pytest

from minrr import collapse
from minrr.data import fashion_mnist_subset

if importlib.util.find_spec("torch") is None and not os.environ.get("CI"):
    pytest.skip("torch is not installed (CI requires it)", allow_module_level=True)

import torch  # noqa: E402

from minrr.backends import get_backend  # noqa: E402
from minrr.backends import defences as dfn  # noqa: E402
from minrr.backends.attacks import project  # noqa: E402
from minrr.backends.models import ModelSpec, build_model  # noqa: E402
from minrr.backends.training import training_batches  # noqa: E402

CPU = get_backend("torch", device="cpu")


@pytest.fixture(scope="module")
def fashion():
    data = fashion_mnist_subset()
    return (data["train_images"][:400, None], data["train_labels"][:400].astype(np.int64),
            data["test_images"][:200, None], data["test_labels"][:200].astype(np.int64))


def tiny(head="embedding", dim=8, width=4, seed=0):
    return build_model(ModelSpec("small-cnn", 1, head, dim, width=width, mean=(0.29,), std=(0.35,)), seed=seed)


def _slow_collapseness(d_ap, d_an, lam):
    def weighted(d):
        top = max(d)
        w = [math.exp(lam * (v - top)) for v in d]
        return sum(wi * v for wi, v in zip(w, d)) / sum(w)
    return weighted(list(d_ap)) - weighted(list(d_an))


# ---- the quantities -------------------------------------------------------------------------------

def test_collapseness_limits_and_formula():
    rng = np.random.default_rng(0)
    d_ap, d_an = rng.uniform(0, 2, 25), rng.uniform(0, 2, 25)
    mean_hardness = np.mean(d_ap - d_an)
    assert collapse.collapseness(d_ap, d_an, 0.0) == pytest.approx(mean_hardness, abs=1e-12)
    assert collapse.collapseness(d_ap, d_an, 1e-7) == pytest.approx(mean_hardness, abs=1e-6)
    limit = d_ap.max() - d_an.max()
    assert abs(collapse.collapseness(d_ap, d_an, 1e4) - limit) < 1e-3
    assert abs(collapse.collapseness(d_ap, d_an, 1e4) - limit) < abs(collapse.collapseness(d_ap, d_an, 10) - limit)
    for lam in (0.5, 2.0, 10.0):
        expected = _slow_collapseness(d_ap, d_an, lam)
        assert collapse.collapseness(d_ap, d_an, lam) == pytest.approx(expected, rel=1e-12)
        torch_value = dfn.collapseness(torch.tensor(d_ap), torch.tensor(d_an), lam)
        assert float(torch_value) == pytest.approx(expected, rel=1e-12)
    assert np.array_equal(collapse.hardness(d_ap, d_an), d_ap - d_an)
    assert torch.equal(dfn.hardness(torch.tensor(d_ap), torch.tensor(d_an)), torch.tensor(d_ap - d_an))


def test_spread_and_separability_against_pair_loops():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(9, 3))
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 0, 1])
    same, different, every = [], [], []
    for i in range(9):
        for j in range(9):
            if i != j:
                d = np.linalg.norm(emb[i] - emb[j])
                every.append(d)
                (same if labels[i] == labels[j] else different).append(d)
    assert collapse.mean_pairwise_distance(emb) == pytest.approx(np.mean(every), rel=1e-12)
    assert collapse.separability(emb, labels) == pytest.approx((np.mean(different) - np.mean(same)) / np.mean(every),
                                                                rel=1e-12)
    assert collapse.separability(np.ones((4, 2)), [0, 0, 1, 1]) == 0.0  # fully collapsed
    triplets = collapse.random_triplets(labels, np.random.default_rng(0))
    assert len(triplets) == 9 and np.all(labels[triplets[:, 0]] == labels[triplets[:, 1]])
    assert np.all(triplets[:, 0] != triplets[:, 1]) and np.all(labels[triplets[:, 0]] != labels[triplets[:, 2]])


def test_anp_terms():
    d_an = torch.tensor([0.5, 0.1, 0.9, 0.3], requires_grad=True)
    d_aa = torch.tensor([0.05, 0.15], requires_grad=True)
    c = torch.tensor(-0.3, requires_grad=True)
    value = dfn.anp_objective(c, d_an, d_aa)
    gamma = math.exp(-0.3)
    t_an, mean_shift = (0.1 + 0.3) / 2, 0.1  # T_an: mean of the smallest half of d(a', n)
    assert float(value.detach()) == pytest.approx(-gamma * (t_an - mean_shift), rel=1e-6)
    value.backward()
    assert float(c.grad) == 0.0  # gamma is a constant: no gradient reaches C through it
    assert torch.allclose(d_an.grad, torch.tensor([0.0, -gamma / 2, 0.0, -gamma / 2]))
    assert torch.allclose(d_aa.grad, torch.tensor([gamma / 2, gamma / 2]))
    collapsed = torch.tensor(0.2, requires_grad=True)
    value = dfn.anp_objective(collapsed, d_an.detach(), d_aa.detach())
    assert float(value.detach()) == pytest.approx(-(0.2 + 1.0 * (t_an - mean_shift)), rel=1e-6)  # gamma = 1 once C >= 0
    value.backward()
    assert float(collapsed.grad) == -1.0
    assert float(dfn.smallest_half_mean(torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0]))) == 1.5
    assert float(dfn.top_ranked_loss(torch.tensor([0.9, 0.4, 0.3]), torch.tensor([0.3, 0.25, 1.0]))) == \
        pytest.approx(0.3 - 0.25 + 0.04)
    assert float(dfn.top_ranked_loss(torch.tensor([0.2, 0.4]), torch.tensor([0.3, 0.25]))) == 0.0


def test_hm_destination_and_objective():
    assert dfn.hm_destination(0.5) == pytest.approx(-0.2) and dfn.hm_destination(0.1) == pytest.approx(-0.1)
    assert dfn.hm_destination(-1.0) == 0.0
    h = torch.tensor([-0.5, -0.1, 0.2])
    assert float(dfn.hm_objective(h, -0.2)) == pytest.approx(-(0.3 ** 2) / 3)


def test_mined_triplets_follow_the_rule():
    rng = np.random.default_rng(2)
    emb = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(24, 4))), dim=1)
    labels = torch.tensor(rng.integers(0, 4, 24))
    anchors = dfn.split_roles(labels)
    for i in range(24):  # anchors: 1st, 3rd, ... of each class in batch order
        assert bool(anchors[i]) == (int((labels[:i] == labels[i]).sum()) % 2 == 0)
    a, p, n = dfn.mine_triplets(emb, labels, anchors, 0.3, torch.Generator().manual_seed(0))
    d = torch.cdist(emb, emb)
    pairs = {(i, j) for i in range(24) for j in range(24)
             if anchors[i] and not anchors[j] and labels[i] == labels[j]}
    assert set(zip(a.tolist(), p.tolist())) == pairs and len(a) == len(pairs)
    for i, j, k in zip(a.tolist(), p.tolist(), n.tolist()):
        negatives = [m for m in range(24) if not anchors[m] and labels[m] != labels[i]]
        band = [m for m in negatives if d[i, j] < d[i, m] < d[i, j] + 0.3]
        farther = [m for m in negatives if d[i, m] > d[i, j]]
        if band:
            assert k in band
        elif farther:
            assert k == min(farther, key=lambda m: d[i, m])
        else:
            assert k == max(negatives, key=lambda m: d[i, m])


# ---- CAP and ANP on a real batch --------------------------------------------------------------------

def _batch(fashion, model):
    images, labels = fashion[0], fashion[1]
    index = training_batches(labels, 32, 4, np.random.default_rng(0))[0]
    x = torch.as_tensor(images[index], dtype=torch.float32) / 255
    return dfn.triplet_batch(model, x, torch.as_tensor(labels[index]), 0.2, torch.Generator().manual_seed(0))


def _c(model, x, batch, lam):
    with torch.no_grad():
        e = model.eval()(x)
    a, p, n = batch.triplets
    return float(dfn.collapseness((e[a] - e[p]).norm(dim=1), (e[a] - e[n]).norm(dim=1), lam))


def test_cap_raises_collapseness_and_stops_at_collapse(fashion):
    model = tiny()
    batch = _batch(fashion, model)
    lam, settings = 10.0, {"eps": 16 / 255, "alpha": 2 / 255, "lam": 10.0}
    before = _c(model, batch.x, batch, lam)
    assert before < 0
    results = [dfn.cap_attack(model, batch, steps=s, **settings) for s in range(1, 13)]
    values = [_c(model, x, batch, lam) for x in results]
    first = next(i for i, v in enumerate(values) if v >= 0)  # the batch collapses within the budget
    assert all(v < 0 for v in values[:first]) and values[0] > before
    assert all(torch.equal(x, results[first]) for x in results[first:])  # no step after the collapse
    assert torch.equal(results[first][batch.anchors], batch.x[batch.anchors])  # anchors stay clean
    assert (results[first] - batch.x).abs().max() <= 16 / 255 + 1e-6
    collapsed = dfn.TripletBatch(results[first], model.eval()(results[first]).detach(), batch.triplets, batch.anchors)
    assert torch.equal(dfn.cap_attack(model, collapsed, steps=5, **settings), results[first])


def test_anp_moves_anchors_only_and_gains_on_its_objective(fashion):
    model = tiny()
    batch = _batch(fashion, model)
    x = dfn.anp_attack(model, batch, eps=8 / 255, alpha=1 / 255, steps=6, lam=10.0)
    assert torch.equal(x[~batch.anchors], batch.x[~batch.anchors])
    assert 0 < (x - batch.x).abs().max() <= 8 / 255 + 1e-6
    a, p, n = batch.triplets
    at = batch.anchors.nonzero().flatten()

    def objective(images):
        with torch.no_grad():
            e = model.eval()(images)
        c = dfn.collapseness((e[a] - e[p]).norm(dim=1), (e[a] - e[n]).norm(dim=1), 10.0)
        return float(dfn.anp_objective(c, (e[a] - e[n]).norm(dim=1), (e[at] - batch.clean[at]).norm(dim=1)))

    assert objective(x) > objective(batch.x)


# ---- training --------------------------------------------------------------------------------------

def _weights(model):
    return [t.clone() for t in model.state_dict().values()]


@pytest.mark.parametrize("task, defense", [("dml", "naive"), ("dml", "act"), ("dml", "hm"), ("dml", "colo-tride"),
                                           ("hash", "freeat")])
def test_every_defence_trains_deterministically(fashion, task, defense):
    images, labels = fashion[0][:64], fashion[1][:64]
    head = "embedding" if task == "dml" else "hash"
    settings = dfn.defence_settings(task, defense, **({"attack_steps": 2} if task == "dml" else {"replays": 2}))
    runs = []
    for _ in range(2):
        model = tiny(head)
        state = dfn.fit(model, images, labels, task=task, defense=defense, settings=settings, epochs=1, batch_size=32,
                        seed=3, backend=CPU)
        runs.append((_weights(model), state.history))
    assert runs[0][1] == runs[1][1] and len(runs[0][1]) >= 2
    assert all(torch.equal(u, v) for u, v in zip(runs[0][0], runs[1][0]))
    assert not all(torch.equal(u, v) for u, v in zip(runs[0][0], _weights(tiny(head))))


@pytest.mark.parametrize("defense", ["naive", "hm"])
def test_the_mining_pass_as_first_attack_step_changes_nothing(fashion, defense, monkeypatch):
    """Naive AT and HM reuse the clean pass that mines the triplets as PGD's first forward pass:
    the same weights as mining and attacking with separate passes."""
    images, labels = fashion[0][:64], fashion[1][:64]
    settings = dfn.defence_settings("dml", defense, attack_steps=2)
    weights = []
    for whole_batch in (dfn._WHOLE_BATCH, ()):
        monkeypatch.setattr(dfn, "_WHOLE_BATCH", whole_batch)
        model = tiny()
        dfn.fit(model, images, labels, task="dml", defense=defense, settings=settings, epochs=1, batch_size=32,
                seed=3, backend=CPU)
        weights.append(_weights(model))
    assert all(torch.equal(u, v) for u, v in zip(*weights))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the defences on a GPU")
@pytest.mark.parametrize("task, defense", [("dml", "naive"), ("dml", "act"), ("dml", "hm"), ("dml", "colo-tride"),
                                           ("hash", "freeat")])
def test_every_defence_trains_on_a_gpu(fashion, task, defense):
    """Each defence on CUDA: the model stays on the device, learns, and logs its diagnostics; the same
    seed gives the same first loss (later ones drift with the GPU's non-deterministic sums)."""
    images, labels = fashion[0][:128], fashion[1][:128]
    head = "embedding" if task == "dml" else "hash"
    settings = dfn.defence_settings(task, defense, **({"attack_steps": 2} if task == "dml" else {"replays": 2}))
    gpu = get_backend("torch", device="cuda")
    runs = []
    for _ in range(2):
        model = tiny(head)
        state = dfn.fit(model, images, labels, task=task, defense=defense, settings=settings, epochs=2, batch_size=32,
                        seed=3, backend=gpu, held_out=(fashion[2][:64], fashion[3][:64]))
        assert all(p.device.type == "cuda" for p in model.parameters())
        assert len(state.diagnostics) == 2 and np.all(np.isfinite(state.history))
        runs.append((_weights(model), state.history))
    assert runs[0][1][0] == pytest.approx(runs[1][1][0], rel=1e-4, abs=1e-6)
    assert not all(torch.equal(u.cpu(), v) for u, v in zip(runs[0][0], _weights(tiny(head))))


def test_naive_at_collapses_and_colo_tride_does_not(fashion):
    """Fashion-MNIST, small CNN, an adversary of eps 32/255 (4 steps of 8/255), four epochs.

    Read from the logged diagnostics, as COLO-TRIDE's Fig. 3: the separability of the
    minibatches the model is trained on starts negative under naive AT and rises to about 0
    (entangled triplets, the collapse), while COLO-TRIDE's stays positive; naive AT's held-out
    embeddings also shrink. (Seeds 0-2 at these settings: naive -0.27..0.004 with the last
    epoch within 0.07 of 0, COLO-TRIDE 0.065..0.32.)
    """
    images, labels, test_images, test_labels = fashion
    rows = {}
    for defense in ("naive", "colo-tride"):
        settings = dfn.defence_settings("dml", defense, attack_eps=32 / 255, attack_alpha=8 / 255, attack_steps=4)
        state = dfn.fit(tiny(dim=16, seed=0), images[:512], labels[:512], task="dml", defense=defense,
                        settings=settings, epochs=4, batch_size=64, lr=3e-3, seed=0,
                        held_out=(test_images, test_labels), backend=CPU)
        rows[defense] = [dict(zip(dfn.DIAGNOSTICS, row)) for row in state.diagnostics]
    naive = np.array([row["train_separability"] for row in rows["naive"]])
    colo = np.array([row["train_separability"] for row in rows["colo-tride"]])
    assert naive[0] < 0 and naive.max() < 0.05 and abs(naive[-1]) < 0.1
    assert colo.min() > 0.05 and np.all(colo > naive + 0.05)
    assert rows["colo-tride"][-1]["mean_pairwise_distance"] > 1.5 * rows["naive"][-1]["mean_pairwise_distance"]


@pytest.mark.parametrize("spec", [ModelSpec("small-cnn", 1, "hash", 8, width=16),
                                  ModelSpec("small-cnn", 3, "hash", 8, width=32),
                                  ModelSpec("resnet18", 1, "hash", 8, width=64, stem="imagenet"),
                                  ModelSpec("small-cnn", 1, "hash", 8, width=4)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_freeat_input_gradient_is_autograds(spec, dtype):
    """FreeAT's first-convolution input gradient (matmul and col2im) against autograd's, and every weight
    gradient unchanged; the 7 x 7 / 2 stem on an odd size leaves input pixels that no window covers."""
    model = build_model(spec, seed=0).to(dtype).train()
    x = torch.rand(5, spec.in_channels, 33, 33, dtype=dtype, generator=torch.Generator().manual_seed(1))
    grads = []
    for cheap in (False, True):
        hooks = dfn._cheap_input_gradient(model, x) if cheap else []
        assert bool(hooks) == (cheap and spec.width != 4)  # width 4: 9 > 4 filters, autograd's own
        image = x.clone().requires_grad_(True)
        model(image).pow(2).sum().backward()
        grads.append([image.grad] + [p.grad for p in model.parameters()])
        model.zero_grad(set_to_none=True)
        for hook in hooks:
            hook.remove()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for ours, theirs in zip(grads[1], grads[0]):
        assert torch.allclose(ours, theirs, rtol=0, atol=tol * float(theirs.abs().max()))
    assert float(grads[1][0].abs().max()) > 0


@pytest.mark.parametrize("width", [4, 16])  # 16: the first convolution's input gradient by matmul and col2im
def test_freeat_replays_each_batch_and_keeps_the_perturbation(fashion, width):
    images, labels = fashion[0][:40], fashion[1][:40]
    eps, replays = 8 / 255, 3
    model = tiny("hash", 16, width=width)
    seen = []

    def record(module, inputs):
        if module.training:
            x = inputs[0]
            entry = {"x": x.detach().clone()}
            x.register_hook(lambda g: entry.__setitem__("grad", g.clone()))
            seen.append(entry)

    model.register_forward_pre_hook(record)
    settings = dfn.defence_settings("hash", "freeat", replays=replays, attack_eps=eps)
    state = dfn.fit(model, images, labels, task="hash", defense="freeat", settings=settings, epochs=1, batch_size=16,
                    seed=0, backend=CPU)
    batches = training_batches(np.unique(labels, return_inverse=True)[1], 16, None, np.random.default_rng(0))
    assert [len(b) for b in batches] == [16, 16, 8]
    assert len(seen) == len(state.history) == 3 * replays
    clean = [torch.as_tensor(images[b], dtype=torch.float32) / 255 for b in batches]
    delta = torch.zeros_like(clean[0])
    for k, entry in enumerate(seen):
        x = clean[k // replays]
        expected = (x + delta[:len(x)]).clamp(0, 1)
        assert torch.allclose(entry["x"], expected, atol=1e-6), k
        assert (entry["x"] - x).abs().max() <= eps + 1e-6
        moved = project(entry["x"] + eps * entry["grad"].sign(), x, eps, "linf")
        delta = delta.clone()
        delta[:len(x)] = moved - x
    # the perturbation carried into each new batch is not zero: it was kept, not reset
    for k in (replays, 2 * replays):
        assert (seen[k]["x"] - clean[k // replays]).abs().max() > 0


def test_a_saved_state_is_a_copy_that_later_epochs_leave_alone(fashion):
    images, labels = fashion[0][:64], fashion[1][:64]
    model = tiny(head="hash", dim=16)
    snapshots = []

    def save(state, optimizer):
        snapshots.append((state.state_dict(model, optimizer),
                          {k: v.clone() for k, v in model.state_dict().items()}, state.memory["delta"].clone()))

    dfn.fit(model, images, labels, task="hash", defense="freeat", epochs=2, batch_size=16, seed=0, backend=CPU,
            on_epoch=save)
    (first, weights, delta), _ = snapshots
    assert all(torch.equal(first["model"][k], weights[k]) for k in weights)
    assert torch.equal(first["memory"]["delta"], delta) and not torch.equal(delta, snapshots[1][2])
    assert not all(torch.equal(first["model"][k], v) for k, v in model.state_dict().items())


def test_defence_settings_are_checked():
    assert dfn.defence_settings("dml", "colo-tride")["attack_steps"] == 16
    assert dfn.defence_settings("hash", "freeat", replays=8)["replays"] == 8
    with pytest.raises(ValueError, match="defense: expected one of none, freeat for task 'hash'"):
        dfn.defence_settings("hash", "naive")
    with pytest.raises(ValueError, match="replays: does not apply to defense 'colo-tride'"):
        dfn.defence_settings("dml", "colo-tride", replays=2)
    with pytest.raises(ValueError, match="attack_eps: expected a finite number above 0"):
        dfn.defence_settings("dml", "naive", attack_eps=0.0)


# ---- CLI: diagnostics file, resume ---------------------------------------------------------------------

def _cli(tmp_path, *extra):
    from minrr.cli.main import main

    return main(["train", "--task", "dml", "--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
                 "--width", "4", "--dim", "8", "--epochs", "2", "--batch-size", "32", "--defense", "colo-tride",
                 "--attack-steps", "2", "--device", "cpu", *extra])


@pytest.fixture
def one_thread():
    """A fixed thread count: a CLI run in a fresh process keeps the one it starts with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cli_resume_ends_byte_identical(fashion, tmp_path, monkeypatch, capsys, one_thread):
    import minrr.cli.train as cli_train

    np.save(tmp_path / "x.npy", fashion[0][:64])
    np.save(tmp_path / "y.npy", fashion[1][:64])
    first, second = tmp_path / "first", tmp_path / "second"  # the same file name: torch.save records it
    first.mkdir()
    second.mkdir()
    assert _cli(tmp_path, "--out", str(first / "model.pt")) == 0
    rows = np.loadtxt(first / "model.diagnostics.csv", delimiter=",", skiprows=1)
    assert rows.shape == (2, len(dfn.DIAGNOSTICS)) and list(rows[:, 0]) == [1, 2]
    assert not (first / "model.resume.pt").exists()
    write = cli_train._write_diagnostics

    def interrupt(path, rows):  # the run is killed right after epoch 1 is saved
        write(path, rows)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_train, "_write_diagnostics", interrupt)
    assert _cli(tmp_path, "--out", str(second / "model.pt")) == 130
    monkeypatch.setattr(cli_train, "_write_diagnostics", write)
    assert (second / "model.resume.pt").is_file() and not (second / "model.pt").exists()
    capsys.readouterr()
    assert _cli(tmp_path, "--out", str(second / "model.pt"), "--resume", "--lr", "0.002") == 1
    err = capsys.readouterr().err
    assert "error: --resume: " in err and "other settings (lr)" in err
    assert _cli(tmp_path, "--out", str(second / "model.pt"), "--resume") == 0
    assert (second / "model.pt").read_bytes() == (first / "model.pt").read_bytes()
    assert np.array_equal(np.loadtxt(second / "model.diagnostics.csv", delimiter=",", skiprows=1), rows)
    assert not (second / "model.resume.pt").exists()
