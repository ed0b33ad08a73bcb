"""Builds JobRequest headers and parses JobResponse headers (schemas/job.fbs).

Thin layer over the flatc-generated code in _generated/ (never edited by hand). The Python
FlatBuffers runtime has no verifier, so every accessor runs inside `parse_response`'s guard and a
malformed reply becomes a ProtocolError instead of an IndexError deep in the runtime.
Stateless; safe to use from any thread.
"""

import json
import struct
from dataclasses import dataclass, field

import flatbuffers

from ._generated import job_generated as g
from .errors import InvalidArgumentError, ProtocolError

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 0
REQUEST_IDENTIFIER = b"FJRQ"
RESPONSE_IDENTIFIER = b"FJRS"

_MODES = {"auto": g.ExecMode.Auto, "stream": g.ExecMode.Stream, "pipeline": g.ExecMode.Pipeline}
_MODE_NAMES = {v: k for k, v in _MODES.items()}
_DTYPES = {
    None: g.DType.Invalid, "": g.DType.Invalid, "default": g.DType.Invalid,
    "float32": g.DType.F32, "fp32": g.DType.F32, "f32": g.DType.F32,
    "bfloat16": g.DType.BF16, "bf16": g.DType.BF16,
    "float16": g.DType.F16, "fp16": g.DType.F16, "f16": g.DType.F16,
}
_STATES = {g.ModelState.Loading: "loading", g.ModelState.Ready: "ready",
           g.ModelState.Failed: "failed", g.ModelState.Unloading: "unloading"}
_BODY_NAMES = {v: k for k, v in vars(g.JobResponseBody).items() if not k.startswith("_")}


@dataclass
class ModelSpec:
    """The inputs of a DisTorch2 loader node, plus ours (wire ModelSpec)."""

    path: str
    compute_device: str = ""            # "cuda:0"; empty: the first GPU, else cpu
    virtual_vram_gb: float = 4.0        # 0-128
    donor_device: str = "cpu"           # "cpu" or a comma list of donors
    expert_mode_allocations: str = ""   # "cuda:0,4gb;cuda:1,2gb;cpu,*"
    eject_models: bool = True
    keep_loaded: bool = True
    mode: str = "auto"                  # auto | stream | pipeline
    dtype: str = "default"              # default (the stored dtype) | float32 | bfloat16 | float16
    prefetch_depth: int = 0             # 0: the coordinator's default
    allow_mixed: bool = False
    # The workflow's input size for the plan's activation estimate (0: the family's default).
    width: int = 0
    height: int = 0
    frames: int = 0
    batch: int = 0
    # ComfyUI's weight_dtype: default (as stored), fp8_e4m3fn, fp8_e4m3fn_fast, fp8_e5m2.
    weight_dtype: str = "default"
    # ComfyUI-GGUF's dequant_dtype: default, target (the compute dtype), float32, float16,
    # bfloat16: the dtype GGUF weights expand into before the compute dtype.
    dequant_dtype: str = "default"


@dataclass
class ModelInfo:
    name: str
    path: str
    family: str
    state: str
    bytes_loaded: int
    bytes_total: int
    compute_device: str
    mode: str
    keep_loaded: bool
    error: str
    plan_json: str

    def plan(self):
        """The plan as a dict ({} when the coordinator sent none or it is not JSON)."""
        try:
            value = json.loads(self.plan_json) if self.plan_json else {}
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {"plan": value}


@dataclass
class Plan:
    plan_json: str
    text: str
    expert_string: str
    # The models a load of this spec would evict first to make room, least recently used
    # first (PlanResponse.evicts); empty when it fits beside the models loaded now.
    evicts: list = field(default_factory=list)

    def plan(self):
        return json.loads(self.plan_json) if self.plan_json else {}


@dataclass
class HelloInfo:
    major: int
    minor: int
    capabilities: int
    peer_name: str
    max_message_bytes: int


@dataclass
class TensorRef:
    """A tensor descriptor of a response; `frame` is 1-based (0: no payload)."""

    name: str
    dtype: int
    shape: tuple
    nbytes: int
    payload: int
    frame: int


