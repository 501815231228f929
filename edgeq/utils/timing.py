"""Wall time per stage of a long job, for the log, the summary line and ``--json``.

Users asked why an export takes minutes; the answer is a table of where the time goes, in the
order the stages ran. Stages that run several times (one per flavour) add up under one name.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger("edgeq")


class StageTimes:
    """``with times("calibration"): ...`` records seconds per stage name, in first-run order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[stage] = self.seconds.get(stage, 0.0) + elapsed
            log.debug("stage %s: %.2f s", stage, elapsed)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def summary(self) -> str:
        """``deploy 1.2 s, onnx 2.0 s, ... (total 41.3 s)``."""
        parts = ", ".join(f"{name} {s:.1f} s" for name, s in self.seconds.items())
        return f"{parts} (total {self.total:.1f} s)"

    def to_dict(self) -> dict[str, float]:
        return {name: round(s, 3) for name, s in self.seconds.items()}
