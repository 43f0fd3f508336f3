"""``minrr detect``: UMCD detection of adversarial queries to a hashing model (calibrate, score)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from minrr.cli.flags import flag_message
from minrr.cli.outputs import Files
from minrr.io import load_npy, load_npz, read_json

from minrr.options import C3_FORMS
from minrr.options import CALIBRATION_METHODS as METHODS

# UMCD and minrr.hashing.detection_baselines.DETECTORS: a copy, for --help, which must not import numba or scipy
# (that module does); tests/test_detection_baselines.py checks that they are equal.
DETECTOR_TYPES = ("umcd", "feature-squeezing", "fs-median", "fs-nlm", "fs-adaptive", "mean-blur", "lid")
BASELINE_FORMAT = "minrr-baseline-detector"

OUTPUT_KEYS = ("f", "f_t")
TSV_COLUMNS = ("idx", "c1", "c2", "c3", "score", "flag_c1", "flag_c2", "flag_c3", "flag")
BASELINE_TSV_COLUMNS = ("idx", "s", "score", "flag")

# Library argument names, as minrr.hashing.detect and minrr.hashing.distance_models messages start, and their flags.
FLAGS = {"database": "--database", "top_k": "--top-k", "fpr": "--fpr", "n_classes": "--c1-model",
         "c1_confidence": "--c1-confidence", "detector": "--detector", "is_adversarial": "--labels-known",
         "k": "--lid-k", "size": "--lid-reference", "seed": "--seed", "images": "--data",
         "batch_size": "--batch-size", "model": "--model"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "detect",
        help="flag adversarial queries to a hashing model (UMCD: Hamming distance, quantization loss, "
             "prediction inconsistency)",
        description="Unsupervised detection of adversarial queries to deep-hashing retrieval (UMCD). "
                    "'calibrate' learns thresholds from benign queries at a target false-positive rate; "
                    "'score' flags new queries. Query files are .npz archives with 'f', the (n, K) "
                    "continuous outputs in [-1, 1] (tanh before the sign), and 'f_t', the outputs on "
                    "transformed (e.g. 3 x 3 mean-blurred) copies of the same images; or --model with --data "
                    "computes them from images. --detector-type calibrates a baseline instead (feature "
                    "squeezing, FS-Adaptive, mean blur, LID), scored the same way.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    c = actions.add_parser("calibrate", help="learn the thresholds from benign queries",
                           description="Compute C1, C2, C3 of benign queries and calibrate the detector's "
                                       "thresholds at the target false-positive rate; write it as JSON.")
    benign = c.add_mutually_exclusive_group(required=True)
    benign.add_argument("--benign", metavar="benign.npz",
                        help="benign queries' outputs: 'f' and the arrays the detector reads ('f_t' for umcd; "
                             "see --detector-type), all (n, K)")
    benign.add_argument("--data", metavar="SOURCE", help="benign images, whose outputs --model computes; " + DATA_HELP)
    c.add_argument("--database", metavar="db.npy",
                   help="umcd: database codes for C1: (N, K) values in {-1, 1} or {0, 1}, or packed with --packed; "
                        "its path is recorded in the detector")
    c.add_argument("--fpr", type=float, default=0.05,
                   help="target false-positive rate on benign queries (default: 0.05)")
    c.add_argument("--out", required=True, metavar="detector.json", help="where to write the detector")
    c.add_argument("--top-k", type=int, default=100, metavar="K",
                   help="database codes averaged in C1 (default: 100)")
    c.add_argument("--method", choices=METHODS, default="joint",
                   help="how the rate is shared by the criteria: the max of rank-normalised criteria at fpr "
                        "(joint, default), fpr / 3 each (bonferroni), or fpr each (per-criterion)")
    c.add_argument("--c3", choices=C3_FORMS, default="soft",
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
    c.add_argument("--detector-type", choices=DETECTOR_TYPES, default="umcd",
                   help="umcd (default), or a baseline: feature squeezing (max over bit depth 5, median 2x2, "
                        "non-local means 13-3-2), one squeezer alone, FS-Adaptive, mean blur, or LID")
    c.add_argument("--lid-k", type=int, metavar="K", help="lid: neighbours (default: 20)")
    c.add_argument("--lid-reference", type=int, metavar="N",
                   help="lid: benign queries drawn as the reference batch and left out of the calibration "
                        "(default: 100)")
    c.add_argument("--seed", type=int, metavar="S", help="lid: seed of the reference batch's draw (default: 0)")
    _add_model_flags(c)
    c.set_defaults(run=run_calibrate)

    s = actions.add_parser("score", help="flag queries with a calibrated detector",
                           description="Compute C1, C2, C3 of queries and flag the adversarial ones; with "
                                       "known labels, report TPR, miss rate, FPR and AUC.")
    s.add_argument("--detector", required=True, metavar="detector.json", help="from minrr detect calibrate")
    queries = s.add_mutually_exclusive_group(required=True)
    queries.add_argument("--inputs", metavar="q.npz",
                         help="queries' outputs: 'f' and the arrays the detector reads ('f_t' for umcd), all (n, K)")
    queries.add_argument("--data", metavar="SOURCE", help="query images, whose outputs --model computes; " + DATA_HELP)
    s.add_argument("--detector-type", choices=DETECTOR_TYPES,
                   help="check that --detector is of this type (default: whatever it is)")
    s.add_argument("--database", metavar="db.npy",
                   help="database codes (default: the path the detector records); must be the same codes "
                        "the detector was calibrated with")
    s.add_argument("--packed", action="store_true",
                   help="only for a detector that records no database: the --database codes are packed")
    s.add_argument("--labels-known", metavar="adv.npy",
                   help="(n,) 0/1 labels, 1 = adversarial: report TPR, miss rate, FPR and AUC")
    s.add_argument("--out", metavar="flags.tsv", help="write one row per query (TSV)")
    _add_model_flags(s)
    s.set_defaults(run=run_score)


DATA_HELP = ("bundled:train|test, fashion-mnist:train|test, a folder with one sub-folder per class, images.npz, "
             "an .npy image array, or the adv.npz of minrr attack (its x_adv)")


def _add_model_flags(parser) -> None:
    """--model and the flags that go with it: the outputs and database codes computed by a hashing model."""
    parser.add_argument("--model", metavar="model.pt",
                        help="a hashing model of minrr train --task hash (its model card beside it), for --data and "
                             "--database-data: computes f and the transformed copies' outputs the detector reads "
                             "(f_t: the 3 x 3 mean blur)")
    parser.add_argument("--database-data", metavar="SOURCE",
                        help="umcd: database images; C1 reads their codes sign(f) through --model (instead of "
                             "--database); recorded in the detector with a digest of the codes")
    parser.add_argument("--device", help="torch device for --model, e.g. cpu or cuda (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch through --model (default: 256)")


def _load_outputs(path, flag: str, keys=OUTPUT_KEYS) -> dict[str, np.ndarray]:
    """The arrays ``keys`` (``f`` first) of an archive of outputs, checked under the flag's name."""
    from minrr.hashing import detect

    arrays = load_npz(path, name=flag)
    missing = [key for key in keys if key not in arrays]
    if missing:
        quoted = [f"'{key}'" for key in keys]
        expected = f"{', '.join(quoted[:-1])} and {quoted[-1]}"
        raise ValueError(f"{flag}: {path} lacks the array '{missing[0]}' (it has: "
                         f"{', '.join(sorted(arrays)) or 'nothing'}); expected {expected}, all (n, K)")
    outputs = {key: detect.check_outputs(arrays[key], name=f"{flag} array '{key}'") for key in keys}
    for key in keys[1:]:
        if outputs[key].shape != outputs["f"].shape:
            raise ValueError(f"{flag}: array '{key}' has shape {outputs[key].shape}, but 'f' has {outputs['f'].shape}")
    return outputs


