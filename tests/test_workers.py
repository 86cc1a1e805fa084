"""#16 item 2: `python -m server --workers N` runs N processes on one port, each with its own
interpreter, and stops them together."""
import http.client
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import REPO, free_port, jpeg_bytes, lesion_image


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def wait_until_healthy(port: int, tries: int = 150) -> None:
    for _ in range(tries):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/healthz")
            if c.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT balancing is Linux's")
def test_workers_share_one_port_and_stop_together(tiny_models):
    from benchmarks.load import multipart
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server", "--model", str(tiny_models["uint8"]), "--port", str(port),
                             "--workers", "2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_healthy(port)
        time.sleep(1)
        workers = children(proc.pid)
        assert len(workers) == 2
        body, ctype = multipart(jpeg_bytes(lesion_image(1)))

        def call(_):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
            c.request("POST", "/api/v1/predict", body=body, headers={"Content-Type": ctype})
            return c.getresponse().status
        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(call, range(64))) == {200}
        busy = [int(Path(f"/proc/{w}/stat").read_text().split()[13]) for w in workers]  # user CPU ticks
        assert all(t > 0 for t in busy), busy  # both processes did work
        import os
        if len(os.sched_getaffinity(0)) >= 2:  # one interpreter thread each: each worker keeps to its own core
            pinned = [os.sched_getaffinity(w) for w in workers]
            assert all(len(c) == 1 for c in pinned) and pinned[0] != pinned[1], pinned
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "2 worker processes" in out
    assert out.count("(waitress, 1 thread, worker process") == 2, out  # one handler thread per worker by default
    assert "Task queue depth" not in err  # a queue is the normal state with one thread: not logged per request
    assert all(not Path(f"/proc/{w}").exists() for w in workers)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT balancing is Linux's")
def test_a_worker_that_dies_after_starting_is_replaced(tiny_models):
    """An out-of-memory kill of one worker took the supervisor and every other worker down with it:
    now a worker that has served for a while is replaced, and the service goes on."""
    from server.__main__ import WORKER_STARTUP_S
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server", "--model", str(tiny_models["uint8"]), "--port", str(port),
                             "--workers", "2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_healthy(port)
        time.sleep(WORKER_STARTUP_S + 0.5)
        workers = children(proc.pid)
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (len(children(proc.pid)) < 2 or workers[0] in children(proc.pid)):
            time.sleep(0.2)
        now = children(proc.pid)
        assert proc.poll() is None and len(now) == 2 and workers[0] not in now and workers[1] in now
        time.sleep(3)  # the replacement loads its model
        for _ in range(8):  # both workers answer (SO_REUSEPORT spreads new connections)
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            c.request("GET", "/healthz")
            assert c.getresponse().status == 200
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert f"worker process {workers[0]} exited with status -9; starting another" in err


