"""The Flask server: every route, every class of bad input, memory-only uploads, real browser, load."""
import io
import json
import logging
import shutil
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from server import create_app

from .conftest import REPO, free_port, jpeg_bytes, lesion_image


@pytest.fixture
def app(tiny_models, tmp_path):
    return create_app({"TESTING": True, "MODEL_PATH": str(tiny_models["uint8"]), "NUM_THREADS": 1,
                       "MAX_CONTENT_LENGTH": 2 * 1024 * 1024, "MAX_PIXELS": 4_000_000, "REPORTS_DIR": str(tmp_path)})


@pytest.fixture
def client(app):
    return app.test_client()


def upload(data: bytes, name="lesion.jpg"):
    return {"image": (io.BytesIO(data), name)}


def test_index_form(client):
    r = client.get("/")
    html = r.get_data(as_text=True)
    assert r.status_code == 200
    assert 'type="file"' in html and 'name="image"' in html and 'capture="environment"' in html
    assert '<label for="image">' in html and "not a diagnosis" in html
    assert "http://" not in html and "https://" not in html  # no CDN, no web fonts
    assert 'name="viewport"' in html


def test_api_predict(client, app):
    r = client.post("/api/v1/predict", data=upload(jpeg_bytes(lesion_image(1))))
    body = r.get_json()
    assert r.status_code == 200
    assert {"probability", "label", "threshold", "model", "latency_ms"} <= set(body)
    assert 0 <= body["probability"] <= 1 and body["label"] in ("melanoma", "not melanoma")
    assert body["threshold"] == app.extensions["classifier"].threshold


def test_form_predict_result_page(client):
    r = client.post("/predict", data=upload(jpeg_bytes(lesion_image(2))))
    html = r.get_data(as_text=True)
    assert r.status_code == 200
    assert 'id="probability"' in html and "threshold" in html and "not a diagnosis" in html
    assert "tiny (int8)" in html and " ms" in html


def test_model_and_health(client, tiny_models):
    meta = client.get("/api/v1/model").get_json()
    assert meta["sha256"] and meta["preprocessing"]["size"] == [32, 32] and "metrics" in meta
    health = client.get("/healthz").get_json()
    assert health["status"] == "ok" and health["sha256"] == meta["sha256"]


def test_tradeoffs_without_and_with_report(client, tmp_path):
    r = client.get("/tradeoffs")
    assert r.status_code == 200 and 'id="no-report"' in r.get_data(as_text=True)
    report = {"generated": "now", "threads": 2, "machine": {"cpu": "TestCPU", "cores": 2, "backend": "x"},
              "rows": [{"file": "a.tflite", "roc_auc": 0.9, "roc_auc_ci95": [0.85, 0.95], "sensitivity": 0.9,
                        "specificity": 0.7, "size_bytes": 4e6, "latency_ms_p50": 12.5, "pareto": True}]}
    (tmp_path / "tradeoff.json").write_text(json.dumps(report))
    Image.new("RGB", (10, 10)).save(tmp_path / "tradeoff.png")
    html = client.get("/tradeoffs").get_data(as_text=True)
    assert "a.tflite" in html and "TestCPU" in html and "/reports/tradeoff.png" in html
    plot = client.get("/reports/tradeoff.png")
    assert plot.status_code == 200 and plot.mimetype == "image/png"
    with client.application.test_request_context():  # from memory: no open file per queued answer
        assert not client.application.view_functions["pages.report_file"]("tradeoff.png").is_streamed
    assert client.get("/reports/secret.txt").status_code == 404


BAD = {  # case -> (file bytes or None for no field, message expected in the 400)
    "missing field": (None, "no file"),
    "zero bytes": (b"", "empty"),
    "not an image": (b"%PDF-1.4 definitely not a picture", "not a usable image"),
    "truncated": (jpeg_bytes(lesion_image(3, size=(200, 200)))[:400], "truncated"),
    "bomb": (jpeg_bytes(Image.new("RGB", (2500, 2000)), quality=20), "over the limit"),
}


