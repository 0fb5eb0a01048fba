"""The demo behind `make demo`: serve a 2-bit artifact with qdllm-serve, ask it one chat question through
the official openai client, print the streamed answer and the timings, and stop the server.

    python examples/demo.py build/shakespeare-2bit
"""
from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import OpenAI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            sys.exit(f"demo: qdllm-serve exited with code {server.returncode} before it was ready")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    sys.exit(f"demo: qdllm-serve was not ready after {timeout:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="artifact or checkpoint folder to serve")
    ap.add_argument("--question", default="Who is there? Stand, and unfold yourself.")
    ap.add_argument("--max-tokens", type=int, default=96)
    args = ap.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = Path(sys.executable).parent / "qdllm-serve"
    print(f"demo: starting qdllm-serve {args.model} on {url}", flush=True)
    t0 = time.perf_counter()
    server = subprocess.Popen([str(serve), str(args.model), "--port", str(port), "--log-level", "warning"])
    try:
        wait_healthy(url, server, timeout=300)
        print(f"demo: server ready in {time.perf_counter() - t0:.1f} s", flush=True)
        client = OpenAI(base_url=url + "/v1", api_key="demo", max_retries=0)
        model = client.models.list().data[0].id
        print(f"\nUSER: {args.question}\nASSISTANT:", flush=True)
        start = time.perf_counter()
        first = None
        usage = None
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": args.question}], max_tokens=args.max_tokens,
            stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    first = first or time.perf_counter()
                    print(choice.delta.content, end="", flush=True)
            usage = chunk.usage or usage
        total = time.perf_counter() - start
        print("\n")
        if first is not None:
            print(f"demo: first text after {first - start:.2f} s, answer complete after {total:.2f} s")
        if usage is not None:
            print(f"demo: {usage.prompt_tokens} prompt tokens, {usage.completion_tokens} generated tokens, "
                  f"{usage.completion_tokens / total:.1f} generated tokens/s")
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        print(f"demo: server stopped (exit code {server.returncode})")


if __name__ == "__main__":
    main()
