"""Run the WanJuan-CC data pipeline on WARC / JSONL files or folders and print its report.

    python scripts/make_example_warc.py --html /usr/share/doc/python3.11-doc/html --out data/example.warc.gz
    python scripts/wanjuan_cc.py --inputs data/example.warc.gz --out-dir out/wanjuan_cc --workers 2
    python scripts/wanjuan_cc.py --inputs crawl/ --out-dir out/cc --tokenizer out/tokenizer.json

Outputs in --out-dir: final/*.jsonl.gz (records with their scores), tokens/ (token shards, with
--tokenizer), report.json. Rerunning skips finished shards. On a cluster, start one process per rank
(torchrun, or a Slurm array: RANK / WORLD_SIZE or SLURM_ARRAY_TASK_ID / _COUNT are read) with the
same flags and a shared --out-dir; the stages wait for each other through files.

Damaged input does not stop the run: unreadable records and files are counted (and listed in
report.json), and a warning says so. `--strict` (or `--strict true`) fails at the first one instead.
"""

import sys
from pathlib import Path

from minillm.cli import parse_config
from minillm.errors import UserError, run_main
from minillm.methods.wanjuan_cc import PipelineConfig, format_report, run


def bare_flags(argv: list[str], names: tuple[str, ...] = ("--strict",)) -> list[str]:
    """`--strict` alone means `--strict true` (the config parser wants a value for booleans)."""
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg in names and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out.append("true")
    return out


def main(argv=None):
    argv = bare_flags(sys.argv[1:] if argv is None else list(argv))
    cfg = parse_config(PipelineConfig, argv, description=__doc__)
    if not cfg.inputs:
        raise UserError("--inputs is required (WARC / JSONL files or folders)")
    report = run(cfg)
    if report:
        print(format_report(report))
        print(f"report: {Path(cfg.out_dir) / 'report.json'}")
        unreadable = sum(report["unreadable"].values())
        if unreadable:
            print(f"warning: {unreadable:,} records could not be read or processed, in "
                  f"{len(report['errors'])} file(s); report.json lists them (--strict: fail instead)",
                  file=sys.stderr)
    else:
        print("this rank's share is done; the report is written when every shard is finished")
    return report


if __name__ == "__main__":
    run_main(main)
