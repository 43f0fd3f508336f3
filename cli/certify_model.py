"""``minrr certify --model``: certify straight from a checkpoint, one query at a time, resumably.

The gallery images are embedded exactly by the model (fixed points); each
query's noisy copies stream through the model (:meth:`Backend.sample_noisy`,
its own noise stream) and it is certified on its own, so its row depends only
on the query and the settings. With ``--out results.tsv`` each row is
appended to ``results.tsv.partial`` and flushed; the partial file starts with
a line of the settings. A rerun finds the partial file, checks that the
settings are the same, and goes on after its last complete row; when every
query is done the rows are written to ``results.tsv`` (atomically) and the
partial file is removed, so the result is the file an uninterrupted run
writes (but for the ``time`` column, seconds per query). ``--skip`` and
``--max`` select queries as Cohen et al.'s ``certify.py`` does: indices
0, S, 2S, ... below M.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from minrr.certify import bounds
from minrr.certify import CertifyResult, certify
from minrr.cli.cluster import cluster, on_cluster
from minrr.data.loaders import load_dataset
from minrr.io import check_positive, check_probability
from minrr.progress import progress_bar

from .certify import TSV_COLUMNS, tsv_row

SETTINGS_PREFIX = "# minrr certify --model settings: "
MODEL_COLUMNS = TSV_COLUMNS + ("time",)
"""The columns of ``certify --model``: those of ``certify``, and the seconds each query took."""
DEFAULT_BATCH = 1000


def partial_path(path) -> Path:
    """Where the rows of ``--out path`` collect until the run is complete: ``path.partial``."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def _row_problem(row: dict, idx: int, label, settings: dict) -> str | None:
    """What is wrong with one resumed row (its fields by column name), or None.

    The row must be query ``idx`` with its label, carry this run's settings, and be
    consistent: numbers parse, radius and time >= 0, correct is margin > 0, and a
    certified query (radius > 0) is correct.
    """
    from .certify import _label_text

    if row["idx"] != str(idx):
        return f"idx {row['idx']!r}, expected {idx}"
    if label is not None and row["label"] != _label_text(label):
        return f"label {row['label']!r}, but query {idx} has label {_label_text(label)}"
    names = ("margin", "margin_lower", "radius", "sigma", "alpha") + (("time",) if "time" in row else ())
    try:
        number = {name: float(row[name]) for name in names}
        n = int(row["n"])
    except ValueError as exc:
        return str(exc)
    if any(v != v for v in number.values()) or number["radius"] < 0 or number.get("time", 0) < 0:
        return "NaN, or a negative radius or time"
    if row["correct"] not in ("0", "1") or (row["correct"] == "1") != (number["margin"] > 0):
        return f"correct {row['correct']!r} does not follow from margin {row['margin']}"
    if number["radius"] > 0 and row["correct"] != "1":
        return "a certified radius for a query that is not correct"
    ours = {"bound": row["bound"] == settings["bound"], "n": n == settings["samples"],
            "sigma": math.isclose(number["sigma"], settings["sigma"], rel_tol=1e-5),
            "alpha": math.isclose(number["alpha"], settings["alpha"], rel_tol=1e-5)}
    if "certificate" in row and "certificate" in settings:
        ours["certificate"] = row["certificate"] == settings["certificate"]
    wrong = [name for name, same in ours.items() if not same]
    return f"{', '.join(wrong)} not of this run" if wrong else None


