"""qdllm.kernels: bit packing, the Triton BCQ kernels and their torch reference. Imports no other qdllm folder."""
