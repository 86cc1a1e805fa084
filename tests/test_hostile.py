"""Hostile input through the real processes: `python -m server` (waitress) and `python -m edge`.

The corpus (tests/hostile.py, over 500 files generated here) is posted to both endpoints of a
real server started on a free port, and run through the CLI over a folder. The server runs
with a `sitecustomize` that records every temporary file Python creates in it, so a body
spooled to disk (waitress does this above 512 KB unless configured) is seen even when the file
is unnamed (O_TMPFILE).
"""
from __future__ import annotations

import http.client
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import REPO, free_port, jpeg_bytes, lesion_image
from .hostile import VALID, corpus, save

RSS_LIMIT_BYTES = 1024 ** 3  # the server and the CLI stay under 1 GB over the whole corpus

TEMPFILE_RECORDER = '''
import os, tempfile
_record = os.environ["TEMPFILE_RECORD"]
def _wrap(fn):
    def recorded(*a, **k):
        with open(_record, "a") as f:
            f.write(fn.__name__ + "\\n")
        return fn(*a, **k)
    return recorded
for _name in ("TemporaryFile", "NamedTemporaryFile", "SpooledTemporaryFile", "mkstemp"):
    setattr(tempfile, _name, _wrap(getattr(tempfile, _name)))
'''


@pytest.fixture(scope="module")
def hostile_files() -> dict[str, bytes]:
    files = corpus()
    assert len(files) >= 500
    return files


