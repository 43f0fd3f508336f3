"""COLO-TRIDE (collapse-oriented adversarial training with triplet decoupling) reproduced on
Fashion-MNIST with minrr's metric-learning models.

Regenerates, beside the paper's numbers (its CUB, CARS and SOP rows):

* Table 1: benign R@1, R@2, mAP and NMI (robrank protocol: the test split is both the queries and
  the gallery, each query leaving its own item out; ``minrr.metrics.report.retrieval_metrics``),
  the ten ERS terms of robrank's nine attacks (``minrr.backends.ml_attacks.robrank_suite``, L-inf
  eps 8/255, no random start) and ERS, for models trained (``minrr.backends.defences.fit``) with no
  defence, ACT, HM and COLO-TRIDE;
* Table 2: the eight ARS terms and the averaged ARS of the same attacks (``minrr.scores``);
* Fig. 3: collapse diagnostics over the epochs, naive AT against COLO-TRIDE (no defence, ACT and HM
  for reference): the spread (mean pairwise distance) and separability of the embeddings each
  minibatch is trained on, averaged over the epoch (as the paper's Fig. 3), and the collapseness,
  separability and R@1 of a held-out probe of the test split (``colotride-fig3.png``);
* a table of the paper's claims, whether each direction holds here (computed from the numbers),
  and why not where it does not.

Outputs (``--out``, default bench/results/reproduction/): ``colotride.md``, ``colotride.json``,
``colotride-fig3.png``.

Usage::

    python bench/reproduce_colotride.py --quick   # bundled subset, tiny models: the CI check, ~30 s
    python bench/reproduce_colotride.py           # full Fashion-MNIST, about 25 minutes on 2 cores

Every size is a flag (defaults: full / quick): ``--train-images`` a fixed class-balanced subset of
the training split (10000 of 60000 / 1000 of 5000), ``--test-images`` queries and gallery (10000 /
1000: the whole test split), ``--held-out`` the diagnostics' probe of the test split (1000 / 300),
``--epochs`` (8 / 2), ``--arch`` (small-cnn), ``--width`` (32 / 8), ``--dim`` (128 / 16),
``--batch-size`` (128), ``--train-steps`` PGD steps of naive AT, ACT and HM in training (8 / 2),
``--colo-steps`` those of COLO-TRIDE (16 / 2), ``--queries`` attacked test items (500 / 60),
``--steps`` PGD steps of the evaluation attacks (32 / 4), ``--eps`` the L-inf radius of every
attack, training and evaluation, in units of 1/255 (8, the paper's). Training attacks: step
max(1/255, eps / steps) (COLO-TRIDE's ramped by t / T); evaluation attacks: step
max(3/255, 2 eps / steps) (robrank's 3/255 unless too few steps to cross the ball twice).
Seeded (``--seed``) and resumable (``--work``: every model per epoch, every evaluation whole);
progress on stderr.

The paper's sizes on a GPU (ResNet-18 with a 512-d embedding, 100 epochs, batch 112, every test
query; ACT and HM with 32 PGD steps, COLO-TRIDE with 16; the paper's ResNet-18 is pre-trained,
ours is trained from scratch)::

    python bench/reproduce_colotride.py --device cuda --arch resnet18 --width 64 --dim 512 \\
        --train-images 60000 --epochs 100 --batch-size 112 --train-steps 32 --colo-steps 16 \\
        --queries 10000 --steps 32
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np

from reproduction import Experiment, command, markdown_table, parser, sizes_of

PIXEL = 1 / 255
DEFENCES = ("none", "act", "hm", "colo-tride")
"""The rows of Tables 1 and 2."""
FIGURE_DEFENCES = ("none", "naive", "act", "hm", "colo-tride")
NAMES = {"none": "no defence", "naive": "naive AT", "act": "ACT", "hm": "HM", "colo-tride": "COLO-TRIDE"}
BENIGN = ("R@1", "R@2", "mAP", "NMI")
BENIGN_KEYS = {"R@1": "precision_at_1", "R@2": "recall_at_2", "mAP": "mean_average_precision", "NMI": "NMI"}
ERS_COLUMNS = ("CA+", "CA-", "QA+", "QA-", "TMA", "ES:D", "ES:R", "LTM", "GTM", "GTT")
ARS_COLUMNS = ("CA+", "CA-", "QA+", "QA-", "ES:R", "LTM", "GTM", "GTT")
RANK_GOALS = {"CA+": 0.0, "QA+": 0.0, "CA-": 1.0, "QA-": 1.0}
ERS_SCALE = {"CA+": 2.0, "QA+": 2.0}  # d(ERS term) / d(raw value); 1 for the other terms with a per-query outcome
RECALL_TERMS = {"ES:R": "ES", "LTM": "LTM", "GTM": "GTM"}
COLLAPSED = 0.5
"""Fig. 3's claims: naive AT counts as collapsed when its separability (spread) is below this times COLO-TRIDE's."""

# ---- the paper's numbers, as printed (Tables 1 and 2; percent, TMA a cosine, ES:D a shift) --------
# Table 1 columns: PGD steps, R@1, R@2, mAP, NMI, CA+, CA-, QA+, QA-, TMA, ES:D, ES:R, LTM, GTM, GTT, ERS.
# Table 2 columns: CA+, CA-, QA+, QA-, ES:R, LTM, GTM, GTT (ARS), averaged ARS (its benign columns
# repeat Table 1's, but for SOP's COLO-TRIDE R@1, 47.8 in Table 2 against 48.3 in Table 1).
# Table 2's CUB no-defence CA- is printed "0/0"; it is None here.
PAPER_TABLE1 = {
    "CUB": {"none": [None, 58.9, 66.4, 26.1, 59.5, 0.0, 100, 0.0, 99.9, 0.883, 1.76, 0.0, 0.0, 14.1, 0.0, 3.3],
            "act": [32, 27.5, 38.2, 12.2, 43.0, 15.5, 37.7, 15.1, 32.2, 0.47, 0.82, 11.1, 9.4, 14.9, 1.0, 33.9],
            "hm": [32, 34.9, 45.0, 19.8, 47.1, 15.5, 37.7, 16.6, 30.9, 0.75, 0.50, 17.9, 16.7, 27.3, 2.9, 36.0],
            "colo-tride": [16, 34.9, 45.1, 19.9, 46.2, 16.4, 32.5, 21.3, 20.9, 0.97, 0.14, 20.2, 21.4, 22.9, 5.2,
                           38.7]},
    "CARS": {"none": [None, 63.2, 75.3, 36.6, 55.6, 0.2, 100, 0.1, 97.3, 0.874, 1.816, 0.0, 0.0, 13.4, 0.0, 3.6],
             "act": [32, 43.4, 54.6, 11.8, 42.9, 18.0, 32.3, 17.5, 30.5, 0.38, 0.76, 16.3, 15.3, 20.7, 1.6, 38.6],
             "hm": [32, 60.2, 71.6, 33.9, 51.2, 19.3, 25.9, 19.6, 25.7, 0.65, 0.45, 30.3, 36.7, 46, 8.8, 46.1],
             "colo-tride": [16, 60.9, 70.7, 35.1, 49.4, 17.5, 22.0, 23.5, 13.9, 0.95, 0.15, 39.9, 40.5, 37.8, 13.6,
                            47.5]},
    "SOP": {"none": [None, 62.9, 68.5, 39.2, 87.4, 0.1, 99.3, 0.2, 99.1, 0.845, 1.685, 0.0, 0.0, 6.3, 0.0, 4.0],
            "act": [32, 47.5, 52.6, 25.5, 84.9, 24.1, 10.5, 22.7, 9.4, 0.25, 0.53, 21.2, 21.6, 27.8, 15.3, 50.8],
            "hm": [32, 46.8, 51.7, 24.5, 84.7, 32, 4.2, 33.7, 3.0, 0.61, 0.20, 39.1, 39.8, 37.9, 45.6, 61.6],
            "colo-tride": [16, 48.3, 52.8, 25.5, 84.9, 33.4, 3.8, 36.9, 2.4, 0.84, 0.12, 43.7, 45.0, 39.6, 53.3,
                           62.6]},
}
PAPER_TABLE2 = {
    "CUB": {"none": [0.0, None, 0.0, 0.0, 0.0, 0.0, 23.9, 0.0, 3.8],
            "act": [31, 62.9, 30.2, 68.5, 40.3, 34.2, 54.2, 1.0, 40.3],
            "hm": [31, 62.9, 33.2, 69.8, 51.3, 47.9, 78.2, 2.9, 47.2],
            "colo-tride": [32.8, 69.0, 41.6, 79.4, 57.9, 61.3, 65.6, 5.2, 51.6]},
    "CARS": {"none": [0.4, 0.0, 0.0, 3.6, 0.0, 0.0, 21.2, 0.0, 2.8],
             "act": [36, 68.4, 35, 70.2, 37.6, 35.3, 47.7, 1.6, 41.4],
             "hm": [38.6, 74.8, 39.2, 75.1, 50.3, 61.0, 76.4, 8.8, 52.9],
             "colo-tride": [34.6, 80.5, 46.8, 86.5, 65.5, 66.5, 62.1, 13.6, 56.9]},
    "SOP": {"none": [0.2, 0.6, 0.3, 0.9, 0.0, 0.0, 10.0, 0.0, 1.5],
            "act": [48.2, 90.4, 45.4, 91.5, 44.6, 45.5, 58.5, 15.3, 54.9],
            "hm": [64.0, 96.8, 67.4, 98.0, 83.5, 85.0, 81.0, 45.6, 77.7],
            "colo-tride": [64.6, 97.2, 73.2, 98.0, 90.2, 92.9, 83.3, 53.6, 81.6]},
}
PAPER_SETTINGS = {"model": "pre-trained ResNet-18, last layer 512-d", "epochs": 100, "batch_size": 112,
                  "training PGD": "eps 8/255, ACT and HM 32 steps, COLO-TRIDE 16 steps (step 1/255 ramped)",
                  "data": "CUB-200-2011, Cars-196, Stanford Online Products (SOP)",
                  "attacks": "eps 8/255, step 3/255, 32 steps, every test query"}
DATASETS = tuple(PAPER_TABLE1)

DEFAULTS = {
    "full": {"train_images": 10000, "test_images": 10000, "held_out": 1000, "epochs": 8, "arch": "small-cnn",
             "width": 32, "dim": 128, "batch_size": 128, "train_steps": 8, "colo_steps": 16, "queries": 500,
             "steps": 32, "eps": 8},
    "quick": {"train_images": 1000, "test_images": 1000, "held_out": 300, "epochs": 2, "arch": "small-cnn",
              "width": 8, "dim": 16, "batch_size": 128, "train_steps": 2, "colo_steps": 2, "queries": 60,
              "steps": 4, "eps": 8},
}


def options():
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--train-images", type=int, help="training images (a fixed class-balanced subset)")
    p.add_argument("--test-images", type=int, help="test images: the queries and the gallery")
    p.add_argument("--held-out", type=int, help="test images of the per-epoch diagnostics' probe")
    p.add_argument("--epochs", type=int, help="epochs of every model (paper: 100)")
    p.add_argument("--arch", choices=("small-cnn", "resnet18"), help="network (default small-cnn; paper: resnet18)")
    p.add_argument("--width", type=int, help="channels of the first stage")
    p.add_argument("--dim", type=int, help="embedding size (paper: 512)")
    p.add_argument("--batch-size", type=int, help="images per training step (paper: 112)")
    p.add_argument("--train-steps", type=int, help="training PGD steps of naive AT, ACT and HM (paper: 32)")
    p.add_argument("--colo-steps", type=int, help="training PGD steps of COLO-TRIDE (paper: 16)")
    p.add_argument("--queries", type=int, help="attacked test items per model (paper: every test item)")
    p.add_argument("--steps", type=int, help="PGD steps of the evaluation attacks (paper: 32)")
    p.add_argument("--eps", type=int, help="L-inf radius of every attack in units of 1/255 (default and paper: 8)")
    return p


# ---- models and their evaluation ------------------------------------------------------------------

class Run:
    """The data, the models and their evaluations of one run; ``sizes`` are clipped in place to the data."""

    def __init__(self, exp: Experiment, sizes: dict):
        from minrr.backends.models import ModelSpec

        self.exp, self.sizes = exp, sizes
        self.train = exp.data("train", sizes["train_images"])
        self.test = exp.data("test", sizes["test_images"])
        self.held_out = exp.data("test", sizes["held_out"])
        for key, (_, labels) in (("train_images", self.train), ("test_images", self.test),
                                 ("held_out", self.held_out)):
            sizes[key] = len(labels)  # a size above the split's is the whole split
        sizes["queries"] = min(sizes["queries"], sizes["test_images"])
        self.source = "bundled" if exp.quick else "fashion-mnist"
        self.eps = sizes["eps"] * PIXEL
        self.spec = ModelSpec(sizes["arch"], 1, "embedding", sizes["dim"], width=sizes["width"], mean=(0.29,),
                              std=(0.35,))

    def defence(self, defense: str) -> dict:
        """The settings of ``defense`` (:func:`~minrr.backends.defences.defence_settings`) at this run's steps."""
        from minrr.backends.defences import defence_settings

        if defense == "none":
            return defence_settings("dml", "none")
        steps = self.sizes["colo_steps" if defense == "colo-tride" else "train_steps"]
        return defence_settings("dml", defense, attack_steps=steps, attack_alpha=max(PIXEL, self.eps / steps),
                                attack_eps=self.eps)

    def identity(self, defense: str) -> dict:
        """What determines the model trained with ``defense`` (the settings of its evaluations)."""
        return {"spec": self.spec.to_dict(), "defence": self.defence(defense), "epochs": self.sizes["epochs"],
                "batch_size": self.sizes["batch_size"], "train": [self.source, self.sizes["train_images"]],
                "seed": self.exp.seed}

    def model(self, defense: str):
        """The model trained with ``defense`` and its per-epoch diagnostics (epochs x DIAGNOSTICS)."""
        images, labels = self.train
        return self.exp.train(f"model-{defense}", self.spec, images, labels, task="dml", defense=defense,
                              epochs=self.sizes["epochs"], held_out=self.held_out,
                              batch_size=self.sizes["batch_size"], settings=self.defence(defense))

    def benign(self, defense: str, model) -> dict:
        """Benign R@1, R@2, mAP, NMI (and mAP@R, R-precision) of the test split, robrank's protocol."""
        import torch

        from minrr.metrics.report import retrieval_metrics

        images, labels = self.test
        settings = {**self.identity(defense), "test": [self.source, self.sizes["test_images"]]}

        def compute():
            threads = torch.get_num_threads()
            try:
                return retrieval_metrics(self.exp.backend.embed(model, images), labels, ks=(1, 2), seed=self.exp.seed)
            finally:  # numba's OpenMP threads share libgomp with torch and change its thread count
                torch.set_num_threads(threads)

        return self.exp.step(f"benign-{defense}", settings, compute)

    def attacks(self, defense: str, model) -> dict:
        """The robrank suite's ``minrr-attacks/1`` record on the test split."""
        from minrr.backends.ml_attacks import ROBRANK_ALPHA, robrank_suite

        images, labels = self.test
        steps = self.sizes["steps"]
        attack = {"eps": self.eps, "alpha": max(ROBRANK_ALPHA, 2 * self.eps / steps), "steps": steps,
                  "max_queries": self.sizes["queries"]}
        settings = {**self.identity(defense), "test": [self.source, self.sizes["test_images"]], **attack}
        return self.exp.step(f"attacks-{defense}", settings, lambda: robrank_suite(
            model, images, labels, **attack, seed=self.exp.seed, device=self.exp.backend.device, progress=True,
            meta={"model": NAMES[defense], "dataset": f"Fashion-MNIST ({self.source})"}))


