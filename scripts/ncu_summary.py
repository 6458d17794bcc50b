#!/usr/bin/env python3
"""Sums an Nsight Compute CSV (ncu --csv --metrics gpu__time_duration.sum,dram__bytes_read.sum ...)
by kernel: calls, total and per-call time, DRAM bytes read and the bandwidth they were read at.
    python3 scripts/ncu_summary.py kernels-decode.csv"""
import collections
import csv
import io
import re
import sys

UNITS = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6,
         "byte": 1.0, "Kbyte": 1e3, "KB": 1e3, "Mbyte": 1e6, "MB": 1e6, "Gbyte": 1e9, "GB": 1e9}


def main(path):
    lines = open(path).read().splitlines()
    head = next(i for i, l in enumerate(lines) if l.startswith('"ID"'))
    launches = collections.OrderedDict()
    for r in csv.DictReader(io.StringIO("\n".join(lines[head:]))):
        d = launches.setdefault(r["ID"], {"name": re.sub(r"\(.*", "", r["Kernel Name"])})
        d[r["Metric Name"]] = float(r["Metric Value"].replace(",", "")) * UNITS.get(r["Metric Unit"], 1.0)
    by = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for d in launches.values():
        a = by[d["name"][:70]]
        a[0] += 1
        a[1] += d.get("gpu__time_duration.sum", 0.0)
        a[2] += d.get("dram__bytes_read.sum", 0.0)
    total = sum(a[1] for a in by.values())
    print(f"{len(launches)} kernels, {total:.1f} us in all (each timed alone)")
    print(f"{'kernel':70s} {'calls':>5s} {'us':>8s} {'share':>6s} {'us/call':>8s} {'MB read':>8s} {'GB/s':>6s}")
    for name, (n, us, b) in sorted(by.items(), key=lambda x: -x[1][1]):
        print(f"{name:70s} {n:5d} {us:8.1f} {100 * us / total:5.1f}% {us / n:8.2f} {b / 1e6:8.1f} "
              f"{b / us / 1e3 if us else 0:6.0f}")


if __name__ == "__main__":
    main(sys.argv[1])
