"""``minrr attack``: adversarial queries against a trained model, written for the detectors and scores.

Deep-hashing attacks (``--attack``, :mod:`minrr.backends.hashing_attacks`) write ``adv.npz``:

=================  ======================================================================
``x_adv``          (n, C, H, W) float32, the adversarial images exactly as attacked
``f``, ``f_t``     (n, K) float32, the model's outputs on them and on their 3 x 3
                   mean-blurred copies: what ``minrr detect score --inputs`` reads
``index``          (n,) int64, the clean images' rows in ``--data``
``labels``         (n,) int64, their labels
``target_labels``  (n,) int64 and ``anchors`` (n, K) int8, for targeted attacks only
``settings``       a 0-d string array: the attack's settings as JSON
=================  ======================================================================

Images go through in batches of ``--batch-size``; every random draw of image i depends only
on (``--seed``, i), so the batch size changes nothing but speed. Each finished batch is
appended to ``adv.npz.partial`` (a sequence of ``.npy`` records: a JSON header with the
run's settings, then index, x_adv, f and f_t of each batch). A rerun with the same settings
checks the header and every batch in it (rows, shapes, pixels inside the eps-ball of the
clean images) and goes on after the last complete batch; the partial file is removed only
once ``adv.npz`` is written.

The metric-learning suite (``--suite robrank --out record.json``, :mod:`minrr.backends.ml_attacks`)
slots in beside the hashing attacks: its flags are their own argument group of
:func:`register`, and :func:`run` sends a run with ``--suite`` to :func:`run_suite`, before
:func:`run_hashing`, which requires ``--attack``. The shared flags (``--model``, ``--data``,
``--labels``, ``--device``, ``--batch-size``, ``--seed``, ``--out``, ``--eps``, ``--alpha``,
``--steps``) and :func:`fraction` serve both; the suite takes ``--max-queries`` (a seeded
subset of queries against the whole gallery) instead of ``--max``. Each finished attack of
the suite is saved to ``record.json.partial``; a rerun with the same settings takes the
finished attacks from it, and the partial file is removed once the record is written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from fractions import Fraction
from pathlib import Path

import numpy as np

from minrr.cli.flags import flag_message
from minrr.cli.outputs import Files
from minrr.data.loaders import load_dataset, to_unit_float
from minrr.io import load_npy

ATTACK_NAMES = ("hamming", "dhta", "cw", "detector")
"""minrr.backends.hashing_attacks.ATTACKS, named here so that the parser never imports torch."""
SUITES = ("robrank",)
SUITE_PARTIAL_FORMAT = "minrr-attacks-partial/1"
PARTIAL_FORMAT = "minrr-attack-partial/1"
BATCH_ARRAYS = ("index", "x_adv", "f", "f_t")

# Library argument names, as the attacks' messages start, and their flags.
FLAGS = {"eps": "--eps", "alpha": "--alpha", "steps": "--steps", "lr": "--lr", "c": "--c", "kappa": "--kappa",
         "lambda1": "--lambda1", "lambda2": "--lambda2", "n_t": "--n-t", "targeted_label": "--targeted-label",
         "database": "--database", "database_labels": "--database-labels", "batch_size": "--batch-size",
         "device": "--device", "seed": "--seed", "blur": "--blur", "scale": "--scale"}
# Flag of each setting of minrr.backends.hashing_attacks.DEFAULTS (attribute of args, flag).
SETTING_FLAGS = {"eps": "--eps", "alpha": "--alpha", "steps": "--steps", "random_start": "--random-start",
                 "lr": "--lr", "c": "--c", "kappa": "--kappa", "lambda1": "--lambda1", "lambda2": "--lambda2",
                 "n_t": "--n-t", "scale": "--scale", "blur": "--blur"}


def fraction(text: str) -> float:
    """A number written as a decimal or a fraction (``8/255``), for argparse."""
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction such as 8/255, got {text!r}") from None


def _scale(text: str):
    return text if text == "dhta" else fraction(text)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "attack",
        help="attack a trained model: deep-hashing attacks (UMCD's evaluation) written for minrr detect, "
             "or the metric-learning suite (--suite robrank) written for minrr score",
        description="Attack the queries of --data through a checkpoint of minrr train on its device, in "
                    "resumable batches, and write the adversarial images with the model's outputs on them "
                    "(adv.npz, read by minrr detect score --inputs); or, with --suite robrank, run robrank's "
                    "nine metric-learning attacks on the test split and write their attack record "
                    "(record.json, read by minrr score). Numbers such as --eps accept fractions: "
                    "8/255. Needs PyTorch.",
    )
    p.add_argument("--model", required=True, metavar="model.pt", help="weights file; its model card (.json) beside it")
    p.add_argument("--data", required=True, metavar="SOURCE",
                   help="the clean queries: bundled:test, fashion-mnist:test, a folder, images.npz, or "
                        "images.npy / an IDX file with --labels")
    p.add_argument("--labels", metavar="y.npy", help="labels of --data when it is a .npy or IDX image file")
    p.add_argument("--out", required=True, metavar="adv.npz", help="where to write the adversarial queries")
    p.add_argument("--max", type=int, metavar="N", help="attack only the first N images of --data")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default: 256); the result "
                                                               "does not depend on it")
    p.add_argument("--seed", type=int, default=0, help="seed of the random starts, targets and anchors (default: 0)")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cuda when available)")
    p.add_argument("--eps", type=fraction, help="l-inf radius in pixels in [0, 1] (default: 8/255; detector: 32/255)")
    p.add_argument("--alpha", type=fraction, help="PGD step size (default: 1/255)")
    p.add_argument("--steps", type=int, help="gradient steps (default: 100; cw: 500)")
    p.add_argument("--random-start", action="store_true", help="PGD from a uniform point of the eps-ball")

    hashing = p.add_argument_group("deep-hashing attacks (a hashing model)")
    hashing.add_argument("--attack", choices=ATTACK_NAMES,
                         help="hamming: untargeted, away from the clean code; dhta: targeted, towards the "
                              "anchor code of a target class; cw: untargeted Carlini-Wagner (Adam); detector: "
                              "UMCD's white-box attack on its own detector")
    hashing.add_argument("--targeted-label", metavar="LABEL|random",
                         help="dhta (default: random) and detector (default: untargeted): the target class, "
                              "or 'random', one per query among the other classes")
    hashing.add_argument("--database", metavar="db.npy",
                         help="targeted attacks: (N, K) database codes ({-1, 1} or {0, 1}) to draw anchors from, "
                              "with --database-labels (default: the codes of --database-data)")
    hashing.add_argument("--database-labels", metavar="y.npy",
                         help="labels of --database, or of --database-data when it is a .npy or IDX image file")
    hashing.add_argument("--database-data", metavar="SOURCE",
                         help="targeted attacks: database images, coded by the model (default: the model card's "
                              "training data)")
    hashing.add_argument("--n-t", type=int, help="dhta: database codes voted into an anchor (default: 9)")
    hashing.add_argument("--scale", type=_scale, metavar="dhta|S",
                         help="dhta: tanh scale of the outputs, 'dhta' for DHTA's schedule by step (default) "
                              "or a number")
    hashing.add_argument("--lr", type=fraction, help="cw: Adam's learning rate (default: 0.01)")
    hashing.add_argument("--c", type=fraction, help="cw: weight of the code term (default: 10)")
    hashing.add_argument("--kappa", type=fraction, help="cw: success margin (default: 0)")
    hashing.add_argument("--lambda1", type=fraction, help="detector: weight of the quantization loss C2 "
                                                          "(default: 0.0075)")
    hashing.add_argument("--lambda2", type=fraction, help="detector: weight of the blur disagreement C3 "
                                                          "(default: 0.3)")
    hashing.add_argument("--blur", type=int, help="detector: side of the mean blur t (default: 3)")

    suite = p.add_argument_group("metric-learning attack suite (an embedding model)")
    suite.add_argument("--suite", choices=SUITES,
                       help="robrank: CA+, CA-, QA+, QA-, TMA, ES, LTM, GTM, GTT on the test split of --data "
                            "(queries = gallery, own item excluded; defaults eps 8/255, alpha 3/255, 32 steps), "
                            "written as the attack record --out record.json that minrr score reads")
    suite.add_argument("--attacks", metavar="CA+,QA-,...",
                       help="--suite: run only these attacks (default: all nine; minrr score needs all nine)")
    suite.add_argument("--max-queries", type=int, metavar="N",
                       help="--suite: attack a seeded subset of N test items (the gallery stays the whole split)")
    suite.add_argument("--robrank-compat", action="store_true",
                       help="--suite: reproduce robrank's GTM target and LTM positives quirks (see the README)")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.suite is not None:
        return run_suite(args)
    return run_hashing(args)


def _settings(args, name: str) -> dict:
    """The attack's settings: its defaults, updated by the flags given; flags of other attacks refused."""
    from minrr.backends.hashing_attacks import DEFAULTS

    given = {key: getattr(args, key) for key in SETTING_FLAGS
             if getattr(args, key) not in (None, False)}
    for key in given:
        if key not in DEFAULTS[name]:
            raise ValueError(f"{SETTING_FLAGS[key]}: not a setting of the {name} attack (its settings: "
                             f"{', '.join(SETTING_FLAGS[k] for k in DEFAULTS[name])})")
    return {**DEFAULTS[name], **given}


