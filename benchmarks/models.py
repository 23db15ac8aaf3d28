"""Models used only by the benchmarks."""

from __future__ import annotations

import time
from typing import Any

from goinfer.models.echo import Echo


class Sleep10ms(Echo):
    """Stands for a model whose inference takes 10 ms of wall time (go-infer's benchmark model)."""

    api_path = "/api/sleep"

    def infer(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        time.sleep(0.010)
        return params
