"""qdllm.server: the OpenAI-compatible HTTP server and `qdllm-serve`."""
