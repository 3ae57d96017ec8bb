"""`run.usage.Usage`: the peak RSS leaves out the processes it is told to (the pipeline's next
kernel, started early and idle beside the running notebook), given as pids or as a function."""
from __future__ import annotations

import subprocess
import sys
import time

from recsys_lib.run.usage import GB, Usage

MB = 1024 ** 2
#: a child that holds ``n`` MiB, written (so resident), and says so
HOLD = "import sys, time; b = b'x' * ({n} * 2**20); print('ready', flush=True); time.sleep(60)"


def child(n_mb: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(n=n_mb)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def peak(exclude) -> float:
    with Usage(interval=0.05, exclude=exclude) as u:
        time.sleep(0.4)
    return u.figures()["peak_rss_gb"] * GB / MB


def test_usage_leaves_out_the_rss_of_the_pids_it_excludes():
    big, small = child(300), child(1)
    try:
        everything = peak(())
        without_big = peak([big.pid])
        by_function = peak(lambda: (big.pid,))
    finally:
        for p in (big, small):
            p.kill()
            p.wait()
    assert everything > 300                        # both children: the big one's 300 MiB counted
    assert without_big < 150 and by_function < 150  # the small one alone (an interpreter, ~10-30 MiB)
    assert without_big > 0
