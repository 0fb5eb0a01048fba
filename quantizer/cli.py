"""`qdllm-convert`: not implemented yet; it says so instead of pretending."""
import sys


def main() -> None:
    print("qdllm-convert: not yet: the quantizer has not landed in this version of qdllm", file=sys.stderr)
    sys.exit(2)
