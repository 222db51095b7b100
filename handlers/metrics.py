"""Prometheus metrics of one application, in a registry of its own (no global state)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from projections.delivery import LATENCY_BUCKETS, bucket_name

__all__ = ["DeliveryCollector", "Metrics"]


class DeliveryCollector:
    """Reply delivery totals of every delivery daemon, read from ``rm_delivery`` per scrape.

    The daemon runs in its own processes; its ``delivery`` projection keeps the totals in the
    database (exactly once, rebuilt with it), so any ``serve`` process reports them.
    """

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.pending = 0.0

    async def refresh(self, pool: AsyncConnectionPool[Any]) -> None:
        """Read the totals (zeros while no daemon has run: no ``rm_delivery`` yet)."""
        try:
            async with pool.connection() as conn:
                rows = await (
                    await conn.execute("SELECT name, value FROM rm_delivery.stats")
                ).fetchall()
                row = await (
                    await conn.execute("SELECT count(*) FROM rm_delivery.outbox")
                ).fetchone()
        except (pg_errors.UndefinedTable, pg_errors.InvalidSchemaName):
            self.values, self.pending = {}, 0.0
            return
        except (psycopg.Error, PoolTimeout):
            return  # the database is away: keep the last totals, the scrape still answers
        self.values = {str(name): float(value) for name, value in rows}
        self.pending = float(row[0]) if row else 0.0

    def collect(self) -> Iterator[Metric]:
        """The metric families, from the last :meth:`refresh`."""
        values = self.values
        replies = CounterMetricFamily(
            "convstore_delivery_replies",
            "Agent replies queued, delivered (or confirmed by an echo) and failed",
            labels=["outcome"],
        )
        for outcome in ("queued", "delivered", "failed"):
            replies.add_metric([outcome], values.get(outcome, 0.0))
        yield replies
        attempts = CounterMetricFamily(
            "convstore_delivery_attempts",
            "Provider calls begun, and those that failed and will be retried",
            labels=["result"],
        )
        attempts.add_metric(["begun"], values.get("attempts", 0.0))
        attempts.add_metric(["retried"], values.get("attempt_failures", 0.0))
        yield attempts
        yield CounterMetricFamily(
            "convstore_delivery_echo_confirmations",
            "Replies confirmed by the provider's echo of our send",
            value=values.get("confirmed", 0.0),
        )
        yield GaugeMetricFamily(
            "convstore_delivery_pending",
            "Replies neither delivered nor failed yet",
            value=self.pending,
        )
        buckets = [(f"{bound:g}", values.get(bucket_name(bound), 0.0)) for bound in LATENCY_BUCKETS]
        buckets.append(("+Inf", values.get("delivered", 0.0)))
        yield HistogramMetricFamily(
            "convstore_delivery_latency_seconds",
            "Time from a reply being queued to its delivery",
            buckets=buckets,
            sum_value=values.get("latency_sum_us", 0.0) / 1_000_000,
        )


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
        self.inbound_statements = Gauge(
            "convstore_inbound_statements",
            "Statements that stored inbound messages since start (see inbound_deliveries)",
            registry=self.registry,
        )
        self.inbound_deliveries = Gauge(
            "convstore_inbound_deliveries",
            "Inbound deliveries those statements carried (shared by concurrent deliveries)",
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
        self.delivery = DeliveryCollector()
        self.registry.register(self.delivery)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
