"""Assemble ``bench/results/REPRODUCTION.md`` from the results of the three reproduction scripts.

Each script (``bench/reproduce_retrievalguard.py``, ``reproduce_umcd.py``,
``reproduce_colotride.py``) writes its section ``NAME.md``, its figures and ``NAME.json`` into
``bench/results/reproduction/``. This page puts a summary of every claim first (read from the
JSON files: whether each direction holds here), then the three sections, with their figure
links made relative to the page. Nothing on it is typed in by hand: rerun the scripts, then

    python bench/reproduction_page.py
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from minrr.io import atomic_path

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = [("retrievalguard", "RetrievalGuard (certification)"), ("umcd", "UMCD (detection in deep hashing)"),
            ("colotride", "COLO-TRIDE (defences for metric learning)")]


def _verdict(holds) -> str:
    """The scripts write a bool, or "yes" / "no" / "not measurable"."""
    if isinstance(holds, bool):
        return "yes" if holds else "no"
    return str(holds)


def _relink(text: str, folder: str) -> str:
    """Markdown links and images relative to the section's folder, made relative to the page."""
    return re.sub(r"\]\((?!https?:|/|#)([^)]+)\)", lambda m: f"]({folder}/{m.group(1)})", text)


def page(source: Path) -> str:
    """The page's markdown, from the sections and JSON files in ``source``."""
    lines = ["# Reproducing RetrievalGuard, UMCD and COLO-TRIDE with minrr\n",
             "Each section below is written by one script under `bench/` (the command that regenerates it "
             "opens the section) on the full Fashion-MNIST, with models trained by minrr on the machine named "
             "there; `python bench/reproduction_page.py` assembles this page from the scripts' outputs in "
             f"`bench/results/{source.name}/`. The papers used larger models and data sets (CUB, CARS, SOP, "
             "CIFAR-10, ImageNet) on GPUs: a claim's direction is what can be compared here, and each section "
             "says, for each claim that does not hold, why (data set, model size, budget). Every script takes "
             "`--device cuda` and the papers' sizes (see its `--help`).\n",
             "## Summary of the claims\n", "| system | claim | holds here |", "|---|---|---|"]
    bodies = []
    for name, title in SECTIONS:
        section, results = source / f"{name}.md", source / f"{name}.json"
        if not (section.is_file() and results.is_file()):
            raise ValueError(f"{name}: {section} or {results} is missing; run bench/reproduce_{name}.py first")
        for claim in json.loads(results.read_text()).get("claims", []):
            text = " ".join(str(claim["claim"]).split()).replace("|", "\\|")
            lines.append(f"| {title.split(' (')[0]} | {text} | {_verdict(claim['holds'])} |")
        body = section.read_text().strip()
        body = re.sub(r"^## .*", f"## {title}", body, count=1)
        bodies.append(_relink(body, source.name))
    return "\n".join(lines) + "\n\n" + "\n\n".join(bodies) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=RESULTS / "reproduction",
                        help="folder of the scripts' outputs (default: bench/results/reproduction)")
    parser.add_argument("--out", type=Path, default=RESULTS / "REPRODUCTION.md",
                        help="the page (default: bench/results/REPRODUCTION.md)")
    args = parser.parse_args(argv)
    try:
        text = page(args.source)
    except ValueError as exc:
        print(f"reproduction_page: {exc}", file=sys.stderr)
        return 1
    with atomic_path(args.out) as tmp:
        tmp.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
