"""waitress, configured so that no client can make it write to disk, wait forever or crash.

What waitress does by default, and what is changed here (see the README's "Limits" section):
- Request bodies over `inbuf_overflow` (512 KB) are spooled to an unnamed temporary file: the
  limit is raised above the largest accepted body, so uploads stay in memory.
- Bodies are refused only from 1 GiB: `max_request_body_size` is set to the app's upload limit
  (plus room for the multipart envelope), so an oversized `Content-Length` is answered with 413
  before the body is read, and a chunked body is cut off once it passes the limit (or as soon as
  one chunk declares more than it can still take).
- Its timeout counts inactivity only, so a client sending a byte a second holds a connection
  for ever: `GuardedChannel` records when each request started and how much of it arrived, and
  `drop_slow_clients` closes a connection whose request, after `request_grace_s`, receives
  under `min_rate_bytes_s` over a grace-long window (a fast start buys no time), or is still
  arriving after `request_timeout_s`; and when the unfinished requests together hold more than
  `max_buffered_bytes`, the largest are dropped until they fit.
- At its connection limit it stops accepting, and idle connections live 30 s:
  `shed_under_pressure` closes idle and slowly arriving connections after 2 s once 80 % of
  the limit is open.
- It answers every pipelined request of one read: `limit_pipelining` answers 8, then closes.
- A Content-Length that int() refuses (over 4,300 digits) escaped its parser: 400 instead.
- Its own error answers (413, 400, 431) are plain text: `FriendlyErrorTask` answers JSON under
  /api/ and a short page elsewhere, in the app's words.
- It logs "Task queue depth" for every waiting request: `DeepQueueLogger`.
And for speed: the main loop leaves a running task's output to the task (`GuardedChannel.writable`).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from html import escape

from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import BaseWSGIServer, create_server
from waitress.task import ErrorTask
from waitress.utilities import BadRequest, RequestEntityTooLarge

from edge import DISCLAIMER

# Room for the multipart envelope (boundaries, part headers) around an upload of the full limit.
FORM_OVERHEAD_BYTES = 64 * 1024
# The security headers of every waitress-generated error (Flask's answers get them from Talisman).
ERROR_HEADERS = [("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"),
                 ("Referrer-Policy", "no-referrer"), ("Cache-Control", "no-store"),
                 ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")]


@dataclass(frozen=True)
class ServeOptions:
    """How waitress is run; `python -m server` fills it from its flags."""

    host: str = "127.0.0.1"  # bind address
    port: int = 8000  # TCP port
    threads: int = 4  # worker threads (requests handled at once)
    max_upload_bytes: int = 10 * 1024 * 1024  # the app's upload limit
    connection_limit: int = 200  # open connections before new ones wait (waitress: 100)
    channel_timeout_s: int = 30  # idle keep-alive connections are closed after this
    request_grace_s: float = 10.0  # any request may take this long, whatever its rate
    min_rate_bytes_s: int = 2048  # after the grace, each grace-long window must bring at least this rate
    request_timeout_s: float = 120.0  # no request may take longer to arrive (10 MB at 0.7 Mbit/s)
    max_buffered_bytes: int = 256 * 2**20  # all unfinished request bodies together
    reuse_port: bool = False  # SO_REUSEPORT: several worker processes share the port (Linux balances them)

    @property
    def max_body_bytes(self) -> int:
        return self.max_upload_bytes + FORM_OVERHEAD_BYTES


def user_message(code: int, max_upload_bytes: int) -> tuple[int, str]:
    """(status, message) for waitress's own errors. Its 501 (a Transfer-Encoding other than
    chunked) is the client's doing: answered 400, so no request gets a 5xx."""
    if code == 413:
        return 413, f"upload too large: the limit is {max_upload_bytes / 2**20:g} MB"
    if code == 431:
        return 431, "request headers too large"
    if code == 501:
        return 400, "unsupported Transfer-Encoding: send the image as multipart/form-data"
    return code, "the request could not be understood"


