"""Start the GPT4All API daemon: a supervisor that keeps its model workers alive.

    python watchdog_main.py [--control-stdin]      (./start.sh and start.bat run this)

Everything is configured in .env or the environment (see .env.example); the code is in supervisor/.
"""

if __name__ == "__main__":  # imports inside: fork-server children re-run this file as __mp_main__
    import sys

    from supervisor.main import main

    sys.exit(main())