@dataclass
class ForwardResult:
    outputs: list = field(default_factory=list)  # [TensorRef]
    step_seconds: float = 0.0
    weight_bytes: int = 0
    activation_bytes: int = 0
    prefetch_stall_seconds: float = 0.0


@dataclass
class Response:
    id: int
    kind: str          # "Hello", "Error", "Ack", "ForwardResponse", ...
    value: object      # the parsed body (see parse_response)


def _s(b):
    return b.decode("utf-8", "replace") if b is not None else ""


# ---------------------------------------------------------------------------------- requests

def _finish(b, request_id, body_type, body):
    g.JobRequestStart(b)
    g.JobRequestAddId(b, request_id)
    g.JobRequestAddBodyType(b, body_type)
    g.JobRequestAddBody(b, body)
    b.Finish(g.JobRequestEnd(b), file_identifier=REQUEST_IDENTIFIER)
    return bytes(b.Output())


def hello_request(request_id, peer_name="fleet-client", max_message_bytes=1 << 40):
    b = flatbuffers.Builder(128)
    name = b.CreateString(peer_name)
    g.HelloStart(b)
    g.HelloAddMajor(b, PROTOCOL_MAJOR)
    g.HelloAddMinor(b, PROTOCOL_MINOR)
    g.HelloAddCapabilities(b, 0)
    g.HelloAddPeerName(b, name)
    g.HelloAddMaxMessageBytes(b, max_message_bytes)
    return _finish(b, request_id, g.JobRequestBody.Hello, g.HelloEnd(b))


WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")  # ComfyUI's UNETLoader
DEQUANT_DTYPES = ("default", "target", "float32", "float16", "bfloat16")  # ComfyUI-GGUF's


def _spec(b, spec):
    if spec.mode not in _MODES:
        raise InvalidArgumentError("mode '%s' is not one of %s" % (spec.mode, ", ".join(_MODES)))
    if spec.dtype not in _DTYPES:
        raise InvalidArgumentError("dtype '%s' is not one of default, float32, bfloat16, float16"
                                   % spec.dtype)
    if spec.weight_dtype not in WEIGHT_DTYPES:
        raise InvalidArgumentError("weight_dtype '%s' is not one of %s"
                                   % (spec.weight_dtype, ", ".join(WEIGHT_DTYPES)))
    if spec.dequant_dtype not in DEQUANT_DTYPES:
        raise InvalidArgumentError("dequant_dtype '%s' is not one of %s"
                                   % (spec.dequant_dtype, ", ".join(DEQUANT_DTYPES)))
    strings = [b.CreateString(s) for s in (spec.path, spec.compute_device, spec.donor_device,
                                           spec.expert_mode_allocations, spec.weight_dtype,
                                           spec.dequant_dtype)]
    g.ModelSpecStart(b)
    g.ModelSpecAddPath(b, strings[0])
    g.ModelSpecAddComputeDevice(b, strings[1])
    g.ModelSpecAddVirtualVramGb(b, float(spec.virtual_vram_gb))
    g.ModelSpecAddDonorDevice(b, strings[2])
    g.ModelSpecAddExpertModeAllocations(b, strings[3])
    g.ModelSpecAddEjectModels(b, bool(spec.eject_models))
    g.ModelSpecAddKeepLoaded(b, bool(spec.keep_loaded))
    g.ModelSpecAddMode(b, _MODES[spec.mode])
    g.ModelSpecAddDtype(b, _DTYPES[spec.dtype])
    g.ModelSpecAddPrefetchDepth(b, int(spec.prefetch_depth))
    g.ModelSpecAddAllowMixed(b, bool(spec.allow_mixed))
    for name in ("width", "height", "frames", "batch"):
        value = int(getattr(spec, name))
        if not 0 <= value < 2 ** 32:
            raise InvalidArgumentError("%s %d is not a size" % (name, value))
        getattr(g, "ModelSpecAdd" + name.capitalize())(b, value)
    g.ModelSpecAddWeightDtype(b, strings[4])
    g.ModelSpecAddDequantDtype(b, strings[5])
    return g.ModelSpecEnd(b)


