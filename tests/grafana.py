"""The Grafana dashboard in deploy/grafana/, read for tests: its PromQL and metric names."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "kvmesh.json"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"

#: PromQL functions, aggregations and keywords the dashboard may use.
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "rate", "irate", "increase", "histogram_quantile",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "clamp_min", "clamp_max", "topk", "bottomk", "delta", "deriv", "abs", "offset", "bool",
}
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


#: The row whose series exist only on a prefill/decode mesh (vLLM's NIXL metrics).
PD_ROW = "Prefill/decode (KV transfer)"


def expressions(dashboard: dict[str, Any], rows: set[str] | None = None) -> list[str]:
    """The PromQL of every panel (or of the panels under the row titles ``rows``)."""
    out: list[str] = []
    row = ""
    for p in dashboard["panels"]:
        if p["type"] == "row":
            row = p["title"]
        elif rows is None or row in rows:
            out.extend(t["expr"] for t in p.get("targets", []))
    return out


def rows(dashboard: dict[str, Any]) -> list[str]:
    return [p["title"] for p in dashboard["panels"] if p["type"] == "row"]


def metric_names(expr: str) -> set[str]:
    """Every identifier of ``expr`` that is not a PromQL word: the metrics it reads."""
    text = re.sub(r'"[^"]*"', "", expr)                     # label values
    text = re.sub(r"\{[^}]*\}", "", text)                   # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)  # grouping labels
    text = re.sub(r"\$\w+", "", text)                       # Grafana variables
    text = re.sub(r"\b\d+(\.\d+)?\b", "", text)             # numbers
    return {word for word in _IDENT.findall(text) if word not in PROMQL_WORDS}


def exported_names(exposition: str) -> set[str]:
    """Series names a Prometheus scrape of ``exposition`` yields, including families
    declared without samples yet (a counter nothing has incremented)."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            if kind in ("histogram", "summary"):
                names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
            if kind == "counter" and not name.endswith("_total"):
                names.add(f"{name}_total")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names