def _load_model(args):
    """(network, model card) of --model on --device, or None without --model; a hashing model only."""
    if args.model is None:
        return None
    from minrr.backends import get_backend
    from minrr.backends.checkpoint import load_checkpoint

    network, card = load_checkpoint(args.model, device=get_backend("torch", device=args.device).device,
                                    name="--model")
    if card["embedding"]["head"] != "hash":
        raise ValueError(f"--model: {args.model} is an embedding model; minrr detect needs a hashing model "
                         "(minrr train --task hash)")
    return network, card


def _images(source, model, flag: str) -> np.ndarray:
    """(N, C, H, W) images of a --data source (see DATA_HELP) for the model ``(network, card)``."""
    from minrr.data.loaders import check_images, load_dataset

    if model is None:
        raise ValueError(f"--model: required with {flag} (the hashing model that computes the outputs)")
    network, card = model
    path = Path(source)
    if path.suffix == ".npy" and path.is_file():
        images = check_images(load_npy(path, name=flag), name=flag)
    elif path.suffix == ".npz" and path.is_file() and "x_adv" in (arrays := load_npz(path, name=flag)):
        images = check_images(arrays["x_adv"], name=flag)
    else:
        images = load_dataset(source, size=tuple(card["input"]["shape"][1:]), name=flag).images
    images = images[:, None] if images.ndim == 3 else images
    if images.ndim != 4 or images.shape[1] != network.spec.in_channels:
        raise ValueError(f"{flag}: images of shape {images.shape[1:]}; the model takes (C, H, W) images with "
                         f"C = {network.spec.in_channels}")
    return images


