"""Runs the benchmarks of bench/ and prints their tables: `make bench` (`python -m bench.run`
runs them all; `python -m bench.run dispatch` only the one named).

Each benchmark measures its cases and its own baseline in the same run, on the same machine, so
that the ratios (not the absolute rates) are what to compare from one commit to the next.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from bench import auth_me, dispatch, events, hotpath, messaging

Settings = auth_me.Settings
Report = auth_me.Report

# By name, in the order `make bench` runs them.
BENCHMARKS: dict[str, Callable[[Settings], Report]] = {
    auth_me.NAME: auth_me.run,
    dispatch.NAME: dispatch.run,
    hotpath.NAME: hotpath.run,
    events.NAME: events.run,
    messaging.NAME: messaging.run,
}


def _at_least(kind: type[int] | type[float], low: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = kind(raw)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low:g}, got {raw}")
        return value

    return parse


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "benchmarks",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run, of {', '.join(BENCHMARKS)} (default: all)",
    )
    parser.add_argument(
        "--seconds", type=_at_least(float, 0.1), default=5.0, help="measured time per case (5)"
    )
    parser.add_argument(
        "--concurrency", type=_at_least(int, 1), default=16, help="client workers per case (16)"
    )
    parser.add_argument(
        "--warmup", type=_at_least(int, 0), default=200, help="unmeasured requests per case (200)"
    )
    parser.add_argument(
        "--database",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="the mesh's database in the dispatch benchmark (sqlite; postgres: a fresh database"
        " on the machine's server, dropped afterwards)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers here")
    args = parser.parse_args(argv)
    unknown = [name for name in args.benchmarks if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    return args


def _machine() -> dict[str, object]:
    return {
        "cpus": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "grpcio": metadata.version("grpcio"),
        "httpx": metadata.version("httpx"),
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _ratios(report: Report) -> dict[str, float | None]:
    rates = {case.name: case.rps for case in report.cases}
    return {
        f"{num}/{den}": (rates[num] / rates[den] if rates[den] else None)
        for num, den in report.ratios
    }


def _goals(report: Report) -> list[tuple[str, bool | None]]:
    """A report's goals, for the reports that state some (dispatch.Report): text, met."""
    return [(goal.text, goal.met) for goal in getattr(report, "goals", ())]


def _print(report: Report) -> None:
    # A report may name what it counts ("tasks") and what its latency is ("dispatch").
    count: str = getattr(report, "count_label", "requests")
    timed: str = getattr(report, "latency_label", "")
    p50, p99 = f"{timed} p50 ms".strip(), f"{timed} p99 ms".strip()
    width = max(8, len(p50))
    print(f"\n== {report.name}: {report.title}")
    print(f"baseline: {report.baseline}")
    print(f"{'case':<20} {count:>9} {count + '/s':>11} {p50:>{width}} {p99:>{width}} {'errors':>7}")
    for case in report.cases:
        print(
            f"{case.name:<20} {case.requests:>9} {case.rps:>11.0f} {_ms(case.p50_ms):>{width}}"
            f" {_ms(case.p99_ms):>{width}} {case.errors:>7}"
        )
    print("throughput ratios:")
    for label, ratio in _ratios(report).items():
        print(f"  {label:<32} {'-' if ratio is None else f'{ratio:.3f}'}")
    for text, met in _goals(report):
        print(f"goal: {text}: {'not judged' if met is None else 'met' if met else 'NOT MET'}")
    for note in report.notes:
        print(f"note: {note}")


def _shout_errors(report: Report) -> bool:
    """Prints every failing case loudly; True if there was one."""
    failing = [case for case in report.cases if case.errors]
    if not failing:
        return False
    bar = "!" * 78
    print(f"\n{bar}\n{report.name}: REQUESTS FAILED, THESE NUMBERS ARE NOT VALID", file=sys.stderr)
    for case in failing:
        print(f"  {case.name}: {case.errors} errors; first: {case.first_error}", file=sys.stderr)
    print(bar, file=sys.stderr)
    return True


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    settings = Settings(
        seconds=float(args.seconds),
        concurrency=int(args.concurrency),
        warmup=int(args.warmup),
        database=str(args.database),
    )
    machine = _machine()
    print("machine: " + ", ".join(f"{key} {value}" for key, value in machine.items()))
    print(
        f"settings: {settings.seconds:g} s per case after {settings.warmup} warm-up requests,"
        f" {settings.concurrency} concurrent workers in one asyncio client process"
    )
    reports = []
    failed = False
    for name in args.benchmarks or BENCHMARKS:
        report = BENCHMARKS[name](settings)
        _print(report)
        failed = _shout_errors(report) or failed
        reports.append(report)
    if args.json:
        numbers = {
            "machine": machine,
            "settings": asdict(settings),
            "benchmarks": {
                report.name: {
                    "baseline": report.baseline,
                    "cases": {
                        case.name: {**asdict(case), "rps": case.rps} for case in report.cases
                    },
                    "ratios": _ratios(report),
                    "goals": dict(_goals(report)),
                }
                for report in reports
            },
        }
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
