"""The one way the repository runs a command as a subprocess (the experiment runner, the
scripts, the benchmarks and the end-to-end tests all use :func:`run`).

Conventions: the command runs from the repository root (``cwd``), with ``OMP_NUM_THREADS``
(default 1: the CPU runs share small machines) and ``PYTHONWARNINGS`` (default ``ignore``)
kept when the caller set them, and with this interpreter's directory first on ``PATH``;
``python`` at the head of a command is this interpreter and ``fairseq-X`` fairseq's console
script next to it (``python -m fairseq_cli.X`` when the scripts are not installed). The
output can be teed to a log file (which starts with ``# <the command>``) and echoed line by
line; a failure (non-zero exit, or the timeout) raises :class:`CommandFailed` naming the
command, the exit status, the log and the output's tail.
"""

import os
import shlex
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: how much of the output a failure shows
TAIL_CHARS = 6000
_FAIRSEQ_MODULES = {"fairseq-train": "train", "fairseq-eval-lm": "eval_lm", "fairseq-preprocess": "preprocess",
                    "fairseq-hydra-train": "hydra_train", "fairseq-generate": "generate"}


class CommandFailed(RuntimeError):
    """A command exited non-zero or ran past its timeout (the message holds the output's tail)."""

    def __init__(self, cmd: Sequence[str], returncode: Optional[int], output: str, log: Optional[str] = None):
        self.cmd, self.returncode, self.output, self.log = list(cmd), returncode, output, log
        status = "timed out" if returncode is None else f"failed ({returncode})"
        where = f"\nlog: {log}" if log else ""
        super().__init__(f"command {status}: {shlex.join(self.cmd)}{where}\n{output[-TAIL_CHARS:]}")


def executable(cmd: Sequence[str]) -> List[str]:
    """What runs for a printed command: this Python for ``python``, fairseq's console scripts
    next to it (or ``python -m fairseq_cli.X`` where they are not installed)."""
    cmd = [str(c) for c in cmd]
    head = cmd[0]
    if head == "python":
        return [sys.executable, *cmd[1:]]
    if head in _FAIRSEQ_MODULES:
        exe = os.path.join(os.path.dirname(sys.executable), head)
        if os.path.exists(exe):
            return [exe, *cmd[1:]]
        return [sys.executable, "-m", f"fairseq_cli.{_FAIRSEQ_MODULES[head]}", *cmd[1:]]
    return cmd


def environment(env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """os.environ with the repository's defaults, then ``env`` over it."""
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e.setdefault("PYTHONWARNINGS", "ignore")
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    e.update(env or {})
    return e


def run(cmd: Sequence[str], *, log: Optional[str] = None, append: bool = False, cwd: str = ROOT,
        env: Optional[Dict[str, str]] = None, echo: Optional[Callable[[str], Optional[str]]] = None,
        timeout: Optional[float] = None, check: bool = True,
        merge_stderr: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` (see the module docstring for the conventions) and return its
    ``CompletedProcess`` (text output; ``stderr`` is ``""`` when ``merge_stderr``).

    ``log``: a file the output is written to as it comes (``append`` continues an earlier
    one); ``echo(line)`` may return a text to print, with the seconds since the start;
    ``timeout`` (seconds) kills the command; ``check`` raises :class:`CommandFailed` when it
    fails, else the caller reads ``returncode``.
    """
    cmd = [str(c) for c in cmd]
    if log:
        os.makedirs(os.path.dirname(log) or ".", exist_ok=True)
    t0 = time.time()
    with open(log or os.devnull, "a" if append else "w") as f:
        f.write("# " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(executable(cmd), cwd=cwd, env=environment(env), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, text=True)
        killed = threading.Event()

        def kill():
            killed.set()
            proc.kill()

        timer = threading.Timer(timeout, kill) if timeout else None
        if timer:
            timer.start()
        try:
            if merge_stderr:  # stream: the log and the echo follow the command as it runs
                lines = []
                for line in proc.stdout:
                    f.write(line)
                    lines.append(line)
                    shown = echo(line) if echo else None
                    if shown:
                        print(f"    {shown}  [{time.time() - t0:.0f}s]", flush=True)
                out, err = "".join(lines), ""
                proc.wait()
            else:
                out, err = proc.communicate()
                f.write(out + err)
        finally:
            if timer:
                timer.cancel()
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if killed.is_set():
        raise CommandFailed(cmd, None, f"(killed after {timeout:.0f} s)\n" + out + err, log)
    if check and proc.returncode != 0:
        raise CommandFailed(cmd, proc.returncode, out + err, log)
    return result