def _query_outputs(args, flag: str, detector_type: str, model) -> dict[str, np.ndarray]:
    """What the detector reads of the queries: from the archive ``flag``, or from --data through --model."""
    from minrr.hashing.detection_baselines import transformed_outputs

    keys = ("f", *transformed_outputs(detector_type))
    if args.data is None:
        return _load_outputs(getattr(args, flag[2:]), flag, keys)
    from minrr.backends.detection import detector_outputs

    images = _images(args.data, model, "--data")
    return detector_outputs(model[0], images, detector_type, batch_size=args.batch_size, progress=True)


def _codes_of_data(args, source, model) -> np.ndarray:
    """Database codes sign(f) of the images ``source`` through --model: (N, K) int8."""
    from minrr.backends.detection import database_codes

    images = _images(source, model, "--database-data")
    return database_codes(model[0], images, batch_size=args.batch_size, progress=True)


def _codes_sha256(codes) -> str:
    """SHA-256 of codes as int8 +-1 rows (0/1 codes are mapped to -1/+1 first)."""
    return hashlib.sha256(np.ascontiguousarray(np.where(np.asarray(codes) > 0, 1, -1), dtype=np.int8)).hexdigest()


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_calibrate(args) -> int:
    from minrr.hashing import detect, distance_models

    files = Files.of(args, inputs=["--benign", "--database", "--model", "--data", "--database-data"],
                     outputs=["--out"])
    files.check()
    _check_type_flags(args)
    if args.detector_type != "umcd":
        return _calibrate_baseline(args, files)
    try:
        network = _load_model(args)
        outputs = _query_outputs(args, "--benign", "umcd", network)
        f, f_t = outputs["f"], outputs["f_t"]
        database, record = _calibration_database(args, network)
        if args.c1_model is None and args.c1_confidence is not None:
            raise ValueError("--c1-confidence: given without --c1-model")
        model = None if args.c1_model is None else distance_models.untargeted(f.shape[1], args.c1_model)
        confidence = detect.THREE_SIGMA if args.c1_confidence is None else args.c1_confidence
        detector = detect.Detector(fpr=args.fpr, method=args.method, top_k=args.top_k, c3=args.c3,
                                   c1_model=model, c1_confidence=confidence, database=record)
        scores = detector.criteria(f, f_t, database, packed=args.packed, progress=True)
        detector.fit(scores)
    except (ValueError, TypeError) as exc:
        raise type(exc)(flag_message(exc, {**FLAGS, "scores": "--benign" if args.data is None else "--data"})) from None

    with files.commit() as tmp:
        tmp["--out"].write_text(detector.to_json() + "\n")
    t1, t2, t3 = detector.thresholds_
    origin = " (from the C1 model)" if model is not None else ""
    print(f"calibrated on {len(scores)} benign queries, {detector.method}, target FPR {detector.fpr:g}: "
          f"benign iff C1 <= {t1:.6g}{origin}, C2 >= {t2:.6g}, C3 <= {t3:.6g}")
    print(f"calibration FPR = {detector.calibration_fpr_:.4f}; wrote {args.out}")
    return 0