def error_task_class(max_upload_bytes: int) -> type[ErrorTask]:
    """An ErrorTask that answers like the app: JSON under /api/ and /healthz, a page elsewhere."""

    class FriendlyErrorTask(ErrorTask):
        def execute(self):
            error = self.request.error
            status, message = user_message(error.code, max_upload_bytes)
            path = getattr(self.request, "path", "") or ""
            if path.startswith("/api/") or path == "/healthz":
                body = json.dumps({"error": message, "status": status}).encode()
                ctype = "application/json"
            else:
                body = (f"<!doctype html><meta charset='utf-8'><title>Error {status}</title>"
                        f"<p>{escape(message)}</p><p><a href='/'>Back to the upload form</a></p>"
                        f"<p>{escape(DISCLAIMER)}</p>").encode()
                ctype = "text/html; charset=utf-8"
            self.status = f"{status} {'Bad Request' if status != error.code else error.reason}"
            self.response_headers.extend([("Content-Type", ctype), *ERROR_HEADERS])
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    return FriendlyErrorTask


MAX_PIPELINED = 8  # requests one connection may have waiting at once (browsers pipeline none)


class StrictRequestParser(HTTPRequestParser):
    """A request framed both by Transfer-Encoding and by Content-Length (which waitress reads as
    chunked) closes the connection after its answer, as RFC 9112 (6.3) asks: a proxy in front
    that framed it by length would otherwise read the rest as another request (smuggling)."""

    def parse_header(self, header_plus):
        super().parse_header(header_plus)
        if self.chunked and "CONTENT_LENGTH" in self.headers:
            self.headers["CONNECTION"] = "close"  # what waitress's task reads to close after answering


class GuardedChannel(HTTPChannel):
    """An HTTPChannel that remembers when the request it is reading began, and its bytes."""

    parser_class = StrictRequestParser

    request_started: float | None = None
    request_bytes = 0
    window_start = 0.0  # the rate window: when it began and the request's bytes then
    window_bytes = 0

    def send_continue(self):
        """No "100 Continue" for a request already refused (e.g. a Content-Length over the
        limit): the client would send the whole body before it reads the 413."""
        if self.request is not None and self.request.error is not None:
            return
        super().send_continue()

    task_running = False  # a task of this connection is being served (set around `service`)

    def service(self):
        self.task_running = True
        try:
            super().service()
        finally:
            self.task_running = False
            if self.connected and self.total_outbufs_len:  # output left, and the loop may have
                self.server.pull_trigger()  # looked at writable() before the flag fell

    def writable(self):
        """Not while this connection's task runs with its output under the high watermark: the
        task sends its own output on every write (waitress 3 flushes in `write_soon`), and after
        it ends the loop is woken again. waitress's own rule (any output pending) made the loop
        poll, find the output lock held by the task and poll again: on a worker that keeps to one
        core, some 30 empty turns per request, taken from the task's own core. At or over the
        watermark the task waits for the loop to flush (woken only below it), and between tasks
        the loop flushes and sees hang-ups as waitress does."""
        if self.task_running and not (self.will_close or self.close_when_flushed) \
                and self.total_outbufs_len < self.adj.outbuf_high_watermark:
            return False
        return super().writable()

    def received(self, data):
        if self.request is None:  # these bytes begin a new request
            now = time.monotonic()
            self.request_started, self.request_bytes, self.window_start, self.window_bytes = now, 0, now, 0
        self.request_bytes += len(data)
        try:
            done = super().received(data)
        except ValueError:  # int() refuses a Content-Length of over 4,300 digits; waitress catches
            self.refuse_request("Content-Length is invalid")  # only its own errors and dropped the connection
            done = True
        if self.request is not None and self.request.error is None and chunk_over_limit(self.request):
            self.refuse_request(RequestEntityTooLarge("a chunk declares more than the limit"))
            done = True
        with self.requests_lock:
            if len(self.requests) > MAX_PIPELINED:
                self.limit_pipelining()
        if self.request is None:  # the request is complete (or failed): stop the clock
            self.request_started = None
        return done

    def refuse_request(self, error):
        """Answer the request being read with `error` (a waitress Error, or a 400's reason) through
        FriendlyErrorTask, then close."""
        with self.requests_lock:
            bad = self.request if self.request is not None else self.parser_class(self.adj)
            bad.error, bad.completed = BadRequest(error) if isinstance(error, str) else error, True
            self.request = None
            self.requests.append(bad)
            if len(self.requests) == 1:
                self.server.add_task(self)

    def limit_pipelining(self):
        """Keep the first MAX_PIPELINED requests of one read, answer them and close the connection
        (the client retries the rest on a new one, as HTTP/1.1 lets a server do; bytes it sent
        beyond one read are not read, so its system may see the close as a reset). waitress
        answers every request of a read before it reads again, so without a cap one 8 KB read of
        pipelined GETs made some 200 answers wait in memory for a client that need never read
        them, on every connection. Called with `requests_lock` held."""
        for request in self.requests[MAX_PIPELINED:]:
            request.close()
        del self.requests[MAX_PIPELINED:]
        self.requests[-1].headers["CONNECTION"] = "close"  # waitress closes after answering it
        if self.request is not None:  # a partly read next request: never to be answered
            self.request.close()
            self.request = None


