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

from common import check_output, description, environment, listed, run_main, write_results
from qdllm.engine.errors import ArgumentParser, bounded
from qdllm.engine.loader import check_dir, resolve_device
from shakespeare import speeches

ASSET = Path(__file__).parents[1] / "assets" / "llada-shakespeare"
SET_HERE = ("model", "messages", "max_tokens", "stream", "stream_options")  # request fields --extra must not set


def base_url(text: str) -> str:
    """--url: a server's base address; the benchmark adds /v1/... itself."""
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL:
        url = None
    if (url is None or url.scheme not in ("http", "https") or not url.host or (url.port or 0) > 65535 or url.query
            or url.fragment or url.path.rstrip("/").endswith("/v1")):
        raise argparse.ArgumentTypeError(f"--url must be a server's base address such as http://127.0.0.1:8000 "
                                         f"(without /v1), got {text!r}")
    return text.rstrip("/")


def extra_fields(text: str) -> dict:
    """--extra: a JSON object of request fields, none of those the benchmark sets itself."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    expected = f"--extra must be a JSON object of request fields such as '{{\"block_length\": 32}}'"
    try:
        extra = json.loads(text, parse_constant=refuse)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{expected} ({e}), got {text!r}") from None
    if not isinstance(extra, dict):
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
    for key in SET_HERE:
        if key in extra:
            raise argparse.ArgumentTypeError(f"--extra must not set {key!r}: the benchmark sets it"
                                             + (" (see --max-tokens)" if key == "max_tokens" else ""))
    return extra


def server_words(ap: argparse.ArgumentParser, model: str, text: str) -> list[str]:
    """--server-args split as a shell would, and checked by qdllm-serve's own parser before it starts."""
    from qdllm.server.cli import parser

    try:
        words = shlex.split(text)
    except ValueError as e:
        ap.error(f"--server-args must be qdllm-serve flags as a shell splits them ({e}), got {text!r}")
    serve = parser()
    serve.error = lambda message: ap.error(f"--server-args {text!r}: {message}")
    parsed = serve.parse_args([model, *words])
    if (parsed.host, parsed.port) != (serve.get_default("host"), serve.get_default("port")):
        ap.error("--server-args must not set --host or --port: the benchmark picks a free loopback port")
    try:
        resolve_device(parsed.device, "--device")
    except ValueError as e:
        ap.error(f"--server-args {text!r}: {e}")
    return words


def server_error(r: httpx.Response) -> str:
    """A refusal in one line: the HTTP status and the server's message (OpenAI's error body, else its text)."""
    try:
        message = r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = r.text.strip()[:200] or r.reason_phrase
    return f"HTTP {r.status_code}: {message}".splitlines()[0]


def percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]


async def one_request(client: httpx.AsyncClient, body: dict) -> dict:
    start = time.perf_counter()
    first, usage = None, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"ok": False, "error": server_error(r)}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"ok": False, "error": f"HTTP {chunk['error'].get('code')}: {chunk['error'].get('message')}"}
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
            "latency_s": [r["latency"] for r in ok], "first_text_s": [r["first"] for r in ok],
            "first_error": next((r["error"] for r in results if not r["ok"]), None)}


