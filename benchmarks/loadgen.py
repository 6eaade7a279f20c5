"""The hot-path benchmark's load generator, run in its own process so it does not share the server's
interpreter: ``ragline.loadtest.run_load`` against 127.0.0.1 only.

    python benchmarks/loadgen.py --url http://127.0.0.1:8080 --path /healthz \\
        --total 5000 --concurrency 16 --time-limit 20 --warmup 200
    python benchmarks/loadgen.py --url http://127.0.0.1:8080 --method POST --path /v1/query \\
        --bodies queries.jsonl --count '"tier":"l1"' --json

``--bodies`` is a JSON-lines file, one request body per line, used round-robin.  To measure your own
deployment (any host), use ``ragline bench --url`` instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx
import orjson
from _common import REPO  # noqa: F401  (puts the checkout first on sys.path)

from ragline.loadtest import Req, check_url, run_load_sync

LOCAL_HOSTS = frozenset({"127.0.0.1"})


def check_local_url(url: str) -> str:
    """``url`` normalised if it targets 127.0.0.1; else ``ValueError`` (a benchmark loads only this box)."""
    base = check_url(url)
    if httpx.URL(base).host not in LOCAL_HOSTS:
        raise ValueError(f"refusing to load {httpx.URL(base).host!r}: benchmarks only target 127.0.0.1")
    return base


def _read_bodies(path: Path) -> list[bytes]:
    return [orjson.dumps(orjson.loads(line)) for line in path.read_bytes().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python benchmarks/loadgen.py", description="Bounded HTTP load against 127.0.0.1 (see module docs)."
    )
    p.add_argument("--url", required=True, help="base URL, http://127.0.0.1:PORT")
    p.add_argument("--method", default="GET")
    p.add_argument("--path", default="/healthz")
    p.add_argument("--bodies", type=Path, default=None, help="JSON-lines file of request bodies (round-robin)")
    p.add_argument("--total", type=int, default=5000, help="measured requests (upper bound)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--time-limit", type=float, default=20.0, help="seconds (upper bound)")
    p.add_argument("--warmup", type=int, default=0, help="unmeasured requests first")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, seconds")
    p.add_argument("--think", type=float, default=0.0, help="pause per worker between requests, seconds")
    p.add_argument("--count", action="append", default=[], help="tally responses containing this substring")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    a = p.parse_args(argv)
    try:
        base = check_local_url(a.url)
    except ValueError as exc:
        p.error(str(exc))
    method = a.method.upper()
    reqs = [Req(method, a.path, b) for b in _read_bodies(a.bodies)] if a.bodies is not None else [Req(method, a.path)]
    res = run_load_sync(
        base,
        reqs,
        total=a.total,
        concurrency=a.concurrency,
        time_limit_s=a.time_limit,
        warmup=a.warmup,
        timeout_s=a.timeout,
        think_time_s=a.think,
        count_substrings=[s.encode() for s in a.count],
    )
    if a.json:
        sys.stdout.write(orjson.dumps(res.to_dict()).decode() + "\n")
    else:
        print(
            f"{method} {a.path}: {res.requests} requests in {res.duration_s:.2f} s ({res.stopped_by}) = "
            f"{res.rps:.0f} req/s; p50 {res.p50_ms:.2f} ms, p90 {res.p90_ms:.2f} ms, p99 {res.p99_ms:.2f} ms; "
            f"errors {res.errors} {res.error_kinds or ''}; client CPU {res.client_cpu_util:.0%}"
        )
        if res.substring_counts:
            print("substrings:", res.substring_counts)
    return 0 if res.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
