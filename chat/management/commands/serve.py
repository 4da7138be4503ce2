"""Serve the site with daphne, draining on SIGTERM: `manage.py serve [daphne's options] llmsite.asgi:application`.

daphne's own CLI stops at once on SIGTERM and cuts every running stream. This launcher runs
daphne's Server with its own signal handling: the first SIGTERM (or SIGINT) starts the drain
(chat/ops/drain.py: `/ready` and new API requests answer 503), the server stops once no request
or generation is left or DRAIN_TIMEOUT seconds have passed; a second signal stops it at once.

WebSocket messages and frames are capped at API_MAX_REQUEST_BYTES by the protocol layer (autobahn,
through daphne's --websocket-max-message-size and --websocket-max-frame-size, which win when given): a
bigger message closes the socket with 1009 (message too big) before it is buffered whole or parsed.

--proxy-headers is refused without --proxy-headers-host (the client's address must come from a header the proxy
overwrites, not from X-Forwarded-For's first entry).
"""

import asyncio
import logging
import os
import signal
import time

from daphne.cli import CommandLineInterface
from daphne.server import Server
from django.conf import settings
from django.core.management.base import BaseCommand
from twisted.internet import reactor

from chat.engines import reset_registry
from chat.ops.drain import drain_begin, is_draining, work_in_progress
from chat.ops.raw_body import install as install_raw_body
from chat.ops.websocket_inbound import install as install_websocket_bound
from chat.ops.write_through import install as install_write_through

logger = logging.getLogger("llmsite.drain")
serve_logger = logging.getLogger("llmsite.serve")

POLL_SECONDS = 0.2


class DrainingServer(Server):
    """daphne's Server with SIGTERM/SIGINT turned into a bounded drain."""

    def __init__(self, *args, **kwargs):
        kwargs["signal_handlers"] = False  # Twisted's handlers would stop the reactor at once
        super().__init__(*args, **kwargs)
        self.drain_deadline = None

    def run(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        # autobahn drops the TCP connection of a message over the limit; with a closing handshake the client
        # learns why (1009). Set once the reactor runs: daphne builds its factory inside run().
        reactor.callWhenRunning(lambda: self.ws_factory.setProtocolOptions(failByDrop=False))
        reactor.callLater(0, self._log_event_loop)  # runs on the loop once it turns
        super().run()

    @staticmethod
    def _log_event_loop():
        loop = type(asyncio.get_running_loop())
        serve_logger.info("event loop: %s.%s (EVENT_LOOP=%s)", loop.__module__, loop.__qualname__, settings.EVENT_LOOP)

    def _on_signal(self, signum, frame):
        reactor.callFromThread(self._drain_or_stop, signal.Signals(signum).name)

    def _drain_or_stop(self, signame):
        if is_draining():
            logger.warning("%s during the drain: stopping now", signame)
            self.stop()
            return
        drain_begin()
        self.drain_deadline = time.monotonic() + settings.DRAIN_TIMEOUT
        logger.info("%s: draining (%d in progress, at most %ss)", signame, work_in_progress(), settings.DRAIN_TIMEOUT)
        self._drain_check()

    def _drain_check(self):
        remaining = work_in_progress()
        if remaining == 0 or time.monotonic() >= self.drain_deadline:
            if remaining:
                logger.warning("drain timeout: stopping with %d request(s) or generation(s) still running", remaining)
            else:
                logger.info("drained: stopping")
            self.stop()
            return
        reactor.callLater(POLL_SECONDS, self._drain_check)


class DrainingCommandLine(CommandLineInterface):
    server_class = DrainingServer

    def run(self, args):
        self.refuse_proxy_headers_without_host(self.parser.parse_args(args))
        super().run(args)

    def refuse_proxy_headers_without_host(self, options):
        """--proxy-headers alone takes the client's address from the first X-Forwarded-For entry, which the
        client writes itself (Nginx appends to it): varying it would escape every login lockout."""
        if options.proxy_headers and not options.proxy_headers_host:
            self.parser.error("--proxy-headers needs --proxy-headers-host with a header the proxy sets itself "
                              "(X-Real-IP with deploy/nginx.conf.template; deploy/README.md)")


WEBSOCKET_LIMIT_OPTIONS = ("--websocket-max-message-size", "--websocket-max-frame-size")


def with_websocket_limits(args: list[str]) -> list[str]:
    """daphne's arguments with its WebSocket message and frame limits at API_MAX_REQUEST_BYTES unless given
    (daphne's own default is 1 MiB, whatever the HTTP body limit)."""
    given = {arg.split("=", 1)[0] for arg in args}
    limits = [item for option in WEBSOCKET_LIMIT_OPTIONS if option not in given
              for item in (option, str(settings.API_MAX_REQUEST_BYTES))]
    return limits + list(args)


class Command(BaseCommand):
    help = "Run daphne (same options) with a graceful drain on SIGTERM bounded by DRAIN_TIMEOUT."

    def run_from_argv(self, argv):
        install_write_through()  # a streamed token leaves without an extra reactor turn (chat/ops/write_through.py)
        install_raw_body()  # Twisted does not parse request bodies on the event loop (chat/ops/raw_body.py)
        install_websocket_bound()  # a socket cannot queue messages without bound (chat/ops/websocket_inbound.py)
        # daphne parses its own options: everything after `serve` goes to it, with our WebSocket limits.
        DrainingCommandLine().run(with_websocket_limits(argv[2:]))
        cut_short = work_in_progress()
        # Stop the engines: each scheduler thread finishes its step, fails what still runs, writes every slot's
        # conversation to the state directory (if set) and frees its model itself, so nothing is freed under a
        # running decode; what a drain cut short resumes from its saved state after the restart.
        reset_registry()
        if cut_short:
            # Stopped by DRAIN_TIMEOUT (or a second signal): request threads may still be winding down; exit
            # without waiting for them.
            logging.shutdown()
            os._exit(0)

    def handle(self, *args, **options):  # pragma: no cover - run_from_argv does the work
        raise NotImplementedError