def load_model_request(request_id, spec, name=""):
    b = flatbuffers.Builder(256)
    name_off = b.CreateString(name)
    spec_off = _spec(b, spec)
    g.LoadModelRequestStart(b)
    g.LoadModelRequestAddName(b, name_off)
    g.LoadModelRequestAddSpec(b, spec_off)
    return _finish(b, request_id, g.JobRequestBody.LoadModelRequest, g.LoadModelRequestEnd(b))


def plan_request(request_id, spec):
    b = flatbuffers.Builder(256)
    spec_off = _spec(b, spec)
    g.PlanRequestStart(b)
    g.PlanRequestAddSpec(b, spec_off)
    return _finish(b, request_id, g.JobRequestBody.PlanRequest, g.PlanRequestEnd(b))


def unload_model_request(request_id, name):
    b = flatbuffers.Builder(64)
    name_off = b.CreateString(name)
    g.UnloadModelRequestStart(b)
    g.UnloadModelRequestAddName(b, name_off)
    return _finish(b, request_id, g.JobRequestBody.UnloadModelRequest, g.UnloadModelRequestEnd(b))


def list_models_request(request_id):
    b = flatbuffers.Builder(32)
    g.ListModelsRequestStart(b)
    return _finish(b, request_id, g.JobRequestBody.ListModelsRequest, g.ListModelsRequestEnd(b))


def status_request(request_id):
    b = flatbuffers.Builder(32)
    g.StatusRequestStart(b)
    return _finish(b, request_id, g.JobRequestBody.StatusRequest, g.StatusRequestEnd(b))


def cancel_request(request_id, target_id):
    b = flatbuffers.Builder(32)
    g.CancelRequestStart(b)
    g.CancelRequestAddRequestId(b, target_id)
    return _finish(b, request_id, g.JobRequestBody.CancelRequest, g.CancelRequestEnd(b))


def _tensor_desc(b, name, wire_dtype, shape, nbytes, frame):
    name_off = b.CreateString(name)
    g.TensorDescStartShapeVector(b, len(shape))
    for d in reversed(shape):
        b.PrependInt64(int(d))
    shape_off = b.EndVector()
    g.TensorDescStart(b)
    g.TensorDescAddName(b, name_off)
    g.TensorDescAddDtype(b, wire_dtype)
    g.TensorDescAddShape(b, shape_off)
    g.TensorDescAddNbytes(b, nbytes)
    g.TensorDescAddPayload(b, g.PayloadKind.Frame if nbytes else g.PayloadKind.None_)
    g.TensorDescAddFrame(b, frame if nbytes else 0)
    return g.TensorDescEnd(b)


def _offsets_vector(b, start_vector, offsets):
    start_vector(b, len(offsets))
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def put_patches_request(request_id, model, patch_id, groups, tensors):
    """`groups`: [(strength, [PatchModule])]; `tensors`: [(name, wire dtype, shape, nbytes,
    frame)] as for forward_request."""
    b = flatbuffers.Builder(1024)
    model_off, id_off = b.CreateString(model), b.CreateString(patch_id)
    descs = [_tensor_desc(b, name, dt, shape, nbytes, frame)
             for name, dt, shape, nbytes, frame in tensors]
    tensors_off = _offsets_vector(b, g.PutPatchesRequestStartTensorsVector, descs)
    files = []
    for strength, modules in groups:
        module_offs = []
        for m in modules:
            prefix_off, target_off = b.CreateString(m.prefix), b.CreateString(m.target)
            keys_off = _offsets_vector(b, g.LoraModuleRefStartKeysVector,
                                       [b.CreateString(k) for k in m.keys])
            g.LoraModuleRefStart(b)
            g.LoraModuleRefAddPrefix(b, prefix_off)
            g.LoraModuleRefAddTarget(b, target_off)
            g.LoraModuleRefAddKeys(b, keys_off)
            dim, start, length = m.offset if m.offset is not None else (0, 0, -1)
            g.LoraModuleRefAddOffsetDim(b, int(dim))
            g.LoraModuleRefAddOffsetStart(b, int(start))
            g.LoraModuleRefAddOffsetLength(b, int(length))
            g.LoraModuleRefAddSwapHalves(b, bool(m.swap_halves))
            module_offs.append(g.LoraModuleRefEnd(b))
        modules_off = _offsets_vector(b, g.LoraFileStartModulesVector, module_offs)
        path_off = b.CreateString("")
        g.LoraFileStart(b)
        g.LoraFileAddPath(b, path_off)
        g.LoraFileAddStrength(b, float(strength))
        g.LoraFileAddModules(b, modules_off)
        files.append(g.LoraFileEnd(b))
    loras_off = _offsets_vector(b, g.PutPatchesRequestStartLorasVector, files)
    g.PutPatchesRequestStart(b)
    g.PutPatchesRequestAddModel(b, model_off)
    g.PutPatchesRequestAddId(b, id_off)
    g.PutPatchesRequestAddLoras(b, loras_off)
    g.PutPatchesRequestAddTensors(b, tensors_off)
    return _finish(b, request_id, g.JobRequestBody.PutPatchesRequest, g.PutPatchesRequestEnd(b))


