"""Credentials that anyone can read, and the rule that keeps them off the network.

go-infer's example settings.yaml, and goinfer's own shipped config/settings.yaml after it, print
an SM2 private key, an appId with its appSecret and a Redis password. They make the examples run
with no set-up, but a service that listens on the network with them accepts requests signed by
anyone who has read the README. So the tiers serve them on a loopback address only (with one
warning) and refuse to start with them anywhere else; `goinfer init` and `goinfer keygen` make
fresh ones. Every published value is listed here and nowhere else.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from goinfer.settings import Settings

PUBLISHED_SM2_PRIVATE_KEYS = frozenset({"JShsBOJL0RgPAoPttEB1hgtPAvCikOl0V1oTOYL7k5U="})
PUBLISHED_APP_SECRETS = frozenset({"41DF0E6AE27B5282C07EF5124642A352"})
PUBLISHED_REDIS_PASSWORDS = frozenset({"e18ffb7484f4d69c2acb40008471a71c"})

LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})


def published_keys(settings: Settings) -> tuple[str, ...]:
    """The settings keys that hold a published value (names only: never the values)."""
    api, server = settings.api, settings.server
    keys = []
    if api.sm2_private_key.strip() in PUBLISHED_SM2_PRIVATE_KEYS:
        keys.append("API.SM2PrivateKey")
    # A published appSecret signs for whatever appId it is given (the README's appId with it is
    # the README's client); a published appId with a fresh secret is harmless: appIds are public.
    if any(secret in PUBLISHED_APP_SECRETS for secret in api.app_id_secret.values()):
        keys.append("API.AppIdSecret")
    if server.redis_passwd in PUBLISHED_REDIS_PASSWORDS:
        keys.append("Server.RedisPasswd")
    if _url_password(server.redis_server) in PUBLISHED_REDIS_PASSWORDS:
        keys.append("Server.RedisServer")
    return tuple(keys)


def _url_password(address: str) -> str | None:
    if "://" not in address:
        return None
    try:
        password = urlsplit(address.strip()).password
    except ValueError:
        return None
    return unquote(password) if password else None


def is_loopback(addr: str) -> bool:
    """Whether API.Addr listens on this machine only; "" and 0.0.0.0 listen everywhere."""
    host = addr.strip().strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name may resolve to anything: treat it as reachable


@dataclass(frozen=True)
class PublishedVerdict:
    """What to do about published credentials: nothing, warn (loopback) or refuse to serve."""

    keys: tuple[str, ...]
    refused: bool
    message: str

    @property
    def warns(self) -> bool:
        return bool(self.keys) and not self.refused


def published_verdict(settings: Settings) -> PublishedVerdict:
    """The rule of `goinfer http`, `goinfer up` and `goinfer check` about published credentials."""
    keys = published_keys(settings)
    if not keys:
        return PublishedVerdict((), False, "")
    names = ", ".join(keys)
    addr = settings.api.addr
    if is_loopback(addr):
        return PublishedVerdict(keys, False, (
            f"{settings.path}: {names}: go-infer's published example values, accepted because API.Addr "
            f"{addr} is loopback only; run `goinfer init` for a project with fresh ones"))
    return PublishedVerdict(keys, True, (
        f"{settings.path}: {names}: go-infer's published example values, refused on API.Addr "
        f"{addr or '(all addresses)'} (anyone could sign requests); {_fixes(keys)}, "
        f"or listen on API.Addr 127.0.0.1"))


def _fixes(keys: tuple[str, ...]) -> str:
    fixes = []
    if "API.SM2PrivateKey" in keys:
        fixes.append("a new API.SM2PrivateKey from `goinfer keygen` (or GOINFER_API__SM2PRIVATEKEY)")
    if "API.AppIdSecret" in keys:
        fixes.append("a new appSecret in API.AppIdSecret (or GOINFER_API__APPIDSECRET)")
    if "Server.RedisPasswd" in keys or "Server.RedisServer" in keys:
        fixes.append("a new Redis password (GOINFER_SERVER__REDISPASSWD, and requirepass in redis.conf)")
    return "run `goinfer init` for a project with fresh credentials, or set " + "; ".join(fixes)