def post_bad(client, path: str, raw: bytes | None):
    """POST `raw` in the field 'image' as browsers encode it (an empty file: CRLF, then the boundary;
    werkzeug's test client leaves that CRLF out, which the multipart parser does not accept: "no file")."""
    if raw is None:
        return client.post(path, data={})
    body, ctype = multipart(raw)
    return client.post(path, data=body, content_type=ctype)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_api_json_400(client, case):
    raw, msg = BAD[case]
    r = post_bad(client, "/api/v1/predict", raw)
    assert r.status_code == 400 and msg in r.get_json()["error"]


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_form_friendly_400(client, case):
    raw, msg = BAD[case]
    r = post_bad(client, "/predict", raw)
    html = r.get_data(as_text=True)
    assert r.status_code == 400 and msg in html and "Back to the upload form" in html and "Traceback" not in html


def test_too_large_is_413(client):
    big = upload(b"\xff\xd8" + b"0" * (3 * 1024 * 1024))
    r = client.post("/api/v1/predict", data=big)
    assert r.status_code == 413 and "limit is 2 MB" in r.get_json()["error"]
    assert client.post("/predict", data=upload(b"0" * (3 * 1024 * 1024))).status_code == 413


def test_unknown_route_and_method(client):
    assert client.get("/nope").status_code == 404
    assert client.get("/api/v1/predict").status_code == 405


def test_unexpected_error_is_clean_500(app, client, monkeypatch):
    def boom(_):
        raise RuntimeError("secret internals")
    monkeypatch.setattr(app.extensions["classifier"], "classify", boom)
    r = client.post("/api/v1/predict", data=upload(jpeg_bytes(lesion_image(1))))
    assert r.status_code == 500 and "secret internals" not in r.get_data(as_text=True)


def test_upload_never_touches_disk_or_logs(client, monkeypatch, caplog):
    """A 1.5 MB upload (above Werkzeug's 500 KB spooling size) stays in memory; nothing logged."""
    def no_disk(*a, **k):
        raise AssertionError("upload spooled to a temporary file")
    monkeypatch.setattr(tempfile, "SpooledTemporaryFile", no_disk)
    monkeypatch.setattr(tempfile, "TemporaryFile", no_disk)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", no_disk)
    img = Image.effect_noise((1200, 1000), 60).convert("RGB")
    data = jpeg_bytes(img, quality=98)
    assert len(data) > 600 * 1024
    with caplog.at_level(logging.DEBUG):
        r = client.post("/api/v1/predict", data=upload(data, "patient_123.jpg"))
    assert r.status_code == 200
    assert "patient_123" not in caplog.text and data[:64].hex() not in caplog.text


def test_concurrent_requests_are_consistent(client, app):
    """Many threads through one interpreter: every answer equals the sequential one."""
    images = [jpeg_bytes(lesion_image(i)) for i in range(6)]
    expected = [app.extensions["classifier"].classify(d).probability for d in images]

    def call(i):
        with app.test_client() as c:
            return c.post("/api/v1/predict", data=upload(images[i % 6])).get_json()["probability"]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(call, range(48)))
    assert all(abs(g - expected[i % 6]) < 1e-6 for i, g in enumerate(got))


# --------------------------------------------------------------------------- real server
@pytest.fixture
def live_server(app):
    import waitress
    port = free_port()
    server = waitress.create_server(app, host="127.0.0.1", port=port, threads=4)
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    for _ in range(50):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.close()


