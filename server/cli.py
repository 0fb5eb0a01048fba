"""`qdllm-serve MODEL`: the OpenAI-compatible server for an artifact or a plain HF checkpoint."""
from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import socket
import sys
from dataclasses import fields
from pathlib import Path

import torch

from qdllm.engine import LLM, AsyncEngine, EngineCore, SamplingParams
from qdllm.engine.artifact import MANIFEST
from qdllm.engine.errors import ArgumentParser, CheckpointError, bounded, byte_size
from qdllm.engine.kv_cache import PAGE
from qdllm.engine.loader import BACKENDS, check_dir, resolve_device

from .app import ServerConfig, create_app
from .shutdown import serve


def parser() -> ArgumentParser:
    ap = ArgumentParser(prog="qdllm-serve", description="Serve a qdllm artifact or an HF dLLM checkpoint "
                                                        "through an OpenAI-compatible HTTP API.")
    ap.add_argument("model", type=Path, help="artifact folder (from qdllm-convert) or HF checkpoint folder")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ap.add_argument("--port", type=bounded(int, "--port", 0, 65535), default=8000, help="port (default 8000)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="compute dtype (default: float32 on CPU, the checkpoint's on GPU)")
    ap.add_argument("--backend", choices=BACKENDS, default="auto",
                    help="kernels: auto, torch, triton, or dense (an artifact dequantized at load)")
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    ap.add_argument("--max-batch", type=bounded(int, "--max-batch", 1, 65536), default=8,
                    help="requests denoised together (default 8; a CFG request counts two)")
    ap.add_argument("--max-batch-tokens", type=bounded(int, "--max-batch-tokens", 1), default=16384,
                    help="token budget of the running requests' whole sequences (default 16384)")
    ap.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                    help="replay forwards of up to 2048 padded tokens from CUDA graphs (default: on for a CUDA "
                         "device; --no-cuda-graphs saves their memory pool)")
    ap.add_argument("--max-model-len", type=bounded(int, "--max-model-len", 1), default=None,
                    help="longest prompt plus canvas (default: the model's context, or what --kv-cache-memory holds)")
    ap.add_argument("--kv-cache-memory", type=byte_size("--kv-cache-memory"), default=None,
                    help="bytes for the KV pool, allocated at start-up (e.g. 2GiB; default: grow as requests need)")
    ap.add_argument("--max-queue", type=bounded(int, "--max-queue", 1), default=128,
                    help="requests waiting before new ones get 503 (default 128)")
    ap.add_argument("--max-n", type=bounded(int, "--max-n", 1), default=16, help="largest n per request (default 16)")
    ap.add_argument("--shutdown-timeout", type=bounded(float, "--shutdown-timeout", 0, 3600), default=10.0,
                    metavar="SECONDS", help="on SIGINT/SIGTERM, how long requests in flight may still run before "
                                            "they end with 503 (default 10; a second Ctrl+C ends them at once)")
    ap.add_argument("--body-timeout", type=bounded(float, "--body-timeout", 0.1, 3600), default=60.0,
                    metavar="SECONDS", help="time a request's body may take to arrive before it gets 408 (default 60)")
    ap.add_argument("--chat-template", type=Path, default=None, metavar="FILE",
                    help="a Jinja chat template instead of the tokenizer's (a base model has none)")
    ap.add_argument("--served-model-name", default=None,
                    help="the model id clients send (default: MODEL's folder name)")
    ap.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                    help="the lowest level of log messages printed, qdllm's and uvicorn's (default info: the start-up "
                         "lines and one line per finished request)")
    return ap


