"""``minrr detect``: UMCD detection of adversarial queries to a hashing model (calibrate, score)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

from minrr import detect, distance_models
from minrr.cli.flags import flag_message
from minrr.io import atomic_path, check_output_path, load_npy, load_npz
from minrr.metrics.detection import check_adversarial_labels

OUTPUT_KEYS = ("f", "f_t")
TSV_COLUMNS = ("idx", "c1", "c2", "c3", "score", "flag_c1", "flag_c2", "flag_c3", "flag")

# Library argument names, as minrr.detect and minrr.distance_models messages start, and their flags.
FLAGS = {"database": "--database", "top_k": "--top-k", "fpr": "--fpr", "n_classes": "--c1-model",
         "c1_confidence": "--c1-confidence", "detector": "--detector", "is_adversarial": "--labels-known"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "detect",
        help="flag adversarial queries to a hashing model (UMCD: Hamming distance, quantization loss, "
             "prediction inconsistency)",
        description="Unsupervised detection of adversarial queries to deep-hashing retrieval (UMCD). "
                    "'calibrate' learns thresholds from benign queries at a target false-positive rate; "
                    "'score' flags new queries. Query files are .npz archives with 'f', the (n, K) "
                    "continuous outputs in [-1, 1] (tanh before the sign), and 'f_t', the outputs on "
                    "transformed (e.g. 3 x 3 mean-blurred) copies of the same images.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    c = actions.add_parser("calibrate", help="learn the thresholds from benign queries",
                           description="Compute C1, C2, C3 of benign queries and calibrate the detector's "
                                       "thresholds at the target false-positive rate; write it as JSON.")
    c.add_argument("--benign", required=True, metavar="benign.npz",
                   help="benign queries: arrays 'f' and 'f_t', both (n, K)")
    c.add_argument("--database", required=True, metavar="db.npy",
                   help="database codes for C1: (N, K) values in {-1, 1} or {0, 1}, or packed with --packed; "
                        "its path is recorded in the detector")
    c.add_argument("--fpr", type=float, default=0.05,
                   help="target false-positive rate on benign queries (default: 0.05)")
    c.add_argument("--out", required=True, metavar="detector.json", help="where to write the detector")
    c.add_argument("--top-k", type=int, default=100, metavar="K",
                   help="database codes averaged in C1 (default: 100)")
    c.add_argument("--method", choices=detect.METHODS, default="joint",
                   help="how the rate is shared by the criteria: the max of rank-normalised criteria at fpr "
                        "(joint, default), fpr / 3 each (bonferroni), or fpr each (per-criterion)")
    c.add_argument("--c3", choices=detect.C3_FORMS, default="soft",
                   help="form of C3: (K - <f_t, f>) / 2 (soft, default), differing code bits (hard), or "
                        "sum |f_t - f| / 2 (soft-l1)")
    c.add_argument("--packed", action="store_true",
                   help="the database holds packed codes: uint8 np.packbits rows or uint64 words")
    c.add_argument("--c1-model", type=int, metavar="C",
                   help="fix T1 from the untargeted-attack distance model of C classes (Theorem 1) "
                        "instead of calibrating it")
    c.add_argument("--c1-confidence", type=float, metavar="P",
                   help="with --c1-model, T1 is the lower end of the model's central interval at this "
                        "confidence (default: 0.9973, three sigma)")
    c.set_defaults(run=run_calibrate)

    s = actions.add_parser("score", help="flag queries with a calibrated detector",
                           description="Compute C1, C2, C3 of queries and flag the adversarial ones; with "
                                       "known labels, report TPR, miss rate, FPR and AUC.")
    s.add_argument("--detector", required=True, metavar="detector.json", help="from minrr detect calibrate")
    s.add_argument("--inputs", required=True, metavar="q.npz", help="queries: arrays 'f' and 'f_t', both (n, K)")
    s.add_argument("--database", metavar="db.npy",
                   help="database codes (default: the path the detector records); must be the same codes "
                        "the detector was calibrated with")
    s.add_argument("--packed", action="store_true",
                   help="only for a detector that records no database: the --database codes are packed")
    s.add_argument("--labels-known", metavar="adv.npy",
                   help="(n,) 0/1 labels, 1 = adversarial: report TPR, miss rate, FPR and AUC")
    s.add_argument("--out", metavar="flags.tsv", help="write one row per query (TSV)")
    s.set_defaults(run=run_score)


def _load_outputs(path, flag: str) -> tuple[np.ndarray, np.ndarray]:
    """``f`` and ``f_t`` from a query archive, checked under the flag's name."""
    arrays = load_npz(path, name=flag)
    missing = [key for key in OUTPUT_KEYS if key not in arrays]
    if missing:
        raise ValueError(f"{flag}: {path} lacks the array '{missing[0]}' (it has: "
                         f"{', '.join(sorted(arrays)) or 'nothing'}); expected 'f' and 'f_t', both (n, K)")
    f = detect.check_outputs(arrays["f"], name=f"{flag} array 'f'")
    f_t = detect.check_outputs(arrays["f_t"], name=f"{flag} array 'f_t'")
    if f_t.shape != f.shape:
        raise ValueError(f"{flag}: array 'f_t' has shape {f_t.shape}, but 'f' has {f.shape}")
    return f, f_t


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_calibrate(args) -> int:
    try:
        check_output_path(args.out, name="--out")
        f, f_t = _load_outputs(args.benign, "--benign")
        database = load_npy(args.database, name="--database", mmap=True)
        if args.c1_model is None and args.c1_confidence is not None:
            raise ValueError("--c1-confidence: given without --c1-model")
        model = None if args.c1_model is None else distance_models.untargeted(f.shape[1], args.c1_model)
        confidence = detect.THREE_SIGMA if args.c1_confidence is None else args.c1_confidence
        record = {"path": str(Path(args.database).resolve()), "shape": list(database.shape),
                  "dtype": str(database.dtype), "packed": args.packed, "sha256": _sha256(args.database)}
        detector = detect.Detector(fpr=args.fpr, method=args.method, top_k=args.top_k, c3=args.c3,
                                   c1_model=model, c1_confidence=confidence, database=record)
        scores = detector.criteria(f, f_t, database, packed=args.packed, progress=sys.stderr.isatty())
        detector.fit(scores)
    except (ValueError, TypeError) as exc:
        raise type(exc)(flag_message(exc, {**FLAGS, "scores": "--benign"})) from None

    with atomic_path(args.out) as tmp:
        tmp.write_text(detector.to_json() + "\n")
    t1, t2, t3 = detector.thresholds_
    origin = " (from the C1 model)" if model is not None else ""
    print(f"calibrated on {len(scores)} benign queries, {detector.method}, target FPR {detector.fpr:g}: "
          f"benign iff C1 <= {t1:.6g}{origin}, C2 >= {t2:.6g}, C3 <= {t3:.6g}")
    print(f"calibration FPR = {detector.calibration_fpr_:.4f}; wrote {args.out}")
    return 0