def _target(args, name: str):
    """None (untargeted), "random", or a class label."""
    text = args.targeted_label
    if name in ("hamming", "cw"):
        if text is not None:
            raise ValueError(f"--targeted-label: the {name} attack is untargeted")
        return None
    if text is None:
        return "random" if name == "dhta" else None
    if text == "random":
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--targeted-label: expected a class label (a whole number) or 'random', "
                         f"got {text!r}") from None


def _database(args, backend, model, card, size):
    """(codes, labels, a record of where they came from) for the anchors of a targeted attack."""
    if args.database is not None:
        if args.database_data is not None:
            raise ValueError("--database: give --database or --database-data, not both")
        if args.database_labels is None:
            raise ValueError("--database-labels: required with --database (one label per code)")
        codes = load_npy(args.database, name="--database")
        labels = load_npy(args.database_labels, name="--database-labels")
        if codes.ndim != 2 or codes.shape[1] != model.spec.dim:
            raise ValueError(f"--database: expected (N, {model.spec.dim}) codes of the model's {model.spec.dim} "
                             f"bits, got shape {codes.shape}")
        digest = _digest(codes, labels)
        return codes, labels, {"database": str(Path(args.database).resolve()), "sha256": digest}
    source = args.database_data or card.get("data", {}).get("train")
    if source is None:
        raise ValueError("--database-data: required (the model card records no training data)")
    data = load_dataset(source, args.database_labels, size=size, name="--database-data",
                        labels_name="--database-labels")
    out = backend.embed(model, data.images, batch_size=args.batch_size)
    return np.where(out >= 0, 1, -1).astype(np.int8), data.labels, {"database_data": source,
                                                                     "sha256": data.fingerprint()}


