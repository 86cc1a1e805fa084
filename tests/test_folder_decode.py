"""#16 item 4: `edge predict` decodes folders in a small thread pool ahead of the interpreter,
in input order, with a bounded window."""
import json
import threading

from edge import Classifier
from edge.__main__ import decoded_ahead, main

from .conftest import lesion_image


def make_folder(tmp_path, n=12):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(n):
        lesion_image(i, size=(64 + i, 48)).save(d / f"img{i:02d}.jpg")
    (d / "img05.jpg").write_bytes(b"not an image")  # an unreadable one in the middle
    return d


def test_decode_ahead_keeps_order_and_results(tiny_models, tmp_path, capsys):
    d = make_folder(tmp_path)
    outs = {}
    for threads in ("1", "3"):
        code = main(["predict", str(d), "--model", str(tiny_models["uint8"]), "--json", "--decode-threads", threads])
        assert code == 3
        outs[threads] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    names = [r["image"] for r in outs["3"]]
    assert names == sorted(names) and len(names) == 12
    strip = lambda rows: [{k: v for k, v in r.items() if k != "latency_ms"} for r in rows]  # noqa: E731
    assert strip(outs["1"]) == strip(outs["3"])
    assert outs["3"][5]["error"]


def test_decoding_runs_in_pool_threads_within_a_bounded_window(tiny_models, tmp_path):
    d = make_folder(tmp_path)
    clf = Classifier(tiny_models["uint8"])
    seen, started = [], []
    real = clf.prepare

    def prepare(path):
        seen.append(threading.current_thread().name)
        started.append(path)
        return real(path)
    clf.prepare = prepare
    images = sorted(d.iterdir())
    gen = decoded_ahead(clf, images, 2)
    first = next(gen)
    assert first[0] == images[0]
    assert len(started) <= 5  # at most 2 x threads ahead (+ the one just handed out)
    rest = list(gen)
    assert [p for p, _ in [first] + rest] == images
    assert all(name.startswith("decode") for name in seen)
