"""Install-time tools that start.sh, test.sh and start.bat run before the daemon starts.

Nothing here is imported by the running daemon (the supervisor or a worker): this is where the
files the daemon needs are made, not where they are served.
"""
