"""#16 item 4: `edge predict` decodes folders in a small thread pool and answers them on
several interpreters at once (replicas of one model), in input order, with a bounded window."""
import json
import threading
import time

from edge import Classifier
from edge.__main__ import answered_ahead, main

from .conftest import lesion_image


def make_folder(tmp_path, n=12):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(n):
        lesion_image(i, size=(64 + i, 48)).save(d / f"img{i:02d}.jpg")
    (d / "img05.jpg").write_bytes(b"not an image")  # an unreadable one in the middle
    return d


def test_parallel_answers_keep_order_and_results(tiny_models, tmp_path, capsys):
    d = make_folder(tmp_path)
    outs = {}
    for parallel, workers in (("1", "1"), ("2", "3"), ("3", "2")):
        code = main(["predict", str(d), "--model", str(tiny_models["uint8"]), "--json",
                     "--parallel", parallel, "--decode-threads", workers])
        assert code == 3
        outs[parallel] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    names = [r["image"] for r in outs["2"]]
    assert names == sorted(names) and len(names) == 12
    strip = lambda rows: [{k: v for k, v in r.items() if k != "latency_ms"} for r in rows]  # noqa: E731
    assert strip(outs["1"]) == strip(outs["2"]) == strip(outs["3"])
    assert outs["2"][5]["error"]
    assert main(["predict", str(d), "--model", str(tiny_models["uint8"]), "--parallel", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err


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
    gen = answered_ahead([clf], images, 2)
    first = next(gen)
    assert first[0] == images[0]
    assert len(started) <= 5  # at most 2 x threads ahead (+ the one just handed out)
    rest = list(gen)
    assert [p for p, _ in [first] + rest] == images
    assert all(name.startswith("image") for name in seen)


def test_replicas_answer_at_once(tiny_models, tmp_path):
    """Each replica has its own interpreter; with two of them two invokes overlap."""
    d = make_folder(tmp_path)
    clf = Classifier(tiny_models["uint8"], num_threads=1)
    twin = clf.replica()
    assert twin._interpreter is not clf._interpreter and twin.meta is clf.meta
    busy, peak, used, lock = [0], [0], set(), threading.Lock()

    def slow(c):
        real = c.predict_outputs

        def predict_outputs(x):
            with lock:
                busy[0] += 1
                peak[0] = max(peak[0], busy[0])
                used.add(id(c))
            time.sleep(0.05)
            try:
                return real(x)
            finally:
                with lock:
                    busy[0] -= 1
        c.predict_outputs = predict_outputs
    slow(clf), slow(twin)
    got = list(answered_ahead([clf, twin], sorted(d.iterdir()), 3))
    assert len(got) == 12 and used == {id(clf), id(twin)} and peak[0] == 2
    single = list(answered_ahead([clf], sorted(d.iterdir()), 3))
    assert [p.probability for _, p in single if hasattr(p, "probability")] == \
        [p.probability for _, p in got if hasattr(p, "probability")]


def test_default_is_one_single_threaded_interpreter_per_core(tiny_models, tmp_path, monkeypatch, capsys):
    """Several images, no --threads: one interpreter per usable core (at most 4), 1 thread each;
    no interpreter that no decode thread could feed; --threads keeps one interpreter."""
    import edge.__main__ as cli
    d = make_folder(tmp_path)
    made = []
    real_init, real_replica = Classifier.__init__, Classifier.replica

    def init(self, *a, **kw):
        made.append(("first", kw.get("num_threads")))
        real_init(self, *a, **kw)

    def replica(self):
        made.append(("replica", self.num_threads))
        return real_replica(self)
    monkeypatch.setattr(Classifier, "__init__", init)
    monkeypatch.setattr(Classifier, "replica", replica)
    monkeypatch.setattr(cli, "usable_cores", lambda: 3)
    model = ["--model", str(tiny_models["uint8"]), "--json"]
    for flags, want in [([], [("first", 1), ("replica", 1), ("replica", 1)]),
                        (["--decode-threads", "2"], [("first", 1), ("replica", 1)]),
                        (["--decode-threads", "1"], [("first", None)]),
                        (["--threads", "2"], [("first", 2)]),
                        (["--threads", "2", "--parallel", "2"], [("first", 2), ("replica", 2)])]:
        made.clear()
        assert cli.main(["predict", str(d), *model, *flags]) == 3
        assert made == want, flags
    made.clear()
    assert cli.main(["predict", str(d / "img00.jpg"), *model]) == 0  # one image: one interpreter
    assert made == [("first", None)]
    capsys.readouterr()