def _check_type_flags(args) -> None:
    """Refuse the calibration flags of one detector type given with another."""
    umcd_only = {"--database": args.database is not None, "--database-data": args.database_data is not None,
                 "--packed": args.packed, "--top-k": args.top_k != 100, "--method": args.method != "joint",
                 "--c3": args.c3 != "soft", "--c1-model": args.c1_model is not None,
                 "--c1-confidence": args.c1_confidence is not None}
    lid_only = {"--lid-k": args.lid_k is not None, "--lid-reference": args.lid_reference is not None,
                "--seed": args.seed is not None}
    for only, flags in (("umcd", umcd_only), ("lid", lid_only)):
        given = [flag for flag, is_given in flags.items() if is_given]
        if given and args.detector_type != only:
            raise ValueError(f"{given[0]}: applies to --detector-type {only} only, not {args.detector_type}")


def _calibration_database(args, model) -> tuple[np.ndarray, dict]:
    """C1's database codes and the detector's record of them: --database or --database-data."""
    if (args.database is None) == (args.database_data is None):
        raise ValueError("--database: give the database codes with --database or --database-data (one of the two)")
    if args.database_data is not None:
        if args.packed:
            raise ValueError("--packed: applies to --database codes, not to --database-data")
        codes = _codes_of_data(args, args.database_data, model)
        source = Path(args.database_data)
        return codes, {"data": str(source.resolve()) if source.exists() else args.database_data,
                       "shape": list(codes.shape), "dtype": "int8", "packed": False,
                       "codes_sha256": _codes_sha256(codes)}
    database = load_npy(args.database, name="--database", mmap=True)
    if database.ndim == 2 and len(database) == 0:
        raise ValueError(f"--database: {args.database} holds no codes (shape {database.shape})")
    return database, {"path": str(Path(args.database).resolve()), "shape": list(database.shape),
                      "dtype": str(database.dtype), "packed": args.packed, "sha256": _sha256(args.database)}


def _calibrate_baseline(args, files) -> int:
    """:func:`run_calibrate` for a baseline of minrr.hashing.detection_baselines."""
    from minrr.hashing import detection_baselines as baselines

    name = args.detector_type
    try:
        outputs = _query_outputs(args, "--benign", name, _load_model(args))
        settings = {}
        if name == "lid":
            size = baselines.LID_REFERENCE_SIZE if args.lid_reference is None else args.lid_reference
            reference, calibration = baselines.split_reference(len(outputs["f"]), size=size,
                                                               seed=0 if args.seed is None else args.seed)
            settings = {"k": args.lid_k, "reference": outputs["f"][reference]}
            outputs = {key: value[calibration] for key, value in outputs.items()}
        detector = baselines.BaselineDetector(name, fpr=args.fpr, **settings)
        detector.fit(detector.statistic(outputs["f"], outputs))
    except (ValueError, TypeError) as exc:
        raise type(exc)(flag_message(exc, {**FLAGS, "scores": "--benign" if args.data is None else "--data"})) from None

    with files.commit() as tmp:
        tmp["--out"].write_text(detector.to_json() + "\n")
    drawn = f" (and {len(detector.reference)} drawn as LID's reference batch)" if name == "lid" else ""
    print(f"calibrated {name} on {len(detector.benign_)} benign queries{drawn}, target FPR {detector.fpr:g}: "
          f"benign iff s <= {detector.threshold_:.6g}")
    print(f"calibration FPR = {detector.calibration_fpr_:.4f}; wrote {args.out}")
    return 0


def _score_database(args, detector, model):
    """The database codes for C1: --database, --database-data, or the recorded path or data,
    checked against the record."""
    record = detector.database
    data = args.database_data
    if data is None and args.database is None and isinstance(record, dict) and "data" in record:
        data = str(record["data"])
    if data is not None:
        if args.packed:
            raise ValueError("--packed: applies to --database codes, not to database images")
        if model is None:
            raise ValueError(f"--model: required to compute the codes of the database images {data} (or give "
                             "the codes with --database)")
        codes = _codes_of_data(args, data, model)
        if isinstance(record, dict) and record.get("codes_sha256", _codes_sha256(codes)) != _codes_sha256(codes):
            raise ValueError(f"--database-data: the codes of {data} through --model are not those the detector "
                             "was calibrated with")
        return codes, False
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
             "sha256": lambda: _sha256(path), "codes_sha256": lambda: _codes_sha256(database)}
    differ = [key for key, value in found.items() if key in record and record[key] != value()]
    if differ:
        raise ValueError(f"--database: {path} is not the database the detector was calibrated with "
                         f"(its {', '.join(differ)} not as recorded for {record.get('path')})")
    return database, bool(record.get("packed", False))


