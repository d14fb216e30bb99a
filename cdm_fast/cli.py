"""The `cdm-fast` command (also `python -m cdm_fast`): parses arguments, nothing more."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _doctor(args: argparse.Namespace) -> int:
    from cdm_fast.doctor import format_report, report

    data = report()
    print(json.dumps(data, indent=2) if args.json else format_report(data))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdm-fast", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log dispatch decisions (INFO)")
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser("doctor", help="versions, device, and which backend serves each op")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.set_defaults(run=_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