def chunk_over_limit(request) -> bool:
    """A chunked body whose current chunk declares more than the limit can still take: waitress
    would wait for all of it (or for the slow-client rule) before its 413; answer at once."""
    if not request.chunked or request.body_rcv is None:
        return False
    remainder = request.body_rcv.chunk_remainder
    return remainder > 0 and request.body_bytes_received + remainder >= request.adj.max_request_body_size


def too_slow(channel, options: ServeOptions, now: float) -> bool:
    """Past the deadline, or under the minimum rate over the last grace-long window."""
    elapsed = now - channel.request_started
    if elapsed > options.request_timeout_s:
        return True
    if elapsed <= options.request_grace_s or now - channel.window_start < options.request_grace_s:
        return False
    rate = (channel.request_bytes - channel.window_bytes) / (now - channel.window_start)
    channel.window_start, channel.window_bytes = now, channel.request_bytes
    return rate < options.min_rate_bytes_s


def busy(channel) -> bool:
    """Requests of this connection are queued or being answered: waitress reads no more of it
    meanwhile, so a next request that began in the same read only seems to stall."""
    return bool(getattr(channel, "requests", None)) or getattr(channel, "task_running", False)


def drop_slow_clients(server: BaseWSGIServer, options: ServeOptions, now: float | None = None) -> int:
    """Close slow or stalled uploads, then the largest ones while all together hold too much."""
    now = time.monotonic() if now is None else now
    reading = [c for c in list(server.active_channels.values())
               if getattr(c, "request_started", None) is not None and not c.will_close and not busy(c)]
    dropped = [c for c in reading if too_slow(c, options, now)]
    rest = sorted((c for c in reading if c not in dropped), key=lambda c: c.request_bytes)
    held = sum(c.request_bytes for c in rest)
    while rest and held > options.max_buffered_bytes:
        largest = rest.pop()
        held -= largest.request_bytes
        dropped.append(largest)
    for channel in dropped:
        channel.will_close = True
    return len(dropped)


PRESSURE_AT = 0.8  # share of the connection limit from which idle and slow connections are shed
PRESSURE_GRACE_S = 2.0  # what an idle or slowly arriving connection is granted under pressure


def shed_under_pressure(server: BaseWSGIServer, options: ServeOptions, now: float | None = None,
                        wall: float | None = None) -> int:
    """Near the connection limit, close keep-alive connections idle for over PRESSURE_GRACE_S
    (nothing arriving, queued or to send) and requests arriving under the minimum rate once they
    are PRESSURE_GRACE_S old (the usual grace is `request_grace_s`). Without it, a client holding
    the limit's worth of connections (silent, or sending a request every 20 s so waitress's 30 s
    idle timeout never fires) kept every other client waiting for as long as it liked, since
    waitress stops accepting at the limit."""
    now = time.monotonic() if now is None else now
    wall = time.time() if wall is None else wall
    channels = [c for c in list(server.active_channels.values()) if not c.will_close]
    if len(channels) < PRESSURE_AT * options.connection_limit:
        return 0
    shed = 0
    for c in channels:
        started = getattr(c, "request_started", None)
        if busy(c):
            continue
        if started is None:
            if c.total_outbufs_len or wall - c.last_activity <= PRESSURE_GRACE_S:
                continue
        elif now - started <= PRESSURE_GRACE_S or c.request_bytes / (now - started) >= options.min_rate_bytes_s:
            continue
        c.will_close = True
        shed += 1
    return shed


