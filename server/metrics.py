"""Prometheus metrics of one app, in the app's own ``CollectorRegistry`` (never the global one).

HTTP metrics are recorded by the middleware; engine metrics (queue, adaptation, sessions) are read
from ``Engine.metrics()`` at scrape time by a custom collector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from refine_tta.engine import EngineMetrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _EngineCollector(Collector):
    def __init__(self, snapshot: Callable[[], EngineMetrics | None]):
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        m = self._snapshot()
        yield GaugeMetricFamily("refine_tta_model_loaded", "1 once the model is loaded and the engine runs",
                                value=0 if m is None else 1)
        if m is None:
            return
        gauges = {
            "refine_tta_queue_depth": ("jobs waiting in the work queue", m.queue_depth),
            "refine_tta_jobs_running": ("jobs running on the worker (an adaptation or other exclusive job, plus the "
                                        "generations decoding in the batch)", m.running),
            "refine_tta_sessions": ("sessions held (memory or disk)", m.sessions),
            "refine_tta_sessions_in_memory": ("sessions whose tensors are in memory", m.sessions_loaded),
            "refine_tta_session_bytes": ("bytes of session tensors in memory", m.session_bytes),
            "refine_tta_session_disk_bytes": ("bytes of session files on disk", m.session_disk_bytes),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "refine_tta_adaptations": ("adaptations completed", m.adaptations_total),
            "refine_tta_adaptation_steps": ("adaptation steps completed", m.adaptation_steps_total),
            "refine_tta_adaptation_seconds": ("seconds spent adapting", m.adaptation_seconds_total),
            "refine_tta_generations": ("generations run", m.generations_total),
            "refine_tta_generated_tokens": ("tokens generated", m.generated_tokens_total),
            "refine_tta_generation_seconds": ("seconds spent generating", m.generation_seconds_total),
            "refine_tta_decode_steps": ("batched decoding steps (one token for every running generation)",
                                        m.decode_steps_total),
            "refine_tta_jobs_cancelled": ("jobs cancelled (client gone or shutdown)", m.cancelled_total),
            "refine_tta_jobs_failed": ("jobs that failed", m.failed_total),
            "refine_tta_jobs_rejected": ("jobs refused because the queue was full", m.rejected_total),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    """The app's registry, HTTP request metrics, and the engine collector."""

    def __init__(self, engine_snapshot: Callable[[], EngineMetrics | None]):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("refine_tta_requests", "HTTP requests by route, method and status",
                                ("route", "method", "status"), registry=self.registry)
        self.latency = Histogram("refine_tta_request_seconds", "HTTP request latency until the last body byte",
                                 ("route", "method"), buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine_snapshot))

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