def standard_errors(record: dict) -> dict:
    """Approximate standard errors of ERS and the averaged ARS over the attacked queries.

    Each term with a per-query outcome contributes its sampling error: the rank attacks the
    standard deviation of their per-trial ranks after the attack over sqrt(n), the R@1 attacks
    and GTT the binomial sqrt(p (1 - p) / n); TMA and ES:D, whose record keeps only a mean,
    contribute none. The terms are taken as independent: ERS's error is the root sum of squares
    of its terms' errors over 10, ARS's over 8.
    """
    entries = {e["attack"]: e for e in record["attacks"]}
    benign = 100.0 * record["benign_r1"]
    ers_var = ars_var = 0.0
    for term in ARS_COLUMNS:
        if term in RANK_GOALS:
            after, before = np.asarray(entries[term]["rank_after"]), np.asarray(entries[term]["rank_before"])
            se = 100.0 * after.std(ddof=1) / math.sqrt(len(after))
            ars_se = se / abs(RANK_GOALS[term] - before.mean())
        else:
            entry = entries[RECALL_TERMS.get(term, term)]
            p = entry["r1_after"] if term in RECALL_TERMS else entry["retained"]
            se = 100.0 * math.sqrt(p * (1.0 - p) / entry["params"]["trials"])
            ars_se = 100.0 * se / benign if term in RECALL_TERMS else se
        ers_var += (ERS_SCALE.get(term, 1.0) * se) ** 2
        ars_var += ars_se ** 2
    return {"ers": math.sqrt(ers_var) / len(ERS_COLUMNS), "ars": math.sqrt(ars_var) / len(ARS_COLUMNS)}