def multipart(data: bytes) -> tuple[bytes, str]:
    boundary = "testboundary7d9"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"l.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_load_on_loopback(live_server):
    """Bounded load check: 240 requests, 8 at a time, against waitress; zero errors."""
    images = [jpeg_bytes(lesion_image(i, size=(320, 240))) for i in range(4)]

    def call(i):
        body, ctype = multipart(images[i % 4])
        req = urllib.request.Request(f"{live_server}/api/v1/predict", data=body, headers={"Content-Type": ctype})
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())["label"]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(240)))
    assert len(results) == 240 and all(s == 200 and label in ("melanoma", "not melanoma") for s, label in results)


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="Debian chromium/chromium-driver not installed (.ci/run installs them)")
def test_browser_upload_flow(live_server, tmp_path):
    """Headless Chromium opens the form, uploads an image and sees the result page."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=390,844"):
        opts.add_argument(flag)
    image = tmp_path / "lesion.jpg"
    lesion_image(5, size=(300, 300)).save(image)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.get(live_server + "/")
        assert "not a diagnosis" in driver.find_element(By.CSS_SELECTOR, ".disclaimer").text
        driver.find_element(By.ID, "image").send_keys(str(image))
        driver.find_element(By.ID, "submit").click()
        # the click does not wait for the result page: wait for it explicitly (no race)
        prob = WebDriverWait(driver, 30).until(
            expected_conditions.presence_of_element_located((By.ID, "probability"))).text
        assert prob.endswith("%") and 0 <= float(prob[:-1]) <= 100
        assert driver.find_element(By.ID, "decision").text.startswith(("Flagged", "Not flagged"))
        # phone width: the page does not scroll sideways
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
    finally:
        driver.quit()


def test_server_cli_help_and_bad_model(tmp_path, capsys):
    from server.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    help_text = capsys.readouterr().out
    assert e.value.code == 0 and "--threads" in help_text and "not a diagnosis" in help_text
    assert main(["--model", str(tmp_path / "missing.tflite")]) == 2
    assert "model file not found" in capsys.readouterr().err


def test_shipped_default_is_served():
    """Without configuration the app serves the shipped default int8 model."""
    default = REPO / "models" / "efficientnet_lite0_int8.tflite"
    if not default.exists():
        pytest.skip("no shipped model yet")
    app = create_app({"TESTING": True})
    assert Path(app.extensions["classifier"].model_path) == default
    r = app.test_client().post("/api/v1/predict", data=upload(jpeg_bytes(lesion_image(0, size=(300, 300)))))
    # a drawn lesion: answered, or refused by the shipped gate as not a dermoscopic image (422)
    assert r.status_code in (200, 422) and r.get_json()["model"] == "efficientnet_lite0"
    assert ("probability" in r.get_json()) == (r.status_code == 200)
    card = app.test_client().get("/api/v1/model").get_data(as_text=True)
    assert "/work/" not in card and "/tmp/" not in card and "/home/" not in card  # no training-machine paths


def test_uploads_are_parsed_by_the_push_parser(client, monkeypatch):
    """The form goes through `multipart`'s push parser, not werkzeug's (a third of the app's time
    per request went into werkzeug's regular-expression scan of the body)."""
    import werkzeug.formparser

    def refuse(*a, **k):
        raise AssertionError("werkzeug's multipart parser was used")
    monkeypatch.setattr(werkzeug.formparser, "MultiPartParser", refuse)
    body, ctype = multipart(jpeg_bytes(lesion_image(2)))
    r = client.post("/api/v1/predict", data=body, content_type=ctype)
    assert r.status_code == 200 and "probability" in r.get_json()


def test_mangled_forms_never_get_a_5xx(app):
    """Hypothesis mangles a valid upload's envelope (cuts, flips, inserted CRLFs, dashes and
    boundary fragments): every answer is a 200 or a 4xx, never a 5xx."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    body, ctype = multipart(jpeg_bytes(lesion_image(3, size=(64, 64))))
    tokens = st.sampled_from([b"\r\n", b"\n", b"--", b"--testboundary7d9", b"\r\n--testboundary7d9--", b'"', b";",
                              b"Content-Disposition: form-data; name=\"image\"", b"\x00", b"\xff"])
    edit = st.tuples(st.integers(0, len(body)), st.one_of(tokens, st.binary(max_size=8)), st.integers(0, 12))
    client = app.test_client()

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(edits=st.lists(edit, max_size=4), cut=st.one_of(st.none(), st.integers(0, len(body))))
    def mangled(edits, cut):
        b = bytearray(body[:cut])  # cut None: the whole body
        for at, insert, drop in edits:
            at = min(at, len(b))
            b[at:at + drop] = insert
        r = client.post("/api/v1/predict", data=bytes(b), content_type=ctype)
        assert r.status_code < 500, (bytes(b[:300]), r.status_code, r.get_data()[:300])
    mangled()
