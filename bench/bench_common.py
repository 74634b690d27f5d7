"""Shared pieces of the benchmark: the document model, payload sizing, statistics, tables."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from pydantic import BaseModel, Field

SIZES: dict[str, int] = {
    "1KB": 1024,
    "100KB": 100 * 1024,
    "1MB": 1024 * 1024,
    "10MB": 10 * 1024 * 1024,
}


class Owner(BaseModel):
    """A nested model, as real records have (who owns a task, where a job runs)."""

    name: str
    email: str | None = None


class Item(BaseModel):
    """One record of the payload: state files mostly hold lists of records (tasks, jobs,
    sessions), and every record is a model with strings, floats, a list, a nested model,
    a dict and optional fields."""

    id: int
    name: str
    score: float = 0.0
    tags: list[str] = Field(default_factory=list)
    owner: Owner | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    note: str | None = None
    done: bool = False


class Doc(BaseModel):
    """The benchmarked document: a counter plus a payload of records that sets the size."""

    counter: int = 0
    items: list[Item] = Field(default_factory=list)


def _item(i: int, name: str | None = None) -> Item:
    return Item(
        id=i,
        name=name or f"item-{i:07d}",
        score=i * 0.37,
        tags=["build", "test"],
        owner=Owner(name=f"user{i % 50}", email=f"u{i % 50}@example.org" if i % 3 else None),
        metrics={"p50": i * 0.125, "p99": i * 0.875},
        note=None if i % 2 else "retry later",
        done=i % 2 == 0,
    )


def parse_size(text: str) -> int:
    """``1KB`` / ``100KB`` / ``1MB`` / ``4096`` -> bytes."""
    key = text.strip().upper()
    if key in SIZES:
        return SIZES[key]
    for suffix, factor in (("KB", 1024), ("MB", 1024 * 1024), ("B", 1)):
        if key.endswith(suffix):
            return int(float(key[: -len(suffix)]) * factor)
    return int(key)


def size_label(nbytes: int) -> str:
    for label, value in SIZES.items():
        if value == nbytes:
            return label
    if nbytes >= 1024 * 1024 and nbytes % (1024 * 1024) == 0:
        return f"{nbytes // (1024 * 1024)}MB"
    if nbytes >= 1024 and nbytes % 1024 == 0:
        return f"{nbytes // 1024}KB"
    return f"{nbytes}B"


def make_doc(target_bytes: int, counter: int = 0) -> Doc:
    """A document whose compact JSON is close to ``target_bytes`` (never above it by much)."""
    empty = len(Doc(counter=counter).model_dump_json())
    per_item = len(_item(10**5).model_dump_json()) + 1  # ids up to 6 digits
    count = max(0, (target_bytes - empty) // per_item)
    doc = Doc(counter=counter, items=[_item(i) for i in range(count)])
    short = target_bytes - len(doc.model_dump_json())
    if short > per_item:  # pad with one more record so the file lands on the target size
        name = "p" * (short - len(_item(count).model_dump_json()) - 1 + len(_item(count).name))
        doc.items.append(_item(count, name))
    return doc


# --- statistics -------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (q in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def median(sorted_values: Sequence[float]) -> float:
    n = len(sorted_values)
    if n == 0:
        return math.nan
    mid = n // 2
    if n % 2:
        return float(sorted_values[mid])
    return (sorted_values[mid - 1] + sorted_values[mid]) / 2.0


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def ms(ns: float) -> str:
    """Nanoseconds -> a millisecond figure with sensible precision."""
    if ns is None or (isinstance(ns, float) and math.isnan(ns)):
        return "-"
    value = ns / 1e6
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def ratio(a: float, b: float) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None
) -> str:
    """A GitHub-flavoured markdown table; ``align`` is one of l/r per column (default: first l)."""
    if align is None:
        align = "l" + "r" * (len(headers) - 1)
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))

    def fmt(row: Sequence[str]) -> str:
        parts = []
        for i, c in enumerate(row):
            parts.append(c.ljust(widths[i]) if align[i] == "l" else c.rjust(widths[i]))
        return "| " + " | ".join(parts) + " |"

    sep = []
    for i, w in enumerate(widths):
        sep.append(":" + "-" * max(1, w - 1) if align[i] == "l" else "-" * max(1, w - 1) + ":")
    lines = [fmt(list(headers)), "| " + " | ".join(sep) + " |"]
    lines.extend(fmt(r) for r in cells)
    return "\n".join(lines)


# --- small file helpers shared by the hand-rolled contenders -----------------


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