def evaluate(run: Run, defense: str, model) -> dict:
    """Benign metrics (fractions), the ERS and ARS terms (percent), ERS, ARS and their errors."""
    from minrr.scores import parse_attack_record, score

    metrics = run.benign(defense, model)
    record = run.attacks(defense, model)
    scores = score(parse_attack_record(record)).to_dict()
    entries = {e["attack"]: e for e in record["attacks"]}
    return {"benign": {name: metrics[key] for name, key in BENIGN_KEYS.items()},
            "benign_other": {k: v for k, v in metrics.items() if k not in BENIGN_KEYS.values()},
            "attacked_benign_r1": scores["benign_r1"],
            "raw": {t["name"]: t["raw"] for t in scores["terms"]},
            "ers_terms": {t["name"]: t["ers"] for t in scores["terms"]},
            "ars_terms": {t["name"]: t["ars"] for t in scores["terms"] if t["ars"] is not None},
            "ERS": scores["ers"], "ARS": scores["ars"], "standard_error": standard_errors(record),
            "rank_before": {t: float(np.mean(entries[t]["rank_before"])) for t in RANK_GOALS},
            "attack_params": {name: e["params"] for name, e in entries.items()}}


def diagnostics_table(rows: list) -> list[dict]:
    """Per-epoch diagnostics as dicts (NaN -> None, for JSON)."""
    from minrr.backends.defences import DIAGNOSTICS

    return [{k: (None if not math.isfinite(v) else (int(v) if k == "epoch" else v)) for k, v in zip(DIAGNOSTICS, row)}
            for row in rows]


