"""Runs every benchmark of bench/ and prints its table: `make bench` (`python -m bench.run`).

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

from bench import auth_me

Settings = auth_me.Settings
Report = auth_me.Report

BENCHMARKS: tuple[Callable[[Settings], Report], ...] = (auth_me.run,)


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
        "--seconds", type=_at_least(float, 0.1), default=5.0, help="measured time per case (5)"
    )
    parser.add_argument(
        "--concurrency", type=_at_least(int, 1), default=16, help="client workers per case (16)"
    )
    parser.add_argument(
        "--warmup", type=_at_least(int, 0), default=200, help="unmeasured requests per case (200)"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers here")
    return parser.parse_args(argv)


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


def _print(report: Report) -> None:
    print(f"\n== {report.name}: {report.title}")
    print(f"baseline: {report.baseline}")
    print(
        f"{'case':<20} {'requests':>9} {'requests/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"
    )
    for case in report.cases:
        print(
            f"{case.name:<20} {case.requests:>9} {case.rps:>11.0f} {_ms(case.p50_ms):>8}"
            f" {_ms(case.p99_ms):>8} {case.errors:>7}"
        )
    print("throughput ratios:")
    for label, ratio in _ratios(report).items():
        print(f"  {label:<32} {'-' if ratio is None else f'{ratio:.3f}'}")
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
        seconds=float(args.seconds), concurrency=int(args.concurrency), warmup=int(args.warmup)
    )
    machine = _machine()
    print("machine: " + ", ".join(f"{key} {value}" for key, value in machine.items()))
    print(
        f"settings: {settings.seconds:g} s per case after {settings.warmup} warm-up requests,"
        f" {settings.concurrency} concurrent workers in one asyncio client process"
    )
    reports = []
    failed = False
    for bench in BENCHMARKS:
        report = bench(settings)
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
                }
                for report in reports
            },
        }
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
