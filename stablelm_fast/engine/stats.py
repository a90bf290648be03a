"""What the engine reports about itself: a snapshot for /metrics and the periodic log line, and the latencies of
finished requests (drained by whoever exports them)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

logger = logging.getLogger("stablelm_fast.engine")

LOG_INTERVAL_S = 10.0
FINISHED_LOG_LEN = 100_000  # finished requests kept for an exporter that is not scraping


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV-cache blocks held by sequences
    num_preemptions: int
    prompt_tokens: int  # computed (prefix-cache hits excluded)
    generation_tokens: int
    prefix_cache_queries: int  # blocks looked up / found in the prefix cache
    prefix_cache_hits: int
    spec_draft_tokens: int
    spec_accepted_tokens: int
    num_steps: int


@dataclass(frozen=True)
class FinishedRequest:
    time_to_first_token: float | None
    time_per_output_token: float | None  # mean inter-token latency after the first token
    e2e_latency: float
    finish_reason: str
    num_prompt_tokens: int
    num_generation_tokens: int


class StatsLogger:
    """Logs throughput and load every LOG_INTERVAL_S seconds of engine activity (vLLM's periodic stats line)."""

    def __init__(self) -> None:
        self.last_time = time.monotonic()
        self.last_prompt = self.last_generation = 0

    def maybe_log(self, snapshot: Callable[[], EngineStats]) -> None:
        """Called every step; takes a snapshot only when a line is due."""
        now = time.monotonic()
        elapsed = now - self.last_time
        if elapsed < LOG_INTERVAL_S:
            return
        stats = snapshot()
        logger.info("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, Running: %d "
                    "reqs, Waiting: %d reqs, KV cache usage: %.1f%%, Preemptions: %d",
                    (stats.prompt_tokens - self.last_prompt) / elapsed,
                    (stats.generation_tokens - self.last_generation) / elapsed, stats.num_running, stats.num_waiting,
                    100 * stats.kv_cache_usage, stats.num_preemptions)
        self.last_time, self.last_prompt, self.last_generation = now, stats.prompt_tokens, stats.generation_tokens

