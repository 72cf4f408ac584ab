"""Draw a run's metrics file to PNG (loss curves per split / domain, learning rate).

    python scripts/plot.py out/quickstart/metrics.jsonl --out out/quickstart/loss.png

Needs matplotlib (`pip install -e ".[plot]"`); without it, prints the losses as a table.
"""

from pathlib import Path

from minillm.cli import ArgumentParser
from minillm.errors import run_main
from minillm.plotting import loss_table, plot_metrics, read_metrics


def main(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("metrics", help="metrics.jsonl written by the trainer")
    ap.add_argument("--out", help="PNG file (default: loss.png beside the metrics file)")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.metrics).with_name("loss.png")
    if plot_metrics(args.metrics, out):
        print(f"wrote {out}")
    else:
        print("matplotlib is not installed (pip install -e '.[plot]'); the losses:")
        print(loss_table(read_metrics(args.metrics)))


if __name__ == "__main__":
    run_main(main)
