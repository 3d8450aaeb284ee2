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
    """Every series carries `model_name` (vLLM's label), so dashboards built for several
    servers, or several models, keep them apart."""

    def __init__(self, model_name: str = "") -> None:
        self.registry = r = CollectorRegistry()
        self.model_name = model_name
        p, m = "parcae_", ["model_name"]

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"{p}{name}", doc, m, registry=r).labels(model_name)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"{p}{name}", doc, m, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(f"{p}{name}", doc, m, buckets=buckets, registry=r).labels(model_name)

        # vLLM's request_success_total{finished_reason}: stop | length | abort | error
        self._requests = Counter(f"{p}requests", "Finished requests by finish reason",
                                 [*m, "finished_reason"], registry=r)  # fmt: skip
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens received")
        self.generation_tokens = counter("generation_tokens", "Tokens generated")
        self.loops = counter("recurrence_loops", "Recurrent-block loops run")
        self.early_exits = counter("early_exits", "Tokens that exited early")
        self.compiled_tokens = counter(
            "compiled_decode_tokens", "Decode tokens run by a compiled graph"
        )
        self.compiled_prefill = counter(
            "compiled_prefill_tokens", "Prompt tokens prefilled by a compiled graph"
        )
        self.prefix_queries = counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache"
        )
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self.preemptions = counter(
            "preemptions", "Sequences preempted for cache memory (swapped out)"
        )
        # vLLM's spec_decode_num_draft_tokens / num_accepted_tokens / draft_acceptance_rate
        self.draft_tokens = counter("spec_decode_draft_tokens", "Speculative tokens drafted")
        self.accepted_tokens = counter(
            "spec_decode_accepted_tokens", "Drafted tokens the full-depth verify pass kept"
        )
        self.acceptance_rate = gauge(
            "spec_decode_acceptance_rate", "Accepted / drafted tokens since the server started"
        )
        self.running = gauge("requests_running", "Sequences being computed")
        self.waiting = gauge("requests_waiting", "Sequences waiting to start")
        self.kv_usage = gauge("kv_cache_usage_ratio", "KV-cache bytes in use / pool")
        self.kv_bytes = gauge("kv_cache_used_bytes", "KV-cache bytes in use")
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token", TTFT_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds", "Time per output token",
                              TPOT_BUCKETS)  # fmt: skip
        self.e2e = histogram("e2e_request_latency_seconds", "Request latency", E2E_BUCKETS)
        self.queue_time = histogram("queue_time_seconds", "Time waiting before admission",
                                    E2E_BUCKETS)  # fmt: skip
        self.depth = histogram("recurrence_depth", "Loops per token", DEPTH_BUCKETS)
        self.batch = histogram("batch_size", "Tokens per recurrent loop step", BATCH_BUCKETS)

    def finished(self, reason: str) -> None:
        """Count a finished request under its finish reason."""
        self._requests.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
