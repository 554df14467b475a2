"""python -m bench: start the real daemon on free loopback ports, run the scenarios, print a table
per scenario and write every figure as JSON. Figures sit beside a baseline measured in the same run."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench import concurrency, growth, measure, memory, metrics, overhead, queueing, recovery, restart
from bench.daemon import Launcher, threads_chosen_by_daemon
from testing.servers import REPO

DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SCENARIOS = ("overhead", "growth", "restart", "concurrency", "recovery", "memory", "queue", "metrics")


@dataclass(frozen=True)
class Effort:
    """How many times each scenario repeats its measurement."""

    runs: int  # overhead: interleaved daemon/in-process pairs
    growth_runs: int  # growth: pairs per prompt and reply size
    growth_prompts: tuple[int, ...]  # growth: prompt sizes in tokens
    growth_replies: tuple[int, ...]  # growth: max_tokens
    restart_requests: int  # restart: sequential requests per daemon ...
    restart_rounds: int  # ... sent in this many turns
    requests_per_client: int  # concurrency
    recovery_samples: int  # recovery: faults of each kind


FULL = Effort(runs=15, growth_runs=5, growth_prompts=growth.PROMPT_SIZES, growth_replies=growth.REPLY_SIZES,
              restart_requests=40, restart_rounds=5, requests_per_client=6, recovery_samples=3)
QUICK = Effort(runs=2, growth_runs=1, growth_prompts=growth.PROMPT_SIZES[:2], growth_replies=growth.REPLY_SIZES[:2],
               restart_requests=6, restart_rounds=2, requests_per_client=1, recovery_samples=1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="chat model (.gguf) to measure")
    parser.add_argument("--threads", type=int, default=None,
                        help="inference threads for daemon and baseline alike (default: the daemon's own choice)")
    parser.add_argument("--runs", type=int, default=None, help=f"repetitions of the overhead pairs (default {FULL.runs})")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few repetitions, under two minutes")
    parser.add_argument("--only", choices=SCENARIOS, action="append", help="run only these scenarios (repeatable)")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "latest.json")
    return parser.parse_args(argv)


def print_table(scenario: str, rows: dict[str, dict[str, float]]) -> None:
    columns = list(dict.fromkeys(key for row in rows.values() for key in row))
    width = max((len(name) for name in rows), default=0) + 2
    print(f"\n{scenario}\n{'':<{width}}" + "".join(f"{column:>{max(12, len(column) + 2)}}" for column in columns))
    for name, row in rows.items():
        print(f"{name:<{width}}" + "".join(f"{row.get(column, ''):>{max(12, len(column) + 2)}}" for column in columns))


def baseline_threads(args: argparse.Namespace) -> int:
    """The threads of the daemon as it ships (restart per request); overhead and growth give the
    in-process baseline and every daemon they measure as many."""
    return args.threads or threads_chosen_by_daemon()


OVERHEAD_DAEMONS = {"restart every request": {}, "never restart": {"RESTART_AFTER_REQUESTS": 0}}


def run_scenarios(args: argparse.Namespace, launcher: Launcher, effort: Effort) -> dict[str, dict[str, dict[str, float]]]:
    chosen = args.only or list(SCENARIOS)
    results: dict[str, dict[str, dict[str, float]]] = {}
    if {"overhead", "growth"} & set(chosen):
        threads = baseline_threads(args)
        baseline = overhead.InProcess.load(args.model, threads, n_ctx=2048)
        with contextlib.ExitStack() as stack:
            ports = {label: stack.enter_context(launcher.start(N_THREADS=threads, **settings)).port
                     for label, settings in OVERHEAD_DAEMONS.items()}
            if "overhead" in chosen:
                results["overhead"] = overhead.run(ports, baseline, effort.runs)
            if "growth" in chosen:  # on the daemon as it ships
                results["growth"] = growth.run(ports["restart every request"], baseline, effort.growth_runs,
                                               effort.growth_prompts, effort.growth_replies)
        baseline.model.close()
    if "restart" in chosen:
        results["restart"] = restart.run(launcher.start, args.threads, effort.restart_requests, effort.restart_rounds)
    if "concurrency" in chosen:
        results["concurrency"] = concurrency.run(launcher.start, effort.requests_per_client)
    if "recovery" in chosen:
        results["recovery"] = recovery.run(launcher.start, effort.recovery_samples)
    if "memory" in chosen:
        results["memory"] = memory.run(launcher.start, args.model)
    if "queue" in chosen:
        results["queue"] = queueing.run(launcher.start, queueing.REFUSALS if effort.runs > 2 else 5, effort.runs)
    if "metrics" in chosen:
        results["metrics"] = metrics.run(calls=20000 if effort.runs > 2 else 1000,
                                         dead=metrics.DEAD if effort.runs > 2 else 100)
    return results


def handle_sigterm(_signum: int, _frame: object) -> None:
    """Stopped from outside (a timeout, a CI runner): unwind, so every daemon started is stopped.
    They run in sessions of their own and would outlive a benchmark that just died."""
    raise SystemExit(143)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, handle_sigterm)
    args = parse_args(argv)
    if not args.model.is_file():
        print(f"bench: model not found: {args.model} (run ./start.sh once, or pass --model)", file=sys.stderr)
        return 2
    effort = QUICK if args.quick else FULL
    if args.runs:
        effort = replace(effort, runs=args.runs)
    if args.quick:
        measure.SETTLE_SECONDS = 0.02  # a smoke run checks that everything works, not the figures
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-") as folder:
        results = run_scenarios(args, Launcher(args.model, Path(folder), args.threads), effort)
    report = {"model": args.model.name, "model_bytes": args.model.stat().st_size,
              "threads": args.threads or "daemon's choice", "baseline_threads": baseline_threads(args),
              "effort": asdict(effort), "quick": args.quick, "seconds": round(time.monotonic() - started, 1),
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
              "scenarios": results}
    for scenario, rows in results.items():
        print_table(scenario, rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.json} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