def _digest(*arrays) -> str:
    digest = hashlib.sha256()
    for arr in arrays:
        digest.update(str((arr.shape, arr.dtype.str)).encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()


class PartialBatches:
    """Finished batches of one run, appended to ``out.partial`` (see the module docstring)."""

    def __init__(self, path: Path, header: dict):
        self.path, self.header = path, header
        self.batches: list[dict] = []

    def resume(self, check) -> None:
        """Read the batches of an existing partial file, each validated by ``check(k, batch)``
        (ValueError if bad); a batch cut short by an interruption is dropped."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            try:
                header = json.loads(str(np.load(fh, allow_pickle=False)))
            except (ValueError, EOFError, OSError, json.JSONDecodeError):
                raise ValueError(f"--out: {self.path} is not a partial result of minrr attack; "
                                 "delete it to start over") from None
            if not isinstance(header, dict) or header.get("format") != PARTIAL_FORMAT:
                raise ValueError(f"--out: {self.path} is not a partial result of minrr attack; "
                                 "delete it to start over")
            changed = [f"{key} {header.get(key)!r} there, {value!r} now" for key, value in self.header.items()
                       if header.get(key) != value]
            if changed:
                raise ValueError(f"--out: {self.path} was made with other settings ({'; '.join(changed)}); "
                                 "rerun with its settings to resume, or delete it to start over")
            complete = fh.tell()
            while True:
                try:
                    batch = {key: np.load(fh, allow_pickle=False) for key in BATCH_ARRAYS}
                except (ValueError, EOFError, OSError):
                    break
                check(len(self.batches), batch)
                self.batches.append(batch)
                complete = fh.tell()
        with open(self.path, "r+b") as fh:
            fh.truncate(complete)

    def start(self) -> None:
        if not self.path.exists():
            with open(self.path, "wb") as fh:
                np.save(fh, np.array(json.dumps(self.header, sort_keys=True)))

    def append(self, batch: dict) -> None:
        with open(self.path, "ab") as fh:
            for key in BATCH_ARRAYS:
                np.save(fh, batch[key])
            fh.flush()
            os.fsync(fh.fileno())
        self.batches.append(batch)

    def abandon(self) -> None:
        """After an error: remove the partial file if it holds no batch."""
        if not self.batches and self.path.exists():
            self.path.unlink()


def _batch_check(x_all, batch_size: int, n_bits: int, radius: float):
    """The validator of resumed batch k: its rows, shapes, values and the eps-ball of the clean images."""
    n = len(x_all)

    def check(k: int, batch: dict) -> None:
        start = k * batch_size
        rows = np.arange(start, min(start + batch_size, n))
        shapes = {"index": rows.shape, "x_adv": (len(rows), *x_all.shape[1:]), "f": (len(rows), n_bits),
                  "f_t": (len(rows), n_bits)}
        bad = [key for key in BATCH_ARRAYS if batch[key].shape != shapes[key]]
        x_adv = batch["x_adv"]
        if (bad or not np.array_equal(batch["index"], rows) or x_adv.dtype != np.float32
                or not all(np.all(np.isfinite(batch[key])) for key in BATCH_ARRAYS[1:])
                or x_adv.min(initial=0) < 0 or x_adv.max(initial=1) > 1
                or np.abs(x_adv - to_unit_float(x_all[rows])).max(initial=0) > radius + 1e-6
                or np.abs(batch["f"]).max(initial=0) > 1 or np.abs(batch["f_t"]).max(initial=0) > 1):
            raise ValueError(f"--out: batch {k} of the partial file is damaged or not from these images; "
                             "delete the .partial file to start over")
    return check


def run_hashing(args) -> int:
    """``minrr attack --attack NAME``: a deep-hashing attack over --data, written to --out (adv.npz)."""
    files = Files()
    partial = Path(str(args.out) + ".partial") if args.out is not None else None
    try:
        import torch

        from minrr.backends import get_backend
        from minrr.backends.base import check_attack, check_whole
        from minrr.backends.checkpoint import load_checkpoint
        from minrr.backends.hashing_attacks import N_T, dhta_targets, hashing_attack, mean_blur
        from minrr.progress import progress_bar

        if args.attack is None:
            raise ValueError("--attack: required (one of the deep-hashing attacks)")
        name = args.attack
        for key, flag in (("attacks", "--attacks"), ("max_queries", "--max-queries"),
                          ("robrank_compat", "--robrank-compat")):
            if getattr(args, key, None) not in (None, False):
                raise ValueError(f"{flag}: only with --suite; the hashing attacks take --max")
        for flag, path in (("--model", args.model), ("--data", args.data), ("--labels", args.labels),
                           ("--database", args.database), ("--database-labels", args.database_labels),
                           ("--database-data", args.database_data)):
            if path is not None and Path(path).exists():
                files.input(flag, path)
        files.output("--out", args.out, beside={"partial results": partial})
        files.check()
        settings = _settings(args, name)
        if name != "cw":
            check_attack(settings["eps"], settings["alpha"], settings["steps"], "linf")
        target = _target(args, name)
        check_whole(args.batch_size, "batch_size", 1)
        check_whole(args.seed, "seed", 0)
        if args.max is not None:
            check_whole(args.max, "--max", 1)
        backend = get_backend("torch", device=args.device)
        model, card = load_checkpoint(args.model, device=backend.device, name="--model")
        if card["embedding"]["head"] != "hash":
            raise ValueError(f"--model: {args.model} is an embedding model; the {name} attack needs a hashing model")
        size = tuple(card["input"]["shape"][1:])
        data = load_dataset(args.data, args.labels, size=size, name="--data", labels_name="--labels")
        if data.images.shape[1] != model.spec.in_channels:
            raise ValueError(f"--data: images with {data.images.shape[1]} channels; the model takes "
                             f"{model.spec.in_channels}")
        images, labels = data.images[:args.max], data.labels[:args.max]
        targets, record = None, {}
        if target is not None:
            codes, db_labels, record = _database(args, backend, model, card, size)
            target_labels, anchors = dhta_targets(labels, codes, db_labels, n_t=settings.get("n_t", N_T),
                                                  target=None if target == "random" else target, seed=args.seed)
            targets = anchors
        settings = {"attack": name, **settings, "targeted_label": target, "seed": args.seed,
                    "model_sha256": card["weights"]["sha256"], "data": data.source, "n": len(images),
                    "data_sha256": data.fingerprint(), **record}
        header = {"format": PARTIAL_FORMAT, **settings, "batch_size": args.batch_size, "device": str(backend.device)}
        batches = PartialBatches(partial, header)
        radius = settings.get("eps") or 1.0
        batches.resume(_batch_check(images, args.batch_size, model.spec.dim, radius))
        batches.start()
    except (ValueError, TypeError) as exc:
        raise type(exc)(flag_message(exc, FLAGS)) from None

    options = {key: value for key, value in settings.items() if key in SETTING_FLAGS and key != "n_t"}
    done = sum(len(b["index"]) for b in batches.batches)
    try:
        with progress_bar(len(images), True, "img", initial=done, desc="minrr attack") as bar:
            for start in range(done, len(images), args.batch_size):
                rows = np.arange(start, min(start + args.batch_size, len(images)))
                x = torch.from_numpy(to_unit_float(images[rows])).to(backend.device)
                batch_targets = None if targets is None else torch.as_tensor(targets[rows], device=backend.device)
                adv = hashing_attack(name, model, x, batch_targets, seed=args.seed, first_index=start, **options)
                with torch.no_grad():
                    f = model(adv)
                    f_t = model(mean_blur(adv))
                batches.append({"index": rows.astype(np.int64), "x_adv": adv.cpu().numpy().astype(np.float32),
                                "f": f.cpu().numpy().astype(np.float32), "f_t": f_t.cpu().numpy().astype(np.float32)})
                bar.update(len(rows))
        result = {key: np.concatenate([b[key] for b in batches.batches]) for key in BATCH_ARRAYS}
        result["labels"] = labels.astype(np.int64)
        if targets is not None:
            result["target_labels"], result["anchors"] = target_labels, anchors
        result["settings"] = np.array(json.dumps(settings, sort_keys=True))
        with files.commit() as tmp, open(tmp["--out"], "wb") as fh:
            np.savez(fh, **result)
    except (ValueError, TypeError) as exc:
        batches.abandon()
        raise type(exc)(flag_message(exc, FLAGS)) from None
    partial.unlink()
    print(f"wrote {args.out}: {len(images)} {name} adversarial queries of {data.source} "
          f"({', '.join(f'{k} {v:g}' if isinstance(v, float) else f'{k} {v}' for k, v in options.items())})")
    return 0


# Flags of the hashing attacks that --suite refuses (dest, flag).
_HASHING_ONLY = {"attack": "--attack", "targeted_label": "--targeted-label", "database": "--database",
                 "database_labels": "--database-labels", "database_data": "--database-data", "n_t": "--n-t",
                 "scale": "--scale", "lr": "--lr", "c": "--c", "kappa": "--kappa", "lambda1": "--lambda1",
                 "lambda2": "--lambda2", "blur": "--blur", "random_start": "--random-start", "max": "--max"}
# Library argument names of minrr.backends.ml_attacks and their flags.
SUITE_FLAGS = {"max_queries": "--max-queries", "attacks": "--attacks", "images": "--data", "labels": "--data"}


def _suite_attacks(text: str | None) -> tuple[str, ...]:
    from minrr.scores import ATTACKS

    if text is None:
        return ATTACKS
    names = tuple(name.strip() for name in text.split(","))
    bad = [name for name in names if name not in ATTACKS]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"--attacks: expected distinct names among {', '.join(ATTACKS)}, separated by commas, "
                         f"got {text!r}")
    return names


def _resumed_entries(partial: Path, header: dict, attacks: tuple[str, ...]) -> dict:
    """The attacks finished by an earlier run with the same settings (``out.partial``), by name."""
    from minrr.io import read_json

    if not partial.exists():
        return {}
    data = read_json(partial, name="--out")
    if not isinstance(data, dict) or data.get("format") != SUITE_PARTIAL_FORMAT or not isinstance(
            data.get("attacks"), list):
        raise ValueError(f"--out: {partial} is not a partial result of minrr attack --suite; delete it to start over")
    changed = [f"{key} {data.get('settings', {}).get(key)!r} there, {value!r} now"
               for key, value in header.items() if data.get("settings", {}).get(key) != value]
    if changed:
        raise ValueError(f"--out: {partial} was made with other settings ({'; '.join(changed)}); "
                         "rerun with its settings to resume, or delete it to start over")
    entries = {}
    for entry in data["attacks"]:
        name = entry.get("attack") if isinstance(entry, dict) else None
        if name not in attacks or name in entries or entry.get("params", {}).get("trials") != header["n_queries"]:
            raise ValueError(f"--out: {partial} holds a damaged or foreign entry; delete it to start over")
        entries[name] = entry
    return entries


def run_suite(args) -> int:
    """``minrr attack --suite robrank``: the metric-learning attack suite, written as an attack record."""
    from minrr.io import atomic_path

    files = Files()
    partial = Path(str(args.out) + ".partial")
    try:
        from minrr.backends.base import check_whole
        from minrr.backends.checkpoint import load_checkpoint
        from minrr.backends.ml_attacks import ROBRANK_ALPHA, ROBRANK_EPS, ROBRANK_STEPS, attack_items, robrank_suite
        from minrr.backends.torch_backend import TorchBackend
        from minrr.scores import ATTACKS

        given = [flag for dest, flag in _HASHING_ONLY.items() if getattr(args, dest) not in (None, False)]
        if given:
            raise ValueError(f"{given[0]}: not an option of --suite (the deep-hashing attacks take it)")
        attacks = _suite_attacks(args.attacks)
        for flag, path in (("--model", args.model), ("--data", args.data), ("--labels", args.labels)):
            if path is not None and Path(path).exists():
                files.input(flag, path)
        files.output("--out", args.out, beside={"partial results": partial})
        files.check()
        check_whole(args.batch_size, "batch_size", 1)
        check_whole(args.seed, "seed", 0)
        if args.max_queries is not None:
            check_whole(args.max_queries, "--max-queries", 1)
        device = TorchBackend(device=args.device).device
        model, card = load_checkpoint(args.model, device=device, name="--model")
        if card["embedding"]["head"] != "embedding":
            raise ValueError(f"--model: {args.model} is a hashing model; --suite {args.suite} needs an embedding model")
        data = load_dataset(args.data, args.labels, size=tuple(card["input"]["shape"][1:]), name="--data",
                            labels_name="--labels")
        if data.images.shape[1] != model.spec.in_channels:
            raise ValueError(f"--data: images with {data.images.shape[1]} channels; the model takes "
                             f"{model.spec.in_channels}")
        settings = {"eps": ROBRANK_EPS if args.eps is None else args.eps,
                    "alpha": ROBRANK_ALPHA if args.alpha is None else args.alpha,
                    "steps": ROBRANK_STEPS if args.steps is None else args.steps}
        n_queries = len(attack_items(len(data), args.max_queries, args.seed))
        header = {"suite": args.suite, "attacks": list(attacks), **settings, "seed": args.seed,
                  "max_queries": args.max_queries, "n_queries": n_queries, "robrank_compat": args.robrank_compat,
                  "model_sha256": card["weights"]["sha256"], "data_sha256": data.fingerprint(),
                  "batch_size": args.batch_size, "device": str(device)}
        finished = _resumed_entries(partial, header, attacks)
        done = list(finished.values())

        def save(entry):
            done.append(entry)
            with atomic_path(partial) as tmp:
                tmp.write_text(json.dumps({"format": SUITE_PARTIAL_FORMAT, "settings": header, "attacks": done}))

        record = robrank_suite(model, data.images, data.labels, attacks=attacks, max_queries=args.max_queries,
                               seed=args.seed, batch_size=args.batch_size, device=device,
                               robrank_compat=args.robrank_compat, progress=True, finished=finished, on_attack=save,
                               meta={"model": str(args.model), "model_sha256": card["weights"]["sha256"],
                                     "data": data.source, "data_sha256": data.fingerprint()}, **settings)
        with files.commit() as tmp:
            tmp["--out"].write_text(json.dumps(record, indent=1) + "\n")
    except (ValueError, TypeError) as exc:
        raise type(exc)(flag_message(exc, {**FLAGS, **SUITE_FLAGS})) from None
    if partial.exists():
        partial.unlink()
    complete = set(attacks) == set(ATTACKS)
    print(f"wrote {args.out}: {', '.join(attacks)} on {n_queries} queries of {data.source} against its {len(data)} "
          f"items (benign R@1 {100 * record['benign_r1']:.2f}%); "
          + (f"score it with minrr score --attacks {args.out}" if complete
             else "minrr score needs all nine attacks"))
    return 0
