"""Helpers for tests that run several JAX processes (test_multihost, test_eval_multihost)."""

import signal
import socket
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_and_check_survivor(procs, logs, victim: int, wait_s: float) -> None:
    """SIGKILL procs[victim]; the other must leave on its own within wait_s, non-zero,
    with a clear error. Two ways, both seen: in a collective, gloo's connection to the
    dead process breaks and gptjax exits at once (status 1, one line naming it);
    otherwise JAX's coordination service misses the dead process's heartbeats (or loses
    its service) and JAX aborts the process (SIGABRT)."""
    survivor = 1 - victim
    procs[victim].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    procs[survivor].wait(timeout=wait_s)  # TimeoutExpired: it hangs
    rc = procs[survivor].returncode
    print(f"process {survivor}: status {rc}, {time.monotonic() - killed:.1f}s")
    stderr = logs[survivor].read_text()
    if rc == 1:
        assert f"gptjax: process {survivor} of 2 failed: JaxRuntimeError" in stderr, stderr
        assert "another process has probably died" in stderr
    else:
        assert rc == -signal.SIGABRT, stderr[-3000:]
        assert "Terminating process because the JAX distributed service detected" in stderr
