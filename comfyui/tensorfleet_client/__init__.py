"""Tensorfleet Python client: talks to a fleet-coordinator's job API (ZeroMQ + FlatBuffers).

Usable without ComfyUI:

    from tensorfleet_client import Client, ModelSpec
    with Client("tcp://127.0.0.1:7770") as c:
        info = c.load_model(ModelSpec("flux1-dev.safetensors", compute_device="cuda:0",
                                      virtual_vram_gb=8.0, donor_device="cuda:1"))
        out = c.forward(info.name, {"x": x, "timestep": t, "context": ctx, "y": y,
                                    "guidance": g},
                        run_id="run-1", constant_inputs=["context", "y", "guidance"])["out"]

Requires pyzmq, flatbuffers and numpy; torch is optional (needed for bfloat16 tensors).
"""

from .client import DEFAULT_ADDRESS, RUN_CACHE_MISS, Client
from .errors import (AlreadyExistsError, CancelledError, DataLossError, DeadlineExceededError,
                     FailedPreconditionError, InternalError, InvalidArgumentError, NotFoundError,
                     OutOfRangeError, ProtocolError, ResourceExhaustedError, TensorfleetError,
                     UnavailableError, UnimplementedError, VersionMismatchError)
from .wire import (PROTOCOL_MAJOR, PROTOCOL_MINOR, ForwardResult, ModelInfo, ModelSpec, PatchModule,
                   Plan)

__version__ = "0.1.0"

__all__ = [
    "Client", "DEFAULT_ADDRESS", "RUN_CACHE_MISS", "ModelSpec", "ModelInfo", "PatchModule", "Plan",
    "ForwardResult", "PROTOCOL_MAJOR", "PROTOCOL_MINOR", "TensorfleetError",
    "InvalidArgumentError", "NotFoundError", "AlreadyExistsError", "OutOfRangeError",
    "ResourceExhaustedError", "FailedPreconditionError", "UnavailableError",
    "DeadlineExceededError", "DataLossError", "CancelledError", "UnimplementedError",
    "InternalError", "ProtocolError", "VersionMismatchError",
]