def _score_database(args, detector: detect.Detector):
    """The database codes for C1: --database or the recorded path, checked against the record."""
    record = detector.database
    if args.database is None and (record is None or "path" not in record):
        raise ValueError("--database: required, because the detector does not record its database")
    path = args.database if args.database is not None else record["path"]
    if args.database is None and not Path(path).is_file():
        raise ValueError(f"--detector: its database {path} is not found; give it with --database")
    database = load_npy(path, name="--database", mmap=True)
    if record is None:
        return database, args.packed
    if args.packed:
        raise ValueError("--packed: the detector records the layout of its database; leave --packed out")
    found = {"shape": lambda: list(database.shape), "dtype": lambda: str(database.dtype),
             "sha256": lambda: _sha256(path)}
    differ = [key for key, value in found.items() if key in record and record[key] != value()]
    if differ:
        raise ValueError(f"--database: {path} is not the database the detector was calibrated with "
                         f"(its {', '.join(differ)} not as recorded for {record.get('path')})")
    return database, bool(record.get("packed", False))


def _format(value) -> str:
    return "n/a" if np.isnan(value) else f"{value:.4f}"


def run_score(args) -> int:
    try:
        check_output_path(args.out, name="--out")
        try:
            text = Path(args.detector).read_text()
        except OSError as exc:
            raise ValueError(f"--detector: cannot read {args.detector} ({exc.strerror or exc})") from None
        detector = detect.Detector.from_json(text)
        f, f_t = _load_outputs(args.inputs, "--inputs")
        database, packed = _score_database(args, detector)
        known = None
        if args.labels_known is not None:
            known = check_adversarial_labels(load_npy(args.labels_known, name="--labels-known"), len(f))
        scores = detector.criteria(f, f_t, database, packed=packed, progress=sys.stderr.isatty())
        flags, joint = detector.flags(scores), detector.score(scores)
        report = detector.report(scores, known) if known is not None else None
    except (ValueError, TypeError) as exc:
        raise type(exc)(flag_message(exc, {**FLAGS, "f": "--inputs"})) from None

    flagged = flags.any(axis=1)
    if args.out is not None:
        columns = TSV_COLUMNS + (("adversarial",) if known is not None else ())
        with atomic_path(args.out) as tmp, open(tmp, "w") as fh:
            fh.write("\t".join(columns) + "\n")
            for i in range(len(scores)):
                row = [str(i), *(str(float(v)) for v in scores[i]), str(float(joint[i])),
                       *(str(int(v)) for v in flags[i]), str(int(flagged[i]))]
                if known is not None:
                    row.append(str(int(known[i])))
                fh.write("\t".join(row) + "\n")
    print(f"scored {len(scores)} queries: {int(flagged.sum())} flagged as adversarial "
          f"({detector.method}, target FPR {detector.fpr:g})")
    if report is not None:
        print("criterion\tTPR\tmiss\tFPR\tAUC")
        for name, row in report.items():
            print(f"{name}\t{_format(row['tpr'])}\t{_format(row['fnr'])}\t{_format(row['fpr'])}\t"
                  f"{_format(row['auc'])}")
        print(f"(c1, c2, c3 alone at the target FPR; combined = the detector; "
              f"{report['combined']['n_adversarial']} adversarial, {report['combined']['n_benign']} benign)")
    if args.out is not None:
        print(f"wrote {args.out}")
    return 0
