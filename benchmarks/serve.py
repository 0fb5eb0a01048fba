"""Serving: a load generator against qdllm-serve over loopback, sweeping the number of concurrent clients.

    python benchmarks/serve.py build/shakespeare-2bit                # starts qdllm-serve itself
    python benchmarks/serve.py --url http://127.0.0.1:8000           # or targets a running server

Each client sends streaming chat requests back to back (prompts: speeches from the test plays) until the
level has sent its request count or spent its time bound. Per level it reports requests/s, generated
tokens/s (completion tokens from the usage chunk, never the prompt), and latency and time-to-first-text
percentiles, with min/median/max of the throughputs over repeats. Writes JSON and a PNG to
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from common import description, environment, write_results
from qdllm.engine.loader import resolve_device
from shakespeare import speeches

ASSET = Path(__file__).parents[1] / "assets" / "llada-shakespeare"


def percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]


async def one_request(client: httpx.AsyncClient, body: dict) -> dict:
    start = time.perf_counter()
    first, usage = None, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"ok": False, "status": chunk["error"].get("code")}
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter()
            usage = chunk.get("usage") or usage
    end = time.perf_counter()
    return {"ok": True, "latency": end - start, "first": (first or end) - start,
            "tokens": usage["completion_tokens"] if usage else 0}


async def level(url: str, headers: dict, bodies: list[dict], clients: int, requests: int, max_s: float) -> dict:
    """`clients` workers send back to back until `requests` are sent or `max_s` has passed."""
    sent, results = 0, []
    deadline = time.perf_counter() + max_s
    limits = httpx.Limits(max_connections=clients + 4)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            body = bodies[sent % len(bodies)]
            sent += 1
            results.append(await one_request(client, body))

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    return {"wall_s": wall, "requests": len(results), "ok": len(ok), "errors": len(results) - len(ok),
            "requests_per_s": len(ok) / wall, "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "latency_s": [r["latency"] for r in ok], "first_text_s": [r["first"] for r in ok]}


def start_server(model: str, args: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = Path(sys.executable).parent / "qdllm-serve"
    proc = subprocess.Popen([str(serve), model, "--port", str(port), "--log-level", "warning", *shlex.split(args)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"serve benchmark: qdllm-serve exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.25)
    proc.kill()
    sys.exit("serve benchmark: qdllm-serve did not become ready")


def plot(file: Path, record: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["results"]
    c = [r["clients"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    a1.plot(c, [r["tokens_per_s"]["median"] for r in rows], "o-")
    a1.set(xscale="log", xlabel="concurrent clients", ylabel="generated tokens/s (median)")
    a2.plot(c, [r["latency_s"]["p50"] for r in rows], "o-", label="p50")
    a2.plot(c, [r["latency_s"]["p99"] for r in rows], "o-", label="p99")
    a2.set(xscale="log", xlabel="concurrent clients", ylabel="request latency (s)")
    a2.legend()
    s = record["settings"]
    fig.suptitle(f"qdllm-serve {s['model']}, max_tokens {s['max_tokens']}, {s['extra']}\n"
                 f"{record['environment']['device']}, {record['environment']['date']}")
    fig.tight_layout()
    fig.savefig(file, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("model", nargs="?", default=None, help="artifact or checkpoint to serve (omit with --url)")
    ap.add_argument("--url", default=None, help="a running server instead of starting one")
    ap.add_argument("--server-args", default="--max-batch 16", help="extra qdllm-serve flags when starting one")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--clients", default="1,2,4,8,16,32,64", help="comma-separated concurrency levels")
    ap.add_argument("--requests", type=int, default=32, help="requests per level (at least one per client)")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="time bound per level and repeat")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--extra", default='{"block_length": 32, "cache": "prefix", "threshold": 0.9}',
                    help="diffusion settings sent with every request (JSON)")
    ap.add_argument("--out", default="benchmarks/results/serve")
    args = ap.parse_args()
    if (args.model is None) == (args.url is None):
        ap.error("give a MODEL to serve or --url of a running server (one of them)")

    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args.model, args.server_args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        model = httpx.get(url + "/v1/models", headers=headers).json()["data"][0]["id"]
        extra = json.loads(args.extra)
        bodies = [{"model": model, "messages": [{"role": "user", "content": s}], "max_tokens": args.max_tokens,
                   "stream": True, "stream_options": {"include_usage": True}, **extra}
                  for s in speeches(ASSET / "data" / "test.txt", 64)]
        levels = [int(c) for c in args.clients.split(",")]
        results = []
        for clients in tqdm(levels, desc="serve benchmark", unit="level"):
            runs = [asyncio.run(level(url, headers, bodies, clients, max(args.requests, clients), args.max_seconds))
                    for _ in range(args.repeats)]
            lat = sum((r["latency_s"] for r in runs), [])
            first = sum((r["first_text_s"] for r in runs), [])
            results.append({
                "clients": clients, "requests": sum(r["requests"] for r in runs),
                "errors": sum(r["errors"] for r in runs),
                **{k: {"min": min(r[k] for r in runs), "median": statistics.median(r[k] for r in runs),
                       "max": max(r[k] for r in runs)} for k in ("requests_per_s", "tokens_per_s")},
                "latency_s": {"p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99), "max": max(lat)},
                "first_text_s": {"p50": percentile(first, 0.5), "p99": percentile(first, 0.99)},
            })
        metrics = httpx.get(url + "/metrics").text
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    record = {"benchmark": "serve", "environment": environment(resolve_device(None)),
              "server": {"url": url, "started_here": proc is not None,
                         "args": args.server_args if proc is not None else None},
              "settings": {"model": args.model or model, "clients": levels, "requests": args.requests,
                           "max_seconds": args.max_seconds, "repeats": args.repeats, "max_tokens": args.max_tokens,
                           "extra": extra, "prompts": "first 64 speeches of the test plays, as chat turns"},
              "results": results,
              "server_metrics_tail": [line for line in metrics.splitlines() if line.startswith("qdllm_engine")]}
    out = Path(args.out)
    write_results(out, record, plot)
    for r in results:
        print(f"{r['clients']:>3} clients: {r['requests_per_s']['median']:6.2f} req/s, "
              f"{r['tokens_per_s']['median']:7.1f} tok/s, latency p50 {r['latency_s']['p50']:.2f} s "
              f"p99 {r['latency_s']['p99']:.2f} s, errors {r['errors']}")


if __name__ == "__main__":
    main()
