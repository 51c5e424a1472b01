"""``/metrics``: Prometheus metrics of one ``corral serve`` process."""

from __future__ import annotations

from collections.abc import Callable, Mapping


class Metrics:
    """Prometheus metrics of one server (its own registry: two servers in one
    process, as in tests, do not collide)."""

    def __init__(self) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            ProcessCollector,
        )

        self.registry = CollectorRegistry()
        self.sandboxes = Gauge(
            "corral_sandboxes", "Sandboxes by state", ["state"], registry=self.registry
        )
        self.creations = Counter(
            "corral_sandbox_creations", "Sandboxes created", registry=self.registry
        )
        self.ends = Counter(
            "corral_sandbox_ends", "Sandboxes ended, by reason", ["reason"], registry=self.registry
        )
        self.run_code = Histogram(
            "corral_run_code_seconds",
            "run_code latency as the server sees it",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=self.registry,
        )
        self.limits = Counter(
            "corral_limit_hits", "Limits hit, by kind", ["kind"], registry=self.registry
        )
        self.proxy = Counter(
            "corral_proxy_decisions", "Proxy decisions", ["decision"], registry=self.registry
        )
        self.server = Gauge(
            "corral_server_objects",
            "What the server process holds: live sandboxes, asyncio tasks, threads, and "
            "per-sandbox objects not yet freed (counted after a full garbage collection)",
            ["kind"],
            registry=self.registry,
        )
        self.pool_hits = Counter(
            "corral_pool_hits",
            "Creates served by a ready box of a warm pool, by pool (policy/runtime)",
            ["pool"],
            registry=self.registry,
        )
        self.pool_misses = Counter(
            "corral_pool_misses",
            "Creates that matched a warm pool with no box ready (started cold), by pool",
            ["pool"],
            registry=self.registry,
        )
        self.pool_boxes = Gauge(
            "corral_pool_boxes",
            "Warm pool boxes not handed out, by pool and state (ready, starting), and "
            "boxes dropped by the check before hand-out (dropped, a running total)",
            ["pool", "state"],
            registry=self.registry,
        )
        ProcessCollector(registry=self.registry)  # process_open_fds, resident memory
        self.counts: Callable[[], Mapping[str, int]] = dict
        self.server_counts: Callable[[], Mapping[str, int]] = dict
        self.pool_counts: Callable[[], Mapping[str, Mapping[str, int]]] = dict

    def created(self) -> None:
        self.creations.inc()

    def ended(self, reason: str) -> None:
        self.ends.labels(reason).inc()

    def pool_declared(self, pool: str) -> None:
        """A pool's counters start at 0 (shown before its first create)."""
        self.pool_hits.labels(pool)
        self.pool_misses.labels(pool)

    def pool_taken(self, pool: str, *, hit: bool) -> None:
        (self.pool_hits if hit else self.pool_misses).labels(pool).inc()

    def limit_hit(self, kind: str) -> None:
        self.limits.labels(kind).inc()

    def proxy_decision(self, allowed: bool) -> None:
        self.proxy.labels("allowed" if allowed else "denied").inc()

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        counts = self.counts()
        for state in ("running", "ended"):
            self.sandboxes.labels(state).set(counts.get(state, 0))
        for kind, value in self.server_counts().items():
            self.server.labels(kind).set(value)
        for pool, counts in self.pool_counts().items():
            for state in ("ready", "starting", "dropped"):
                self.pool_boxes.labels(pool, state).set(counts.get(state, 0))
        return generate_latest(self.registry)
