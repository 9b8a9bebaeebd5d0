"""The harness that stops test clusters must treat a process that exits on its own as stopped."""

import subprocess
import sys

import psutil

from tests.ray_cluster import _process, _running


def test_a_process_that_exits_between_check_and_call_counts_as_stopped():
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    handle = psutil.Process(child.pid)
    assert _running(handle)  # it waits on its stdin
    child.stdin.close()
    child.wait()
    assert _process(child.pid) is None
    assert not _running(handle)
