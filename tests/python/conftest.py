"""Shared pytest fixtures for tests/python (run with /usr/bin/python3 -m pytest tests/python).

The binaries under test come from FLEET_BUILD_DIR (default <repo>/build): bin/fleet,
bin/fleet-run-local, ... Models and inputs are generated per session with `fleet gen-model` /
`fleet gen-inputs` into a temporary directory.
"""
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


def _build_dir():
    return pathlib.Path(os.environ.get("FLEET_BUILD_DIR", REPO / "build"))


@pytest.fixture(scope="session")
def build_dir():
    d = _build_dir()
    if not (d / "bin" / "fleet").exists():
        pytest.fail(f"{d}/bin/fleet not found: build first or set FLEET_BUILD_DIR")
    return d


@pytest.fixture(scope="session")
def fleet_bin(build_dir):
    return build_dir / "bin" / "fleet"


def run_checked(cmd, **kw):
    """Runs cmd; on failure raises with its stderr in the message."""
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} -> rc {p.returncode}\n{p.stderr}")
    return p


@pytest.fixture(scope="session")
def gen_model(fleet_bin, tmp_path_factory):
    """gen_model(*flags) -> path of a model written by `fleet gen-model FLAGS`, cached by flags."""
    cache = {}
    root = tmp_path_factory.mktemp("models")

    def make(*flags):
        key = tuple(str(f) for f in flags)
        if key not in cache:
            path = root / f"model{len(cache)}.safetensors"
            run_checked([fleet_bin, "gen-model", *key, path])
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture(scope="session")
def gen_inputs(fleet_bin, tmp_path_factory):
    """gen_inputs(model, *flags) -> path of inputs written by `fleet gen-inputs`."""
    root = tmp_path_factory.mktemp("inputs")
    count = [0]

    def make(model, *flags):
        count[0] += 1
        path = root / f"in{count[0]}.safetensors"
        run_checked([fleet_bin, "gen-inputs", model, *flags, path])
        return path

    return make
