"""``perfagent profile``: a py-spy recording of a running process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def profile_pid(pid: int, duration: int, output: str, fmt: str) -> int:
    """Runs ``py-spy record``; every failure is one line saying what to do."""
    if not os.path.exists(f"/proc/{pid}") and not _alive(pid):
        sys.stderr.write(f"perfagent: no process {pid}\n")
        return 1
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        sys.stderr.write("perfagent: py-spy is not installed (pip install py-spy)\n")
        return 1
    argv = [py_spy, "record", "--pid", str(pid), "--duration", str(duration), "-o", output]
    argv += ["--format", fmt]
    sys.stderr.write(f"perfagent: profiling pid {pid} for {duration}s into {output}\n")
    result = subprocess.run(argv, stderr=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        text = result.stderr.strip()
        if "Failed to find python version" in text:
            sys.stderr.write(
                f"perfagent: process {pid} is not a Python interpreter (a wrapper such as "
                "timeout, a shell or a pyenv shim?); give the pid of the Python process itself\n"
            )
            return result.returncode
        if "Permission" in text or "ptrace" in text.lower():
            sys.stderr.write(
                "perfagent: py-spy may not attach (ptrace not permitted): run as root, "
                "add CAP_SYS_PTRACE, or set /proc/sys/kernel/yama/ptrace_scope to 0\n"
            )
        sys.stderr.write(text + "\n")
    return result.returncode
