"""The kernels/ folder installs as `lowmem.kernels`, never as a top-level `kernels` package: that name belongs to
the Hugging Face kernel hub, which bitsandbytes and transformers import."""
import importlib.metadata
import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

# Builds a wheel and probes imports in Python subprocesses.
pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parents[2]
BNB_HUB_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"

PROBE = """
import importlib.util, json
import bitsandbytes, transformers
import lowmem.kernels
from transformers.utils.import_utils import is_kernels_available
spec = importlib.util.find_spec("kernels")
print(json.dumps({"lowmem_kernels": lowmem.kernels.__file__, "kernels": spec and spec.origin,
                  "hub_available": is_kernels_available()}))
"""


def hub_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of this checkout (building in place would leave build/ and egg-info behind)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("lowmem", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp / "dist"
    subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_wheel({str(out)!r})"],
                   cwd=src, check=True, capture_output=True)
    return next(out.glob("lowmem-*.whl"))


def test_wheel_holds_every_package_under_lowmem_and_no_top_level_kernels(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert not any(name.startswith("kernels/") for name in names)
    expected = {f"lowmem/{p.relative_to(ROOT / 'lowmem').as_posix()}" for p in (ROOT / "lowmem").rglob("__init__.py")}
    expected |= {f"lowmem/kernels/{p.relative_to(ROOT / 'kernels').as_posix()}" for p in (ROOT / "kernels").rglob("*.py")}
    assert expected <= set(names), f"missing from the wheel (list them in pyproject): {sorted(expected - set(names))}"
    top_level = zipfile.ZipFile(wheel).read("lowmem-0.1.0.dist-info/top_level.txt").decode().split()
    assert top_level == ["lowmem"]


def test_installed_lowmem_leaves_the_kernels_name_to_the_hub(wheel, tmp_path):
    """Import bitsandbytes and transformers' hub-kernel check beside an install of this checkout, away from the
    checkout (without site processing, so no other editable install maps a `kernels` of ours)."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {"PYTHONPATH": f"{site}:{sysconfig.get_paths()['purelib']}", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-S", "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(found["lowmem_kernels"]).resolve() == (site / "lowmem" / "kernels" / "__init__.py").resolve()
    assert found["kernels"] is None or not Path(found["kernels"]).resolve().is_relative_to(site)
    assert found["hub_available"] == hub_installed()
    assert "cannot import name 'get_kernel'" not in run.stderr
    if hub_installed():
        assert BNB_HUB_WARNING not in run.stderr
    else:  # bitsandbytes' own note that the hub package is absent, not our folder standing in for it
        assert all("No module named 'kernels'" in line for line in run.stderr.splitlines() if BNB_HUB_WARNING in line)


def test_checkout_root_hands_the_kernels_name_to_an_installed_hub(tmp_path):
    """A script run from the checkout's root has kernels/ first on its path: `import kernels` must still give
    the hub package (a stand-in here) when one is installed."""
    hub = tmp_path / "hub" / "kernels"
    hub.mkdir(parents=True)
    (hub / "__init__.py").write_text("__version__ = '9.9'\ndef get_kernel(name, version=None):\n    return name\n")
    code = "import kernels, lowmem.kernels; print(kernels.__file__); print(lowmem.kernels.__file__)"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(hub.parent), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    hub_file, ours = run.stdout.split()
    assert Path(hub_file) == hub / "__init__.py"
    assert Path(ours) == ROOT / "kernels" / "__init__.py"
