"""Start several real processes for the distributed tests, with a deadline.

``torch.multiprocessing.start_processes(..., join=True)`` waits forever when a rank hangs (a gloo
connection that never completes, a collective one rank never enters): the test run then stops at
the CI's limit with no word of where. Here each rank gets a deadline: when it passes, the rank
prints every thread's stack (``faulthandler``) and exits, and the parent stops the other ranks and
fails the test with what it knows. The default group is told to use the loopback interface (where
the machine has one and the caller did not choose): two processes on one machine need nothing else,
and a host name that resolves to an address of no local interface would otherwise break gloo.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import sys
import time
from typing import Callable

import pytest
import torch.multiprocessing as mp

#: Seconds a rank may run before it dumps its stacks and exits (the tests take seconds).
RANK_DEADLINE_S = 240.0
#: What ``init_process_group`` should wait for a peer (``timeout=`` of every test's group).
GROUP_TIMEOUT = datetime.timedelta(seconds=120)


def _use_loopback() -> None:
    if "GLOO_SOCKET_IFNAME" not in os.environ and os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"


def _rank_main(rank: int, fn: Callable, deadline_s: float, *args) -> None:
    faulthandler.dump_traceback_later(deadline_s, exit=True, file=sys.stderr)
    try:
        fn(rank, *args)
    except BaseException:
        faulthandler.cancel_dump_traceback_later()
        raise  # torch.multiprocessing reports it to the parent
    # The rank's work is done and its results are written. Leave without running destructors:
    # freeing a DDP model and a gloo group as the worker's frame is torn down once blocked rank 0
    # for good in CI (its stack dump showed it inside the call above, after the worker returned),
    # which would fail a test whose results were already complete.
    faulthandler.cancel_dump_traceback_later()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(fn: Callable, args: tuple, nprocs: int, deadline_s: float = RANK_DEADLINE_S) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes and wait for all of them.

    Raises (through ``torch.multiprocessing``) the first rank's exception; fails the test when a rank
    is still running ``deadline_s`` + 30 s after the start (its stacks are then in the captured stderr).
    """
    _use_loopback()  # spawned children inherit the environment
    ctx = mp.start_processes(_rank_main, args=(fn, deadline_s) + tuple(args), nprocs=nprocs, start_method="spawn",
                             join=False)
    end = time.monotonic() + deadline_s + 30.0
    while not ctx.join(timeout=1.0):
        if time.monotonic() > end:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{nprocs} ranks still running after {deadline_s + 30:.0f} s (see their stacks in stderr)")
