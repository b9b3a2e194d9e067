"""Helpers for tests that start `moeserve serve`, alone or under mpirun (standard library only)."""

import os
import time


def _descends_from(pid, ancestor):
    """Whether process `pid` has `ancestor` among its parents."""
    for _ in range(8):
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])  # the parent
        except (OSError, ValueError, IndexError):
            return False
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
    return False


def rank_pid(mpirun_pid, rank, timeout=5.0):
    """The process of rank `rank` of the job `mpirun_pid` launched."""
    want = f"OMPI_COMM_WORLD_RANK={rank}".encode()
    deadline = time.time() + timeout
    while True:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                continue
            if want in env and _descends_from(int(pid), mpirun_pid):
                return int(pid)
        if time.time() > deadline:
            raise RuntimeError(f"rank {rank} of mpirun job {mpirun_pid} not found")
        time.sleep(0.1)


def rank0_pid(mpirun_pid, timeout=5.0):
    """Rank 0 of the job `mpirun_pid` launched (not of any other job on the machine). Signals go
    there: mpirun itself kills the whole job on SIGINT / SIGTERM."""
    return rank_pid(mpirun_pid, 0, timeout)
