"""The node pack as a registry-style archive (scripts/pack-comfyui): it holds what a drop-in
needs, unpacks into custom_nodes/ and imports as ComfyUI imports it, and is reproducible."""

import importlib.util
import os
import re
import subprocess
import sys
import zipfile

from conftest_client import REPO
import test_node  # noqa: F401  (puts the ComfyUI stand-in on sys.path, no control API)

PACK = os.path.join(REPO, "scripts", "pack-comfyui")


def _version():
    with open(os.path.join(REPO, "comfyui", "pyproject.toml")) as f:
        return re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M).group(1)


def _pack(out):
    r = subprocess.run([PACK, "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    path = r.stdout.strip()
    assert path == str(out / ("comfyui-tensorfleet-%s.zip" % _version()))
    return path


def test_archive_holds_a_drop_in(tmp_path):
    with zipfile.ZipFile(_pack(tmp_path)) as z:
        names = set(z.namelist())
        pyproject = z.read("pyproject.toml").decode()
        license_text = z.read("LICENSE").decode()
    for needed in ("pyproject.toml", "LICENSE", "README.md", "requirements.txt", "__init__.py",
                   "tensorfleet_nodes.py", "tensorfleet_model.py", "tensorfleet_patches.py",
                   "tensorfleet_plan_image.py",
                   "tensorfleet_routes.py", "tensorfleet_client/__init__.py",
                   "tensorfleet_client/client.py", "tensorfleet_client/wire.py",
                   "tensorfleet_client/workflow_convert.py",
                   "tensorfleet_client/_generated/job_generated.py", "web/js/tensorfleet.js",
                   "example_workflows/flux_dev_tensorfleet.json"):
        assert needed in names, needed
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert 'license = { text = "Apache-2.0" }' in pyproject
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    with open(os.path.join(REPO, "LICENSE")) as f:
        assert f.read() == license_text  # the repository's LICENSE is the same Apache-2.0 text


def test_archive_unpacks_into_custom_nodes_and_imports(tmp_path):
    target = tmp_path / "custom_nodes" / "comfyui-tensorfleet"
    with zipfile.ZipFile(_pack(tmp_path)) as z:
        z.extractall(target)
    # As ComfyUI's load_custom_node: the folder's __init__.py under the folder's name.
    name = "comfyui_tensorfleet_from_archive"
    spec = importlib.util.spec_from_file_location(
        name, target / "__init__.py", submodule_search_locations=[str(target)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    assert sorted(module.NODE_CLASS_MAPPINGS) == [
        "CLIPLoaderTensorfleet", "DualCLIPLoaderTensorfleet", "TensorfleetPlan",
        "UNETLoaderTensorfleet", "UnetLoaderGGUFAdvancedTensorfleet", "UnetLoaderGGUFTensorfleet"]
    assert (target / module.WEB_DIRECTORY / "tensorfleet.js").is_file()
    assert module.tensorfleet_routes.CONVERT_ROUTE == "/tensorfleet/convert-workflow"
    # The converter runs from the unpacked archive alone, as `fleet convert-workflow` runs it.
    out = tmp_path / "converted.json"
    r = subprocess.run([sys.executable, str(target / "tensorfleet_client" / "workflow_convert.py"),
                        os.path.join(REPO, "tests", "python", "workflows",
                                     "distorch2_flux_ui.json"), str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and out.is_file(), r.stderr


def test_archive_is_reproducible(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with open(_pack(tmp_path / "a"), "rb") as a, open(_pack(tmp_path / "b"), "rb") as b:
        assert a.read() == b.read()
