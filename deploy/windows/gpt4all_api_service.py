"""Run the GPT4All API daemon as a Windows service (needs pywin32; NOT run on our Linux CI).

From the checkout, in an administrator prompt, after `start.bat` has created the virtualenv once:

    .venv\\Scripts\\python -m pip install pywin32
    .venv\\Scripts\\python deploy\\windows\\gpt4all_api_service.py --startup auto install
    sc failure gpt4all-api reset= 86400 actions= restart/5000/restart/5000/restart/30000
    .venv\\Scripts\\python deploy\\windows\\gpt4all_api_service.py start
    (later: ... stop | remove)

The service runs `python watchdog_main.py --control-stdin` in the checkout. A service has no console,
so it cannot send Ctrl+C or CTRL_BREAK to the supervisor: it stops it by writing `stop` to the
supervisor's stdin, which stops accepting and gives requests in flight GRACEFUL_TIMEOUT to finish.
If the supervisor is still there after that (plus a margin), the service kills it, and the Job
Object the supervisor put its workers in (KILL_ON_JOB_CLOSE) takes every worker with it. If the
supervisor exits by itself, the service process exits abnormally so that the recovery actions set
with `sc failure` restart it. Output goes to logs\\service-console.log; the daemon's own log is
logs\\gpt4all-api.log as everywhere.

Written against pywin32's documented ServiceFramework API and the Win32 service control manager.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import servicemanager  # type: ignore[import-not-found]
import win32event  # type: ignore[import-not-found]
import win32service  # type: ignore[import-not-found]
import win32serviceutil  # type: ignore[import-not-found]

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from api.config import load_settings  # noqa: E402 - after the path above

STOP_MARGIN_SECONDS = 15


def venv_python() -> Path:
    """The virtualenv's python.exe (VENV_NAME, as start.bat picks it), not the service host."""
    venv = os.environ.get("VENV_NAME") or load_settings().venv_name
    return (REPO / venv / "Scripts" / "python.exe").resolve()


class GPT4AllApiService(win32serviceutil.ServiceFramework):
    _svc_name_ = "gpt4all-api"
    _svc_display_name_ = "GPT4All API daemon"
    _svc_description_ = "Local LLM API (OpenAI-compatible) on gpt4all, kept alive by its watchdog supervisor."

    def __init__(self, args: list[str]) -> None:
        super().__init__(args)
        self.stop_requested = win32event.CreateEvent(None, 0, 0, None)
        self.process: subprocess.Popen[bytes] | None = None

    def SvcStop(self) -> None:  # noqa: N802 - pywin32's name
        graceful = load_settings().graceful_timeout
        self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING, waitHint=int((graceful + STOP_MARGIN_SECONDS) * 1000))
        win32event.SetEvent(self.stop_requested)

    def SvcDoRun(self) -> None:  # noqa: N802 - pywin32's name
        (REPO / "logs").mkdir(exist_ok=True)
        with open(REPO / "logs" / "service-console.log", "ab") as console:
            self.process = subprocess.Popen(
                [str(venv_python()), "watchdog_main.py", "--control-stdin"], cwd=REPO,
                stdin=subprocess.PIPE, stdout=console, stderr=subprocess.STDOUT)
            servicemanager.LogInfoMsg(f"gpt4all-api: supervisor started (pid {self.process.pid})")
            while win32event.WaitForSingleObject(self.stop_requested, 1000) != win32event.WAIT_OBJECT_0:
                if self.process.poll() is not None:
                    servicemanager.LogErrorMsg(f"gpt4all-api: the supervisor exited with code {self.process.returncode}")
                    os._exit(1)  # abnormal end: the recovery actions (sc failure) restart the service
            self.stop_supervisor()

    def stop_supervisor(self) -> None:
        process = self.process
        assert process is not None and process.stdin is not None
        try:
            process.stdin.write(b"stop\n")
            process.stdin.close()
        except OSError:
            pass
        try:
            process.wait(load_settings().graceful_timeout + STOP_MARGIN_SECONDS)
        except subprocess.TimeoutExpired:
            servicemanager.LogWarningMsg("gpt4all-api: the supervisor did not stop in time; killing it")
            process.kill()
            process.wait()


if __name__ == "__main__":
    win32serviceutil.HandleCommandLine(GPT4AllApiService)
