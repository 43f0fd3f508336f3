"""The robrank metric-learning attack suite (minrr.backends.ml_attacks).

A small CNN is trained in the module fixture on 400 bundled Fashion-MNIST images; the whole
suite runs once on 48 of 200 test items, with the PGD engine spied on, and every attack is
checked against its goal. The measurements are pinned to brute-force argsort rankings, and
the robrank-compatibility selections to constructed cases and to a transcription of
robrank's selection code.
"""

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from minrr.backends import ml_attacks  # noqa: E402
from minrr.backends.ml_attacks import (ROBRANK_ALPHA, ROBRANK_EPS, ROBRANK_STEPS, attack_items,  # noqa: E402
                                       gtm_targets, ltm_masks, nearest_other, prepare, rank_fraction,
                                       retained_in_top, robrank_suite, run_attack, top1_hits)
from minrr.backends.models import ModelSpec, build_model  # noqa: E402
from minrr.backends.training import train  # noqa: E402
from minrr.cli.main import main  # noqa: E402
from minrr.data import fashion_mnist_subset  # noqa: E402
from minrr.metrics.retrieval import recall_at_k  # noqa: E402
from minrr.scores import ATTACKS, parse_attack_record  # noqa: E402

N_QUERIES = 48


@pytest.fixture(scope="module")
def trained():
    """A small CNN (width 8, 16-d) trained with the triplet loss; 200 test images and labels."""
    data = fashion_mnist_subset()
    model = build_model(ModelSpec("small-cnn", 1, "embedding", 16, width=8, mean=(0.29,), std=(0.35,)), seed=0)
    train(model, data["train_images"][:400, None], data["train_labels"][:400].astype(np.int64), task="dml",
          epochs=3, batch_size=64, seed=0)
    return model, data["test_images"][:200, None], data["test_labels"][:200].astype(np.int64)


@pytest.fixture(scope="module")
def suite(trained):
    """The whole suite's record, and every (clean, adversarial, pgd settings) the engine saw."""
    model, images, labels = trained
    calls, engine = [], ml_attacks.pgd

    def spy(model, x, loss, **settings):
        adv = engine(model, x, loss, **settings)
        calls.append((x.clone(), adv.clone(), settings))
        return adv

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ml_attacks, "pgd", spy)
        record = robrank_suite(model, images, labels, max_queries=N_QUERIES, device="cpu", batch_size=32, seed=3,
                               meta={"model": "tiny"})
    return record, calls


def _entry(record, name):
    return next(e for e in record["attacks"] if e["attack"] == name)


# ---- goals of the attacks ----------------------------------------------------------------------------

def test_rank_attacks_move_the_candidate_towards_their_goal(suite):
    record, _ = suite
    for name in ("CA+", "QA+"):
        before, after = (np.array(_entry(record, name)[f]) for f in ("rank_before", "rank_after"))
        assert len(before) == N_QUERIES and after.mean() < before.mean() - 0.05, name
        assert np.mean(after < before) > 0.7, name
    for name in ("CA-", "QA-"):
        before, after = (np.array(_entry(record, name)[f]) for f in ("rank_before", "rank_after"))
        assert before.mean() < 0.03 and after.mean() > before.mean() + 0.02, name
        assert np.mean(after > before) > 0.7, name
    # QA-'s candidate is one of the query's 2 nearest other items (the top 1% of 200)
    assert max(_entry(record, "QA-")["rank_before"]) == 1 / 198


def test_recall_attacks_lower_recall_and_gtt_loses_the_top1(suite):
    record, _ = suite
    benign = record["benign_r1"]
    assert benign > 0.4
    es = _entry(record, "ES")
    assert es["shift"] > 0.05 and es["r1_after"] <= benign
    for name in ("LTM", "GTM"):
        assert _entry(record, name)["r1_after"] < benign - 0.1, name
    assert _entry(record, "GTT")["retained"] < 0.8  # 1 before the attack, by definition


