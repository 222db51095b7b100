"""Prometheus metrics of one application, in a registry of its own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]


class Metrics:
    """The counters, histograms and gauges ``/metrics`` exposes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "convstore_http_requests",
            "HTTP requests by route and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.append_latency = Histogram(
            "convstore_append_seconds",
            "Time to make a delivery's events durable, by operation",
            ["operation"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.conflicts_retried = Gauge(
            "convstore_conflicts_retried",
            "Races lost and retried by conversation commands since start",
            registry=self.registry,
        )
        self.duplicates_dropped = Gauge(
            "convstore_duplicates_dropped",
            "Redelivered messages recognised and stored once, since start",
            registry=self.registry,
        )
        self.unknown_entries = Counter(
            "convstore_webhook_unknown_entries",
            "Webhook entries for ids no connection is registered for (skipped)",
            ["channel"],
            registry=self.registry,
        )
        self.projector_lag = Gauge(
            "convstore_projector_lag_events",
            "Events in the global log not yet applied, per projection",
            ["projection"],
            registry=self.registry,
        )
        self.replies = Counter(
            "convstore_replies",
            "Agent replies by outcome (queued, delivered, failed)",
            ["outcome"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
