"""Start the GPT4All API daemon: a supervisor that keeps its model workers alive.

    python watchdog_main.py [--control-stdin]      (./start.sh and start.bat run this)

Everything is configured in .env or the environment (see .env.example); the code is in supervisor/.
"""

import sys

from supervisor.main import main

if __name__ == "__main__":
    sys.exit(main())
