"""Prometheus metrics at ``/metrics`` (text exposition format, via prometheus_client).

Every figure is read from the database at scrape time, so any number of API processes and
workers report the same cluster-wide numbers. The run figures are gauges over a fixed
window (the last 24 hours, from `services.runs.RunLog.stats`) rather than counters: run rows
are pruned after two weeks, so a total derived from them would shrink, which Prometheus
would misread as a counter reset. Use the window gauges directly (no ``rate()``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from serversync.services.controls import Overview

WINDOW = dt.timedelta(hours=24)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Snapshot(Collector):
    """One scrape's figures, turned into metric families."""

    def __init__(self, overview: Overview, stats: dict[str, Any]) -> None:
        self.overview = overview
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        channels = GaugeMetricFamily(
            "serversync_mailbox_channels", "Mailbox channels by state (none = not synced).",
            labels=["channel", "state"])
        for count in self.overview.channels:
            channels.add_metric([count.channel.value, count.state], count.mailboxes)
        yield channels
        health = GaugeMetricFamily(
            "serversync_mailboxes", "Mailboxes by overall health.", labels=["status"])
        for status, n in sorted(self.stats.get("mailboxes_by_status", {}).items()):
            health.add_metric([status], n)
        yield health
        approval = GaugeMetricFamily("serversync_mailbox_approval",
                                     "Mailboxes by approval of their address.",
                                     labels=["approval"])
        for state, n in sorted(self.overview.approval.items()):
            approval.add_metric([state], n)
        yield approval
        alerts = GaugeMetricFamily("serversync_alerts_open", "Open (unresolved) alerts.",
                                   labels=["severity"])
        for severity in ("error", "warning", "info"):
            alerts.add_metric([severity], self.overview.open_alerts.get(severity, 0))
        yield alerts
        by_channel: dict[str, dict[str, int]] = self.stats.get("by_channel", {})
        for key, name, text in (
                ("runs", "serversync_sync_runs_24h", "Sync runs finished in the last 24 h."),
                ("failed_runs", "serversync_sync_failed_runs_24h",
                 "Sync runs that failed (transient or permanent) in the last 24 h."),
                ("items", "serversync_sync_items_24h",
                 "Items tracked, sent or synced in the last 24 h."),
                ("failures", "serversync_sync_item_failures_24h",
                 "Items quarantined or failed in the last 24 h.")):
            family = GaugeMetricFamily(name, text, labels=["channel"])
            for channel, figures in sorted(by_channel.items()):
                family.add_metric([channel], figures.get(key, 0))
            yield family
        totals = self.stats.get("totals", {})
        yield GaugeMetricFamily("serversync_sync_runs_running", "Sync runs in progress.",
                                value=totals.get("running", 0))
        latency = GaugeMetricFamily(
            "serversync_sync_duration_seconds",
            "Sync run duration percentiles over the last 24 h.", labels=["quantile"])
        figures = self.stats.get("latency_s", {})
        for label, key in (("0.5", "p50"), ("0.9", "p90"), ("0.99", "p99")):
            if figures.get(key) is not None:
                latency.add_metric([label], float(figures[key]))
        yield latency


def render(overview: Overview, stats: dict[str, Any]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot(overview, stats))
    return generate_latest(registry)
