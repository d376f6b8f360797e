"""Children that cannot outlive the process that started them."""

from __future__ import annotations

import ctypes
import signal
from typing import Callable

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn`: the kernel sends the child `sig` when its parent dies, even by SIGKILL, so
    a server, benchmark or test that ends abruptly leaves no worker behind (Linux; elsewhere a
    no-op)."""

    def arm() -> None:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
        except (OSError, AttributeError):
            pass

    return arm