class RealServer:
    def __init__(self, proc: subprocess.Popen, port: int, tmpdir: Path, record: Path):
        self.proc, self.port, self.tmpdir, self.record = proc, port, tmpdir, record

    def peak_rss(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) * 1024

    def temp_files(self) -> list[str]:
        return self.record.read_text().split() if self.record.exists() else []

    def get(self, path: str, timeout=10) -> tuple[int, bytes, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, r.read(), dict(r.getheaders())
        finally:
            conn.close()

    def post(self, path: str, data: bytes, filename="lesion.jpg", headers=None, timeout=60):
        boundary = "hostile7d9a"
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("POST", path, body=body, headers={
                "Content-Type": f"multipart/form-data; boundary={boundary}", **(headers or {})})
            r = conn.getresponse()
            return r.status, r.read(), dict(r.getheaders())
        finally:
            conn.close()


def start_server(tiny_model: Path, root: Path, *extra: str) -> RealServer:
    port = free_port()
    tmpdir, hook = root / "tmpdir", root / "hook"
    tmpdir.mkdir()
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(TEMPFILE_RECORDER)
    record = root / "tempfiles.txt"
    env = {**os.environ, "TMPDIR": str(tmpdir), "TEMPFILE_RECORD": str(record),
           "PYTHONPATH": os.pathsep.join([str(hook), str(REPO)])}
    proc = subprocess.Popen([sys.executable, "-m", "server", "--model", str(tiny_model), "--port", str(port),
                             "--threads", "4", "--model-threads", "1", "--workers", "1", *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    server = RealServer(proc, port, tmpdir, record)
    for _ in range(150):
        try:
            if server.get("/healthz", timeout=1)[0] == 200:
                return server
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not start: {proc.communicate()[1].decode()[-2000:]}")


@pytest.fixture(scope="module")
def real_server(tiny_models, tmp_path_factory):
    server = start_server(tiny_models["uint8"], tmp_path_factory.mktemp("server"), "--client-grace", "2")
    yield server
    server.proc.terminate()
    _, err = server.proc.communicate(timeout=20)
    assert b"Traceback" not in err, err.decode()[-3000:]


HOSTILE_UPLOAD_NAMES = ["../../etc/passwd", 'a"b.jpg', "%00.jpg", "con.jpg", "\u202egpj.exe", "x" * 300 + ".jpg"]


def test_corpus_through_real_server(real_server, hostile_files):
    """Every file to both endpoints: no 5xx, no dropped connection, bounded RSS, no temp file."""
    jobs = [(path, name, data) for name, data in sorted(hostile_files.items()) for path in ("/api/v1/predict", "/predict")]

    def post(job):
        path, name, data = job
        upload_name = HOSTILE_UPLOAD_NAMES[hash(name) % len(HOSTILE_UPLOAD_NAMES)]
        t0 = time.perf_counter()
        try:
            status, body, headers = real_server.post(path, data, filename=upload_name)
        except OSError as e:
            return path, name, f"connection error {e!r}", time.perf_counter() - t0, b""
        return path, name, status, time.perf_counter() - t0, body

    t0 = time.perf_counter()
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(post, jobs))
    wall = time.perf_counter() - t0
    statuses = Counter(str(r[2]) for r in results)
    broken = [(p, n, s) for p, n, s, _, _ in results if not isinstance(s, int) or s >= 500]
    assert not broken, broken[:10]
    for path, name, status, _, body in results:
        if name in VALID:
            assert status == 200, (path, name, body[:300])
        if path.startswith("/api/") and status != 200:
            assert "error" in json.loads(body), (name, body[:200])
        assert b"Traceback" not in body and b"Pillow" not in body and b"PIL." not in body
    slowest = max(results, key=lambda r: r[3])
    peak = real_server.peak_rss()
    print(f"\nhostile corpus: {len(hostile_files)} files, {len(results)} requests in {wall:.1f} s; "
          f"statuses {dict(statuses)}; slowest {slowest[3]:.2f} s ({slowest[1]} to {slowest[0]}); "
          f"server peak RSS {peak / 2**20:.0f} MB")
    assert peak < RSS_LIMIT_BYTES
    assert real_server.get("/healthz")[0] == 200
    assert real_server.temp_files() == [] and list(real_server.tmpdir.iterdir()) == []


def raw_request(port: int, head: str, body: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(head.encode() + body)
    return s


def read_response(s: socket.socket, timeout=10) -> bytes:
    s.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data:
                head, _, rest = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), None)
                if length is not None and len(rest) >= length:
                    break
    except (socket.timeout, ConnectionResetError):
        pass
    return data


def test_oversized_body_refused_from_its_header(real_server):
    """A 200 MB Content-Length gets a JSON 413 in under 0.1 s; nothing is read or spooled."""
    head = (f"POST /api/v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{real_server.port}\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 209715200\r\n\r\n")
    rss_before = real_server.peak_rss()
    t0 = time.perf_counter()
    s = raw_request(real_server.port, head, b"--x\r\n" + bytes(60_000))
    response = read_response(s)
    elapsed = time.perf_counter() - t0
    s.close()
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert json.loads(response.partition(b"\r\n\r\n")[2])["error"].startswith("upload too large: the limit is 10 MB")
    assert elapsed < 0.1, elapsed
    assert real_server.temp_files() == [] and real_server.peak_rss() - rss_before < 50 * 2**20


def test_no_100_continue_for_a_refused_body(real_server):
    """With Expect: 100-continue, an oversized upload gets its 413 before any body is sent."""
    s = raw_request(real_server.port, "POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                                      "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 12000000\r\n\r\n")
    response = read_response(s)
    s.close()
    assert response.startswith(b"HTTP/1.1 413"), response[:100]


def test_chunked_body_cut_off_at_the_limit(real_server):
    """A chunked upload that never ends is answered 413 once it passes the limit."""
    s = raw_request(real_server.port, f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                                      "Content-Type: multipart/form-data; boundary=x\r\n\r\n")
    chunk = b"100000\r\n" + bytes(0x100000) + b"\r\n"  # 1 MiB chunks
    sent = 0
    try:
        while sent < 40 * 2**20:
            s.sendall(chunk)
            sent += 2**20
            if select.select([s], [], [], 0)[0]:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    response = read_response(s)
    s.close()
    assert response.startswith(b"HTTP/1.1 413") and b"<p>upload too large" in response, response[:300]
    assert sent < 20 * 2**20  # 10 MB read, the rest sat in socket buffers
    assert real_server.temp_files() == []


def test_a_chunk_declared_over_the_limit_gets_413_at_once(real_server):
    """A first chunk that declares 256 MB is answered 413 as soon as its size line arrives, not
    left waiting for data that could never be accepted (it was closed without an answer)."""
    for path in ("/api/v1/predict", "/predict"):
        t0 = time.perf_counter()
        s = raw_request(real_server.port, f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                                          "Content-Type: multipart/form-data; boundary=b\r\n\r\n10000000\r\n--b\r\n")
        response = read_response(s, timeout=5)
        s.close()
        assert response.startswith(b"HTTP/1.1 413") and b"upload too large" in response, response[:300]
        assert time.perf_counter() - t0 < 1.5  # the slow-client rule would have closed it after 2 s
    ok = raw_request(real_server.port, "POST /api/v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                                       "Content-Type: multipart/form-data; boundary=b\r\n\r\n4\r\n--b-\r\n0\r\n\r\n")
    assert read_response(ok).startswith(b"HTTP/1.1 400")  # a small chunk is read as before


def test_a_body_framed_two_ways_closes_the_connection(real_server):
    """Transfer-Encoding: chunked beside a Content-Length: answered, then the connection closes
    (RFC 9112 6.3), so nothing after it on the connection is read as another request."""
    body = b"4\r\n--b-\r\n0\r\n\r\n"
    smuggled = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    s = raw_request(real_server.port, "POST /api/v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
                                      "Transfer-Encoding: chunked\r\nContent-Type: multipart/form-data; boundary=b\r\n\r\n",
                    body + smuggled)
    s.settimeout(5)
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (socket.timeout, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    s.close()
    assert data.startswith(b"HTTP/1.1 400") and b"connection: close" in data.lower(), data[:300]
    assert data.count(b"HTTP/1.1 ") == 1  # the request after it was not answered


def test_one_mb_upload_stays_in_memory(real_server):
    """Above waitress's 512 KB spooling size: classified, and no temporary file is created."""
    from PIL import Image
    data = jpeg_bytes(Image.effect_noise((1400, 1200), 80).convert("RGB"), quality=97)
    assert len(data) > 1_000_000
    status, body, _ = real_server.post("/api/v1/predict", data)
    assert status == 200, body[:300]
    assert real_server.temp_files() == [] and list(real_server.tmpdir.iterdir()) == []


def test_slow_clients_do_not_block_service(real_server):
    """120 clients sending a byte at a time: normal requests are still answered, and the slow
    ones are disconnected after the grace (2 s in this server)."""
    slow = []
    for _ in range(120):
        s = socket.create_connection(("127.0.0.1", real_server.port), timeout=5)
        s.sendall(b"POST /api/v1/predict HTTP/1.1\r\n")
        slow.append(s)
    stop = threading.Event()

    def trickle():
        while not stop.is_set():
            for s in slow:
                try:
                    s.send(b"X")
                except OSError:
                    pass
            time.sleep(0.5)
    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        image = jpeg_bytes(lesion_image(3, size=(300, 300)))
        for _ in range(5):
            t0 = time.perf_counter()
            assert real_server.post("/api/v1/predict", image, timeout=5)[0] == 200
            assert real_server.get("/healthz", timeout=5)[0] == 200
            assert time.perf_counter() - t0 < 2
        time.sleep(4)  # grace 2 s + sweep
        closed = 0
        for s in slow:
            s.settimeout(0.5)
            try:
                closed += s.recv(1024) == b""
            except (ConnectionResetError, BrokenPipeError):
                closed += 1
            except socket.timeout:
                pass
        assert closed == len(slow)
    finally:
        stop.set()
        t.join()
        for s in slow:
            s.close()


def test_fast_start_then_trickle_is_dropped(real_server):
    """A fast first megabyte buys no time: after the grace the rate is measured per window."""
    s = raw_request(real_server.port, f"POST /api/v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                      "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 2000000\r\n\r\n",
                    bytes(1_000_000))
    t0, closed = time.monotonic(), False
    s.settimeout(0.5)
    while time.monotonic() - t0 < 12 and not closed:
        try:
            s.send(b"x")
            closed = s.recv(1024) == b""
        except socket.timeout:
            pass
        except OSError:
            closed = True
    s.close()
    assert closed and time.monotonic() - t0 < 9  # grace 2 s + one 2 s window + the 1 s sweep


def test_a_client_that_pipelines_and_never_reads_does_not_stall_a_one_thread_worker(tiny_models, tmp_path):
    """(From review.) waitress answers every request of one read before it reads again, and a task
    whose answers pass its 16 MB output watermark waits, without a deadline, for the client to
    read. With its 8 KB reads one read's pipelined GETs of a 40 KB file stay under it; with 64 KB
    reads one such client stalled a --threads 1 worker for everyone."""
    server = start_server(tiny_models["uint8"], tmp_path, "--threads", "1")
    attacker = socket.socket()
    try:
        status, png, _ = server.get("/reports/tradeoff.png")
        assert status == 200 and len(png) > 20_000
        req = b"GET /reports/tradeoff.png HTTP/1.1\r\nHost: a\r\n\r\n"
        attacker.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # reads nothing, buffers little
        attacker.connect(("127.0.0.1", server.port))
        attacker.sendall(req * (65536 // len(req)))
        time.sleep(2)
        assert server.get("/healthz", timeout=10)[0] == 200
    finally:
        attacker.close()
        server.proc.terminate()
        server.proc.communicate(timeout=20)


def test_pipelining_clients_that_never_read_hold_neither_descriptors_nor_much_memory(tiny_models, tmp_path):
    """60 connections each pipeline one 8 KB read of GETs for the 40 KB report plot and never
    read. Before: every queued answer held an open file (~200 per connection: with the common
    1,024-descriptor limit the worker could no longer accept) and ~8 MB per connection. Now each
    connection gets at most MAX_PIPELINED answers, from memory, then is closed; a well-behaved
    pipelining client gets its first MAX_PIPELINED answers and a close."""
    from server.serving import MAX_PIPELINED
    server = start_server(tiny_models["uint8"], tmp_path, "--threads", "1")
    req = b"GET /reports/tradeoff.png HTTP/1.1\r\nHost: a\r\n\r\n"
    attackers = []
    try:
        fds_before = len(os.listdir(f"/proc/{server.proc.pid}/fd"))
        for _ in range(60):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", server.port))
            s.sendall(req * (8192 // len(req)))
            attackers.append(s)
        time.sleep(3)
        assert server.get("/healthz", timeout=10)[0] == 200
        fds = len(os.listdir(f"/proc/{server.proc.pid}/fd"))
        assert fds < fds_before + 60 + 20, fds  # about one per connection, not one per queued answer
        # one client that pipelines 20 and reads: MAX_PIPELINED answers, then the server closes
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n" * 20)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        s.close()
        assert data.count(b"HTTP/1.1 200") == MAX_PIPELINED and data.count(b"Connection: close") == 1
    finally:
        for s in attackers:
            s.close()
        server.proc.terminate()
        server.proc.communicate(timeout=20)


def test_a_content_length_of_5000_digits_gets_a_400(real_server):
    """Python's int() refuses over 4,300 digits; waitress let that escape: no answer, a condensed
    traceback in the log per request."""
    s = raw_request(real_server.port, "POST /api/v1/predict HTTP/1.1\r\nHost: a\r\nContent-Length: " + "9" * 5000
                    + "\r\n\r\n")
    response = read_response(s)
    s.close()
    assert response.startswith(b"HTTP/1.1 400") and b'"status": 400' in response, response[:300]


def test_a_client_holding_every_connection_does_not_lock_others_out(tiny_models, tmp_path):
    """200 connections (the limit) that send nothing, or a request now and then: waitress stops
    accepting at the limit and its idle timeout is 30 s. Near the limit, idle connections are
    shed after 2 s, so a new client is answered within a few seconds."""
    server = start_server(tiny_models["uint8"], tmp_path, "--threads", "1")
    idle = []
    try:
        for i in range(200):
            s = socket.create_connection(("127.0.0.1", server.port))
            if i % 2:  # half of them have had one request answered: keep-alive connections
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
            idle.append(s)
        t0 = time.monotonic()
        assert server.get("/healthz", timeout=15)[0] == 200
        assert time.monotonic() - t0 < 6
    finally:
        for s in idle:
            s.close()
        server.proc.terminate()
        server.proc.communicate(timeout=20)


def test_slow_client_rules():
    """The sweep's rules on their own: deadline, windowed rate, and the cap on held bytes."""
    from types import SimpleNamespace

    from server.serving import ServeOptions, drop_slow_clients
    opts = ServeOptions(request_grace_s=10, min_rate_bytes_s=1000, request_timeout_s=100, max_buffered_bytes=10**7)

    def channel(started, nbytes, window_start=None, window_bytes=0):
        return SimpleNamespace(request_started=started, request_bytes=nbytes, will_close=False,
                               window_start=started if window_start is None else window_start, window_bytes=window_bytes)
    chans = {"young": channel(95, 10), "fast": channel(80, 30000), "stalled": channel(80, 100),
             "old": channel(-1, 10**6, window_start=99, window_bytes=0), "done": channel(None, 0)}
    drop_slow_clients(SimpleNamespace(active_channels=chans), opts, now=100)
    assert {k for k, c in chans.items() if c.will_close} == {"stalled", "old"}
    assert chans["fast"].window_start == 100 and chans["fast"].window_bytes == 30000  # a new window begins
    chans["fast"].request_bytes = 35000  # 5000 bytes in the next 10 s: under 1000 B/s
    drop_slow_clients(SimpleNamespace(active_channels=chans), opts, now=110)
    assert chans["fast"].will_close
    big = {f"c{i}": channel(99, 2000) for i in range(4)}  # 8000 bytes held > 5000
    capped = ServeOptions(request_grace_s=10, min_rate_bytes_s=1000, max_buffered_bytes=5000)
    drop_slow_clients(SimpleNamespace(active_channels=big), capped, now=100)
    assert sum(c.will_close for c in big.values()) == 2


def test_large_uploads_in_turn_do_not_pile_up_memory(tiny_models, tmp_path):
    """Each of 4 waitress threads decoding a large upload in turn kept its own malloc arena's
    freed memory (1.6 GB after a few 49 Mpx PNGs); with one arena the worker returns to its size."""
    server = start_server(tiny_models["uint8"], tmp_path)  # --threads 4

    def rss_mb():
        status = (Path("/proc") / str(server.proc.pid) / "status").read_text()
        return int(status.split("VmRSS:")[1].split()[0]) / 1024
    from PIL import Image
    big = save(Image.new("RGBA", (5000, 5000), (180, 120, 90, 255)), "PNG")
    try:
        before = rss_mb()
        for _ in range(6):
            status, body, _ = server.post("/api/v1/predict", big)
            assert status in (200, 422), body[:200]
        assert rss_mb() - before < 150, (before, rss_mb())
    finally:
        server.proc.terminate()
        server.proc.communicate(timeout=20)


def test_shedding_rules_under_pressure():
    """Below PRESSURE_AT of the limit nothing is shed; at it, idle connections past the short
    grace and slow arrivals past it go, busy, young and fast ones stay."""
    from types import SimpleNamespace

    from server.serving import ServeOptions, shed_under_pressure
    opts = ServeOptions(connection_limit=10, min_rate_bytes_s=1000)

    def channel(last_activity=0.0, started=None, nbytes=0, **busy):
        return SimpleNamespace(will_close=False, last_activity=last_activity, request_started=started,
                               request_bytes=nbytes, requests=busy.get("requests", []),
                               total_outbufs_len=busy.get("out", 0), task_running=busy.get("running", False))
    chans = {"idle": channel(last_activity=90), "idle young": channel(last_activity=99),
             "queued": channel(last_activity=90, requests=[1]), "sending": channel(last_activity=90, out=5),
             "serving": channel(last_activity=90, running=True), "slow": channel(started=95, nbytes=100),
             "fast": channel(started=95, nbytes=10**5), "arriving young": channel(started=99, nbytes=1),
             "next behind a queued one": channel(started=95, nbytes=10, requests=[1])}
    few = dict(list(chans.items())[:7])  # 7 < 0.8 x 10
    assert shed_under_pressure(SimpleNamespace(active_channels=few), opts, now=100, wall=100) == 0
    assert shed_under_pressure(SimpleNamespace(active_channels=chans), opts, now=100, wall=100) == 2
    assert {k for k, c in chans.items() if c.will_close} == {"idle", "slow"}


def test_protocol_oddities_get_4xx(real_server):
    image = jpeg_bytes(lesion_image(5))
    for bad in ({"Origin": "http://["}, {"Referer": "http://[::1/"}):
        status, body, _ = real_server.post("/api/v1/predict", image, headers=bad)
        assert status == 403, (bad, status, body[:200])
    s = raw_request(real_server.port, "POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n"
                                      "Content-Length: 5\r\n\r\nhello")
    response = read_response(s)
    s.close()
    assert response.startswith(b"HTTP/1.1 400") and b"Transfer-Encoding" in response, response[:300]


def test_security_headers_and_cross_site_posts(real_server):
    status, body, headers = real_server.get("/")
    assert status == 200
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert "'nonce-" in headers["Content-Security-Policy"] and headers["Referrer-Policy"] == "same-origin"
    image = jpeg_bytes(lesion_image(4))
    status, body, headers = real_server.post("/api/v1/predict", image)
    assert status == 200 and headers["Cache-Control"] == "no-store"
    for evil in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                 {"Referer": "http://evil.example/page.html"}):
        status, body, _ = real_server.post("/api/v1/predict", image, headers=evil)
        assert status == 403 and "other websites" in json.loads(body)["error"]
    same = {"Origin": f"http://127.0.0.1:{real_server.port}", "Sec-Fetch-Site": "same-origin"}
    assert real_server.post("/predict", image, headers=same)[0] == 200


def test_many_form_fields_get_their_own_message(real_server):
    boundary = "f"
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nx\r\n'.encode()
                    for i in range(5000)) + f"--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", real_server.port, timeout=20)
    conn.request("POST", "/api/v1/predict", body=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    r = conn.getresponse()
    message = json.loads(r.read())["error"]
    assert r.status == 413 and "too many fields" in message and "MB" not in message


def hostile_envelopes(image: bytes) -> dict[str, tuple[str, bytes]]:
    """Malformed or abusive multipart bodies around a valid image: name -> (Content-Type, body)."""
    b = "hb"
    part = f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="l.jpg"\r\n'.encode()
    ok = part + b"\r\n" + image + f"\r\n--{b}--\r\n".encode()
    ctype = f"multipart/form-data; boundary={b}"
    return {
        "unterminated": (ctype, part + b"\r\n" + image),
        "no closing boundary": (ctype, part + b"\r\n" + image + f"\r\n--{b}\r\n".encode()),
        "no boundary parameter": ("multipart/form-data", ok),
        "empty boundary": ('multipart/form-data; boundary=""', ok),
        "non-ascii boundary": ("multipart/form-data; boundary=h\u00e9", ok),
        "wrong boundary": ("multipart/form-data; boundary=other", ok),
        "empty body": (ctype, b""),
        "lf line endings": (ctype, ok.replace(b"\r\n", b"\n")),
        "no content-disposition": (ctype, f"--{b}\r\nContent-Type: image/jpeg\r\n\r\n".encode() + image
                                   + f"\r\n--{b}--\r\n".encode()),
        "header line of 64 KB": (ctype, part.replace(b'l.jpg"', b"l.jpg\"; x=" + b"y" * 65536) + b"\r\n" + image
                                 + f"\r\n--{b}--\r\n".encode()),
        "1000 part headers": (ctype, part + b"X-A: 1\r\n" * 1000 + b"\r\n" + image + f"\r\n--{b}--\r\n".encode()),
        "unknown text charset": (ctype, f'--{b}\r\nContent-Disposition: form-data; name="note"\r\n'
                                 f"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\nhello\r\n".encode()
                                 + ok),
        "text field of 3 MB": (ctype, f'--{b}\r\nContent-Disposition: form-data; name="note"\r\n\r\n'.encode()
                               + b"x" * (3 * 2**20) + b"\r\n" + ok),
        "image twice": (ctype, part + b"\r\n" + image + b"\r\n" + ok),
        "garbage preamble": (ctype, b"\x00" * 5000 + b"\r\n" + ok),
        "rfc 2231 file name only": (ctype, part.replace(b'filename="l.jpg"', b"filename*=utf-8''l%C3%A4sion.jpg")
                                    + b"\r\n" + image + f"\r\n--{b}--\r\n".encode()),
        "nested multipart": (ctype, f'--{b}\r\nContent-Disposition: form-data; name="image"\r\n'
                             f"Content-Type: multipart/mixed; boundary=inner\r\n\r\n--inner\r\n".encode() + ok
                             + f"\r\n--{b}--\r\n".encode()),
    }


def test_hostile_multipart_envelopes_get_4xx(real_server):
    """Every broken or abusive form envelope gets a 4xx with a message, none a 5xx; the well-formed
    ones still classify. The server keeps serving."""
    image = jpeg_bytes(lesion_image(6))
    for name, (ctype, body) in hostile_envelopes(image).items():
        conn = http.client.HTTPConnection("127.0.0.1", real_server.port, timeout=30)
        try:
            conn.request("POST", "/api/v1/predict", body=body, headers={"Content-Type": ctype})
            r = conn.getresponse()
            answer = json.loads(r.read())
        finally:
            conn.close()
        if name in ("image twice", "garbage preamble", "unknown text charset", "nested multipart",
                    "rfc 2231 file name only"):
            assert r.status == 200 and "probability" in answer, (name, r.status, answer)
        else:
            assert 400 <= r.status < 500 and answer["error"], (name, r.status, answer)
        if name == "text field of 3 MB":
            assert r.status == 413 and "one too large" in answer["error"], answer
    assert real_server.get("/healthz")[0] == 200


def test_a_file_name_that_is_not_utf8_gets_a_message_that_says_so(real_server):
    """A raw Latin-1 file name (browsers send UTF-8) cannot be parsed: the 400 says why instead
    of claiming that no file was sent."""
    body = (b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"l\xe9sion.jpg\"\r\n"
            b"Content-Type: image/jpeg\r\n\r\n" + jpeg_bytes(lesion_image(6)) + b"\r\n--b--\r\n")
    for path in ("/api/v1/predict", "/predict"):
        conn = http.client.HTTPConnection("127.0.0.1", real_server.port, timeout=30)
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "multipart/form-data; boundary=b"})
            r = conn.getresponse()
            text = r.read().decode()
        finally:
            conn.close()
        assert r.status == 400 and "not a readable multipart form" in text and "UTF-8" in text, (path, r.status, text[:300])
        assert "no file in the form field" not in text


def run_server_cli(*args: str, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_port_in_use_and_invalid_port(tiny_models):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_server_cli("--model", str(tiny_models["uint8"]), "--port", str(port))
    assert r.returncode == 2 and "already in use" in r.stderr and "Traceback" not in r.stderr
    assert "serving" not in r.stdout
    r = run_server_cli("--port", "99999")
    assert r.returncode == 2 and "out of range" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- the CLI
MEASURE = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable] + sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"\\nPEAK_RSS_KB={usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(args: list[str], timeout: float) -> tuple[int, str, str, int]:
    """Run `python ARGS`; (exit status, stdout, stderr, peak RSS in bytes of that process).
    It is forked from a small launcher: Linux carries a process's peak RSS across exec, so a
    child forked straight from pytest (with TensorFlow loaded) would report pytest's."""
    r = subprocess.run([sys.executable, "-c", MEASURE, *args], cwd=REPO, capture_output=True, text=True,
                       timeout=timeout)
    err, _, peak = r.stderr.rpartition("\nPEAK_RSS_KB=")
    return r.returncode, r.stdout, err, int(peak) * 1024


def hostile_folder(root: Path, files: dict[str, bytes]) -> tuple[Path, set[str]]:
    """The corpus, real images and hostile file-system entries in one folder."""
    d = root / "mixed"
    d.mkdir()
    for name, data in files.items():
        (d / name).write_bytes(data)
    real = set()
    for i in range(5):
        name = f"real_{i}.jpg"
        lesion_image(100 + i, size=(400, 300)).save(d / name)
        real.add(name)
    os.mkfifo(d / "fifo.jpg")
    (d / "dir.jpg").mkdir()
    (d / "broken_link.jpg").symlink_to(d / "missing.jpg")
    (d / "loop.jpg").symlink_to(d / "loop.jpg")
    for weird in ("new\nline.jpg", "-rf.jpg", "tab\tname.png", "ünïcode.jpg", "x" * 200 + ".jpg"):
        lesion_image(7, size=(100, 100)).save(d / weird)
        real.add(weird)
    (d / os.fsdecode(b"bad_\xff\xfe.jpg")).write_bytes(jpeg_bytes(lesion_image(8)))
    return d, real


def test_cli_over_hostile_folder(tiny_models, hostile_files, tmp_path):
    """Exit 3, every real image predicted, every bad one named, no traceback, bounded RSS."""
    folder, real = hostile_folder(tmp_path, hostile_files)
    code, out, err, peak = run_measured(["-m", "edge", "predict", str(folder), "--json",
                                         "--model", str(tiny_models["uint8"])], timeout=240)
    assert code == 3 and "Traceback" not in err, err[-3000:]
    rows = [json.loads(line) for line in out.splitlines()]
    predicted = {Path(r["image"]).name for r in rows if "probability" in r}
    assert {n.replace("\n", "\\n").replace("\t", "\\t") for n in real | VALID} <= predicted
    assert any("fifo.jpg" in line and "not a regular file" in line for line in err.splitlines())
    assert any("bad_\\xff\\xfe.jpg" in r["image"] for r in rows)
    skipped = [line for line in err.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == sum("error" in r for r in rows) > 300, [x[:200] for x in err.splitlines() if not x.startswith("skipped: ")][:12]
    from edge.__main__ import IMAGE_SUFFIXES, shown
    listed = {shown(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()}
    assert {r["image"] for r in rows} == listed  # every image file is either predicted or named
    print(f"\nCLI over {len(rows)} inputs: {len(predicted)} predicted, {len(skipped)} skipped, "
          f"peak RSS {peak / 2**20:.0f} MB")
    assert peak < RSS_LIMIT_BYTES


def test_cli_fifo_given_directly_does_not_hang(tiny_models, tmp_path):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    code, out, err, _ = run_measured(["-m", "edge", "predict", str(fifo),
                                      "--model", str(tiny_models["uint8"])], timeout=60)
    assert code == 3 and "not a regular file" in err and "Traceback" not in err


def test_cli_broken_pipe_is_quiet(tiny_models):
    proc = subprocess.Popen([sys.executable, "-m", "edge", "info", "--model", str(tiny_models["uint8"])],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written, like `| head -0`
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "BrokenPipeError" not in err and "Traceback" not in err, err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_cli_with_its_output_closed_or_full_exits_2_without_a_traceback(tiny_models, tmp_path):
    """stdout closed (`>&-`: Python makes sys.stdout None and print() drops every result), stdout
    or stderr on a full disk: exit 2 with a message where one can be written, never a traceback."""
    cmd = [sys.executable, "-m", "edge", "predict", str(REPO / "tests" / "fixtures" / "lesion.jpg"),
           "--model", str(tiny_models["uint8"])]
    closed = subprocess.run(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=60,
                            preexec_fn=lambda: os.close(1))
    assert closed.returncode == 2 and "standard output is closed" in closed.stderr, closed.stderr
    no_err = subprocess.run(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, timeout=60,
                            preexec_fn=lambda: os.close(2))
    assert no_err.returncode == 0 and "not melanoma" in no_err.stdout and "predicted" not in no_err.stdout
    with open("/dev/full", "w") as full:
        out_full = subprocess.run(cmd, cwd=REPO, stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)
        err_full = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=full, timeout=60)
    assert out_full.returncode == 2 and "cannot write the results" in out_full.stderr, out_full.stderr
    assert "Traceback" not in out_full.stderr and err_full.returncode == 2


# --------------------------------------------------------------------------- memory
WORST_LEGAL = '''
import importlib, sys
from PIL import Image
P = importlib.import_module("edge.preprocess")

def status(key):  # VmRSS now, VmHWM the peak of this process (reset by exec, unlike ru_maxrss)
    line = next(l for l in open("/proc/self/status") if l.startswith(key))
    return int(line.split()[1]) * 1024

need = P.peak_bytes(Image.open(sys.argv[1]))
base = status("VmRSS")
x = P.preprocess(sys.argv[1])
print(need, status("VmHWM") - base, x.shape)
'''


def test_worst_legal_image_stays_within_its_memory_estimate(tmp_path):
    """The most memory-hungry image the limits allow (an RGBA PNG of 25 Mpx in 8 bytes/pixel,
    right under the 400 MB estimate) decodes within that estimate."""
    from PIL import Image

    from edge.preprocess import DecodeLimits
    side = 7000  # 49 Mpx x 8 bytes/pixel = 392 MB <= 400 MB
    path = tmp_path / "worst.png"
    Image.new("RGBA", (side, side), (90, 60, 50, 255)).save(path, compress_level=1)
    r = subprocess.run([sys.executable, "-c", WORST_LEGAL, str(path)], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    need, grew, shape = r.stdout.split(maxsplit=2)
    assert int(need) <= DecodeLimits().max_decode_bytes and "(224, 224, 3)" in shape
    print(f"\nworst legal image: estimate {int(need) / 2**20:.0f} MB, measured {int(grew) / 2**20:.0f} MB")
    assert int(grew) <= int(need) * 1.1


def test_cli_deep_folders_and_unwritable_output(tiny_models, tmp_path):
    """A folder 1,100 levels deep is walked (no recursion limit); a full disk on stdout is one line."""
    deep = tmp_path / "deep"
    os.makedirs(deep)
    fd = os.open(deep, os.O_RDONLY)
    try:  # build it relative to a descriptor: the whole path is longer than PATH_MAX
        for _ in range(1100):
            os.mkdir("a", dir_fd=fd)
            nxt = os.open("a", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        with os.fdopen(os.open("x.jpg", os.O_WRONLY | os.O_CREAT, dir_fd=fd), "wb") as f:
            f.write(jpeg_bytes(lesion_image(9)))
    finally:
        os.close(fd)
    try:
        code, out, err, _ = run_measured(["-m", "edge", "predict", str(deep), "--model", str(tiny_models["uint8"])],
                                         timeout=120)
    finally:  # rm walks any depth; pytest's own clean-up (shutil.rmtree) would overflow Python's stack
        subprocess.run(["rm", "-rf", str(deep)], check=False)
    assert code in (0, 3) and "Traceback" not in err and "1 image" in err, err[-2000:]
    if Path("/dev/full").exists():
        with open("/dev/full", "w") as full:
            r = subprocess.run([sys.executable, "-m", "edge", "predict", str(REPO / "tests" / "fixtures" / "lesion.jpg"),
                                "--model", str(tiny_models["uint8"])], cwd=REPO, stdout=full, stderr=subprocess.PIPE,
                               text=True, timeout=60)
        assert r.returncode == 2 and "cannot write the results" in r.stderr and "Traceback" not in r.stderr
