"""``hf-medvis logs DIR``: search every rank's structured log of a run in one time-ordered view."""

from __future__ import annotations

import argparse
import json
import sys

# This subcommand's work is imported inside run(): `hf-medvis --help` loads every subcommand module and must not
# load torch, pyarrow or pydicom (tests/test_architecture.py).


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "logs",
        help="search the per-rank JSON-line logs of a run (all ranks and nodes, time-ordered)",
        description="Reads DIR/**/*.jsonl (a run's output_dir, its logs/ folder, or logs downloaded from several "
        "nodes) and prints matching lines as: time node rank step level message.",
    )
    parser.add_argument("directory", metavar="DIR", help="output_dir of a run, or a folder of *.jsonl logs")
    parser.add_argument("--grep", default=None, metavar="PATTERN", help="regular expression searched in the message")
    parser.add_argument("-i", "--ignore-case", action="store_true", help="case-insensitive --grep")
    parser.add_argument("--rank", type=int, default=None, help="only this global rank")
    parser.add_argument("--node", default=None, help="only this node (host name)")
    parser.add_argument("--level", default=None, help="minimum level: DEBUG, INFO, WARNING, ERROR, CRITICAL")
    parser.add_argument(
        "--since", default=None, help="only entries after a duration ago (30s, 10m, 2h, 1d) or ISO time"
    )
    parser.add_argument("--json", action="store_true", help="print matching entries as JSON lines")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .logsearch import LogQuery, compile_pattern, format_entry, parse_level, parse_since, search_logs

    query = LogQuery(
        pattern=compile_pattern(args.grep, args.ignore_case),
        rank=args.rank,
        min_level=parse_level(args.level) if args.level else 0,
        since=parse_since(args.since) if args.since else None,
        node=args.node,
    )
    skipped: list[str] = []
    entries = search_logs(args.directory, query, skipped)
    for entry in entries:
        print(json.dumps(entry) if args.json else format_entry(entry))
    if skipped:
        print(f"hf-medvis logs: skipped {len(skipped)} unreadable line(s), first at {skipped[0]}", file=sys.stderr)
    return 0 if entries else 1