@dataclass
class PatchModule:
    """One weight patch of a patch set: `keys` name its parts among the set's tensors as
    "<prefix><part>" (".lora_up.weight", ".alpha", ".diff", ...; docs/models.md); `target` is
    the weight without the file prefix; `offset` (dim, start, length) or None."""
    prefix: str
    target: str
    keys: list = field(default_factory=list)
    offset: tuple = None
    swap_halves: bool = False


def forward_request(request_id, model, tensors, run_id="", constant_inputs=(), end_run=False,
                    timeout_ms=0, loras=(), patches=""):
    """`tensors`: [(name, wire dtype, shape, nbytes, frame)]; frame is 1-based, 0 for an empty
    tensor (no payload). `loras`: [(path relative to a model root, strength)], stacked in order."""
    b = flatbuffers.Builder(1024)
    model_off = b.CreateString(model)
    run_off = b.CreateString(run_id)
    descs = [_tensor_desc(b, name, dt, shape, nbytes, frame)
             for name, dt, shape, nbytes, frame in tensors]
    g.ForwardRequestStartInputsVector(b, len(descs))
    for d in reversed(descs):
        b.PrependUOffsetTRelative(d)
    inputs_off = b.EndVector()
    const_offs = [b.CreateString(c) for c in constant_inputs]
    g.ForwardRequestStartConstantInputsVector(b, len(const_offs))
    for c in reversed(const_offs):
        b.PrependUOffsetTRelative(c)
    const_off = b.EndVector()
    patches_off = b.CreateString(patches)
    lora_offs = []
    for path, strength in loras:
        path_off = b.CreateString(path)
        g.LoraRefStart(b)
        g.LoraRefAddPath(b, path_off)
        g.LoraRefAddStrength(b, float(strength))
        lora_offs.append(g.LoraRefEnd(b))
    g.ForwardRequestStartLorasVector(b, len(lora_offs))
    for off in reversed(lora_offs):
        b.PrependUOffsetTRelative(off)
    loras_off = b.EndVector()
    g.ForwardRequestStart(b)
    g.ForwardRequestAddModel(b, model_off)
    g.ForwardRequestAddInputs(b, inputs_off)
    g.ForwardRequestAddRunId(b, run_off)
    g.ForwardRequestAddConstantInputs(b, const_off)
    g.ForwardRequestAddEndRun(b, bool(end_run))
    g.ForwardRequestAddTimeoutMs(b, int(timeout_ms))
    g.ForwardRequestAddLoras(b, loras_off)
    g.ForwardRequestAddPatches(b, patches_off)
    return _finish(b, request_id, g.JobRequestBody.ForwardRequest, g.ForwardRequestEnd(b))


# --------------------------------------------------------------------------------- responses

def _model_info(m):
    return ModelInfo(
        name=_s(m.Name()), path=_s(m.Path()), family=_s(m.Family()),
        state=_STATES.get(m.State(), "state %d" % m.State()),
        bytes_loaded=m.BytesLoaded(), bytes_total=m.BytesTotal(),
        compute_device=_s(m.ComputeDevice()), mode=_MODE_NAMES.get(m.Mode(), "auto"),
        keep_loaded=m.KeepLoaded(), error=_s(m.Error()), plan_json=_s(m.PlanJson()))


