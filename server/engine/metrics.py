"""Prometheus metrics (prefix `parcae_`, vLLM's names and buckets as the model).

Each server owns its registry, so several engines in one process (tests) never collide. The
engine calls these once per step or per finished request, never per loop.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # vLLM-style exposition: no *_created series

# vLLM's latency buckets (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
DEPTH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        p = "parcae_"
        self.requests = Counter(
            f"{p}requests", "Finished requests by status", ["status"], registry=r
        )
        self.prompt_tokens = Counter(f"{p}prompt_tokens", "Prompt tokens received", registry=r)
        self.generation_tokens = Counter(f"{p}generation_tokens", "Tokens generated", registry=r)
        self.loops = Counter(f"{p}recurrence_loops", "Recurrent-block loops run", registry=r)
        self.early_exits = Counter(f"{p}early_exits", "Tokens that exited early", registry=r)
        self.compiled_tokens = Counter(
            f"{p}compiled_decode_tokens", "Decode tokens run by a compiled graph", registry=r
        )
        self.prefix_queries = Counter(f"{p}prefix_cache_queries", "Prefix lookups", registry=r)
        self.prefix_hits = Counter(f"{p}prefix_cache_hits", "Prefix lookups that hit", registry=r)
        self.preemptions = Counter(
            f"{p}preemptions", "Sequences preempted for cache memory (swapped out)", registry=r
        )
        self.running = Gauge(f"{p}requests_running", "Sequences being computed", registry=r)
        self.waiting = Gauge(f"{p}requests_waiting", "Sequences waiting to start", registry=r)
        self.kv_usage = Gauge(
            f"{p}kv_cache_usage_ratio", "KV-cache bytes in use / pool", registry=r
        )
        self.kv_bytes = Gauge(f"{p}kv_cache_used_bytes", "KV-cache bytes in use", registry=r)
        self.ttft = Histogram(f"{p}time_to_first_token_seconds", "Time to first token",
                              buckets=TTFT_BUCKETS, registry=r)  # fmt: skip
        self.tpot = Histogram(f"{p}time_per_output_token_seconds", "Time per output token",
                              buckets=TPOT_BUCKETS, registry=r)  # fmt: skip
        self.e2e = Histogram(f"{p}e2e_request_latency_seconds", "Request latency",
                             buckets=E2E_BUCKETS, registry=r)  # fmt: skip
        self.queue_time = Histogram(f"{p}queue_time_seconds", "Time waiting before admission",
                                    buckets=E2E_BUCKETS, registry=r)  # fmt: skip
        self.depth = Histogram(f"{p}recurrence_depth", "Loops per token",
                               buckets=DEPTH_BUCKETS, registry=r)  # fmt: skip
        self.batch = Histogram(f"{p}batch_size", "Tokens per recurrent loop step",
                               buckets=BATCH_BUCKETS, registry=r)  # fmt: skip

    def render(self) -> bytes:
        return generate_latest(self.registry)
