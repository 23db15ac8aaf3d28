"""Which version of a model's files a worker loads: TF Serving's `<base path>/<number>/` layout.

A version is a folder whose name is a whole number; anything else under the base path (a file,
`.tmp-4` or `4.partial` being copied) is not a version, so a version is published by writing
it under another name and renaming it to its number, which is atomic. The dispatcher's
supervisor reads this without importing any model; the worker is told the folder it loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


class VersionError(Exception):
    """No version can be served from a base path; the message says what was found there."""


@dataclass(frozen=True)
class ServedVersion:
    """The version a worker serves: its number and the folder its `init` loads."""

    number: int
    path: str


def list_versions(base_path: str) -> list[int]:
    """The version numbers under `base_path`, lowest first; VersionError if it cannot be read."""
    try:
        names = os.listdir(base_path)
    except FileNotFoundError:
        raise VersionError(f"model base path {base_path} does not exist") from None
    except OSError as exc:
        raise VersionError(f"cannot read model base path {base_path}: {exc.strerror or exc}") from None
    return sorted(int(name) for name in names
                  if name.isdigit() and name.isascii() and os.path.isdir(os.path.join(base_path, name)))


def choose_version(base_path: str, pinned: int | None = None) -> ServedVersion:
    """The version to serve: `pinned` when set, else the highest number present."""
    numbers = list_versions(base_path)
    if pinned is not None:
        if pinned not in numbers:
            found = ", ".join(map(str, numbers)) or "none"
            raise VersionError(f"ModelVersion {pinned} is not under {base_path} (versions found: {found})")
        number = pinned
    elif numbers:
        number = numbers[-1]
    else:
        raise VersionError(f"no version under {base_path}: expected folders named by a number, e.g. "
                           f"{os.path.join(base_path, '1')}")
    return ServedVersion(number, os.path.join(base_path, str(number)))
