"""python -m bench: start the real daemon on free loopback ports, run the scenarios, print a table
per scenario and write every figure as JSON. Figures sit beside a baseline measured in the same run."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from api.config import load_settings
from bench import concurrency, growth, measure, overhead
from tests.servers import PYTHON, REPO, ServerProcess, base_env, free_port

DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SCENARIOS = ("overhead", "growth", "concurrency")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="chat model (.gguf) to measure")
    parser.add_argument("--threads", type=int, default=None,
                        help="inference threads for daemon and baseline alike (default: the daemon's own choice)")
    parser.add_argument("--runs", type=int, default=15, help="repetitions of each measurement")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few repetitions, under two minutes")
    parser.add_argument("--server", choices=["supervisor", "worker"], default="supervisor",
                        help="overhead and growth: the whole daemon (watchdog_main.py) or one bare worker (python -m api)")
    parser.add_argument("--only", choices=SCENARIOS, action="append", help="run only these scenarios (repeatable)")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "latest.json")
    return parser.parse_args(argv)


class Daemons:
    """Starts daemons on free ports for the scenarios, each with its own settings, and stops them."""

    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args = args
        self.folder = folder

    @contextlib.contextmanager
    def start(self, server: str = "supervisor", *, workers: int = 1, threads: int | None = None,
              **settings: object) -> Iterator[int]:
        port = free_port()
        home = Path(tempfile.mkdtemp(dir=self.folder))
        env = base_env(MODEL_PATH=self.args.model.parent, MODEL_NAME=self.args.model.name, LISTEN_PORT=port,
                       N_THREADS=threads or self.args.threads or 0, WORKERS=workers, LOG_FOLDER_NAME=home / "logs",
                       WATCHDOG_TEMPFILE=home / "run", EMBEDDING_MODEL_NAME="none.gguf", **settings)
        command = [PYTHON, "watchdog_main.py"] if server == "supervisor" else [PYTHON, "-m", "api"]
        daemon = ServerProcess(command, env, port, home / "daemon.log").start()
        try:
            daemon.wait_ready(timeout=120)
            yield port
        finally:
            daemon.stop()


def print_table(scenario: str, rows: dict[str, dict[str, float]]) -> None:
    columns = list(dict.fromkeys(key for row in rows.values() for key in row))
    width = max(len(name) for name in rows) + 2
    print(f"\n{scenario}\n{'':<{width}}" + "".join(f"{column:>16}" for column in columns))
    for name, row in rows.items():
        print(f"{name:<{width}}" + "".join(f"{row.get(column, ''):>16}" for column in columns))


def baseline_threads(args: argparse.Namespace) -> int:
    """The threads the daemon's one worker uses, so the baseline runs on as many."""
    if args.threads:
        return args.threads
    if args.server == "worker":
        return load_settings(base_env(RESTART_AFTER_REQUESTS=0), env_file=Path(os.devnull)).threads_per_worker
    return load_settings(base_env(), env_file=Path(os.devnull)).threads_per_worker


def run_scenarios(args: argparse.Namespace, daemons: Daemons, runs: int) -> dict[str, dict[str, dict[str, float]]]:
    chosen = args.only or list(SCENARIOS)
    results: dict[str, dict[str, dict[str, float]]] = {}
    if {"overhead", "growth"} & set(chosen):
        baseline = overhead.InProcess.load(args.model, baseline_threads(args), n_ctx=2048)
        with daemons.start(args.server) as port:
            paired: dict[str, Callable[[int, overhead.InProcess, int], dict[str, dict[str, float]]]] = {
                "overhead": overhead.run, "growth": growth.run}
            for name, scenario in paired.items():
                if name in chosen:
                    results[name] = scenario(port, baseline, runs)
        baseline.model.close()
    if "concurrency" in chosen:
        results["concurrency"] = concurrency.run(daemons.start, requests_per_client=2 if args.quick else 6)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.model.is_file():
        print(f"bench: model not found: {args.model} (run ./start.sh once, or pass --model)", file=sys.stderr)
        return 2
    runs = 3 if args.quick else args.runs
    if args.quick:
        measure.SETTLE_SECONDS = 0.02  # a smoke run checks that everything works, not the figures
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-") as folder:
        results = run_scenarios(args, Daemons(args, Path(folder)), runs)
    report = {"model": args.model.name, "server": args.server, "threads": baseline_threads(args), "runs": runs,
              "quick": args.quick, "seconds": round(time.monotonic() - started, 1),
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count()}, "scenarios": results}
    for scenario, rows in results.items():
        print_table(scenario, rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.json} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
