"""GET /metrics: Prometheus text format (prometheus-client), with vLLM's metric names so its dashboards work as is.

Gauges and counters are read from the engine at scrape time (`engine.stats()`); the latency histograms are fed from
the engine's finished requests (`engine.drain_finished()`) at each scrape. Every series carries `model_name`.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)


class _EngineCollector:
    def __init__(self, engine: Any, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name

    def collect(self):
        s = self.engine.stats()
        label = [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(label, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(label, value)
            return c

        yield gauge("vllm:num_requests_running", "Sequences running (in the batch).", s.num_running)
        yield gauge("vllm:num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", s.kv_cache_usage)
        yield counter("vllm:num_preemptions", "Sequences preempted (recomputed later).", s.num_preemptions)
        yield counter("vllm:prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded).", s.prompt_tokens)
        yield counter("vllm:generation_tokens", "Tokens generated.", s.generation_tokens)
        yield counter("vllm:prefix_cache_queries", "KV blocks looked up in the prefix cache.", s.prefix_cache_queries)
        yield counter("vllm:prefix_cache_hits", "KV blocks found in the prefix cache.", s.prefix_cache_hits)
        yield counter("vllm:spec_decode_num_draft_tokens", "Draft tokens proposed.", s.spec_draft_tokens)
        yield counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.", s.spec_accepted_tokens)
        yield counter("stablelm_fast:engine_steps", "Engine steps run.", s.num_steps)


class Metrics:
    def __init__(self, engine: Any, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, model_name))
        labels = ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Mean inter-token latency of a request.", labels,
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5),
                              registry=self.registry)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency, arrival to finish.", labels,
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.prompt_len = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request.", labels,
                                    buckets=(1, 8, 32, 128, 512, 2048, 8192, 32768), registry=self.registry)
        self.success = Counter("vllm:request_success", "Finished requests, by finish reason.",
                               labels + ["finished_reason"], registry=self.registry)

    def render(self) -> bytes:
        for r in self.engine.drain_finished():
            if r.time_to_first_token is not None:
                self.ttft.labels(self.model_name).observe(r.time_to_first_token)
            if r.time_per_output_token is not None:
                self.tpot.labels(self.model_name).observe(r.time_per_output_token)
            self.e2e.labels(self.model_name).observe(r.e2e_latency)
            self.prompt_len.labels(self.model_name).observe(r.num_prompt_tokens)
            self.success.labels(self.model_name, r.finish_reason).inc()
        return generate_latest(self.registry)
