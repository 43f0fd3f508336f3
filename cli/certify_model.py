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
writes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minrr import bounds
from minrr.certify import CertifyResult, certify
from minrr.data.loaders import load_dataset
from minrr.io import atomic_path, check_positive, check_probability

from .certify import TSV_COLUMNS, tsv_row

SETTINGS_PREFIX = "# minrr certify --model settings: "
DEFAULT_BATCH = 1000


class ResumableTSV:
    """Rows of one run: appended and flushed to ``path.partial``, renamed to ``path`` when complete."""

    def __init__(self, path, settings: dict):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.rows: list[str] = []
        if self.partial.exists():
            self._resume(settings)
        else:
            self.partial.write_text(SETTINGS_PREFIX + json.dumps(settings, sort_keys=True) + "\n"
                                    + "\t".join(TSV_COLUMNS) + "\n")
        self._file = open(self.partial, "a")

    def _resume(self, settings: dict) -> None:
        text = self.partial.read_text()
        complete = text[: text.rfind("\n") + 1]  # a row cut short by an interruption is dropped
        lines = complete.splitlines()
        if len(lines) < 2 or not lines[0].startswith(SETTINGS_PREFIX) or lines[1].split("\t") != list(TSV_COLUMNS):
            raise ValueError(f"--out: {self.partial} is not a partial result of minrr certify --model; "
                             "delete it to start over")
        try:
            theirs = json.loads(lines[0][len(SETTINGS_PREFIX):])
        except json.JSONDecodeError:
            raise ValueError(f"--out: the settings line of {self.partial} is damaged; "
                             "delete it to start over") from None
        changed = [f"{key} {theirs.get(key)!r} there, {settings.get(key)!r} now"
                   for key in sorted(set(theirs) | set(settings)) if theirs.get(key) != settings.get(key)]
        if changed:
            raise ValueError(f"--out: {self.partial} was made with other settings ({'; '.join(changed)}); "
                             "rerun with its settings to resume, or delete it to start over")
        for k, line in enumerate(lines[2:]):
            if not line.startswith(f"{k}\t") or len(line.split("\t")) != len(TSV_COLUMNS):
                raise ValueError(f"--out: row {k} of {self.partial} is damaged; delete the file to start over")
            self.rows.append(line + "\n")
        if len(complete) < len(text):
            with open(self.partial, "r+") as fh:
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

    def finish(self) -> None:
        """Write every row to ``path`` atomically and remove the partial file."""
        self._file.close()
        with atomic_path(self.path) as tmp:
            tmp.write_text("\t".join(TSV_COLUMNS) + "\n" + "".join(self.rows))
        os.unlink(self.partial)


class _MemoryRows:
    """The rows of a run without ``--out``."""

    def __init__(self):
        self.rows: list[str] = []

    def append(self, row: str) -> None:
        self.rows.append(row)

    def abandon(self) -> None:
        pass

    def finish(self) -> None:
        pass


def _data(source, labels, card: dict, split: str, flag: str, labels_flag: str):
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
    """The certificates as written (6 significant digits), for the summary."""
    fields = [row.rstrip("\n").split("\t") for row in rows]
    column = {name: np.array([f[i] for f in fields]) for i, name in enumerate(TSV_COLUMNS)}
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


def run_model(args) -> tuple[list[CertifyResult], str]:
    """Certify every query of ``--data`` through ``--model``; returns ([result], source line)."""
    from minrr.backends import get_backend
    from minrr.backends.base import check_whole
    from minrr.backends.checkpoint import load_checkpoint

    sigma = check_positive(args.sigma, name="sigma")
    alpha = check_probability(args.alpha, name="alpha")
    check_whole(args.seed, "seed", 0)
    check_whole(args.samples, "n_samples", 2)
    if args.norm_bound is not None:
        check_positive(args.norm_bound, name="norm_bound")
    backend = get_backend("torch", device=args.device)
    model, card = load_checkpoint(args.model, device=backend.device, name="--model")
    queries, queries_from = _data(args.data, args.labels, card, "test", "--data", "--labels")
    gallery, gallery_from = _data(args.gallery_data, args.gallery_labels, card, "train", "--gallery-data",
                                  "--gallery-labels")
    for flag, data in (("--data", queries), ("--gallery-data", gallery)):
        if data.images.shape[1] != model.spec.in_channels:
            raise ValueError(f"{flag}: images with {data.images.shape[1]} channels; the model takes "
                             f"{model.spec.in_channels}")
    lonely = np.flatnonzero(~np.isin(queries.labels, gallery.labels))
    if lonely.size:
        raise ValueError(f"--labels: query {lonely[0]} has no same-label item in the gallery ({lonely.size} such "
                         "queries); its Recall@k is 0 whatever the input")
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
        "batch_size": batch_size,
    }
    rows = ResumableTSV(args.out, settings) if args.out else _MemoryRows()
    tty = sys.stderr.isatty()
    try:
        gallery_embeddings = backend.embed(model, gallery.images, batch_size=batch_size, progress=tty)
        with tqdm(total=len(queries), initial=len(rows.rows), unit="query", disable=not tty, file=sys.stderr) as bar:
            for i in range(len(rows.rows), len(queries)):
                estimate = backend.sample_noisy(model, queries.images[i:i + 1], sigma, args.samples, seed=args.seed,
                                                first_index=i, batch_size=batch_size)
                result = certify(estimate, queries.labels[i:i + 1], sigma=sigma, gallery=gallery_embeddings,
                                 gallery_labels=gallery.labels, norm_bound=norm_bound, alpha=alpha,
                                 bound=args.bound, top_k=args.top_k, radius_form=args.radius_form,
                                 precision=args.precision)
                rows.append(tsv_row(i, result, 0))
                bar.update(1)
    except (ValueError, TypeError):
        rows.abandon()
        raise
    rows.finish()
    summary_settings = {"bound": args.bound, "sigma": sigma, "alpha": alpha, "n": args.samples, "top_k": args.top_k,
                        "norm_bound": norm_bound, "radius_form": args.radius_form, "gallery": "exact"}
    source = f"model: {args.model}, queries {queries_from}, gallery {gallery_from}"
    return [_result_from_rows(rows.rows, summary_settings)], source