def generation_defaults(path: Path, engine: EngineCore) -> dict:
    """The artifact's default generation settings (its manifest's `generation`), checked now, against this
    engine too (a one-token prompt must fit), rather than on the first request; {} for a plain checkpoint.
    (The manifest itself was checked when the model loaded.)"""
    file = path / MANIFEST
    if not file.is_file():
        return {}
    generation = json.loads(file.read_text()).get("generation", {})
    if not isinstance(generation, dict):
        raise CheckpointError(f"{file}: field 'generation' must be an object of sampling settings")
    known = [f.name for f in fields(SamplingParams) if f.name not in ("seed", "stop")]  # per request only
    unknown = sorted(generation.keys() - set(known))
    if unknown:  # a misspelt default would go unused, as a misspelt request field is refused
        raise CheckpointError(f"{file}: field 'generation.{unknown[0]}' is not a default generation setting "
                              f"(expected some of {known})")
    try:
        engine.check([0], SamplingParams(**generation))
    except ValueError as e:
        if m := re.match(r"SamplingParams\.(\w+) (.*)", str(e)):
            raise CheckpointError(f"{file}: field 'generation.{m[1]}' {m[2]}") from None
        where = f"generation.{e.field}" if getattr(e, "field", None) else "generation"
        raise CheckpointError(f"{file}: field '{where}': {e}") from None
    return generation


def check_bind(host: str, port: int) -> None:
    """Refuse an address that cannot be bound before the model loads; uvicorn would fail later, in several log
    lines. Binds every address of `host` as asyncio's create_server (under uvicorn) does, then lets go."""
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                                  flags=socket.AI_PASSIVE):
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind(address)
    except OSError as e:  # socket.gaierror included
        raise ValueError(f"--host {host} --port {port}: cannot bind ({e.strerror or e})") from None


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.api_key is not None and not (args.api_key.strip() and args.api_key.isprintable()):
            raise ValueError("--api-key must be a non-empty printable string (an empty key would turn auth off)")
        if args.served_model_name is not None and not args.served_model_name.strip():
            raise ValueError("--served-model-name must be a non-empty model id")
        device = resolve_device(args.device, "--device")
        if args.cuda_graphs and device.type != "cuda":
            raise ValueError(f"--cuda-graphs needs a CUDA device; the device is {device}")
        check_dir(args.model, "an artifact or a Hugging Face checkpoint directory")
        check_bind(args.host, args.port)  # before the weights load, which can take minutes
        dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if device.type == "cpu" else None)
        llm = LLM(args.model, device=device, backend=args.backend, dtype=dtype, max_num_seqs=args.max_batch,
                  max_batch_tokens=args.max_batch_tokens, max_model_len=args.max_model_len,
                  cuda_graphs=args.cuda_graphs, kv_cache_memory=args.kv_cache_memory, chat_template=args.chat_template)
        defaults = generation_defaults(args.model, llm.engine)
    except ValueError as e:  # CheckpointError and bad settings: one line each, naming the engine's settings as flags
        message = re.sub(r"\b(kv_cache_memory|max_model_len)\b", lambda m: "--" + m[1].replace("_", "-"), str(e))
        print(f"qdllm-serve: error: {message}", file=sys.stderr)
        sys.exit(2)
    engine = AsyncEngine(llm.engine, max_queue=args.max_queue)
    config = ServerConfig(args.served_model_name or args.model.resolve().name, defaults, args.api_key, args.max_n,
                          body_timeout_s=args.body_timeout)
    app = create_app(engine, llm.tokenizer, config)

    log = logging.getLogger("qdllm.server")
    log.info("serving %s as '%s' on http://%s:%d/v1 (%s, %s)", args.model, config.model_name, args.host, args.port,
             device, next(llm.model.parameters()).dtype)
    core = llm.engine
    pool = core.pool
    if pool.max_pages is None:
        log.info("KV pool: %d positions in pages of %d, %.3g GiB, allocated; max_model_len %d", pool.capacity, PAGE,
                 pool.nbytes / 2**30, core.max_model_len)
    else:
        log.info("KV pool: grown as cached requests need, up to %d positions in pages of %d; max_model_len %d",
                 pool.page_limit * PAGE, PAGE, core.max_model_len)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the handlers it found;
    # these make that last step a no-op, so a graceful shutdown exits 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    serve(app, engine, args.host, args.port, args.log_level, args.shutdown_timeout)