def test_tma_raises_the_cosine_to_its_target(trained):
    model, images, labels = trained
    setup = prepare(model, images, labels, device="cpu", batch_size=64)
    items = attack_items(len(images), 24, seed=1)
    clean = run_attack(setup, "TMA", items, steps=0, seed=1)["cosine"]  # the same targets, unattacked
    attacked = run_attack(setup, "TMA", items, seed=1)["cosine"]
    assert attacked > clean + 0.03 and 1 - attacked < 0.8 * (1 - clean)


def test_perturbations_stay_in_the_ball_and_the_box_with_robrank_settings(suite):
    _, calls = suite
    assert len(calls) == len(ATTACKS) * 2  # 48 items in batches of 32
    for clean, adv, settings in calls:
        assert settings == {"forward": settings["forward"], "eps": ROBRANK_EPS, "alpha": ROBRANK_ALPHA,
                            "steps": ROBRANK_STEPS}  # no random start
        assert (adv - clean).abs().max() <= ROBRANK_EPS + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
        assert (adv - clean).abs().max() > ROBRANK_EPS / 2  # it did move


def test_record_is_valid_and_minrr_score_reads_it(suite, tmp_path, capsys):
    record, _ = suite
    parsed = parse_attack_record(json.loads(json.dumps(record)))
    assert set(parsed.outcomes) == set(ATTACKS)
    meta = record["meta"]
    assert meta["model"] == "tiny" and meta["seed"] == 3 and meta["n_queries"] == N_QUERIES
    assert meta["n_gallery"] == 200 and meta["protocol"] == "robrank"
    assert _entry(record, "GTM")["params"]["robrank_compat"] is False
    assert _entry(record, "QA-")["params"]["top"] == 2  # int(0.01 * 200)
    path = tmp_path / "record.json"
    path.write_text(json.dumps(record))
    assert main(["score", "--attacks", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"benign R@1 {100 * record['benign_r1']:.2f}%" in out and "ERS " in out and "ARS " in out


def test_benign_recall_matches_recall_at_k_and_the_model_is_left_as_it_was(trained):
    model, images, labels = trained
    setup = prepare(model, images, labels, device="cpu", batch_size=64)
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.train()  # the gallery and the attacks run in eval mode all the same
    try:
        record = robrank_suite(model, images, labels, attacks=("GTT",), steps=1, device="cpu", batch_size=64)
        assert model.training and all(p.requires_grad for p in model.parameters())
        assert all((g is None and p.grad is None) or torch.equal(g, p.grad)
                   for g, p in zip(grads, model.parameters()))
    finally:
        model.eval()
    assert record["benign_r1"] == pytest.approx(recall_at_k(setup.gallery64.numpy(), labels, 1), abs=1e-12)


def test_draws_do_not_depend_on_the_batch_size(trained):
    model, images, labels = trained
    setup = prepare(model, images, labels, device="cpu", batch_size=64)
    items = attack_items(len(images), 30, seed=5)
    for name in ("CA+", "CA-", "QA+", "QA-"):
        big = run_attack(setup, name, items, steps=0, seed=5)
        small = run_attack(dataclasses.replace(setup, batch_size=7), name, items, steps=0, seed=5)
        assert big["rank_before"] == small["rank_before"] == big["rank_after"], name
        other = run_attack(setup, name, items, steps=0, seed=6)
        assert other["rank_before"] != big["rank_before"], name


# ---- measurements against brute force -----------------------------------------------------------------

def _argsort_ranking(row, query):
    """Gallery indices of one row in ranking order, the query left out: stable argsort, ties by index."""
    order = np.argsort(row, kind="stable")
    return order[order != query]


def test_measurements_match_argsort():
    rng = np.random.default_rng(0)
    gallery = rng.integers(0, 3, size=(14, 2)).astype(np.float64)  # coarse grid: many ties and duplicates
    labels = rng.integers(0, 3, size=14)
    queries = np.arange(14)
    adv = gallery + rng.integers(-1, 2, size=gallery.shape)
    d = torch.cdist(torch.as_tensor(adv), torch.as_tensor(gallery), compute_mode="donot_use_mm_for_euclid_dist")
    q = torch.as_tensor(queries)
    candidate = torch.as_tensor((queries + rng.integers(1, 14, size=14)) % 14)
    got_rank = rank_fraction(d, candidate, q).numpy()
    got_nearest = nearest_other(d, q).numpy()
    got_kept = retained_in_top(d, q, candidate, 4).numpy()
    hit, answerable = (t.numpy() for t in top1_hits(d, q, torch.as_tensor(labels)))
    for i in queries:
        ranking = _argsort_ranking(d[i].numpy(), i)
        position = int(np.flatnonzero(ranking == int(candidate[i]))[0])
        assert got_rank[i] == position / 12
        assert got_nearest[i] == ranking[0]
        assert got_kept[i] == (position < 4)
        assert hit[i] == (labels[ranking[0]] == labels[i])
        assert answerable[i] == (np.sum(labels == labels[i]) > 1)


def test_rank_fraction_end_points():
    d = torch.tensor([[0.0, 0.5, 0.1, 0.2, 0.9]])
    q = torch.tensor([0])
    assert rank_fraction(d, torch.tensor([2]), q).item() == 0.0  # nearest other item: the top
    assert rank_fraction(d, torch.tensor([4]), q).item() == 1.0  # farthest: the bottom
    assert rank_fraction(d, torch.tensor([1]), q).item() == 2 / 3


# ---- robrank's quirks -------------------------------------------------------------------------------------

def test_gtm_target_fixed_and_robrank_compat_on_constructed_cases():
    # query 0 (label 0), clean top-1 item 1 is correct; other-label items {2, 4, 5}, nearest 4
    d = torch.tensor([[0.0, 0.1, 0.5, 0.2, 0.3, 0.9]])
    labels = torch.tensor([0, 0, 1, 0, 1, 1])
    q = torch.tensor([0])
    assert gtm_targets(d, q, labels).item() == 4
    assert gtm_targets(d, q, labels, robrank_compat=True).item() == 1  # 4's position among {2, 4, 5}
    # the clean top-1 (item 1, label 1) is wrong: robrank's "non-matching" items are those
    # whose label is not 1, {0, 2, 4} (the query itself included), nearest 4, at position 2
    d = torch.tensor([[0.0, 0.1, 0.3, 0.4, 0.2]])
    labels = torch.tensor([0, 1, 0, 1, 0])
    assert gtm_targets(d, q, labels).item() == 1
    assert gtm_targets(d, q, labels, robrank_compat=True).item() == 2


def _robrank_gtm(dist, labels, loc_self):
    """robrank's QCSelector._sel_gtm, transcribed: the target index it returns."""
    d = dist.clone()
    d[range(len(loc_self)), loc_self] = 1e38
    argsort = d.argsort(dim=1, stable=True)
    argrank = argsort.argsort(dim=1)
    mylabel = labels[argsort[:, 0]].view(-1, 1)
    mask_unmatch = labels.view(1, -1) != mylabel
    return torch.stack([argrank[i, mask_unmatch[i]].argmin() for i in range(len(d))])


def test_gtm_compat_reproduces_robrank_selection_and_the_fix_is_the_nearest_other_label():
    rng = np.random.default_rng(1)
    for _ in range(5):
        emb = torch.as_tensor(rng.normal(size=(40, 4)))
        labels = torch.as_tensor(rng.integers(0, 4, size=40))
        queries = torch.as_tensor(rng.choice(40, 10, replace=False))
        d = torch.cdist(emb[queries], emb)
        assert torch.equal(gtm_targets(d, queries, labels, robrank_compat=True), _robrank_gtm(d, labels, queries))
        fixed = gtm_targets(d, queries, labels).numpy()
        for row, query, target in zip(d.numpy(), queries.numpy(), fixed):
            ranking = _argsort_ranking(row, query)
            assert target == ranking[labels.numpy()[ranking] != labels.numpy()[query]][0]


def test_ltm_positives_keep_the_query_only_in_robrank_compat():
    labels = torch.tensor([0, 1, 0, 2, 0, 1])
    q = torch.tensor([0, 1])
    positives, negatives = ltm_masks(q, labels)
    old_positives, old_negatives = ltm_masks(q, labels, robrank_compat=True)
    assert positives.tolist() == [[False, False, True, False, True, False], [False, False, False, False, False, True]]
    assert torch.equal(old_negatives, negatives) and negatives.tolist()[0] == [False, True, False, True, False, True]
    difference = (old_positives & ~positives).nonzero().tolist()
    assert difference == [[0, 0], [1, 1]] and not (positives & ~old_positives).any()  # exactly the query itself


# ---- the command line: minrr attack --suite robrank ---------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(trained, tmp_path_factory):
    from minrr.backends.checkpoint import save_checkpoint

    model, images, labels = trained
    folder = tmp_path_factory.mktemp("suite")
    np.savez(folder / "test.npz", images=images, labels=labels)
    save_checkpoint(folder / "model.pt", model, input_shape=images.shape[1:])
    return folder


def test_cli_writes_a_record_that_minrr_score_reads(checkpoint, capsys):
    out = checkpoint / "record.json"
    args = ["attack", "--model", str(checkpoint / "model.pt"), "--data", str(checkpoint / "test.npz"),
            "--suite", "robrank", "--max-queries", "16", "--steps", "3", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    record = json.loads(out.read_text())
    assert [e["attack"] for e in record["attacks"]] == list(ATTACKS) and record["meta"]["n_queries"] == 16
    assert record["attacks"][0]["params"]["steps"] == 3 and record["attacks"][0]["params"]["eps"] == ROBRANK_EPS
    assert not (checkpoint / "record.json.partial").exists()
    assert main(["score", "--attacks", str(out)]) == 0
    assert "ERS " in capsys.readouterr().out
    assert main(args[:-2] + ["--attacks", "CA+,QX", "--out", str(checkpoint / "bad.json")]) == 1
    assert "--attacks: expected distinct names" in capsys.readouterr().err
    assert not (checkpoint / "bad.json").exists()


def test_cli_resumes_after_an_interruption(checkpoint, monkeypatch):
    out = checkpoint / "resumed.json"
    args = ["attack", "--model", str(checkpoint / "model.pt"), "--data", str(checkpoint / "test.npz"),
            "--suite", "robrank", "--attacks", "QA+,GTT", "--max-queries", "8", "--steps", "2", "--device", "cpu",
            "--out", str(out)]
    ran, engine = [], ml_attacks.run_attack

    def interrupted(setup, name, *rest, **options):
        ran.append(name)
        if ran == ["QA+", "GTT"]:
            raise ValueError("steps: interrupted on purpose")
        return engine(setup, name, *rest, **options)

    monkeypatch.setattr(ml_attacks, "run_attack", interrupted)
    assert main(args) == 1
    partial = json.loads((checkpoint / "resumed.json.partial").read_text())
    assert [e["attack"] for e in partial["attacks"]] == ["QA+"] and not out.exists()
    assert main(args) == 0
    assert ran == ["QA+", "GTT", "GTT"]  # the second run took QA+ from the partial file
    record = json.loads(out.read_text())
    assert record["attacks"][0] == partial["attacks"][0] and record["attacks"][1]["attack"] == "GTT"
    assert not (checkpoint / "resumed.json.partial").exists()
    assert main(args[:-4] + ["--seed", "1", "--out", str(out)]) == 0  # a finished record is simply replaced


# ---- input checks ------------------------------------------------------------------------------------------

def test_bad_input_names_the_argument(trained):
    model, images, labels = trained
    with pytest.raises(ValueError, match="^attacks: expected distinct names"):
        robrank_suite(model, images, labels, attacks=("QA+", "XX"), device="cpu")
    with pytest.raises(ValueError, match="^labels: the test split has one class"):
        prepare(model, images[:10], np.zeros(10, dtype=np.int64), device="cpu")
    with pytest.raises(ValueError, match="^max_queries: expected a whole number >= 1"):
        attack_items(10, 0, seed=0)
    setup = prepare(model, images[:20], labels[:20], device="cpu")
    with pytest.raises(ValueError, match=r"^items: expected a non-empty list of test indices in \[0, 20\)"):
        run_attack(setup, "ES", [3, 20])
