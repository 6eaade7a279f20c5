"""Output of the hot-path benchmark: the printed tables and the PNG (split from hotpath.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

TARGET_RATIO = 0.6
"""Target of the req/s ratio POST /v1/query (exact hit) / GET /healthz."""


def print_in_process(report: dict[str, Any]) -> None:
    ip = report["in_process"]
    print(f"\n(a) in-process                         {'p50 ms':>10}{'p99 ms':>10}")
    for name in ("hit_ask_body", "hit_ask_body_with_timings", "hit_ask", "hit_l3_ask_body", "uncached_first_request"):
        print(f"    {name:<35}{ip[name]['p50_ms']:>10.4f}{ip[name]['p99_ms']:>10.3f}")
    print("    app over raw ASGI, CPU µs/request   healthz  query hit  ratio")
    for name, v in report["asgi_in_process"].items():
        if isinstance(v, dict) and "healthz_cpu_us" in v:
            print(
                f"      {name:<33}{v['healthz_cpu_us']:>8.1f}{v['query_hit_cpu_us']:>11.1f}"
                f"{v['ratio_healthz_over_query']:>7.2f}"
            )


def print_report(report: dict[str, Any]) -> None:
    print_in_process(report)
    h = report["http"]
    if h["load_generator"].startswith("wrk"):
        import _hotpath_wrk

        _hotpath_wrk.print_summary(h)
    else:
        _print_python_client(report)
    llm = report["llm"]
    print(
        f"\n(c) fake upstream {llm['upstream']['latency_ms']:.0f} ms + {llm['upstream']['tokens_per_s']:.0f} tok/s: "
        f"uncached median {llm['median_uncached_ms']:.1f} ms, cached median {llm['median_cached_ms']:.2f} ms, "
        f"speed-up ×{llm['speedup_median']}; upstream calls {llm['upstream_calls']}"
    )
    for route, p in report["profile"].items():
        pk = list(p["own_time_by_package_us_per_req"].items())[:8]
        print(
            f"\nprofile {route}: {p['profiled_us_per_req']} µs/req (under cProfile); own time by package: "
            + ", ".join(f"{k} {v}" for k, v in pk)
        )
    print(
        f"\nchecks: {report['checks']}  ({report['seconds']} s; load average "
        f"{report['machine']['loadavg_start']} → {report['machine']['loadavg_end']})"
    )


def _print_python_client(report: dict[str, Any]) -> None:
    h = report["http"]
    print(
        f"\n(b) HTTP, {report['server']['workers']} workers, {h['load_generator']} in a separate process "
        f"(median of {len(h['ratio_rps_per_round'])} rounds)"
    )
    print(
        f"    {'route':<12}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'client CPU':>12}{'client µs/req':>15}"
        f"{'server µs/req':>15}"
    )
    for name in ("healthz", "query_hit"):
        r = h[name]
        print(
            f"    {name:<12}{r['rps_median']:>8.0f}{r['p50_ms_median']:>9.2f}{r['p99_ms_median']:>9.2f}"
            f"{r['client_cpu_util_median']:>12.0%}{r['client_cpu_us_per_req_median']:>15.0f}"
            f"{r['server_cpu_us_per_req_median']:>15.0f}"
        )
    print(
        f"    ratio query/healthz: req/s {h['ratio_rps']} (median of paired rounds {h['ratio_rps_per_round']}; "
        f"of medians {h['ratio_rps_of_medians']}), server CPU per request {h['ratio_server_cpu']} "
        f"(rounds {h['ratio_server_cpu_per_round']}); target ≥ {TARGET_RATIO}; "
        f"L1 hits {h['query_hits_from_l1']}"
    )


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.2))
    ip = report["in_process"]
    names = ["hit_ask_body", "hit_ask", "hit_l3_ask_body", "uncached_first_request"]
    x = np.arange(len(names))
    a1.bar(x - 0.2, [ip[n]["p50_ms"] for n in names], 0.4, label="p50")
    a1.bar(x + 0.2, [ip[n]["p99_ms"] for n in names], 0.4, label="p99")
    a1.set_yscale("log")
    a1.set_xticks(x, ["L1 hit\nask_body", "L1 hit\nask", "L3 hit\nask_body", "uncached\n(extractive)"], fontsize=8)
    a1.set_ylabel("ms (log)")
    a1.set_title("(a) in-process latency")
    a1.legend()
    h = report["http"]
    if h["load_generator"].startswith("wrk"):
        rounds = len(h["ratio_vs_hello_per_round"])
        xr = np.arange(rounds)
        for off, (t, label) in zip(
            (-0.27, 0.0, 0.27),
            (("hello", "FastAPI hello world"), ("healthz", "ragline /healthz"), ("query_hit", "ragline exact hit")),
            strict=True,
        ):
            a2.bar(xr + off, [r["rps"] for r in h["runs"] if r["target"] == t], 0.27, label=label)
        a2.set_xticks(xr, [f"round {i}" for i in range(rounds)], fontsize=8)
        a2.set_title(
            f"(b) wrk, {report['server']['workers']} workers: hit/hello {h['ratio_vs_hello']}, "
            f"hit/healthz {h['ratio_vs_healthz']}",
            fontsize=9,
        )
    else:
        rounds = len(h["ratio_rps_per_round"])
        xr = np.arange(rounds)
        hz = [r["rps"] for r in h["runs"] if r["route"] == "healthz"]
        qh = [r["rps"] for r in h["runs"] if r["route"] == "query_hit"]
        a2.bar(xr - 0.2, hz, 0.4, label="GET /healthz")
        a2.bar(xr + 0.2, qh, 0.4, label="POST /v1/query (hit)")
        a2.set_xticks(xr, [f"round {i}\nratio {v}" for i, v in enumerate(h["ratio_rps_per_round"])], fontsize=8)
        a2.set_title(
            f"(b) HTTP (Python client), {report['server']['workers']} workers: ratio {h['ratio_rps']} "
            f"(target ≥ {TARGET_RATIO})"
        )
    a2.set_ylabel("req/s")
    a2.legend(fontsize=8)
    llm = report["llm"]
    a3.bar([0, 1], [llm["median_uncached_ms"], llm["median_cached_ms"]], color=["tab:red", "tab:green"])
    a3.set_yscale("log")
    a3.set_xticks([0, 1], ["uncached\n(bypass)", "cached\n(exact hit)"])
    a3.set_ylabel("median ms (log)")
    a3.set_title(
        f"(c) fake LLM {llm['upstream']['latency_ms']:.0f} ms + {llm['upstream']['tokens_per_s']:.0f} tok/s:"
        f" ×{llm['speedup_median']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
