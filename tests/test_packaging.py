"""pyproject.toml: `pip install .` gives command-line entry points that work from any folder,
with the shipped models inside the package; the `edge` extra never pulls in TensorFlow."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO

SOURCES = ("edge", "server", "train", "quantize", "benchmarks", "models", "reports", "pyproject.toml", "README.md")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(prefix with bin/ and site-packages, the built wheel, a folder outside the checkout)."""
    root = tmp_path_factory.mktemp("pkg")
    src = root / "src"  # a copy: setuptools writes build/ and *.egg-info next to the sources
    src.mkdir()
    for name in SOURCES:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, src / name)
    wheels = root / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)], check=True,
                   capture_output=True, timeout=300)
    wheel = next(wheels.glob("*.whl"))
    prefix = root / "prefix"
    subprocess.run([*pip, "install", "--no-deps", "--prefix", str(prefix), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return prefix, wheel, elsewhere


def run_script(installed, name: str, *args: str, hide: str | None = None) -> subprocess.CompletedProcess:
    """Run an installed command from a folder outside the checkout; `hide` makes one package
    look uninstalled (a stand-in that raises ImportError comes first on the path)."""
    prefix, _, elsewhere = installed
    path = [sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)})]
    if hide:
        stub = elsewhere / "hidden" / hide
        stub.mkdir(parents=True, exist_ok=True)
        (stub / "__init__.py").write_text(f'raise ImportError("No module named {hide}", name="{hide}")\n')
        path.insert(0, str(stub.parent))
    return subprocess.run([str(prefix / "bin" / name), *args], cwd=elsewhere, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(path)})


def test_edge_entry_point_works_from_any_folder(installed):
    prefix = installed[0]
    info = run_script(installed, "melanoma-edge", "info")
    assert info.returncode == 0, info.stderr
    model_file = Path(json.loads(info.stdout)["file"])
    assert model_file.name == "efficientnet_lite0_int8.tflite" and prefix in model_file.parents  # inside the package
    image = REPO / "tests" / "fixtures" / "lesion.jpg"
    r = run_script(installed, "melanoma-edge", "predict", str(image), "--json")
    answer = json.loads(r.stdout)
    assert answer["model"] == "efficientnet_lite0", r.stderr
    # the demo image is a drawing: answered (exit 0) or refused by the gate (exit 4), never an error
    assert (r.returncode, "probability" in answer) in ((0, True), (4, False)) and answer.get("refused", False) == (r.returncode == 4)


@pytest.mark.parametrize("script", ["melanoma-server", "melanoma-train", "melanoma-quantize", "melanoma-benchmarks"])
def test_other_entry_points_answer_help(installed, script):
    r = run_script(installed, script, "--help")
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr


def test_edge_extra_installs_no_tensorflow(installed):
    """The wheel's own metadata: the base requirements and the `edge` extra are the edge runtime only."""
    with zipfile.ZipFile(installed[1]) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith("METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    base_or_edge = [r for r in requires if "extra ==" not in r or 'extra == "edge"' in r]
    names = {r.split("=")[0].split(";")[0].strip().lower() for r in base_or_edge}
    assert names == {"numpy", "pillow", "tqdm", "ai-edge-litert"}
    edge_requirements = (REPO / "requirements-edge.txt").read_text()
    assert all(n in edge_requirements.lower() for n in names)
    assert any("tensorflow" in r and 'extra == "all"' in r for r in requires)


@pytest.mark.parametrize("script,args,missing", [("melanoma-server", [], "flask"),
                                                 ("melanoma-quantize", ["card"], "jinja2"),
                                                 ("melanoma-train", ["--data", "."], "tensorflow")])
def test_missing_extras_are_named_not_a_traceback(installed, script, args, missing):
    r = run_script(installed, script, *args, hide=missing)
    assert r.returncode == 2 and f"needs {missing}" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_installed_card_and_defaults_stay_out_of_site_packages(installed):
    elsewhere = installed[2]
    r = run_script(installed, "melanoma-quantize", "card")
    assert r.returncode == 0, r.stderr
    assert (elsewhere / "MODEL_CARD.md").read_text().startswith("# Model card")
    help_text = run_script(installed, "melanoma-train", "--help").stdout
    assert "site-packages" not in help_text.split("--out")[1].split("--")[0]


def _pins(lines) -> set[str]:
    """Requirement strings without comments, spaces or -r includes, quotes normalised."""
    out = set()
    for line in lines:
        line = line.split("#", 1)[0].strip().replace(" ", "").replace("'", '"')
        if line and not line.startswith("-r"):
            out.add(line)
    return out


def test_pyproject_pins_the_same_versions_as_the_requirements_files():
    """`pip install .[edge]` is exactly requirements-edge.txt and `.[all]` is requirements.txt:
    a version bumped in one place only would make the package and the checkout disagree."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    edge = _pins(project["dependencies"]) | _pins(extras["edge"])
    full = edge | _pins(d for d in extras["all"] + extras["server"] if not d.startswith("melanoma-screen"))
    assert edge == _pins((REPO / "requirements-edge.txt").read_text().splitlines())
    assert full == _pins((REPO / "requirements-edge.txt").read_text().splitlines()
                         + (REPO / "requirements.txt").read_text().splitlines())
