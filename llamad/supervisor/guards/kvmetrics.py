"""What llamad counts of kept KV caches: per model since it started (`Figures`, shown in
GET /v1/models) and the Prometheus series /metrics shows (`families`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


@dataclass
class Figures:
    """Per model, since llamad started."""

    saved_tokens: int = 0
    restored_tokens: int = 0
    restores_verified: int = 0  # restored slots whose next request reused the cache
    restores_failed: int = 0  # ... that computed everything again
    discarded: dict[str, int] = field(default_factory=dict)  # reason -> saved slots


def families(figures: dict[str, Figures], on_disk: dict[str, tuple[int, int]]) -> list[Metric]:
    """Prometheus series per model (metrics.py shows them): tokens saved and restored,
    what is on disk (`on_disk`: tokens, bytes), saved slots discarded by reason, restores
    checked."""
    labels = ["model"]
    saved = CounterMetricFamily("llamad_kv_cache_saved_tokens",
                                "Cached tokens saved when llamad stopped the model", labels=labels)
    restored = CounterMetricFamily("llamad_kv_cache_restored_tokens",
                                   "Cached tokens restored when the model loaded", labels=labels)
    checked = CounterMetricFamily(
        "llamad_kv_cache_restores", "Restored slots checked on their next request, by "
        "outcome (took: it reused the cache; failed: it computed everything again, and "
        "restores are off for that model and build)", labels=[*labels, "outcome"])
    discarded = CounterMetricFamily(
        "llamad_kv_cache_discarded", "Saved slots not kept or not restored, by reason "
        "(changed, unusable, disk_bound, skipped, not_worth, timeout, failed)",
        labels=[*labels, "reason"])
    stored = GaugeMetricFamily("llamad_kv_cache_stored_bytes",
                               "Bytes of the model's saved KV cache on disk", labels=labels)
    tokens = GaugeMetricFamily("llamad_kv_cache_stored_tokens",
                               "Tokens in the model's saved KV cache on disk", labels=labels)
    for model, fig in sorted(figures.items()):
        saved.add_metric([model], fig.saved_tokens)
        restored.add_metric([model], fig.restored_tokens)
        checked.add_metric([model, "took"], fig.restores_verified)
        checked.add_metric([model, "failed"], fig.restores_failed)
        for reason, n in sorted(fig.discarded.items()):
            discarded.add_metric([model, reason], n)
    for model, (n, size) in sorted(on_disk.items()):
        tokens.add_metric([model], n)
        stored.add_metric([model], size)
    return [saved, restored, checked, discarded, stored, tokens]
