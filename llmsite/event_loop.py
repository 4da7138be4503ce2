"""The event loop `manage.py serve` runs on: uvloop by default, asyncio's own with EVENT_LOOP=asyncio.

Every streamed token is a wake of the event loop from the engine's thread, a few coroutine steps and one
send(); on a small machine that loop time comes out of the model's threads. uvloop (libuv, in C) does the
loop's share in less: measured on 2 cores, the loop thread's CPU per streamed token fell by a tenth to a fifth
(270-325 to 242-259 us with one stream, 103-111 to 97-102 us with eight; docs/BENCHMARKS.md).

daphne makes its Twisted reactor's loop when Django loads the daphne app, with the asyncio policy of that
moment: so this runs before Django is set up (manage.py), and only for the server.
"""

from __future__ import annotations

import asyncio

EVENT_LOOPS = ("uvloop", "asyncio")


def install_event_loop(name: str) -> None:
    """Make new event loops of this process `name` loops (settings.EVENT_LOOP, checked there; "asyncio" leaves
    the default)."""
    if name == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
