"""Scenario 4: where one statestore update's time goes, next to the floor and the baseline.

Every step of ``StateStore.update`` is timed on its own, interleaved round-robin with the
whole update, the raw floor and the hand-rolled filelock baseline, so that all share the
machine's noise. The steps are statestore's own code paths (private modules, called the
way the store calls them): the empty lock cycle, the read and validation of the current
document, the serialisation of the new one, the validation of what is about to be
written, and the durable atomic write. Their medians add up to about the whole update;
what is left is the glue between them.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from typing import Any

import contenders
from bench_common import Doc, make_doc, median, ms, ratio, size_label, table
from filelock import FileLock

from statestore import DirectoryLock, StateStore
from statestore._atomic import write_atomic

now = time.perf_counter_ns


def _steps(directory: str, doc: Doc) -> dict[str, Callable[[], Any]]:
    """The timed operations, each repeatable on its own."""
    path = os.path.join(directory, "state.json")
    store: StateStore[Doc] = StateStore(Doc, path, default=Doc())
    store.save(doc)
    data = store.path.read_bytes()
    model = store.load()
    body = model.__pydantic_serializer__.to_json(model, indent=2, by_alias=True)
    lock = DirectoryLock(os.path.join(directory, "empty.lock"))
    flock = FileLock(os.path.join(directory, "empty.flock"))
    spare = os.path.join(directory, "spare.json")
    floor = contenders.make("raw-floor", os.path.join(directory, "floor.json"), Doc)
    floor.create(doc)
    baseline = contenders.make("filelock-fsync", os.path.join(directory, "base.json"), Doc)
    baseline.create(doc)

    def lock_cycle() -> None:
        with lock:
            pass

    def flock_cycle() -> None:
        with flock:
            pass

    def bump(state: Doc) -> None:
        state.counter += 1

    return {
        "statestore update (durable)": lambda: store.update(bump),
        "raw floor update": floor.update_increment,
        "filelock baseline update": baseline.update_increment,
        "step: empty lock cycle (mkdir lock)": lock_cycle,
        "step: read + validate (load)": store.load,
        "step: serialise (indent 2)": lambda: model.__pydantic_serializer__.to_json(
            model, indent=2, by_alias=True
        ),
        "step: validate what is written": lambda: Doc.model_validate_json(body),
        "step: durable atomic write": lambda: write_atomic(spare, data, durable=True),
        "for comparison: empty filelock cycle": flock_cycle,
    }


def scenario_breakdown(
    sizes: list[int], counts: list[int], rounds: int, workdir: str, report: Any
) -> None:
    report.add(
        "## 4. Where an update's time goes\n\n"
        "Each step of a statestore update timed on its own (statestore's own code paths), "
        f"interleaved round-robin with whole updates, the raw floor and the filelock "
        f"baseline ({rounds} rounds). The collector is paused for the validation and "
        "serialisation steps as the store pauses it. **x floor** is the step's median over "
        "the raw floor's; **sum of steps** adds the statestore steps' medians."
    )
    for size, n in zip(sizes, counts, strict=True):
        slabel = size_label(size)
        directory = os.path.join(workdir, f"breakdown-{slabel}")
        os.makedirs(directory)
        steps = _steps(directory, make_doc(size))
        samples: dict[str, list[int]] = {name: [] for name in steps}
        batch = max(1, n // rounds)
        order = list(steps)
        for r in range(rounds):
            rot = r % len(order)
            for name in order[rot:] + order[:rot]:
                fn = steps[name]
                gc.collect()
                # As the store does around these (load pauses it by itself).
                paused = name in ("step: serialise (indent 2)", "step: validate what is written")
                if paused:
                    gc.disable()
                try:
                    for _ in range(batch):
                        t0 = now()
                        fn()
                        samples[name].append(now() - t0)
                finally:
                    gc.enable()
        medians = {name: median(sorted(times)) for name, times in samples.items()}
        floor = medians["raw floor update"]
        rows = [[name, ms(value), ratio(value, floor)] for name, value in medians.items()]
        parts = sum(value for name, value in medians.items() if name.startswith("step: "))
        rows.append(["sum of steps", ms(parts), ratio(parts, floor)])
        report.add(f"### {slabel}\n\n" + table(["operation", "median ms", "x floor"], rows))
