"""qdllm.quantizer: Quant-dLLM (MCS + DAQ + ABMP), the baselines, and `qdllm-convert`."""
