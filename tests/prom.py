"""Reading the Prometheus text format back in the tests, with prometheus_client's own parser."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """{(sample name, sorted (label, value) pairs): value} of an exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(got: Samples, name: str, **labels: str) -> float:
    """One sample's value; KeyError naming it if the exposition lacks it."""
    key = (name, tuple(sorted(labels.items())))
    if key not in got:
        raise KeyError(f"no sample {name}{labels}")
    return got[key]
