"""The models a worker serves: each one's engine behind its admission gate (shell side)."""

from __future__ import annotations

from collections.abc import Mapping

from services.admission.core import Admission
from services.admission.gate import Gate
from services.worker.engines.base import Engine


class ServedModel:
    def __init__(self, engine: Engine, gate: Gate) -> None:
        self.engine = engine
        self.gate = gate


def admissions(models: Mapping[str, ServedModel]) -> dict[str, Admission]:
    """Each model's admission core: what the worker's pure decisions read."""
    return {name: served.gate.core for name, served in models.items()}
