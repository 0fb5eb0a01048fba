"""`qdllm-eval`: not implemented yet; it says so instead of pretending."""
import sys


def main() -> None:
    print("qdllm-eval: not yet: the masked-diffusion evaluator has not landed in this version of qdllm",
          file=sys.stderr)
    sys.exit(2)