# ---- comparison rows: ours and the paper's in one shape --------------------------------------------

def our_rows(results: dict) -> dict:
    """``{defence: {column: value}}`` of our numbers, in the papers' units (percent, cosine, shift)."""
    rows = {}
    for d in DEFENCES:
        r = results["evaluation"][d]
        rows[d] = {**{k: 100.0 * v for k, v in r["benign"].items()}, **r["raw"], "ERS": r["ERS"],
                   **{f"ARS {k}": v for k, v in r["ars_terms"].items()}, "ARS": r["ARS"],
                   **{f"ERS {k}": v for k, v in r["ers_terms"].items()}}
    return rows


def paper_rows(dataset: str) -> dict:
    """The paper's ``{defence: {column: value}}`` for one data set, the shape of :func:`our_rows`."""
    from minrr.scores import ers_terms

    rows = {}
    for d in DEFENCES:
        t1, t2 = PAPER_TABLE1[dataset][d], PAPER_TABLE2[dataset][d]
        row = dict(zip(("PGD steps", *BENIGN, *ERS_COLUMNS, "ERS"), t1))
        row.update({f"ARS {k}": v for k, v in zip(ARS_COLUMNS, t2)})
        row["ARS"] = t2[-1]
        row.update({f"ERS {k}": v for k, v in ers_terms({t: row[t] for t in ERS_COLUMNS}).items()})
        rows[d] = row
    return rows


