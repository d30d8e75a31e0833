"""Throughput of the RPC farm: distinct small candidates measured per minute, 1 vs 2 servers.

Starts a real tracker and N real servers on 127.0.0.1 (TVM_NUM_THREADS=1 each), then measures
a batch of structurally distinct candidates with ``Oracle.measure_many`` (fresh store, so every
candidate is compiled here and measured there). Two figures per farm size:

- end to end: compile here (one producer thread) + upload/load/time on the devices;
- device phase: the same candidates compiled beforehand, only the farm's part (lease, upload,
  load, time) -- what more servers can speed up.

    .venv/bin/python benchmarks/bench_rpc.py --candidates 12 --servers 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from omnic import engine  # noqa: E402
from omnic.core.deployment import Deployment  # noqa: E402
from omnic.core.measure import MeasureConfig  # noqa: E402
from omnic.oracle import LatencyStore, Oracle  # noqa: E402
from omnic.remote.batch import BatchConfig, FarmBatch  # noqa: E402
from omnic.remote.farm import LocalFarm  # noqa: E402
from omnic.remote.session import export_for_upload  # noqa: E402


class Candidate(nn.Module):
    def __init__(self, w1: int, w2: int):
        super().__init__()
        self.c1 = nn.Conv2d(3, w1, 3, padding=1)
        self.c2 = nn.Conv2d(w1, w2, 3, padding=1, stride=2)
        self.fc = nn.Linear(w2, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean(dim=(2, 3)))


def candidates(n: int) -> list[nn.Module]:
    widths = [(8 + 4 * (i % 6), 16 + 8 * (i // 6)) for i in range(n)]
    return [Candidate(a, b).eval() for a, b in widths]


def run(n_servers: int, n_candidates: int, config: MeasureConfig) -> dict:
    x = torch.randn(1, 3, 32, 32)
    models = candidates(n_candidates)
    with LocalFarm(servers=n_servers, threads=1) as farm, tempfile.TemporaryDirectory() as tmp:
        dep = {"device": "host", "tracker": farm.address}
        oracle = Oracle(LatencyStore(Path(tmp) / "e2e.sqlite"), config, compile_fn=engine.compile)
        t0 = time.perf_counter()
        results = oracle.measure_many(models, dep, x)
        e2e = time.perf_counter() - t0
        assert all(m.ok for m in results), [m.error for m in results]

        # device phase only: compile first, then hand the farm ready libraries
        deployment = Deployment.coerce(dep)
        libs = []
        for m in models:
            dm = engine.compile(m, deployment, x, check=False, progress=False)
            libs.append((export_for_upload(dm.executable, deployment, tmp), dm.input_shapes, dm.input_dtypes))
        done = []
        batch = FarmBatch(deployment, len(libs), prepare=lambda i: libs[i],
                          on_result=lambda i, m, extra: done.append((m.ok, extra.get("server"))),
                          config=config, batch=BatchConfig())
        t0 = time.perf_counter()
        batch.run(n_servers)
        device = time.perf_counter() - t0
        assert all(ok for ok, _ in done)
    return {"servers": n_servers, "candidates": n_candidates,
            "end_to_end_s": round(e2e, 2), "end_to_end_per_min": round(60 * n_candidates / e2e, 1),
            "device_phase_s": round(device, 2), "device_phase_per_min": round(60 * n_candidates / device, 1),
            "servers_used": len({s for _, s in done}), "median_ms": round(sorted(
                m.median_ms for m in results)[len(results) // 2], 4),
            "load_avg_1min": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--candidates", type=int, default=12)
    p.add_argument("--servers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    config = MeasureConfig()  # the oracle's default protocol
    rows = [run(n, args.candidates, config) for n in args.servers]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'servers':>7} {'e2e s':>7} {'e2e/min':>8} {'device s':>9} {'device/min':>10} {'load':>5}")
        for r in rows:
            print(f"{r['servers']:>7} {r['end_to_end_s']:>7} {r['end_to_end_per_min']:>8} "
                  f"{r['device_phase_s']:>9} {r['device_phase_per_min']:>10} {r['load_avg_1min']:>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
