"""Long prompts are tokenized off a frontend's event loop, on its tokenizer thread.

A tokenizer reads ~5 MB of code per second (the built-in one: 0.18 µs a character): in the loop,
a 64 KB file that an editor sends held every stream of the frontend for 12 ms, a 3 MB body for
1.3 s before its error. Tokenizer.encode lets go of the GIL while it works, so on a thread of its
own the loop streams on meanwhile. A short text is tokenized in place: handing it to the thread
and back costs ~90 µs, more than tokenizing 2 KB does (~0.4 ms at most in place).

One thread per frontend process, as TGI's one validation worker (/info's `validation_workers`):
long prompts queue there, and frontends scale out as processes.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

LONG_TEXT = 2048  # characters of prompt text (or bytes of a request's body) tokenized in place at most

T = TypeVar("T")

_tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")


def is_long(size: int) -> bool:
    """Whether a text of `size` characters (or a body of `size` bytes) goes to the tokenizer thread."""
    return size > LONG_TEXT


def start(fn: Callable[..., T], *args) -> asyncio.Future[T]:
    """fn(*args) on the tokenizer thread; its result (or exception) in the returned future, on the
    running loop."""
    return asyncio.get_running_loop().run_in_executor(_tokenizer_thread, fn, *args)
