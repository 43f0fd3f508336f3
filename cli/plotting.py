"""Certified-recall curves, drawn by ``minrr certify --plot`` and ``minrr plot`` alike.

A :class:`Curve` is one run of certification: each query's certified radius and whether
it is certified. Certified recall at radius r is the share of queries certified with
radius >= r, a step function that falls at each query's radius; the curve is drawn exactly,
with a hollow marker at r = 0 for the clean recall of the smoothed model. Settings that
differ between the curves go into the legend; those they share go into a note above the
axes. The file format follows the extension of the output (PDF, SVG or PNG).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["FORMATS", "Curve", "check_plot_path", "curves_from_results", "read_curves", "draw_curves"]

FORMATS = {".pdf": "pdf", ".svg": "svg", ".png": "png"}
REQUIRED_COLUMNS = ("correct", "radius", "bound", "sigma", "alpha", "n")
# TSV columns that tell runs apart within one file, in the order the labels name them.
SETTING_COLUMNS = ("sigma", "n", "alpha", "bound", "certificate")


@dataclass(frozen=True)
class Curve:
    """One certification run.

    radius : (N,) certified l2 radius of each query (0 = not certified; may be inf).
    certified : (N,) bool, d_low > 0.
    clean_recall : Recall@k of the smoothed model (margin > 0).
    settings : sigma, n, alpha, bound and, when known, certificate and top_k.
    source : where the run came from (a file name), or "".
    """

    radius: np.ndarray
    certified: np.ndarray
    clean_recall: float
    settings: dict = field(default_factory=dict)
    source: str = ""

    def recall_steps(self, right: float) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of the step function r -> share certified with radius >= r on [0, right],
        for ``step(where="post")``."""
        radii = self.radius[self.certified]
        corners = np.unique(radii[np.isfinite(radii) & (radii < right)])
        corners = corners[corners > 0]
        x = np.concatenate([[0.0], corners, [right]])
        n = len(self.radius)
        y = np.array([len(radii) / n] + [np.count_nonzero(radii > r) / n for r in corners])
        return x, np.append(y, y[-1])


def check_plot_path(path, *, name: str) -> str:
    """The matplotlib format of an output ``path`` (from its extension); matplotlib must be installed."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"{name}: expected a file name ending in {', '.join(FORMATS)} (the format follows it), "
                         f"got {path}")
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError(f"{name}: matplotlib is not installed (pip install 'minrr[plot]')")
    return fmt


def curves_from_results(results) -> list[Curve]:
    """Curves of :class:`~minrr.certify.CertifyResult` runs."""
    return [Curve(radius=np.asarray(r.radius, dtype=np.float64), certified=np.asarray(r.certified),
                  clean_recall=float(np.mean(r.correct)), settings=dict(r.settings)) for r in results]


def read_curves(path, *, name: str) -> list[Curve]:
    """The runs of a TSV of ``minrr certify --out``: one curve per distinct (sigma, n, alpha, bound, certificate)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"{name}: file not found: {path}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{name}: {path} is not a text TSV file") from None
    if not lines:
        raise ValueError(f"{name}: {path} is empty; expected the TSV of minrr certify --out")
    header = lines[0].split("\t")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ValueError(f"{name}: {path} is not a TSV of minrr certify --out (no column {missing[0]!r})")
    column = {c: i for i, c in enumerate(header)}
    groups: dict[tuple, list[list[str]]] = {}
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != len(header):
            raise ValueError(f"{name}: line {number} of {path} has {len(fields)} fields, the header {len(header)}")
        key = tuple(fields[column[c]] if c in column else None for c in SETTING_COLUMNS)
        groups.setdefault(key, []).append(fields)
    if not groups:
        raise ValueError(f"{name}: {path} has no rows")
    curves = []
    for key, rows in groups.items():
        def values(col, kind=float):
            try:
                return np.array([kind(row[column[col]]) for row in rows])
            except ValueError:
                raise ValueError(f"{name}: {path} has a non-numeric {col!r} value") from None

        radius = values("radius")
        if np.any(np.isnan(radius)) or np.any(radius < 0):
            raise ValueError(f"{name}: {path} has a radius that is negative or NaN")
        certified = values("margin_lower") > 0 if "margin_lower" in column else radius > 0
        settings = dict(zip(SETTING_COLUMNS, key))
        settings.update(sigma=float(settings["sigma"]), n=int(float(settings["n"])), alpha=float(settings["alpha"]))
        if settings["certificate"] is None:
            del settings["certificate"]
        curves.append(Curve(radius=radius, certified=certified, clean_recall=float(np.mean(values("correct") > 0)),
                            settings=settings, source=Path(path).name))
    return curves


_SYMBOLS = {"sigma": r"$\sigma$ = {:g}", "n": "n = {}", "alpha": r"$\alpha$ = {:g}", "bound": "{} bound",
            "certificate": "{} certificate"}


def _describe(settings: dict, keys) -> list[str]:
    return [_SYMBOLS[k].format(settings[k]) for k in keys if settings.get(k) is not None]


def draw_curves(curves: list[Curve], path, fmt: str) -> None:
    """Draw the curves into the file ``path`` (the caller's temporary file) in matplotlib format ``fmt``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in SETTING_COLUMNS if any(k in c.settings for c in curves)]
    varying = [k for k in keys if len({c.settings.get(k) for c in curves}) > 1]
    shared = [k for k in keys if k not in varying]
    several_files = len({c.source for c in curves}) > 1
    finite = [c.radius[c.certified & np.isfinite(c.radius)] for c in curves]
    top = max((float(r.max()) for r in finite if r.size), default=0.0)
    right = 1.05 * top if top > 0 else max(c.settings.get("sigma", 1.0) for c in curves)
    top_k = {c.settings.get("top_k") for c in curves}
    recall = f"Recall@{top_k.pop()}" if len(top_k) == 1 and None not in top_k else "recall"

    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for curve in curves:
        label = ", ".join(([curve.source] if several_files else []) + _describe(curve.settings, varying))
        x, y = curve.recall_steps(right)
        (line,) = ax.step(x, y, where="post", label=label or None)
        ax.plot([0.0], [curve.clean_recall], marker="o", markerfacecolor="none", color=line.get_color(),
                linestyle="none", clip_on=False)
    ax.plot([], [], marker="o", markerfacecolor="none", color="0.3", linestyle="none", label=f"clean {recall}")
    ax.set_xlim(0.0, right)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel(r"$\ell_2$ radius $r$ (input units)")
    ax.set_ylabel(f"certified {recall} at radius $r$")
    note = ", ".join(_describe(curves[0].settings, shared))
    if note:
        ax.set_title(note, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, format=fmt, dpi=150)
    finally:
        plt.close(fig)