def paper_inconsistencies(rounding: float = 0.15) -> list[str]:
    """The paper's ERS and averaged ARS that do not follow from its own printed terms (beyond ``rounding``)."""
    from minrr.scores import ers

    notes = []
    for ds in DATASETS:
        for d, row in paper_rows(ds).items():
            computed = ers({t: row[t] for t in ERS_COLUMNS})
            if abs(computed - row["ERS"]) > rounding:
                notes.append(f"{ds} {NAMES[d]}: ERS printed {row['ERS']:g}, {computed:.2f} from its terms")
            terms = [row[f"ARS {t}"] for t in ARS_COLUMNS if row[f"ARS {t}"] is not None]
            if abs(np.mean(terms) - row["ARS"]) > rounding:
                notes.append(f"{ds} {NAMES[d]}: averaged ARS printed {row['ARS']:g}, {np.mean(terms):.2f} from its "
                             f"{len(terms)} printed terms")
    return notes


# ---- claims ---------------------------------------------------------------------------------------

def _ranking(rows: dict, key: str) -> list[str]:
    return sorted(DEFENCES, key=lambda d: rows[d][key])


WEAK_ADVERSARY = ("COLO-TRIDE's step (t / T) and semi-hard band ramp over the epochs; over few epochs its "
                  "adversary stays weak for most of training.")


def _score_claims(score: str, the_score: str, bare: str, table: int) -> list[tuple]:
    """The two claims of Table ``table`` on ``score`` (ERS or ARS; named ``the_score``, or ``bare``
    after "a higher"): every defence raises it over no defence, and COLO-TRIDE's is higher than HM's
    and ACT's (entries of :data:`CLAIMS`)."""
    return [
        (f"Every defence raises {the_score} over no defence (Table {table})", score,
         lambda r: all(r[d][score] > r["none"][score] for d in DEFENCES[1:]),
         lambda r: f"{r['none'][score]:.1f} -> " + ", ".join(f"{r[d][score]:.1f}" for d in DEFENCES[1:]),
         "a defence trained for few epochs may not yet have left the undefended model's robustness."),
        (f"COLO-TRIDE has a higher {bare} than HM and ACT (Table {table})", score,
         lambda r: r["colo-tride"][score] > max(r["hm"][score], r["act"][score]),
         lambda r: f"{r['colo-tride'][score]:.1f} vs {r['hm'][score]:.1f}, {r['act'][score]:.1f}",
         WEAK_ADVERSARY),
    ]


