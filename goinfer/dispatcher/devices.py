"""Which device each worker runs on (Server.Devices), set in its environment before it starts.

The variables are set in the supervisor around the spawn, not in the worker: a spawned worker
imports the user's program (its `__main__`) before any code of ours runs in it, and a model
module may import TensorFlow or PyTorch at its top, so the worker's environment must be right
from its first instruction. Workers are spread round-robin: with `Devices: [0, 1]` and
MaxWorkers 4, slots 0 and 2 see GPU 0, slots 1 and 3 see GPU 1, each as its only GPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

CPU = "cpu"
# TensorFlow reserves nearly all of a GPU's memory in the first process that touches it unless
# this is set: with it, several workers placed on one GPU each take what they use.
MEMORY_GROWTH = {"TF_FORCE_GPU_ALLOW_GROWTH": "true"}


def device_for(devices: Sequence[str], slot_index: int) -> str | None:
    """The device of worker slot `slot_index`; None when Devices is empty (no placement)."""
    if not devices:
        return None
    return devices[slot_index % len(devices)]


def placement_environment(device: str | None, inherited: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables a worker on `device` starts with; a memory-growth choice already in the
    environment (`inherited`, os.environ by default) is the operator's and is kept."""
    if device is None:
        return {}
    inherited = os.environ if inherited is None else inherited
    if device == CPU:
        return {"CUDA_VISIBLE_DEVICES": "-1"}  # no GPU at all: TensorFlow and PyTorch fall back to the CPU
    values = {"CUDA_VISIBLE_DEVICES": device}
    values.update({key: value for key, value in MEMORY_GROWTH.items() if key not in inherited})
    return values


@contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """os.environ with `values` set for the duration (a spawn inherits it), then as it was."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
