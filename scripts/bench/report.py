#!/usr/bin/env python3
"""Turn scripts/bench.sh results (JSON lines) into one markdown table.

Input lines: {"job": ..., "system": ..., "value": number|null, "unit": ...}.
Rows are jobs in order of first appearance; columns are the systems given with --systems
(all four by default, so a system that was not run still shows n/a), plus thinfs/bindfs.
A value of null, or a missing cell, prints as n/a. Values in bytes print in GiB or MiB.

Usage: report.py RESULTS.jsonl [--systems native,bindfs,juicefs,thinfs] [--header FILE] [--notes FILE]
"""
import argparse
import json
import math

ALL = ["native", "bindfs", "juicefs", "thinfs"]


def fmt(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    a = abs(v)
    if a >= 1000:
        return "{:,.0f}".format(v)
    if a >= 100:
        return "{:.0f}".format(v)
    if a >= 10:
        return "{:.1f}".format(v)
    if a >= 1:
        return "{:.2f}".format(v)
    if a == 0:
        return "0"
    return "{:.3g}".format(v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--systems", default=",".join(ALL))
    ap.add_argument("--header")
    ap.add_argument("--notes")
    a = ap.parse_args()
    systems = [s for s in ALL if s in a.systems.split(",")]

    rows, units, cells = [], {}, {}
    with open(a.results) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except ValueError:
                continue
            job = r.get("job")
            if job is None:
                continue
            if job not in units:
                rows.append(job)
                units[job] = r.get("unit", "")
            v = r.get("value")
            if v is not None and not isinstance(v, (int, float)):
                v = None
            cells[(job, r.get("system"))] = v

    out = []
    if a.header:
        with open(a.header) as f:
            out.append(f.read().rstrip() + "\n")
    cols = ["job", "unit"] + systems
    ratio = "thinfs" in systems and "bindfs" in systems
    if ratio:
        cols.append("thinfs/bindfs")
    out.append("| " + " | ".join(cols) + " |")
    out.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(cols) - 2)) + "|")
    for job in rows:
        unit = units[job]
        vals = [cells.get((job, s)) for s in systems]
        shown_unit = unit
        scale = 1.0
        if unit == "bytes":
            biggest = max([abs(v) for v in vals if v is not None] or [0])
            if biggest >= 1024 ** 3:
                shown_unit, scale = "GiB", 1024.0 ** 3
            else:
                shown_unit, scale = "MiB", 1024.0 ** 2
        line = [job, shown_unit] + [fmt(None if v is None else v / scale) for v in vals]
        if ratio:
            t, b = cells.get((job, "thinfs")), cells.get((job, "bindfs"))
            if t is not None and b not in (None, 0):
                r = t / b
                line.append("{:.2f}".format(r) if abs(r) >= 0.1 or r == 0 else "{:.2g}".format(r))
            else:
                line.append("n/a")
        out.append("| " + " | ".join(line) + " |")
    if a.notes:
        try:
            with open(a.notes) as f:
                notes = f.read().strip()
        except OSError:
            notes = ""
        if notes:
            out.append("\nFailures (shown as n/a):\n")
            out.extend("- " + l for l in notes.splitlines())
    print("\n".join(out))


if __name__ == "__main__":
    main()
