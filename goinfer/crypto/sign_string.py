"""The strings a go-infer request's signature is computed over.

A signature (SHA256 with the appSecret, or SM3withSM2) is valid over one exact string, so the
server that checks it and every client that makes it must build that string byte for byte
alike. It lives here, with the other signature primitives, so that clients build it without
importing the HTTP tier.
"""

from __future__ import annotations

import json
from typing import Any

from goinfer.crypto.gojson import go_format_g, go_marshal


def go_sign_string(fields: dict[str, Any], numbers_differ: bool, timestamp: int, secret: str) -> str:
    """The string go-infer's checkSign builds: sorted keys but signData, `&key=<secret>` last.

    `numbers_differ` (from parsing the body) says whether `data` holds numbers that Go spells
    differently from Python; a client signing its own dict passes True, the always-correct path.
    """
    parts = []
    for key in sorted(fields):
        value = fields[key]
        if key == "signData":
            continue
        if key == "timestamp":
            text = str(timestamp)
        elif isinstance(value, str):
            text = value
        elif isinstance(value, dict):
            text = go_marshal(value, numbers_differ)
        elif isinstance(value, bool) or value is None or isinstance(value, list):
            continue  # go-infer leaves these out without a word
        else:
            text = go_format_g(float(value))
        parts.append(f"{key}={text}")
    parts.append(f"key={secret}")
    return "&".join(parts)


def python_client_sign_string(fields: dict[str, Any], secret: str) -> str:
    """The string go-infer's example Python client (`gen_param_str`) signs.

    It differs from Go's where Python's json spells `data` differently; the HTTP tier accepts
    signatures over either, so requests from that client keep working.
    """
    parts = []
    for key in sorted(fields):
        if key == "signData":
            continue
        value = fields[key]
        if isinstance(value, dict):
            text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        else:
            text = str(value)
        if text != "":
            parts.append(f"{key}={text}")
    parts.append(f"key={secret}")
    return "&".join(parts)
