"""Fail when the fast tier leaves a sans-IO folder under its line-coverage floor (issue 26).

    python3 .ci/coverage_gate.py coverage.json [--floor 90] [folder ...]

Reads `coverage json` output and sums lines per folder (default: mailproxy/protocol, mailproxy/upstream,
mailproxy/auth_http). Fails when a folder is under the floor, when a module of one holds statements none
of which ran (every module must be exercised), or when a folder has no file in the data at all (the
wrong selector, or --cov without that folder, must not pass as "nothing to measure").
"""

import argparse
import json
import sys

FOLDERS = ("mailproxy/protocol", "mailproxy/upstream", "mailproxy/auth_http")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="the file `coverage json` wrote")
    parser.add_argument("folders", nargs="*", default=FOLDERS)
    parser.add_argument("--floor", type=float, default=90.0, help="percent of lines, per folder")
    args = parser.parse_args(argv)
    with open(args.report) as handle:
        files = json.load(handle)["files"]
    failures = []
    for folder in args.folders:
        prefix = folder.rstrip("/") + "/"
        mine = {path: data["summary"] for path, data in files.items() if path.replace("\\", "/").startswith(prefix)}
        if not mine:
            failures.append("%s: no file measured" % folder)
            continue
        statements = sum(summary["num_statements"] for summary in mine.values())
        covered = sum(summary["covered_lines"] for summary in mine.values())
        percent = 100.0 * covered / statements if statements else 100.0
        print("%-22s %5.1f%%  (%d of %d lines)" % (folder, percent, covered, statements))
        for path, summary in sorted(mine.items()):
            if summary["num_statements"] and not summary["covered_lines"]:
                failures.append("%s: not exercised at all" % path)
        if percent < args.floor:
            failures.append("%s: %.1f%% of lines, under %.0f%%" % (folder, percent, args.floor))
    for failure in failures:
        print("coverage gate: " + failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