CLAIMS = [
    # (claim, score compared or None, test(rows) -> bool, numbers(rows) -> str, why it may fail here: a
    # str.format template of the run's sizes)
    ("Every defence lowers benign R@1 below no defence's (Table 1)", None,
     lambda r: all(r[d]["R@1"] < r["none"]["R@1"] for d in DEFENCES[1:]),
     lambda r: f"{r['none']['R@1']:.1f} -> " + ", ".join(f"{r[d]['R@1']:.1f}" for d in DEFENCES[1:]),
     "Fashion-MNIST's 10 coarse classes leave a small model room to keep its R@1 under an eps of {eps}/255."),
    ("COLO-TRIDE's benign R@1 is no lower than HM's (Tables 1, 2)", None,
     lambda r: r["colo-tride"]["R@1"] >= r["hm"]["R@1"],
     lambda r: f"{r['colo-tride']['R@1']:.1f} vs {r['hm']['R@1']:.1f}",
     "COLO-TRIDE trains with {colo_steps} PGD steps against HM's {train_steps} here (the paper: 16 against 32), "
     "and minrr's COLO-TRIDE has no early disabling of the 'assist' adversary, which the paper credits with its "
     "accuracy (Table 4)."),
    *_score_claims("ERS", "ERS", "ERS", 1),
    *_score_claims("ARS", "the averaged ARS", "averaged ARS", 2),
    ("COLO-TRIDE beats HM on most of the eight ARS attacks (Sec. 4.1: 'almost all attacks')", None,
     lambda r: sum(r["colo-tride"][f"ARS {t}"] > r["hm"][f"ARS {t}"] for t in ARS_COLUMNS) > len(ARS_COLUMNS) / 2,
     lambda r: f"{sum(r['colo-tride'][f'ARS {t}'] > r['hm'][f'ARS {t}'] for t in ARS_COLUMNS)} of 8",
     WEAK_ADVERSARY),
    ("COLO-TRIDE scores lower than HM on TMA and GTM (ERS terms; Sec. 4.1)", None,
     lambda r: r["colo-tride"]["ERS TMA"] < r["hm"]["ERS TMA"] and r["colo-tride"]["ERS GTM"] < r["hm"]["ERS GTM"],
     lambda r: (f"TMA {r['colo-tride']['ERS TMA']:.1f} vs {r['hm']['ERS TMA']:.1f}, "
                f"GTM {r['colo-tride']['ERS GTM']:.1f} vs {r['hm']['ERS GTM']:.1f}"),
     "the paper explains both by the embedding shrinkage of adversarial training and COLO-TRIDE's top-ranked "
     "terms; a small model on 10 classes shrinks differently."),
    ("ARS orders the four models like ERS (Tables 1, 2)", "ARS",
     lambda r: _ranking(r, "ERS") == _ranking(r, "ARS"),
     lambda r: (" < ".join(NAMES[d] for d in _ranking(r, "ERS")) + " (ERS); "
                + " < ".join(NAMES[d] for d in _ranking(r, "ARS")) + " (ARS)"),
     "ARS discounts each attack by its starting point and drops TMA and ES:D; close models can swap places."),
]
"""The claims of Tables 1 and 2, each checked on the paper's rows (per data set) and on ours."""


def _close_calls(key: str | None, rows: dict, errors: dict) -> str:
    """A note naming the pairs of models whose ``key`` (ERS or ARS) differ by less than two standard errors."""
    if key is None:
        return ""
    pairs = [(a, b) for i, a in enumerate(DEFENCES) for b in DEFENCES[i + 1:]]
    close = [f"{NAMES[a]} - {NAMES[b]} = {rows[a][key] - rows[b][key]:+.1f}" for a, b in pairs
             if abs(rows[a][key] - rows[b][key]) < 2 * math.hypot(errors[a][key.lower()], errors[b][key.lower()])]
    return f" {key} differences within two standard errors here: {', '.join(close)}." if close else ""


def claims(results: dict, sizes: dict) -> list[dict]:
    """Each claim: the paper's numbers and verdict per data set, ours, whether it holds here, and why not."""
    ours = our_rows(results)
    errors = {d: results["evaluation"][d]["standard_error"] for d in DEFENCES}
    setting = (f"Here: Fashion-MNIST (10 classes, 28 x 28 gray, {sizes['train_images']} training images), a "
               f"{sizes['arch']} of width {sizes['width']} trained from scratch for {sizes['epochs']} epochs, "
               f"eps {sizes['eps']}/255, {sizes['queries']} attacked queries with {sizes['steps']} PGD steps; "
               "the paper: "
               f"{PAPER_SETTINGS['model']}, {PAPER_SETTINGS['epochs']} epochs on fine-grained CUB, CARS, SOP.")
    out = []
    for text, key, test, numbers, why in CLAIMS:
        paper = "; ".join(f"{ds}: {numbers(paper_rows(ds))} ({'yes' if test(paper_rows(ds)) else 'no'})"
                          for ds in DATASETS)
        holds = bool(test(ours))
        why = why.format(**sizes)
        out.append({"claim": text, "paper": paper, "ours": numbers(ours), "holds": holds,
                    "explanation": "" if holds else
                    f"{why[0].upper()}{why[1:]}{_close_calls(key, ours, errors)} {setting}"})
    out += collapse_claims(results, setting)
    return out


