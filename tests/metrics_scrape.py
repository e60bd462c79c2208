"""Read a server's /metrics as Prometheus would: an HTTP GET, parsed by prometheus_client's
own text-format parser. Shared by the metrics, monitoring and topology tests."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


@dataclass(frozen=True)
class Scrape:
    text: str
    samples: list[Sample]

    @property
    def names(self) -> set[str]:
        """Every sample name (a histogram's ``_bucket``, ``_sum`` and ``_count`` included)."""
        return {s.name for s in self.samples}

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples named ``name`` whose labels include ``labels``."""
        found = [
            s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items()
        ]
        assert found, f"no sample {name}{labels or ''} in the scrape"
        return float(sum(found))

    def labels(self, name: str, label: str) -> set[str]:
        return {s.labels[label] for s in self.samples if s.name == name and label in s.labels}


def scrape(host: str, port: int) -> Scrape:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    return Scrape(text, samples)
