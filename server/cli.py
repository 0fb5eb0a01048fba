"""`qdllm-serve`: not implemented yet; it says so instead of pretending."""
import sys


def main() -> None:
    print("qdllm-serve: not yet: the HTTP server has not landed in this version of qdllm; "
          "use qdllm.engine.LLM from Python meanwhile", file=sys.stderr)
    sys.exit(2)
