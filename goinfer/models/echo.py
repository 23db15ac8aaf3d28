"""The built-in model: answers with what it was given (go-infer's test EchoModel, without the sleep).

Useful to check a deployment end to end and to measure the framework's own overhead.
"""

from __future__ import annotations

from typing import Any

from goinfer.models.base import Model


class Echo(Model):
    api_path = "/api/echo"
    api_entry_on_loop = True  # it returns its input: a thread hand-off would cost more than the call

    def init(self) -> None:
        pass

    def api_entry(self, data: dict[str, Any]) -> dict[str, Any]:
        return data

    def infer(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        return params