def start_server(model: str, words: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = Path(sys.executable).parent / "qdllm-serve"
    proc = subprocess.Popen([str(serve), model, "--log-level", "warning", *words, "--host", "127.0.0.1",
                             "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            if proc.returncode == 2:  # qdllm-serve's refusal (of the model, the device, ...), in its own one line
                sys.exit(2)
            raise ValueError(f"qdllm-serve {model} exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.25)
    proc.kill()
    raise ValueError(f"qdllm-serve {model} did not become ready within 300 s")


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
    ap = ArgumentParser(description=description(__doc__))
    ap.add_argument("model", nargs="?", default=None, help="artifact or checkpoint to serve (omit with --url)")
    ap.add_argument("--url", type=base_url, default=None, help="a running server instead of starting one")
    ap.add_argument("--server-args", default="--max-batch 16", help="extra qdllm-serve flags when starting one")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--clients", type=listed(bounded(int, "--clients", 1, 4096), "--clients"),
                    default="1,2,4,8,16,32,64", help="comma-separated concurrency levels")
    ap.add_argument("--requests", type=bounded(int, "--requests", 1), default=32,
                    help="requests per level (at least one per client)")
    ap.add_argument("--max-seconds", type=bounded(float, "--max-seconds", 1.0), default=120.0,
                    help="time bound per level and repeat")
    ap.add_argument("--repeats", type=bounded(int, "--repeats", 1), default=1)
    ap.add_argument("--max-tokens", type=bounded(int, "--max-tokens", 1), default=64)
    ap.add_argument("--extra", type=extra_fields, default='{"block_length": 32, "cache": "prefix", "threshold": 0.9}',
                    help="diffusion settings sent with every request (JSON)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serve"))
    args = ap.parse_args()
    if (args.model is None) == (args.url is None):
        ap.error("give a MODEL to serve or --url of a running server (one of them)")
    words = None
    if args.model is not None:
        words = server_words(ap, args.model, args.server_args)
        check_dir(Path(args.model), "an artifact or a Hugging Face checkpoint directory")
    check_output("--out", args.out, inputs=[Path(args.model) if args.model else None, ASSET])
    prompts = speeches(ASSET / "data" / "test.txt", 64)

    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args.model, words)
    where = f"--url {url}" if proc is None else f"qdllm-serve at {url}"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        r = httpx.get(url + "/v1/models", headers=headers)
        if r.status_code != 200:
            raise ValueError(f"{where}: GET /v1/models answered {server_error(r)}"
                             + (" (see --api-key)" if r.status_code == 401 else ""))
        try:
            model = r.json()["data"][0]["id"]
        except (ValueError, LookupError, TypeError):
            raise ValueError(f"{where}: GET /v1/models answered no OpenAI model list") from None
        extra = args.extra
        bodies = [{"model": model, "messages": [{"role": "user", "content": s}], "max_tokens": args.max_tokens,
                   "stream": True, "stream_options": {"include_usage": True}, **extra}
                  for s in prompts]
        levels = args.clients
        results = []
        for clients in tqdm(levels, desc="serve benchmark", unit="level"):
            runs = [asyncio.run(level(url, headers, bodies, clients, max(args.requests, clients), args.max_seconds))
                    for _ in range(args.repeats)]
            lat = sum((r["latency_s"] for r in runs), [])
            first = sum((r["first_text_s"] for r in runs), [])
            if not lat:  # percentiles of nothing: say why instead
                errors = [r["first_error"] for r in runs if r["first_error"]]
                raise ValueError(f"{where}: no request at {clients} clients succeeded; the first error: "
                                 + (errors[0] if errors else "none was sent within --max-seconds"))
            results.append({
                "clients": clients, "requests": sum(r["requests"] for r in runs),
                "errors": sum(r["errors"] for r in runs),
                **{k: {"min": min(r[k] for r in runs), "median": statistics.median(r[k] for r in runs),
                       "max": max(r[k] for r in runs)} for k in ("requests_per_s", "tokens_per_s")},
                "latency_s": {"p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99), "max": max(lat)},
                "first_text_s": {"p50": percentile(first, 0.5), "p99": percentile(first, 0.99)},
            })
        metrics = httpx.get(url + "/metrics").text
    except httpx.HTTPError as e:
        raise ValueError(f"{where}: {e or 'no answer'} ({type(e).__name__})") from None
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    record = {"benchmark": "serve", "environment": environment(resolve_device(None)),
              "server": {"url": url, "started_here": proc is not None,
                         "args": args.server_args if proc is not None else None},
              "settings": {"model": args.model or model, "clients": levels, "requests": args.requests,
                           "max_seconds": args.max_seconds, "repeats": args.repeats, "max_tokens": args.max_tokens,
                           "extra": extra, "prompts": "first 64 speeches of the test plays, as chat turns"},
              "results": results,
              "server_metrics_tail": [line for line in metrics.splitlines() if line.startswith("qdllm_engine")]}
    write_results(args.out, record, plot)
    for r in results:
        print(f"{r['clients']:>3} clients: {r['requests_per_s']['median']:6.2f} req/s, "
              f"{r['tokens_per_s']['median']:7.1f} tok/s, latency p50 {r['latency_s']['p50']:.2f} s "
              f"p99 {r['latency_s']['p99']:.2f} s, errors {r['errors']}")


if __name__ == "__main__":
    run_main(main)
