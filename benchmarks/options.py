"""Command-line value types the benchmark scripts share."""

from __future__ import annotations

import argparse


def positive_numbers(text: str) -> list[int]:
    """`1,16,64` -> [1, 16, 64]: connection levels, batch sizes; a clear argparse error otherwise."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values
