"""Prometheus text exposition of the server's counters and histograms and the engine's state."""
from __future__ import annotations

import bisect
from collections import defaultdict

from qdllm.engine import AsyncEngine

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
NFE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip(self.buckets, self.counts):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.sum}",
                  f"{self.name}_count {self.count}"]
        return lines


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)  # (endpoint, status) -> count
        self.prompt_tokens = self.completion_tokens = self.nfe = 0
        self.latency = Histogram("qdllm_request_latency_seconds", "Arrival to last token, per choice.",
                                 LATENCY_BUCKETS)
        self.first_block = Histogram("qdllm_time_to_first_block_seconds", "Arrival to the first finished block.",
                                     LATENCY_BUCKETS)
        self.queue = Histogram("qdllm_queue_time_seconds", "Arrival to the first denoising step.", LATENCY_BUCKETS)
        self.nfe_hist = Histogram("qdllm_request_nfe", "Network evaluations per choice.", NFE_BUCKETS)

    def render(self, engine: AsyncEngine) -> str:
        st = engine.stats
        out = ["# HELP qdllm_requests_total HTTP requests by endpoint and status.",
               "# TYPE qdllm_requests_total counter"]
        out += [f'qdllm_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                for (e, s), n in sorted(self.requests.items())]
        for name, kind, help_text, value in [
            ("qdllm_prompt_tokens_total", "counter", "Prompt tokens of finished choices.", self.prompt_tokens),
            ("qdllm_generation_tokens_total", "counter", "Generated tokens returned.", self.completion_tokens),
            ("qdllm_nfe_total", "counter", "Network evaluations spent on returned choices.", self.nfe),
            ("qdllm_engine_steps_total", "counter", "Engine denoising steps.", st.steps),
            ("qdllm_engine_forwards_total", "counter", "Batched forward calls.", st.forwards),
            ("qdllm_aborted_requests_total", "counter", "Engine requests cancelled (client gone, shutdown).",
             st.aborted),
            ("qdllm_failed_requests_total", "counter", "Engine requests that could not run (out of device memory).",
             st.failed),
            ("qdllm_queue_depth", "gauge", "Requests accepted and not yet running.", engine.queue_depth),
            ("qdllm_running_requests", "gauge", "Requests being denoised.", st.running),
            ("qdllm_batch_occupancy", "gauge", "Mean share of sequence slots in use per step.", st.batch_occupancy),
            ("qdllm_kv_cache_usage", "gauge", "Share of the KV pool's pages held by running requests.", st.kv_usage),
        ]:
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        for h in (self.latency, self.first_block, self.queue, self.nfe_hist):
            out += h.render()
        return "\n".join(out) + "\n"
