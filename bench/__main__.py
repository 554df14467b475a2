"""python -m bench: start the real daemon on a free loopback port, measure, print a table, write JSON."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from bench import growth, measure, overhead
from tests.servers import PYTHON, REPO, ServerProcess, base_env, free_port

DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="chat model (.gguf) to measure")
    parser.add_argument("--threads", type=int, default=2, help="inference threads, the same for daemon and baseline")
    parser.add_argument("--runs", type=int, default=15, help="repetitions of each measurement")
    parser.add_argument("--quick", action="store_true", help="few repetitions: a smoke run")
    parser.add_argument("--server", choices=["supervisor", "worker"], default="supervisor",
                        help="measure the whole daemon (watchdog_main.py) or one bare worker (python -m api)")
    parser.add_argument("--only", choices=["overhead", "growth"], action="append",
                        help="run only these scenarios (repeatable); default: all")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "latest.json")
    return parser.parse_args(argv)


def start_daemon(args: argparse.Namespace, tmp: Path) -> ServerProcess:
    port = free_port()
    env = base_env(MODEL_PATH=args.model.parent, MODEL_NAME=args.model.name, N_THREADS=args.threads, LISTEN_PORT=port,
                   LOG_FOLDER_NAME=tmp / "logs", WATCHDOG_TEMPFILE=tmp / "run", EMBEDDING_MODEL_NAME="none.gguf")
    command = [PYTHON, "watchdog_main.py"] if args.server == "supervisor" else [PYTHON, "-m", "api"]
    return ServerProcess(command, env, port, tmp / "daemon.log").start()


def print_table(scenario: str, results: dict[str, dict[str, float]]) -> None:
    print(f"\n{scenario}\n{'figure':<28}{'daemon':>12}{'in-process':>12}{'added':>10}{'ratio':>8}")
    for name, row in results.items():
        if "daemon_ms" in row:
            print(f"{name:<28}{row['daemon_ms']:>10.1f}ms{row['in_process_ms']:>10.1f}ms{row['added_ms']:>8.1f}ms"
                  f"{row['ratio']:>8.3f}")
        else:
            print(f"{name:<28}{row['daemon']:>12.1f}{row['in_process']:>12.1f}{'':>10}{row['ratio']:>8.3f}")


def main(argv: list[str] | None = None) -> int:
    import tempfile

    args = parse_args(argv)
    if not args.model.is_file():
        print(f"bench: model not found: {args.model} (run ./start.sh once, or pass --model)", file=sys.stderr)
        return 2
    runs = 3 if args.quick else args.runs
    if args.quick:
        measure.SETTLE_SECONDS = 0.02  # a smoke run checks that everything works, not the figures
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        daemon = start_daemon(args, Path(tmp))
        try:
            daemon.wait_ready(timeout=120)
            baseline = overhead.InProcess.load(args.model, args.threads, n_ctx=2048)
            scenarios = {"overhead": overhead.run, "growth": growth.run}
            chosen = args.only or list(scenarios)
            results = {name: scenarios[name](daemon.port, baseline, runs) for name in chosen}
        finally:
            daemon.stop()
    report = {"model": args.model.name, "server": args.server, "threads": args.threads, "runs": runs,
              "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
              "scenarios": results}
    for scenario, rows in results.items():
        print_table(scenario, rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
