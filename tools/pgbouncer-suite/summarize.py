#!/usr/bin/env python3
"""Summarise a pytest JUnit XML report of PgBouncer's suite.

usage: summarize.py REPORT.xml [FAILED_LIST_OUT]

Prints the failed test ids, a per-file passed/failed/skipped table and, as
the last line, exactly 'N passed, M failed'.  Each test case is counted once:
a case with any <failure> or <error> (including setup/teardown errors) is
failed, a case with only <skipped> is skipped, anything else passed.  Cases
without a name (tests cut off when the run was interrupted) count as failed.
"""

import sys
import xml.etree.ElementTree as ET
from collections import OrderedDict


def file_of(classname):
    parts = classname.split(".")
    if parts and parts[0] == "test" and len(parts) > 1:
        parts = parts[1:]
    return parts[0] + ".py" if parts and parts[0] else "?"


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        root = ET.parse(sys.argv[1]).getroot()
    except (OSError, ET.ParseError) as e:
        print(f"summarize: cannot read {sys.argv[1]}: {e}", file=sys.stderr)
        print("0 passed, 0 failed")
        return 1

    per_file = OrderedDict()
    failed_ids = []
    for case in root.iter("testcase"):
        interrupted = not case.get("classname") and not case.get("name")
        f = "(interrupted)" if interrupted else file_of(case.get("classname", ""))
        name = case.get("name", "?")
        row = per_file.setdefault(f, {"passed": 0, "failed": 0, "skipped": 0})
        tags = {child.tag for child in case}
        if interrupted:
            # a test cut off by the overall bound: it did not pass
            row["failed"] += 1
            failed_ids.append(f"{f}  test running when the run was interrupted")
        elif "failure" in tags or "error" in tags:
            row["failed"] += 1
            msg = ""
            for child in case:
                if child.tag in ("failure", "error"):
                    msg = (child.get("message") or "").strip().splitlines()
                    msg = msg[0][:110] if msg else ""
                    if child.tag == "error":
                        msg = "[error] " + msg
                    break
            failed_ids.append(f"{f}::{name}  {msg}")
        elif "skipped" in tags:
            row["skipped"] += 1
        else:
            row["passed"] += 1

    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as out:
            out.write("\n".join(failed_ids) + ("\n" if failed_ids else ""))

    if failed_ids:
        print(f"failed tests ({len(failed_ids)}):")
        for fid in failed_ids:
            print(f"  FAILED {fid}")
        print()

    tot = {"passed": 0, "failed": 0, "skipped": 0}
    w = max([len(k) for k in per_file] + [10])
    print(f"{'file':<{w}}  {'passed':>6}  {'failed':>6}  {'skipped':>7}  {'total':>5}")
    for f in sorted(per_file):
        r = per_file[f]
        for k in tot:
            tot[k] += r[k]
        print(
            f"{f:<{w}}  {r['passed']:>6}  {r['failed']:>6}  {r['skipped']:>7}  {sum(r.values()):>5}"
        )
    print(
        f"{'TOTAL':<{w}}  {tot['passed']:>6}  {tot['failed']:>6}  {tot['skipped']:>7}  "
        f"{sum(tot.values()):>5}"
    )
    print(f"{tot['passed']} passed, {tot['failed']} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