def test_workers_port_in_use_is_one_line(tiny_models):
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "server", "--model", str(tiny_models["uint8"]), "--port", str(port),
                            "--workers", "2"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "already in use" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_stops_a_server_started_with_sigint_ignored(tiny_models, workers):
    """What a shell's background job, systemd or `docker stop` does: SIGINT ignored from the
    start, SIGTERM to stop. The server (and every worker) exits 0, promptly."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server", "--model", str(tiny_models["uint8"]), "--port", str(port),
                             "--workers", str(workers)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        wait_until_healthy(port)
        time.sleep(0.5)
        workers_pids = children(proc.pid)
        proc.terminate()
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert all(not Path(f"/proc/{w}").exists() for w in workers_pids)


def test_worker_cores_one_each_while_there_are_enough(monkeypatch):
    import os
    from server.__main__ import worker_cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 5, 7}, raising=False)
    assert worker_cores(2) == [2, 5] and worker_cores(3) == [2, 5, 7]
    assert worker_cores(4) == [None] * 4  # more workers than cores: the scheduler decides


def test_default_threads_one_per_worker_four_in_a_single_process():
    from server.__main__ import build_parser, default_threads
    worker = build_parser().parse_args(["--workers", "1", "--reuse-port", "--model-threads", "1"])
    single = build_parser().parse_args(["--workers", "1", "--model-threads", "2"])
    assert default_threads(worker) == 1 and default_threads(single) == 4
    wide = build_parser().parse_args(["--workers", "1", "--reuse-port", "--model-threads", "2"])
    assert default_threads(wide) == 4  # a worker whose interpreter spans cores decodes while it classifies


def test_main_loop_leaves_a_running_tasks_output_to_the_task():
    """While this connection's task runs, the loop does not poll it for writing (the task sends
    its own output): waitress's own rule made it spin about 30 empty turns per request on the
    worker's one core. It still does between tasks, at or over the high watermark (the task waits
    for the loop there) and when the connection is closing."""
    from types import SimpleNamespace

    from server.serving import GuardedChannel
    ch = object.__new__(GuardedChannel)
    ch.adj = SimpleNamespace(outbuf_high_watermark=1000)
    ch.requests, ch.total_outbufs_len, ch.task_running = [object()], 500, True
    assert not ch.writable()  # a task is running and sends its own output
    ch.total_outbufs_len = 1000
    assert ch.writable()  # at the watermark: waitress wakes a waiting task only below it
    ch.total_outbufs_len, ch.close_when_flushed = 500, True
    assert ch.writable()
    ch.close_when_flushed, ch.task_running = False, False
    assert ch.writable()  # between tasks (a pipelined request queued): the loop flushes, sees hang-ups
    ch.total_outbufs_len = 0
    assert not ch.writable()


class _FakeSocket:
    """send() takes at most `room` bytes, then would block."""

    def __init__(self):
        self.room = 0

    def send(self, data):
        n = min(len(data), self.room)
        if n == 0:
            raise BlockingIOError(11, "would block")
        self.room -= n
        return n


def test_a_flush_landing_on_the_watermark_still_wakes_the_waiting_task():
    """(From review.) The task waits over the watermark and is woken only once the output is
    below it; a flush that lands exactly on it must leave the connection polled, or the task
    waits for ever."""
    import threading
    import time
    from types import SimpleNamespace

    from waitress.adjustments import Adjustments
    from waitress.buffers import OverflowableBuffer

    from server.serving import GuardedChannel
    ch = object.__new__(GuardedChannel)
    ch.adj = Adjustments(outbuf_high_watermark=1000)
    ch.outbufs = [OverflowableBuffer(ch.adj.outbuf_overflow)]
    ch.outbuf_lock, ch.requests_lock = threading.Condition(), threading.Lock()
    ch.requests, ch.connected, ch.task_running, ch.sendbuf_len = [object()], True, True, 4096
    ch.socket, ch.server = _FakeSocket(), SimpleNamespace(pull_trigger=lambda: None)
    ch.write_soon(b"a" * 1500)  # over the watermark; the client reads nothing yet
    task = threading.Thread(target=ch.write_soon, args=(b"b" * 10,), daemon=True)
    task.start()  # waits for the loop in waitress's _flush_outbufs_below_high_watermark
    time.sleep(0.2)
    assert task.is_alive()
    ch.socket.room = 500
    assert ch.writable()
    ch.handle_write()
    assert ch.total_outbufs_len == 1000  # exactly on the watermark
    ch.socket.room = 10**9  # the client now reads everything
    for _ in range(50):
        if ch.writable():
            ch.handle_write()
        time.sleep(0.01)
    task.join(2)
    assert not task.is_alive(), f"task still waiting with {ch.total_outbufs_len} bytes unsent"


def test_queue_depth_warning_is_kept_only_when_the_queue_is_deep(monkeypatch):
    """Shallow queues make no log record at all (not one built and then filtered: that cost the
    loop time on every request); deep ones pass once per interval, other warnings always."""
    import logging

    from server.serving import QUEUE_WARN_DEPTH, DeepQueueLogger
    made = []
    factory = logging.getLogRecordFactory()
    monkeypatch.setattr(logging, "_logRecordFactory", lambda *a, **k: made.append(a) or factory(*a, **k))
    logger = DeepQueueLogger(logging.getLogger("waitress.queue"))
    logger.warning("Task queue depth is %d", 3)
    assert made == []
    logger.warning("Task queue depth is %d", QUEUE_WARN_DEPTH)
    logger.warning("Task queue depth is %d", QUEUE_WARN_DEPTH + 1)  # within QUEUE_WARN_INTERVAL_S: not again
    logger.warning("other")
    assert [a[4] % a[5] if a[5] else a[4] for a in made] == [f"Task queue depth is {QUEUE_WARN_DEPTH}", "other"]
    assert logger.name == "waitress.queue"  # the rest is the logger's


def test_queue_warnings_are_rate_limited_at_every_thread_count():
    """One thread: warned from QUEUE_WARN_DEPTH; more threads: from any depth; both at most once per
    interval."""
    from server.serving import QUEUE_WARN_DEPTH, DeepQueueLogger, ServeOptions, make_server
    one, four = (make_server(lambda e, s: [], ServeOptions(port=0, threads=t)) for t in (1, 4))
    try:
        loggers = one.task_dispatcher.queue_logger, four.task_dispatcher.queue_logger
        assert all(isinstance(x, DeepQueueLogger) for x in loggers)
        assert [x.min_depth for x in loggers] == [QUEUE_WARN_DEPTH, 1]
    finally:
        one.close()
        four.close()


def test_the_loop_is_woken_after_a_task_that_left_output(monkeypatch):
    """The loop may have asked writable() while the task still ran (False) and gone back to
    poll: a task that leaves output wakes it once the flag has fallen, or the answer waits."""
    from types import SimpleNamespace

    from waitress.channel import HTTPChannel

    from server.serving import GuardedChannel
    ch = object.__new__(GuardedChannel)
    ch.connected, woken = True, []
    ch.server = SimpleNamespace(pull_trigger=lambda: woken.append(ch.task_running))

    def task(self, left):
        assert self.task_running
        self.total_outbufs_len = left
    monkeypatch.setattr(HTTPChannel, "service", lambda self: task(self, 10))
    ch.service()
    assert woken == [False] and not ch.task_running
    woken.clear()
    monkeypatch.setattr(HTTPChannel, "service", lambda self: task(self, 0))
    ch.service()
    assert woken == []  # all sent by the task: waitress's own trigger suffices
