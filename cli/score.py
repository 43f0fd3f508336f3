"""``minrr score``: ERS and averaged ARS from an attack record (see :mod:`minrr.scores`)."""

from __future__ import annotations

import json

from minrr.cli.outputs import Files


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "score",
        help="ERS and ARS robustness scores from an attack record (JSON)",
        description="Score a metric-learning model's robustness from the raw outcomes of the attack "
                    "suite (CA+, CA-, QA+, QA-, TMA, ES, LTM, GTM, GTT): print every attack's raw "
                    "value, its ERS-normalised value and its ARS, then ERS and the averaged ARS.",
    )
    p.add_argument("--attacks", required=True, metavar="results.json",
                   help="attack record, format 'minrr-attacks/1' (see the README)")
    p.add_argument("--json", metavar="out.json", help="also write the scores as JSON")
    p.set_defaults(run=run)


def _print_table(scores) -> None:
    print(f"benign R@1 {100 * scores.benign_r1:.2f}%")
    print(f"{'term':<6} {'raw':>9} {'ERS':>8} {'ARS':>8}")
    for t in scores.terms:
        ars = "-" if t.ars is None else f"{t.ars:.2f}"
        print(f"{t.name:<6} {t.raw:>9.3f} {t.ers:>8.2f} {ars:>8}")
    print(f"ERS {scores.ers:.2f}  (mean of the 10 ERS terms)")
    print(f"ARS {scores.ars:.2f}  (mean of the 8 ARS terms)")


def run(args) -> int:
    from minrr.scores import load_attack_record, score

    files = Files.of(args, inputs=["--attacks"], outputs=["--json"])
    files.check()
    scores = score(load_attack_record(args.attacks, name="--attacks"))
    if args.json:
        with files.commit() as tmp:
            tmp["--json"].write_text(json.dumps({"attacks": str(args.attacks), **scores.to_dict()}, indent=2) + "\n")
    _print_table(scores)
    return 0