QUEUE_WARN_DEPTH = 64  # with one thread per worker: requests waiting before waitress's warning is kept
QUEUE_WARN_INTERVAL_S = 10.0  # and then at most one such warning in this many seconds


class DeepQueueLogger:
    """waitress's queue logger, keeping "Task queue depth is N" only from `min_depth` waiting
    requests, and then once per QUEUE_WARN_INTERVAL_S. waitress warns on every request that waits
    (a flood of clients wrote 2,000 lines a second), and with one thread per worker a queue is the
    normal state under load (min_depth QUEUE_WARN_DEPTH there); a logging.Filter would drop the
    message only after the record was built (caller lookup, pid, thread name: 4 % of a worker's
    main loop under load), so the depth is checked before anything is made. waitress calls it
    with its dispatcher's lock held."""

    def __init__(self, logger: logging.Logger, min_depth: int = QUEUE_WARN_DEPTH):
        self.logger = logger
        self.min_depth = min_depth
        self.last_warned = -math.inf

    def warning(self, msg, *args, **kwargs):
        depth = args[0] if args else None
        if isinstance(depth, int):
            now = time.monotonic()
            if depth < self.min_depth or now - self.last_warned < QUEUE_WARN_INTERVAL_S:
                return
            self.last_warned = now
        self.logger.warning(msg, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.logger, name)


def guard(server: BaseWSGIServer, options: ServeOptions) -> None:
    """Give one listening server the guarded channel, friendly errors and the slow-client sweep."""
    server.channel_class = type("Channel", (GuardedChannel,),
                                {"error_task_class": error_task_class(options.max_upload_bytes)})
    idle_sweep = server.maintenance

    def maintenance(now):
        idle_sweep(now)
        drop_slow_clients(server, options)
        shed_under_pressure(server, options, wall=now)
    server.maintenance = maintenance


def reuse_port_socket(host: str, port: int):
    """A bound TCP socket with SO_REUSEPORT, for one of several worker processes on one port."""
    import socket
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def make_server(app, options: ServeOptions):
    """A waitress server for `app` with the limits above; `.run()` serves, `.close()` stops.
    Raises OSError when the address cannot be bound (port in use, no permission)."""
    socket_map: dict = {}
    where = {"sockets": [reuse_port_socket(options.host, options.port)]} if options.reuse_port else \
        {"host": options.host, "port": options.port}
    server = create_server(
        app, map=socket_map, **where, threads=options.threads,
        ident="melanoma-screen", max_request_body_size=options.max_body_bytes,
        # never spool a body to disk: a chunked body is checked against the limit only after a
        # read (recv_bytes, 8 KB) has been buffered, so leave room above it. Keep waitress's 8 KB
        # reads: it answers every request of one read before it reads again (at most
        # MAX_PIPELINED of them, `limit_pipelining`), and a task whose answers pass its 16 MB
        # output watermark waits, without a deadline, for the client to read; 64 KB reads (tried
        # before the cap, for no measurable gain) let one client that never reads stall a
        # one-thread worker
        inbuf_overflow=options.max_body_bytes + 2**20,
        outbuf_overflow=64 * 1024 * 1024,  # nor a response
        connection_limit=options.connection_limit, channel_timeout=options.channel_timeout_s,
        cleanup_interval=1, asyncore_use_poll=True)  # poll: no 1024-descriptor limit of select
    # waitress warns "Task queue depth is N" whenever a request waits for a free thread: with one
    # thread per worker process that is the normal state under load, so warn there only when the
    # queue is deep (the overload signal stays); with any thread count, once per interval at most
    server.task_dispatcher.queue_logger = DeepQueueLogger(server.task_dispatcher.queue_logger,
                                                          QUEUE_WARN_DEPTH if options.threads == 1 else 1)
    for listener in {id(s): s for s in socket_map.values() if isinstance(s, BaseWSGIServer)}.values():
        guard(listener, options)
    return server