def _tensor_ref(t):
    return TensorRef(name=_s(t.Name()), dtype=t.Dtype(),
                     shape=tuple(t.Shape(i) for i in range(t.ShapeLength())),
                     nbytes=t.Nbytes(), payload=t.Payload(), frame=t.Frame())


def _body(cls, table):
    obj = cls()
    obj.Init(table.Bytes, table.Pos)
    return obj


def _parse_body(kind, table):
    if kind == "Hello":
        h = _body(g.Hello, table)
        return HelloInfo(major=h.Major(), minor=h.Minor(), capabilities=h.Capabilities(),
                         peer_name=_s(h.PeerName()), max_message_bytes=h.MaxMessageBytes())
    if kind == "Error":
        e = _body(g.Error, table)
        return (e.Code(), _s(e.Message()))
    if kind == "Ack":
        return None
    if kind == "LoadModelResponse":
        r = _body(g.LoadModelResponse, table)
        m = r.Model()
        if m is None:
            raise ProtocolError("LoadModelResponse without a model")
        return _model_info(m)
    if kind == "ListModelsResponse":
        r = _body(g.ListModelsResponse, table)
        return [_model_info(r.Models(i)) for i in range(r.ModelsLength())]
    if kind == "PlanResponse":
        r = _body(g.PlanResponse, table)
        return Plan(plan_json=_s(r.PlanJson()), text=_s(r.Text()),
                    expert_string=_s(r.ExpertString()),
                    evicts=[_s(r.Evicts(i)) for i in range(r.EvictsLength())])
    if kind == "ForwardResponse":
        r = _body(g.ForwardResponse, table)
        return ForwardResult(outputs=[_tensor_ref(r.Outputs(i)) for i in range(r.OutputsLength())],
                             step_seconds=r.StepSeconds(), weight_bytes=r.WeightBytes(),
                             activation_bytes=r.ActivationBytes(),
                             prefetch_stall_seconds=r.PrefetchStallSeconds())
    if kind == "StatusResponse":
        r = _body(g.StatusResponse, table)
        workers = []
        for i in range(r.WorkersLength()):
            w = r.Workers(i)
            workers.append({"device": _s(w.Device()), "endpoint": _s(w.Endpoint()), "up": w.Up(),
                            "backing": _s(w.Backing()), "total_bytes": w.TotalBytes(),
                            "capacity_bytes": w.CapacityBytes(),
                            "resident_bytes": w.ResidentBytes(), "last_seen_ms": w.LastSeenMs()})
        return {"version": _s(r.Version()), "workers": workers,
                "models": [_model_info(r.Models(i)) for i in range(r.ModelsLength())],
                "queue_depth": r.QueueDepth(), "queue_capacity": r.QueueCapacity(),
                "draining": r.Draining()}
    raise ProtocolError("unknown response body '%s'" % kind)


def parse_response(header):
    """Parses a JobResponse header frame. Raises ProtocolError on anything malformed."""
    buf = bytes(header)
    if len(buf) < 8:
        raise ProtocolError("response header of %d bytes is too short for a FlatBuffer" % len(buf))
    if buf[4:8] != RESPONSE_IDENTIFIER:
        raise ProtocolError("response header has file identifier %r at byte 4, expected %r"
                            % (buf[4:8], RESPONSE_IDENTIFIER))
    try:
        root = g.JobResponse.GetRootAs(buf, 0)
        body_type = root.BodyType()
        kind = _BODY_NAMES.get(body_type)
        if kind is None or kind == "NONE":
            raise ProtocolError("response %d has body type %d (none or unknown)"
                                % (root.Id(), body_type))
        table = root.Body()
        if table is None:
            raise ProtocolError("response %d (%s) has no body" % (root.Id(), kind))
        return Response(id=root.Id(), kind=kind, value=_parse_body(kind, table))
    except ProtocolError:
        raise
    except (IndexError, struct.error, ValueError, TypeError, UnicodeError) as e:
        raise ProtocolError("malformed response header (%d bytes): %s" % (len(buf), e)) from None
