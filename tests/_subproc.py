"""Running a child process from a test with a hard time limit (shared by the DDP and resume tests)."""
import os
import signal
import subprocess

import pytest


def run_bounded(cmd, timeout, env=None, cwd=None):
    """Run ``cmd`` in its own process group and return ``(returncode, combined output)``.

    On timeout the whole group is killed (no stray workers are left behind) and the test fails with the output's tail.
    ``OMP_NUM_THREADS`` defaults to 1 so that several children share the CPU cores without oversubscription.
    """
    env = dict(os.environ if env is None else env)
    env.setdefault('OMP_NUM_THREADS', '1')
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=cwd, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f'{[str(c) for c in cmd[:6]]} ... did not finish in {timeout} s:\n{out[-4000:]}')
    return proc.returncode, out