def _format(value) -> str:
    return "n/a" if np.isnan(value) else f"{value:.4f}"


def run_score(args) -> int:
    from minrr.hashing import detect
    from minrr.metrics.detection import check_adversarial_labels

    files = Files.of(args, inputs=["--detector", "--inputs", "--database", "--labels-known", "--model", "--data",
                                   "--database-data"], outputs=["--out"])
    files.check()
    document = read_json(args.detector, name="--detector")
    if isinstance(document, dict) and document.get("format") == BASELINE_FORMAT:
        return _score_baseline(args, files, document)
    try:
        detector = detect.Detector.from_dict(document)
        if args.detector_type not in (None, "umcd"):
            raise ValueError(f"--detector-type: {args.detector_type}, but {args.detector} is a umcd detector")
        if args.database is None and isinstance(detector.database, dict) and "path" in detector.database:
            files.input("--detector's database", str(detector.database["path"]))
            files.check()
        network = _load_model(args)
        outputs = _query_outputs(args, "--inputs", "umcd", network)
        f, f_t = outputs["f"], outputs["f_t"]
        database, packed = _score_database(args, detector, network)
        known = None
        if args.labels_known is not None:
            known = check_adversarial_labels(load_npy(args.labels_known, name="--labels-known"), len(f))
        scores = detector.criteria(f, f_t, database, packed=packed, progress=True)
        flags, joint = detector.flags(scores), detector.score(scores)
        report = detector.report(scores, known) if known is not None else None
    except (ValueError, TypeError) as exc:
        raise type(exc)(flag_message(exc, {**FLAGS, "f": "--inputs" if args.data is None else "--data"})) from None

    flagged = flags.any(axis=1)
    if args.out is not None:
        columns = TSV_COLUMNS + (("adversarial",) if known is not None else ())
        with files.commit() as tmp, open(tmp["--out"], "w") as fh:
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


def _score_baseline(args, files, document) -> int:
    """:func:`run_score` for a baseline detector (``minrr-baseline-detector``)."""
    from minrr.hashing.detection_baselines import BaselineDetector
    from minrr.metrics.detection import check_adversarial_labels

    try:
        detector = BaselineDetector.from_dict(document)
        name = detector.detector
        if args.detector_type not in (None, name):
            raise ValueError(f"--detector-type: {args.detector_type}, but {args.detector} is a {name} detector")
        for flag, given in (("--database", args.database), ("--database-data", args.database_data),
                            ("--packed", args.packed or None)):
            if given is not None:
                raise ValueError(f"{flag}: a {name} detector reads no database")
        outputs = _query_outputs(args, "--inputs", name, _load_model(args))
        known = None
        if args.labels_known is not None:
            known = check_adversarial_labels(load_npy(args.labels_known, name="--labels-known"), len(outputs["f"]))
        statistic = detector.statistic(outputs["f"], outputs)
        flags, score = detector.predict(statistic), detector.score(statistic)
        report = detector.report(statistic, known) if known is not None else None
    except (ValueError, TypeError) as exc:
        raise type(exc)(flag_message(exc, {**FLAGS, "f": "--inputs" if args.data is None else "--data"})) from None

    if args.out is not None:
        columns = BASELINE_TSV_COLUMNS + (("adversarial",) if known is not None else ())
        with files.commit() as tmp, open(tmp["--out"], "w") as fh:
            fh.write("\t".join(columns) + "\n")
            for i in range(len(statistic)):
                row = [str(i), str(float(statistic[i])), str(float(score[i])), str(int(flags[i]))]
                fh.write("\t".join(row + ([str(int(known[i]))] if known is not None else [])) + "\n")
    print(f"scored {len(statistic)} queries: {int(flags.sum())} flagged as adversarial "
          f"({name}, target FPR {detector.fpr:g})")
    if report is not None:
        row = report[name]
        print("detector\tTPR\tmiss\tFPR\tAUC")
        print(f"{name}\t{_format(row['tpr'])}\t{_format(row['fnr'])}\t{_format(row['fpr'])}\t{_format(row['auc'])}")
        print(f"({row['n_adversarial']} adversarial, {row['n_benign']} benign)")
    if args.out is not None:
        print(f"wrote {args.out}")
    return 0