class ResumableTSV:
    """Rows of one run: appended and flushed to ``path.partial``, renamed to ``path`` when complete."""

    def __init__(self, path, settings: dict, indices, labels=None):
        self.path = Path(path)
        self.indices = indices  # the query index of each row
        self.labels = labels  # the query labels, (N,): a resumed row must carry its query's label
        self.partial = partial_path(path)
        self.rows: list[str] = []
        if self.partial.exists():
            self._resume(settings)
        else:
            self.partial.write_text(SETTINGS_PREFIX + json.dumps(settings, sort_keys=True) + "\n"
                                    + "\t".join(MODEL_COLUMNS) + "\n")
        self._file = open(self.partial, "a")

    def _resume(self, settings: dict) -> None:
        """Take the rows of an earlier run, each checked; refuse the file (untouched) otherwise."""
        where = f"--out: {self.partial}"
        with open(self.partial, "rb") as fh:
            data = fh.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{where} is damaged (not UTF-8 text); delete it to start over") from None
        complete = text[: text.rfind("\n") + 1]  # a row cut short by an interruption is dropped
        lines = complete.splitlines()
        if len(lines) < 2 or not lines[0].startswith(SETTINGS_PREFIX) or lines[1].split("\t") != list(MODEL_COLUMNS):
            raise ValueError(f"{where} is not a partial result of this minrr certify --model; "
                             "delete it to start over")
        try:
            theirs = json.loads(lines[0][len(SETTINGS_PREFIX):])
        except (json.JSONDecodeError, RecursionError):
            theirs = None
        if not isinstance(theirs, dict):
            raise ValueError(f"{where}: its settings line is damaged; delete it to start over")
        changed = [f"{key} {theirs.get(key)!r} there, {settings.get(key)!r} now"
                   for key in sorted(set(theirs) | set(settings)) if theirs.get(key) != settings.get(key)]
        if changed:
            raise ValueError(f"{where} was made with other settings ({'; '.join(changed)}); "
                             "rerun with its settings to resume, or delete it to start over")
        if len(lines) - 2 > len(self.indices):
            raise ValueError(f"{where} has {len(lines) - 2} rows, but this run has only {len(self.indices)} "
                             "queries; delete it to start over")
        columns = lines[1].split("\t")
        for k, line in enumerate(lines[2:]):
            fields, idx = line.split("\t"), self.indices[k]
            problem = "wrong number of fields" if len(fields) != len(columns) else _row_problem(
                dict(zip(columns, fields)), idx, None if self.labels is None else self.labels[idx], settings)
            if problem:
                raise ValueError(f"{where}: row {k} (line {k + 3}) is damaged or not of this run ({problem}); "
                                 "delete the file to start over")
            self.rows.append(line + "\n")
        if len(complete) < len(text):
            with open(self.partial, "r+b") as fh:
                fh.truncate(len(complete.encode()))

    def append(self, row: str) -> None:
        self._file.write(row)
        self._file.flush()
        self.rows.append(row)

    def abandon(self) -> None:
        """After an error: close, and remove the partial file if it holds no row."""
        self._file.close()
        if not self.rows:
            os.unlink(self.partial)

    def write(self, path) -> None:
        """Write the header and every row to ``path`` (a temporary file of the final result)."""
        self._file.close()
        Path(path).write_text("\t".join(MODEL_COLUMNS) + "\n" + "".join(self.rows))

    def remove_partial(self) -> None:
        """Once the final file is in place: the partial file is no longer needed."""
        self._file.close()
        os.unlink(self.partial)


class _MemoryRows:
    """The rows of a run without ``--out``."""

    def __init__(self):
        self.rows: list[str] = []

    def append(self, row: str) -> None:
        self.rows.append(row)

    def abandon(self) -> None:
        pass


def load_data(source, labels, card: dict, split: str, flag: str, labels_flag: str):
    """The data set of ``flag``, by default the model card's ``split`` data; and how it was chosen."""
    how = ""
    if source is None:
        source = card.get("data", {}).get(split)
        if source is None:
            raise ValueError(f"{flag}: required (the model card records no {split} data)")
        how = f" (the model card's {split} data)"
    data = load_dataset(source, labels, size=tuple(card["input"]["shape"][1:]), name=flag, labels_name=labels_flag)
    return data, data.source + how


def _result_from_rows(rows: list[str], settings: dict) -> CertifyResult:
    """The certificates as written (full precision, see :func:`tsv_row`), for the summary."""
    fields = [row.rstrip("\n").split("\t") for row in rows]
    column = {name: np.array([f[i] for f in fields]) for i, name in enumerate(MODEL_COLUMNS)}
    return CertifyResult(
        label=column["label"].astype(np.int64),
        nearest=np.full(len(rows), -1),  # not recorded in the TSV
        nearest_label=column["nn_label"].astype(np.int64),
        correct=column["correct"] == "1",
        margin=column["margin"].astype(np.float64),
        margin_lower=column["margin_lower"].astype(np.float64),
        radius=column["radius"].astype(np.float64),
        settings=settings,
    )


