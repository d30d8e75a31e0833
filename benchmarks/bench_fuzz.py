"""Differential fuzzing against PyTorch: N random models compiled on host (untuned), outputs compared.

Model ``i`` is drawn from ``random.Random(seed + i)`` by ``tests/fuzz/generator.py``, so any row
reproduces. Prints models generated, compiled OK, refused (by op), mismatches and errors (a finding that hits
a bug in ``tests/fuzz/known_bugs.py`` is counted under it; a new one is minimised to its smallest
failing model and printed as a repro), op coverage, wall time and the CPU.

    .venv/bin/python benchmarks/bench_fuzz.py --n 1000 [--seed 0] [--max-nodes 6] [--json out.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.fuzz lives beside omnic
os.environ.setdefault("OMNIC_CACHE_DIR", tempfile.mkdtemp(prefix="omnic-fuzz-cache-"))

from tests.fuzz import generator as gen
from tests.fuzz.known_bugs import known_bug


def _refused_op(error: str) -> str:
    found = re.search(r"no converter for ([^:]+):", error)
    return found.group(1) if found else error.split("\n")[0][:80]


def main(argv: list[str] | None = None) -> int:
    """Run the fuzzer and print its table; exit status 1 when anything was found."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="models to generate (default 1000)")
    ap.add_argument("--seed", type=int, default=0, help="seed of model 0 (model i uses seed + i)")
    ap.add_argument("--max-nodes", type=int, default=6, help="ops per model, at most")
    ap.add_argument("--minutes", type=float, default=None,
                    help="stop drawing new models after this many minutes (the table says how many ran)")
    ap.add_argument("--no-minimise", action="store_true", help="print findings as found, unminimised")
    ap.add_argument("--json", type=Path, help="also write every outcome here")
    args = ap.parse_args(argv)

    from omnic.compile.target import host_cpu_name

    t0 = time.perf_counter()
    coverage, refused = collections.Counter(), collections.Counter()
    status, findings, rows, known = collections.Counter(), [], [], collections.Counter()
    n_run = 0
    for i in range(args.n):
        if args.minutes is not None and time.perf_counter() - t0 > 60 * args.minutes:
            break
        n_run, seed = i + 1, args.seed + i
        spec = gen.draw_spec(gen.RandomDrawer(seed), max_nodes=args.max_nodes, seed=seed)
        coverage.update(spec.labels())
        out = gen.check(spec)
        status[out.status] += 1
        rows.append({"seed": seed, "status": out.status, "max_rel_error": out.max_rel_error,
                     "error": out.error[:300], "seconds": round(out.seconds, 2), "ops": spec.labels()})
        if out.status == "refused":
            refused[_refused_op(out.error)] += 1
        bug = known_bug(spec) if out.finding else None
        rows[-1]["known_bug"] = bug.name if bug else None
        if bug:
            known[f"{bug.name} ({out.status})"] += 1
        elif out.finding:
            findings.append((seed, spec, out))
        if out.finding:
            print(f"[{i + 1}/{args.n}] seed {seed}: {out.status} {out.max_rel_error} {bug.name if bug else 'NEW'} "
                  f"{out.error[:200]}", flush=True)
        elif (i + 1) % 25 == 0:
            print(f"[{i + 1}/{args.n}] {dict(status)} {time.perf_counter() - t0:.0f} s", flush=True)
    wall = time.perf_counter() - t0
    args.n = n_run

    print(f"\n## Differential fuzzing, host, untuned fp32, tolerance {gen.TOLERANCE_FP32:g}\n")
    print(f"CPU {host_cpu_name()}, {time.strftime('%Y-%m-%d')}, seeds {args.seed}..{args.seed + args.n - 1}, "
          f"max {args.max_nodes} ops, wall {wall:.0f} s ({wall / max(args.n, 1):.1f} s/model)\n")
    print("| models | compiled OK | refused | mismatches | other errors | of which known bugs | new findings |\n"
          "|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.n} | {status['ok']} | {status['refused']} | {status['mismatch']} | {status['error']} "
          f"| {sum(known.values())} | {len(findings)} |\n")
    if known:
        print("| known bug (tests/fuzz/known_bugs.py) | models |\n|---|---:|")
        for name, n in known.most_common():
            print(f"| {name} | {n} |")
        print()
    if refused:
        print("| refused op | models |\n|---|---:|")
        for op, n in refused.most_common():
            print(f"| {op} | {n} |")
        print()
    print("| op | nodes |\n|---|---:|")
    for op, n in sorted(coverage.items()):
        print(f"| {op} | {n} |")
    # one minimisation per culprit: a later finding with the same signature that contains the
    # op a minimal repro ends in is taken to be the same bug (each minimisation is a dozen builds)
    culprits: dict[tuple[str, str], int] = {}
    for seed, spec, out in findings:
        same = [s for (sig, label), s in culprits.items() if sig == out.signature and label in spec.labels()]
        if same:
            print(f"\n### seed {seed}: {out.status}, taken to be the bug of seed {same[0]}")
            continue
        small = spec if args.no_minimise else gen.minimise(spec)
        culprits[(out.signature, small.nodes[small.outputs[0]].label)] = seed
        again = gen.check(small)
        print(f"\n### seed {seed}: {out.status} (minimised: {again.status}, max rel error "
              f"{again.max_rel_error}) {again.error[:300]}\n\n```\n{gen.describe_spec(small)}\n```\n\n```python\n"
              f"{gen.repro(small)}\n```")
    if args.json:
        args.json.write_text(json.dumps({"wall_s": wall, "cpu": host_cpu_name(), "rows": rows}, indent=1,
                                        default=str))
    return 1 if findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