def collapse_claims(results: dict, setting: str) -> list[dict]:
    """Fig. 3's claims, on the last epoch of the training-minibatch diagnostics: naive AT has collapsed
    when its separability (or spread) is below COLLAPSED times COLO-TRIDE's, and COLO-TRIDE's stays positive."""
    last = {d: results["diagnostics"][d][-1] for d in ("naive", "colo-tride")}
    naive_sep, colo_sep = last["naive"]["train_separability"], last["colo-tride"]["train_separability"]
    naive_spread = last["naive"]["train_mean_pairwise_distance"]
    colo_spread = last["colo-tride"]["train_mean_pairwise_distance"]
    epochs = len(results["diagnostics"]["naive"])
    collapse = colo_sep > 0 and naive_sep < COLLAPSED * colo_sep
    shrink = naive_spread < COLLAPSED * colo_spread
    return [
        {"claim": f"Naive AT collapses (training separability -> 0: below {COLLAPSED:g} x COLO-TRIDE's at the last "
                  "epoch), COLO-TRIDE does not (its separability stays > 0) (Fig. 3)",
         "paper": "CUB, Fig. 3 (a plot; no numbers in the text): naive AT's separability 'starts in the negative "
                  "region, quickly raises zero and fluctuates around 0'; COLO-TRIDE's 'remains positive'",
         "ours": f"epoch {epochs}: naive AT {naive_sep:.3f}, COLO-TRIDE {colo_sep:.3f}", "holds": bool(collapse),
         "explanation": "" if collapse else
         "Naive AT's collapse builds over many epochs of maximised hardness; over "
         f"{epochs} epochs it may not have set in. {setting}"},
        {"claim": f"Naive AT shrinks the embedding: its mean pairwise distance falls below {COLLAPSED:g} x "
                  "COLO-TRIDE's (Fig. 3)",
         "paper": "CUB, Fig. 3: naive AT's average distance 'plunges to 0', COLO-TRIDE's shows 'a minor overall "
                  "shrinkage'",
         "ours": f"epoch {epochs}: naive AT {naive_spread:.3f}, COLO-TRIDE {colo_spread:.3f}", "holds": bool(shrink),
         "explanation": "" if shrink else
         f"The embedding's shrinkage under naive AT builds over many epochs. {setting}"},
    ]


# ---- the page -------------------------------------------------------------------------------------

def _cell(column: str, value) -> str:
    """A table cell: TMA's cosine and ES:D's shift with three decimals, percentages with one."""
    if value is None:
        return "n/a"
    return f"{value:.3f}" if column in ("TMA", "ES:D") else f"{value:.1f}"