def certify_rows(model, backend, images, labels, indices, gallery, gallery_labels, options: dict, *,
                 offset: int = 0) -> list[str]:
    """The TSV rows of queries ``indices``: each query sampled through ``model`` on its own noise
    stream (seed, index) and certified on its own, so a row depends only on its query and ``options``
    (the run's sigma, samples, seed, batch_size and certify settings), never on who computes it.
    Query i's image and label are ``images[i - offset]`` and ``labels[i - offset]``."""
    out = []
    for i in indices:
        started = time.perf_counter()
        j = i - offset
        estimate = backend.sample_noisy(model, images[j:j + 1], options["sigma"], options["samples"],
                                        seed=options["seed"], first_index=i, batch_size=options["batch_size"])
        result = certify(estimate, labels[j:j + 1], sigma=options["sigma"], gallery=gallery,
                         gallery_labels=gallery_labels, norm_bound=options["norm_bound"], alpha=options["alpha"],
                         bound=options["bound"], top_k=options["top_k"], radius_form=options["radius_form"],
                         precision=options["precision"], certificate=options["certificate"],
                         candidates=options["candidates"])
        out.append(tsv_row(i, result, 0)[:-1] + f"\t{time.perf_counter() - started:.4f}\n")
    return out


def _worker_rows(job, model_path: str, sha256: str, device: str, gallery, gallery_labels,
                 options: dict) -> list[str]:
    """:func:`certify_rows` of one chunk on a Dask worker, the checkpoint loaded once per worker process.

    ``job`` = (indices, their images, their labels); the gallery comes scattered to every worker.
    """
    from minrr.backends import get_backend
    from minrr.backends.distributed import use_worker_threads, worker_model

    indices, images, labels = job
    backend = get_backend("torch", device=device)
    model = worker_model(model_path, sha256, device=str(backend.device))
    use_worker_threads()
    return certify_rows(model, backend, images, labels, indices, gallery, gallery_labels, options,
                        offset=indices[0])


def _distributed_rows(args, card: dict, queries, todo, gallery_embeddings, gallery_labels, options: dict,
                      device: str):
    """Rows of the queries ``todo`` from a Dask cluster, ``--chunk-size`` queries per task, yielded
    chunk by chunk in order as they finish (see :mod:`minrr.backends.distributed`). Each task carries
    its own queries' images; the gallery is sent once to every worker."""
    from minrr.backends.distributed import in_order

    def jobs():
        for c in range(0, len(todo), args.chunk_size):
            chunk = list(todo[c:c + args.chunk_size])
            span = slice(chunk[0], chunk[-1] + 1)
            yield chunk, queries.images[span], queries.labels[span]

    with cluster(args) as client:
        shared = [client.scatter(x, broadcast=True, hash=False)
                  for x in (gallery_embeddings, np.asarray(gallery_labels))]
        yield from in_order(client, _worker_rows, jobs(), str(Path(args.model).resolve()), card["weights"]["sha256"],
                            device, *shared, options)


