"""A lean process that spawns and times the benchmarked clients (standard library only).

Why a separate process: Linux books the parent's memory high-water mark into a
child's ``ru_maxrss`` (the mm the child leaves at ``exec`` is the parent's copy), so
a child spawned by the benchmark itself, which holds Pillow and generated images,
would report the benchmark's RSS rather than its own. Spawned from this ~10 MB
process, a client's ``ru_maxrss`` is its own.

Protocol: one JSON request a line on stdin, one JSON answer a line on stdout::

    {"argv": [...], "env": {...}, "stdout": PATH, "stderr": PATH, "timeout": SECONDS|null}
    {"wall": s, "utime": s, "stime": s, "maxrss_kb": n, "exit_code": n, "timed_out": bool}

``argv[0]`` must be an absolute path. Past ``timeout`` the child gets SIGTERM, and
SIGKILL 30 s later.
"""

import json
import os
import signal
import sys
import time
from typing import Any

KILL_GRACE_SECONDS = 30.0


def run(request: dict[str, Any]) -> dict[str, Any]:
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    actions = [
        (os.POSIX_SPAWN_DUP2, null, 0),
        (os.POSIX_SPAWN_DUP2, out, 1),
        (os.POSIX_SPAWN_DUP2, err, 2),
    ]
    argv = request["argv"]
    started = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, request["env"], file_actions=actions)
    for fd in (out, err, null):
        os.close(fd)
    timed_out: list[bool] = []

    def on_alarm(signum: int, frame: object) -> None:
        try:
            if not timed_out:
                timed_out.append(True)
                os.kill(pid, signal.SIGTERM)
                signal.setitimer(signal.ITIMER_REAL, KILL_GRACE_SECONDS)
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGALRM, on_alarm)
    if request.get("timeout"):
        signal.setitimer(signal.ITIMER_REAL, float(request["timeout"]))
    _, status, usage = os.wait4(pid, 0)  # retried after the handler runs (PEP 475)
    signal.setitimer(signal.ITIMER_REAL, 0)
    return {
        "wall": time.perf_counter() - started,
        "utime": usage.ru_utime,
        "stime": usage.ru_stime,
        "maxrss_kb": usage.ru_maxrss,
        "exit_code": os.waitstatus_to_exitcode(status),
        "timed_out": bool(timed_out),
    }


def main() -> None:
    for line in sys.stdin:
        if line.strip():
            sys.stdout.write(json.dumps(run(json.loads(line))) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