def figure(exp: Experiment, diagnostics: dict):
    """Fig. 3: the diagnostics of every model over the epochs, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [("train_mean_pairwise_distance", "mean pairwise distance (training minibatches)"),
              ("train_separability", "separability (training minibatches)"),
              ("mean_pairwise_distance", "mean pairwise distance (held-out)"),
              ("separability", "separability (held-out)"),
              ("collapseness", "collapseness C (held-out)"),
              ("recall_at_1", "R@1 (held-out)")]
    styles = {"none": ("0.5", ":"), "naive": ("tab:red", "-"), "act": ("tab:green", "--"),
              "hm": ("tab:purple", "--"), "colo-tride": ("tab:blue", "-")}
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, title) in zip(axes.flat, panels):
        for d in FIGURE_DEFENCES:
            rows = diagnostics[d]
            values = [np.nan if r[key] is None else r[key] for r in rows]
            if np.isfinite(values).any():
                color, style = styles[d]
                ax.plot([r["epoch"] for r in rows], values, style, marker="o", ms=3, color=color, label=NAMES[d],
                        lw=2 if d in ("naive", "colo-tride") else 1)
        if "separability" in key or key == "collapseness":
            ax.axhline(0.0, color="k", lw=0.5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1, 2].legend(fontsize=8)  # every model has held-out values; plain training has no minibatch ones
    fig.suptitle("Collapse diagnostics over training (COLO-TRIDE Fig. 3 on Fashion-MNIST)")
    fig.tight_layout()
    return exp.figure("colotride-fig3.png", fig)


def page(exp: Experiment, results: dict, sizes: dict, cmd: str) -> str:
    ours = our_rows(results)
    evaluation = results["evaluation"]
    attack = evaluation["none"]["attack_params"]["CA+"]
    lines = [exp.header("COLO-TRIDE: collapse-oriented adversarial training for robust retrieval", cmd)]
    settings_rows = [
        ["data", f"Fashion-MNIST: {sizes['train_images']} training images (class-balanced subset), "
                 f"{sizes['test_images']} test images as queries and gallery", PAPER_SETTINGS["data"]],
        ["model", f"{sizes['arch']}, width {sizes['width']}, {sizes['dim']}-d embedding, from scratch",
         PAPER_SETTINGS["model"]],
        ["training", f"{sizes['epochs']} epochs, batch {sizes['batch_size']}, Adam 1e-3, triplet margin 0.2",
         f"{PAPER_SETTINGS['epochs']} epochs, batch {PAPER_SETTINGS['batch_size']}, Adam, triplet margin 0.2"],
        ["training PGD", f"eps {sizes['eps']}/255; naive AT, ACT, HM {sizes['train_steps']} steps, COLO-TRIDE "
                         f"{sizes['colo_steps']} steps (step max(1/255, eps / steps), COLO-TRIDE's ramped)",
         PAPER_SETTINGS["training PGD"]],
        ["attacks", f"eps {sizes['eps']}/255, step {attack['alpha'] * 255:.2f}/255, {sizes['steps']} steps, "
                    f"{attack['trials']} attacked test items per model", PAPER_SETTINGS["attacks"]],
    ]
    lines.append("### Settings\n")
    lines.append(markdown_table(["", "here", "paper"], settings_rows))

    def table(columns, value, total):
        rows = []
        for d in DEFENCES:
            rows.append([NAMES[d], "ours (Fashion-MNIST)", *[_cell(c, value(ours, d, c)) for c in columns],
                         f"{ours[d][total]:.1f} ± {evaluation[d]['standard_error'][total.lower()]:.1f}"])
            for ds in DATASETS:
                paper = paper_rows(ds)
                rows.append(["", f"paper ({ds})", *[_cell(c, value(paper, d, c)) for c in columns],
                             _cell(total, paper[d][total])])
        return rows

    lines.append("### Table 1: benign metrics and the robrank attacks (ERS)\n\n"
                 "Percent but TMA (cosine to the target after the attack) and ES:D (embedding shift); CA+, QA+ "
                 "rank percentiles after the attack (lower: the attack succeeded), CA-, QA- likewise (higher: it "
                 "succeeded); ES:R, LTM, GTM R@1 after the attack; GTT the share keeping their top-1 item in the "
                 "top 4. ERS: the mean of the ten normalised terms (± our approximate standard error from the "
                 "attacked queries' sampling). The paper's R@1 to NMI are over its full test sets, ours over "
                 f"{sizes['test_images']} images.\n")
    columns = (*BENIGN, *ERS_COLUMNS)
    lines.append(markdown_table(["defence", "source", *columns, "ERS"],
                                table(columns, lambda rows, d, c: rows[d][c], "ERS")))
    lines.append("### Table 2: adversarial resistance scores (ARS, percent)\n\n"
                 "The share of each attack's intended change that did not happen (minrr.scores); the averaged "
                 "ARS is the mean of the eight (± as above). The paper prints CUB's undefended CA- as '0/0'.\n")
    columns = (*BENIGN, *ARS_COLUMNS)
    lines.append(markdown_table(["defence", "source", *columns, "avg ARS"],
                                table(columns, lambda rows, d, c: rows[d][c if c in BENIGN else f"ARS {c}"], "ARS")))
    notes = paper_inconsistencies()
    if notes:
        lines.append("The paper's scores that do not follow from its own printed terms (computed here with "
                     "minrr.scores): " + "; ".join(notes) + ".\n")

    lines.append("### Fig. 3: collapse diagnostics over the epochs\n\n"
                 "Training minibatches: the mean over the epoch's minibatches of the spread (mean pairwise "
                 "distance) and separability ((mean d_an - mean d_ap) / spread, over the mined triplets) of the "
                 "embeddings the model is trained on (adversarial under a defence), as the paper's Fig. 3; none for "
                 f"plain training. Held-out: the clean embeddings of {sizes['held_out']} test images after each "
                 "epoch (separability over all pairs, collapseness C with lambda 10 over one random triplet per "
                 "image, R@1 each image its own query).\n\n![Fig. 3](colotride-fig3.png)\n")
    keys = ("train_mean_pairwise_distance", "train_separability", "mean_pairwise_distance", "separability",
            "collapseness", "recall_at_1")
    rows = [[NAMES[d], r["epoch"], *[("n/a" if r[k] is None else f"{r[k]:.3f}") for k in keys]]
            for d in FIGURE_DEFENCES for r in results["diagnostics"][d]]
    lines.append(markdown_table(["model", "epoch", "train spread", "train separability", "held-out spread",
                                 "held-out separability", "held-out C", "held-out R@1"], rows))
    lines.append("### Claims\n\nWhether each claim's direction holds, on the paper's numbers (per data set) and "
                 "on ours, is computed from the numbers above.\n")
    lines.append(markdown_table(["claim", "paper", "ours", "holds here", "why not"],
                                [[c["claim"], c["paper"], c["ours"], "yes" if c["holds"] else "no",
                                  c["explanation"]] for c in results["claims"]]))
    lines.append("All our numbers, with every model's per-epoch diagnostics: [colotride.json](colotride.json).\n")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = options().parse_args(argv)
    sizes = sizes_of(args, DEFAULTS, options())
    exp = Experiment("colotride", args)
    exp.log(f"sizes: {json.dumps(sizes)}")
    run = Run(exp, sizes)
    results = {"settings": sizes, "evaluation": {}, "diagnostics": {}}
    for defense in FIGURE_DEFENCES:
        model, diagnostics = run.model(defense)
        results["diagnostics"][defense] = diagnostics_table(diagnostics)
        if defense in DEFENCES:
            results["evaluation"][defense] = evaluate(run, defense, model)
    results["claims"] = claims(results, sizes)
    for c in results["claims"]:
        if not c["holds"]:
            exp.log(f"claim does not hold: {c['claim']}: {c['explanation']}")
    figure(exp, results["diagnostics"])
    results["paper"] = {"table1": PAPER_TABLE1, "table2": PAPER_TABLE2, "settings": PAPER_SETTINGS}
    exp.write("colotride.json", json.dumps(results, indent=1, sort_keys=True) + "\n")
    exp.write("colotride.md", page(exp, results, sizes, command("reproduce_colotride.py", sizes, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