def run_model(args) -> tuple[list[CertifyResult], str, ResumableTSV | None]:
    """Certify every query of ``--data`` through ``--model``.

    Returns ([result], source line, rows): with ``--out``, ``rows`` holds the rows; the caller
    writes them (:meth:`ResumableTSV.write`) with its other outputs, then removes the partial
    file (:meth:`ResumableTSV.remove_partial`).
    """
    from minrr.labels import check_top_k

    from minrr.backends import get_backend
    from minrr.backends.base import check_whole
    from minrr.backends.checkpoint import load_checkpoint

    sigma = check_positive(args.sigma, name="sigma")
    if sigma > 1e30:  # noise is drawn in float32, whose largest value is 3.4e38
        raise ValueError(f"sigma: expected a noise level in pixel units of at most 1e30, got {sigma:g}")
    alpha = check_probability(args.alpha, name="alpha")
    check_whole(args.seed, "seed", 0)
    check_whole(args.samples, "n_samples", 2)
    if args.norm_bound is not None:
        check_positive(args.norm_bound, name="norm_bound")
    backend = get_backend("torch", device=args.device)
    model, card = load_checkpoint(args.model, device=backend.device, name="--model")
    queries, queries_from = load_data(args.data, args.labels, card, "test", "--data", "--labels")
    gallery, gallery_from = load_data(args.gallery_data, args.gallery_labels, card, "train", "--gallery-data",
                                  "--gallery-labels")
    for flag, data in (("--data", queries), ("--gallery-data", gallery)):
        if data.images.shape[1] != model.spec.in_channels:
            raise ValueError(f"{flag}: images with {data.images.shape[1]} channels; the model takes "
                             f"{model.spec.in_channels}")
    lonely = np.flatnonzero(~np.isin(queries.labels, gallery.labels))
    if lonely.size:
        raise ValueError(f"--labels: query {lonely[0]} has no same-label item in the gallery ({lonely.size} such "
                         "queries); its Recall@k is 0 whatever the input")
    check_top_k(args.top_k, queries.labels, gallery.labels)
    dim = model.spec.dim
    if args.bound == "paper" and args.samples < bounds.paper_min_samples(alpha, dim):
        raise ValueError(f"--samples: the paper's bound needs n >= {bounds.paper_min_samples(alpha, dim)} "
                         f"at alpha = {alpha:g} and dim = {dim} (got {args.samples})")
    norm_bound = args.norm_bound if args.norm_bound is not None else card["embedding"]["norm_bound"]
    batch_size = args.batch_size or DEFAULT_BATCH
    settings = {
        "model_sha256": card["weights"]["sha256"], "data": queries.source, "data_sha256": queries.fingerprint(),
        "gallery": gallery.source, "gallery_sha256": gallery.fingerprint(), "sigma": sigma, "samples": args.samples,
        "seed": args.seed, "alpha": alpha, "bound": args.bound, "top_k": args.top_k, "norm_bound": norm_bound,
        "radius_form": args.radius_form, "precision": args.precision, "device": backend.device.type,
        "batch_size": batch_size, "skip": args.skip or 1, "max": args.max, "certificate": args.certificate,
        "candidates": args.candidates,
    }
    indices = range(0, min(len(queries), args.max or len(queries)), args.skip or 1)
    rows = ResumableTSV(args.out, settings, indices, queries.labels) if args.out else _MemoryRows()
    if rows.rows:
        print(f"minrr certify: resuming at row {len(rows.rows)} of {len(indices)} ({rows.partial})", file=sys.stderr)
    options = {key: settings[key] for key in ("sigma", "samples", "seed", "batch_size", "norm_bound", "alpha",
                                              "bound", "top_k", "radius_form", "precision", "certificate",
                                              "candidates")}
    try:
        gallery_embeddings = backend.embed(model, gallery.images, batch_size=batch_size, progress=True)
        todo = indices[len(rows.rows):]
        with progress_bar(len(indices), True, "query", initial=len(rows.rows)) as bar:
            if not on_cluster(args):
                chunks = (certify_rows(model, backend, queries.images, queries.labels, [i], gallery_embeddings,
                                       gallery.labels, options) for i in todo)
            else:
                chunks = _distributed_rows(args, card, queries, todo, gallery_embeddings, gallery.labels, options,
                                           settings["device"])
            for chunk in chunks:
                for row in chunk:
                    rows.append(row)
                if bar is not None:
                    bar.update(len(chunk))
    except BaseException as exc:  # Ctrl-C, a bad input, a full disk: keep the rows made so far
        if isinstance(exc, KeyboardInterrupt) and args.out and rows.rows:
            print(f"minrr certify: {len(rows.rows)} of {len(indices)} rows are in {rows.partial}; run the same "
                  "command again to resume", file=sys.stderr)
        rows.abandon()
        raise
    summary_settings = {"bound": args.bound, "sigma": sigma, "alpha": alpha, "n": args.samples, "top_k": args.top_k,
                        "norm_bound": norm_bound, "radius_form": args.radius_form, "gallery": "exact",
                        "certificate": args.certificate}
    source = f"model: {args.model}, queries {queries_from}, gallery {gallery_from}"
    return [_result_from_rows(rows.rows, summary_settings)], source, rows if args.out else None
