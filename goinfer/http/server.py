"""Start-up of one HTTP tier process: load models and keys, then serve until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from aiohttp import web

from goinfer.crypto.sm2 import SM2Verifier, public_key_from_private_b64
from goinfer.http.app import create_app
from goinfer.http.queue_client import QueueClient
from goinfer.http.signing import SignatureChecker
from goinfer.models.registry import ModelRegistry, instantiate
from goinfer.settings import Settings, SettingsError

log = logging.getLogger("goinfer.http")

# Requests in flight get this long to finish after SIGTERM before their connections close.
SHUTDOWN_GRACE_S = 30.0


def sm2_verifier_for(settings: Settings) -> SM2Verifier | None:
    """The verifier for the configured key pair; None (SM2 refused) when no key is configured."""
    key = settings.api.sm2_private_key
    if not key:
        log.warning("API.SM2PrivateKey is not set: requests signed with SM2 will be refused")
        return None
    try:
        return SM2Verifier(public_key_from_private_b64(key))
    except ValueError as exc:
        raise SettingsError(settings.path, "API.SM2PrivateKey", str(exc)) from None


def build_app(settings: Settings, registry: ModelRegistry,
              clock: Callable[[], float] = time.time) -> web.Application:
    """The app of one HTTP process; `clock` is what request timestamps are checked against."""
    models = instantiate(registry.classes, settings)
    checker = SignatureChecker(settings.api, sm2_verifier_for(settings), clock)
    return create_app(settings, models, checker, QueueClient(settings.server))


def run_http(settings: Settings, registry: ModelRegistry) -> None:
    """Serve the API on the settings' Addr:Port; returns after a clean shutdown."""
    _use_uvloop()
    app = build_app(settings, registry)
    routes = [m.api_path for m in registry.classes]
    log.info("HTTP tier on %s:%d serving %s", settings.api.addr, settings.api.port, ", ".join(routes))
    web.run_app(
        app,
        host=settings.api.addr,
        port=settings.api.port,
        print=None,
        access_log=None,
        shutdown_timeout=min(SHUTDOWN_GRACE_S, settings.server.message_timeout + 1),
        handle_signals=True,
    )
    log.info("HTTP tier stopped")


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        log.info("uvloop not installed; using asyncio's default event loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
