#!/usr/bin/env python3
"""Where a kernel's warps wait, by SASS line: reads Nsight Compute's source page as CSV
(`ncu --import REP --page source --csv --print-source sass --kernel-name K --launch-count 1`, of a
report taken with `--section SourceCounters`) and prints the kernel's stall samples and executed
instructions, the lines holding the most samples (with the 3 lines before each: a stall is charged
to the instruction that waits, its cause usually just above), and the samples by stretch of lines.
    python3 scripts/ncu_source_summary.py src.csv [--top 15] [--stretch 40]"""
import argparse
import csv


def rows_of(path):
    rows = list(csv.reader(open(path, newline="")))
    head = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    hdr = rows[head]
    body = [r for r in rows[head + 1:] if r and r[0].startswith("0x")]
    # ncu lists a kernel's SASS once for each view it has: keep the first copy.
    seen, lines = set(), []
    for r in body:
        if r[0] in seen:
            break
        seen.add(r[0])
        lines.append(r)
    return hdr, lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--stretch", type=int, default=40)
    a = ap.parse_args()
    hdr, lines = rows_of(a.csv)
    i_s = hdr.index("Warp Stall Sampling (All Samples)")
    i_e = hdr.index("Instructions Executed")
    num = lambda r, i: int((r[i] or "0").replace(",", ""))
    total = sum(num(r, i_s) for r in lines) or 1
    print(f"{len(lines)} SASS lines, {total} stall samples, {sum(num(r, i_e) for r in lines)} warp instructions")
    print(f"\nthe {a.top} lines with the most samples:")
    for k in sorted(range(len(lines)), key=lambda k: -num(lines[k], i_s))[: a.top]:
        print(f"--- line {k}: {num(lines[k], i_s)} samples ({100 * num(lines[k], i_s) / total:.1f}%)")
        for j in range(max(0, k - 3), k + 1):
            print(f"  {j:5d} {num(lines[j], i_s):7d} {num(lines[j], i_e):11d}  {lines[j][1].strip()[:90]}")
    print(f"\nsamples by stretch of {a.stretch} lines (those over 1%):")
    for b in range(0, len(lines), a.stretch):
        s = sum(num(r, i_s) for r in lines[b:b + a.stretch])
        if s > total / 100:
            print(f"  lines {b:5d}-{b + a.stretch - 1:5d}: {s:7d} ({100 * s / total:.1f}%)")


if __name__ == "__main__":
    main()
