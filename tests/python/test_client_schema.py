"""The checked-in FlatBuffers Python code equals what flatc generates from schemas/ now."""

import filecmp
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "comfyui"))
CHECKED_IN = os.path.join(REPO, "comfyui", "tensorfleet_client", "_generated")


def test_generated_code_matches_flatc(tmp_path):
    if shutil.which(os.environ.get("FLATC", "flatc")) is None:
        pytest.fail("flatc is not installed (apt install flatbuffers-compiler); "
                    "it is needed to check comfyui/tensorfleet_client/_generated")
    out = tmp_path / "gen"
    subprocess.run([os.path.join(REPO, "scripts", "gen-python-schemas"), str(out)], check=True)
    fresh = sorted(p for p in os.listdir(out) if not p.startswith("__pycache__"))
    kept = sorted(p for p in os.listdir(CHECKED_IN) if p != "__pycache__")
    assert fresh == kept, "file lists differ: run scripts/gen-python-schemas"
    _, mismatch, errors = filecmp.cmpfiles(out, CHECKED_IN, fresh, shallow=False)
    assert not mismatch and not errors, (
        "comfyui/tensorfleet_client/_generated is stale (%s differ from flatc's output of "
        "schemas/): run scripts/gen-python-schemas and commit the result" % (mismatch + errors))


def test_generated_code_knows_every_job_request():
    from tensorfleet_client._generated import job_generated as g  # noqa: PLC0415
    names = {k for k in vars(g.JobRequestBody) if not k.startswith("_")}
    assert {"Hello", "LoadModelRequest", "UnloadModelRequest", "ListModelsRequest",
            "PlanRequest", "ForwardRequest", "CancelRequest", "StatusRequest"} <= names
