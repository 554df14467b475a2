"""The watchdog supervisor of the GPT4All API daemon (entry point: watchdog_main.py).

It never imports gpt4all: it binds the public socket once, runs `python -m api` workers on it,
watches their sentinel files and health, and replaces them after their requests, or when they
crash, hang or grow too big. `arbiter` decides, `processes` spawns and signals, `logs` writes
the one log, `fallback` answers 503 while no worker can, `notify` speaks to systemd.
"""
