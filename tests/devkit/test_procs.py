"""devkit.procs: the port hand-out that the tests, the bench and `aiq dev` share."""

from __future__ import annotations

import subprocess
import sys

from devkit.paths import ROOT
from devkit.procs import free_port

_HAND_OUTS = 400
_OTHER_PROCESS = f"from devkit.procs import free_port\nprint(*(free_port() for _ in range({_HAND_OUTS})))"


def test_no_port_is_handed_out_twice_across_processes() -> None:
    # The kernel gives a just-closed port out again within a few binds: without the claims, two processes
    # asking at once (two pytest-xdist workers) get some of the same ports, in this many calls nearly always.
    other = subprocess.Popen([sys.executable, "-c", _OTHER_PROCESS], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    mine = [free_port() for _ in range(_HAND_OUTS)]
    out, _ = other.communicate(timeout=60)
    theirs = [int(port) for port in out.split()]
    assert len(theirs) == _HAND_OUTS
    assert len(set(mine) | set(theirs)) == 2 * _HAND_OUTS
