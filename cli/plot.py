"""``minrr plot``: redraw and compare certified-recall curves from TSV files of ``minrr certify --out``."""

from __future__ import annotations

from minrr.cli.outputs import Files


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plot",
        help="draw certified recall against radius from TSV files of minrr certify (needs matplotlib)",
        description="Redraw and compare certified-recall curves: one curve per run (distinct sigma, n, alpha, "
                    "bound, certificate) of each TSV written by minrr certify --out, with the clean recall "
                    "marked at radius 0. The format follows the extension of --out. Needs matplotlib "
                    "(pip install 'minrr[plot]').",
    )
    p.add_argument("tsv", nargs="+", metavar="results.tsv", help="TSV files of minrr certify --out")
    p.add_argument("--out", required=True, metavar="fig.pdf", help="the figure: .pdf, .svg or .png")
    p.set_defaults(run=run)


def run(args) -> int:
    from minrr.cli.plotting import check_plot_path, draw_curves, read_curves

    fmt = check_plot_path(args.out, name="--out")
    files = Files()
    for path in args.tsv:
        files.input("results.tsv", path)
    files.output("--out", args.out)
    files.check()
    curves = [curve for path in args.tsv for curve in read_curves(path, name="results.tsv")]
    with files.commit() as tmp:
        draw_curves(curves, tmp["--out"], fmt)
    print(f"wrote {args.out}: {len(curves)} curve{'s' if len(curves) > 1 else ''} from {len(args.tsv)} "
          f"file{'s' if len(args.tsv) > 1 else ''}")
    return 0
