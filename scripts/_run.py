"""The subprocess runner of the scripts here (``from _run import sh`` in a script run as
``python scripts/NAME.py``)."""

import os
import re
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(cmd, log_path=None, echo_prefix=None, env=None, cwd=ROOT):
    """Run a command (stderr into stdout), tee to a log file, echo fairseq progress lines when
    echo_prefix is given; return its output, or raise RuntimeError with its tail when it fails.
    env: variables set over os.environ and PYTHONWARNINGS=ignore."""
    t0 = time.time()
    with open(log_path or os.devnull, "w") as log:
        env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env)
        lines = []
        for line in proc.stdout:
            log.write(line)
            lines.append(line)
            if echo_prefix and ("| train_inner |" in line or "| valid |" in line):
                m = re.search(r"num_updates[= ](\d+)", line)
                loss = re.search(r"nll_loss[= ]([\d.]+)", line)
                kind = "valid" if "| valid |" in line else "train"
                print(f"  {echo_prefix}: {kind} update {m.group(1) if m else '?'} "
                      f"nll_loss(bits) {loss.group(1) if loss else '?'}  [{time.time() - t0:.0f}s]", flush=True)
        rc = proc.wait()
    if rc != 0:
        tail = "".join(lines[-30:])
        raise RuntimeError(f"command failed ({rc}): {' '.join(cmd)}\n{tail}")
    return "".join(lines)
