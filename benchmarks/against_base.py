"""This tree against the one the performance issue measured, side by side on this machine, and the
targets against go-infer's figures as they would stand here.

go-infer's figures (benchmarks/reference.py) were measured on the issue's machine, in one run with
goinfer's tree of that day (reference.BASE_COMMIT). On another machine every figure moves, and not
all by as much: a faster core speeds Python's SM2 arithmetic more than a round trip between
processes. go-infer cannot be built here (no Go module proxy), but that base tree can: run here,
in rounds alternating with this tree, its figures say how far this machine moved each point, and
go-infer's are scaled by as much (reference.scaled_reference). That is an estimate, which
assumes go-infer's speed moved as the base tree's did; the plain run's table compares with the
figures as measured.

    python -m benchmarks.against_base                          # 3 alternations, 10 s points: ~13 min
    python -m benchmarks.against_base --rounds 1 --duration 5 --output against-base.md

The base tree is checked out with `git worktree` (so this needs the repository's history: a
clone, not an archive) into a temporary folder, and this tree's benchmarks/ is copied over its
own, so that one harness measures both and only goinfer/ differs. Points: SHA256 and SM2 echo at
1, 16, 64 and 256 connections, the 10 ms model and the model alone; the settings the base tree
does not know (BusyPollUs, a TakeAheadMs budget) are left out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from benchmarks.reference import BASE, BASE_COMMIT, evaluate_targets, scaled_reference
from benchmarks.run import Point, median_points

ROOT = Path(__file__).resolve().parents[1]
POINTS = "echo-sha256,echo-sm2,sleep-10ms"
SKIP = "echo-sha256-busy-poll,sleep-10ms-take-ahead"


def check_out(commit: str, folder: Path) -> Path:
    """`commit`'s tree in `folder`, with this tree's benchmarks/ in place of its own."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(folder), commit],
                   check=True)
    shutil.rmtree(folder / "benchmarks", ignore_errors=True)
    shutil.copytree(ROOT / "benchmarks", folder / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def remove(folder: Path) -> None:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)], check=False)


def one_round(tree: Path, duration: float, number: int, results: Path) -> list[Point]:
    """One round of the points, served by `tree`'s goinfer (its own folder on the path)."""
    subprocess.run([sys.executable, "-m", "benchmarks.run", "--rounds", "1", "--duration", f"{duration:g}",
                    "--only", POINTS, "--skip", SKIP, "--json", str(results)], cwd=tree, check=True)
    points = [Point(**fields) for fields in json.loads(results.read_text())["rounds"]]
    for point in points:
        point.round = number
    return points


def comparison(base: Mapping[tuple[str, int], Point], this: Mapping[tuple[str, int], Point]) -> list[str]:
    """Each point's medians, base tree and this one, and this one's as a multiple of the base's."""
    lines = ["| point | base req/s | this req/s | × | base CPU ms/req | this CPU ms/req | × | base p50 ms | "
             "this p50 ms |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, old in base.items():
        new = this.get(key)
        if new is None:
            continue
        lines.append(f"| {old.scenario}, {old.connections} conns | {old.rps:,.0f} | {new.rps:,.0f} | "
                     f"{new.rps / old.rps:.2f} | {old.cpu_ms:.2f} | {new.cpu_ms:.2f} | {new.cpu_ms / old.cpu_ms:.2f} | "
                     f"{old.p50_ms:.2f} | {new.p50_ms:.2f} |")
    return lines


def report(base: list[Point], this: list[Point]) -> str:
    base_here = {(p.scenario, p.connections): p for p in median_points(base)}
    this_here = {(p.scenario, p.connections): p for p in median_points(this)}
    goinfer, echo_p50 = scaled_reference(base_here)
    moved = ", ".join(f"{scenario} at {connections}: {base_here[scenario, connections].rps / ref.rps:.2f}x req/s, "
                      f"{base_here[scenario, connections].cpu_ms / ref.cpu_ms:.2f}x CPU"
                      for (scenario, connections), ref in BASE.items() if (scenario, connections) in base_here)
    targets = evaluate_targets(this_here, None, goinfer, echo_p50)
    return "\n".join([
        f"This tree against the base tree ({BASE_COMMIT}, the one the performance issue measured beside "
        f"go-infer), medians of {max((p.round for p in this), default=0)} alternating round(s) on this machine:",
        "", *comparison(base_here, this_here), "",
        f"The base tree here against its figures on the issue's machine: {moved}. go-infer's figures scaled by "
        "as much (an estimate: it assumes go-infer moved as the base tree did), and the 1-connection p50 "
        "target with them:", "",
        "| target | measured (median) | reference, scaled to this machine | verdict |", "|---|---|---|---|",
        *(target.as_row() for target in targets if target.met is not None),
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.against_base", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=BASE_COMMIT, help=f"the base tree's commit (default {BASE_COMMIT})")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of base and this tree (default 3)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per point (default 10)")
    parser.add_argument("--output", help="also write the report (markdown) to this file")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0:
        parser.error("--rounds must be at least 1 and --duration positive")
    base: list[Point] = []
    this: list[Point] = []
    with tempfile.TemporaryDirectory(prefix="goinfer-against-base-") as scratch:
        folder = Path(scratch) / "base"
        check_out(args.base, folder)
        try:
            for number in range(1, args.rounds + 1):
                print(f"round {number} of {args.rounds}: the base tree, then this one", file=sys.stderr)
                base += one_round(folder, args.duration, number, Path(scratch) / "base.json")
                this += one_round(ROOT, args.duration, number, Path(scratch) / "this.json")
        finally:
            remove(folder)
    text = report(base, this)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
