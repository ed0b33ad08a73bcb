"""Fixtures for the client and node tests (imported by test_client*.py / test_node*.py).

- `JobPeer`: a tiny ZeroMQ ROUTER that speaks schemas/job.fbs, run in a thread. It is a test
  peer for the client's framing, errors, timeouts, cancel and reconnect logic, not a stand-in
  for fleet-coordinator: its "model" just computes out = x + sum(context) + sum(y) in float32.
- `cluster`: a real local cluster (fleet-coordinator + 2 emulated GPU workers + a cpu worker)
  from FLEET_BUILD_DIR (default <repo>/build), for the end-to-end tests.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import flatbuffers
import numpy as np
import pytest
import zmq

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "comfyui"))

from tensorfleet_client._generated import job_generated as g  # noqa: E402

_NP = {g.DType.F32: np.float32, g.DType.F16: np.float16, g.DType.I64: np.int64,
       g.DType.BF16: np.int16}


def _s(b):
    return b.decode() if b is not None else ""


SLOW_LOAD_TOTAL = 400   # bytes of a "slowload*" model on the JobPeer
SLOW_LOAD_STEPS = 4     # ListModels answers before its load completes


class JobPeer:
    """A ROUTER on tcp://127.0.0.1:<port> answering job requests. `port=None` picks one."""

    def __init__(self, port=None, major=1, refuse_hello=None):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if port is None:
            self.sock.bind("tcp://127.0.0.1:*")
        else:
            self.sock.bind("tcp://127.0.0.1:%d" % port)
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.port = int(self.endpoint.rsplit(":", 1)[1])
        self.major = major
        self.refuse_hello = refuse_hello  # an error message: answer Hello with Error
        self.requests = []        # (kind, details) in arrival order
        self.runs = {}            # run_id -> {name: ndarray}
        self.helloed = set()
        self.models = {}
        # What a load would evict to make room, as the coordinator's PlanMakingRoom decides it:
        # Plan answers these names in `evicts` (and the line in its text), and LoadModel evicts
        # them before it loads.
        self.plan_evicts = []
        self._pending = {}        # (peer, request id) of Forwards waiting for a cancel
        # "slowload*" models: (peer, request id) -> [name, path, ListModels answered]; the load
        # is answered after SLOW_LOAD_STEPS ListModels (each shows more bytes), or cancelled.
        self._loads = {}
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self):
        self._stop = True
        self._thread.join(5)
        self.sock.close(linger=0)
        self.ctx.term()

    # --------------------------------------------------------------------------- replies

    def _send(self, peer, rid, body_type, build_body, frames=()):
        b = flatbuffers.Builder(256)
        body = build_body(b)
        g.JobResponseStart(b)
        g.JobResponseAddId(b, rid)
        g.JobResponseAddBodyType(b, body_type)
        g.JobResponseAddBody(b, body)
        b.Finish(g.JobResponseEnd(b), file_identifier=b"FJRS")
        self.sock.send_multipart([peer, bytes(b.Output())] + list(frames))

    def _error(self, peer, rid, code, message):
        def body(b):
            m = b.CreateString(message)
            g.ErrorStart(b)
            g.ErrorAddCode(b, code)
            g.ErrorAddMessage(b, m)
            return g.ErrorEnd(b)
        self._send(peer, rid, g.JobResponseBody.Error, body)

    def _ack(self, peer, rid):
        def body(b):
            g.AckStart(b)
            return g.AckEnd(b)
        self._send(peer, rid, g.JobResponseBody.Ack, body)

    def _model_info(self, b, name, path, loading=None):
        """loading: None (Ready) or bytes loaded so far of SLOW_LOAD_TOTAL (state Loading)."""
        strings = [b.CreateString(s) for s in (name, path, "flux", "cuda:0", json.dumps(
            {"config": {"guidance_embed": "schnell" not in path, "in_channels": 16,
                        "out_channels": 16, "depth": 2, "depth_single_blocks": 2},
             "dtype": "float32"}))]
        g.ModelInfoStart(b)
        g.ModelInfoAddName(b, strings[0])
        g.ModelInfoAddPath(b, strings[1])
        g.ModelInfoAddFamily(b, strings[2])
        g.ModelInfoAddState(b, g.ModelState.Ready if loading is None else g.ModelState.Loading)
        if "slowload" in path:
            g.ModelInfoAddBytesLoaded(b, SLOW_LOAD_TOTAL if loading is None else loading)
            g.ModelInfoAddBytesTotal(b, SLOW_LOAD_TOTAL)
        g.ModelInfoAddComputeDevice(b, strings[3])
        g.ModelInfoAddKeepLoaded(b, True)
        g.ModelInfoAddPlanJson(b, strings[4])
        return g.ModelInfoEnd(b)

    # -------------------------------------------------------------------------- requests

    def _loop(self):
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self._stop:
            if not poller.poll(20):
                continue
            msg = self.sock.recv_multipart()
            peer, header, frames = msg[0], msg[1], msg[2:]
            req = g.JobRequest.GetRootAs(header, 0)
            rid, kind = req.Id(), req.BodyType()
            table = req.Body()
            if kind == g.JobRequestBody.Hello:
                h = g.Hello()
                h.Init(table.Bytes, table.Pos)
                self.requests.append(("Hello", {"major": h.Major(), "peer": _s(h.PeerName())}))
                if self.refuse_hello:
                    self._error(peer, rid, g.ErrorCode.FailedPrecondition, self.refuse_hello)
                    continue
                self.helloed.add(peer)

                def hello(b):
                    n = b.CreateString("coordinator")
                    g.HelloStart(b)
                    g.HelloAddMajor(b, self.major)
                    g.HelloAddMinor(b, 3)
                    g.HelloAddPeerName(b, n)
                    return g.HelloEnd(b)
                self._send(peer, rid, g.JobResponseBody.Hello, hello)
                continue
            if peer not in self.helloed:
                self.requests.append(("NoHello", {}))
                self._error(peer, rid, g.ErrorCode.FailedPrecondition,
                            "the first request on a connection must be Hello")
                continue
            if kind == g.JobRequestBody.PlanRequest or kind == g.JobRequestBody.LoadModelRequest:
                if kind == g.JobRequestBody.PlanRequest:
                    r = g.PlanRequest()
                else:
                    r = g.LoadModelRequest()
                r.Init(table.Bytes, table.Pos)
                spec = r.Spec()
                details = {"path": _s(spec.Path()), "compute_device": _s(spec.ComputeDevice()),
                           "virtual_vram_gb": spec.VirtualVramGb(),
                           "donor_device": _s(spec.DonorDevice()),
                           "expert": _s(spec.ExpertModeAllocations()),
                           "eject_models": spec.EjectModels(), "keep_loaded": spec.KeepLoaded(),
                           "mode": spec.Mode(), "dtype": spec.Dtype(),
                           "weight_dtype": _s(spec.WeightDtype()),
                           "dequant_dtype": _s(spec.DequantDtype())}
                is_plan = kind == g.JobRequestBody.PlanRequest
                self.requests.append(("Plan" if is_plan else "LoadModel", details))
                if "tb" in details["expert"]:
                    self._error(peer, rid, g.ErrorCode.InvalidArgument,
                                "expert_mode_allocations: unknown unit 'tb' in token '%s' at "
                                "byte 7" % details["expert"].split(";")[0])
                    continue
                if details["path"].startswith("huge"):  # no room even after evicting
                    self._error(peer, rid, g.ErrorCode.ResourceExhausted,
                                "the plan does not fit: cuda:0 needs 1.00 TiB but its capacity "
                                "is 8.00 GiB; evicting the %d other model(s) that may go would "
                                "not make room either; nothing was evicted" % len(self.models))
                    continue
                if details["path"].startswith("missing"):
                    self._error(peer, rid, g.ErrorCode.NotFound,
                                "model file '%s' not found under the model roots"
                                % details["path"])
                    continue
                evicts = [n for n in self.plan_evicts if n in self.models]
                if is_plan:
                    def plan(b, evicts=evicts):
                        text = "cuda:0  everything\n"
                        if evicts:
                            text += ("\nloading it evicts (least recently used first): %s\n"
                                     % ", ".join(evicts))
                        p = b.CreateString(json.dumps({"assignments": []}))
                        t = b.CreateString(text)
                        e = b.CreateString("cuda:0,*")
                        names = [b.CreateString(n) for n in evicts]
                        g.PlanResponseStartEvictsVector(b, len(names))
                        for n in reversed(names):
                            b.PrependUOffsetTRelative(n)
                        ev = b.EndVector()
                        g.PlanResponseStart(b)
                        g.PlanResponseAddPlanJson(b, p)
                        g.PlanResponseAddText(b, t)
                        g.PlanResponseAddExpertString(b, e)
                        g.PlanResponseAddEvicts(b, ev)
                        return g.PlanResponseEnd(b)
                    self._send(peer, rid, g.JobResponseBody.PlanResponse, plan)
                else:
                    for n in evicts:
                        del self.models[n]
                    name = _s(r.Name()) or os.path.splitext(os.path.basename(details["path"]))[0]
                    if details["path"].startswith("slowload"):
                        self._loads[(peer, rid)] = [name, details["path"], 0]
                        continue
                    self.models[name] = details["path"]

                    def load(b, name=name, path=details["path"]):
                        m = self._model_info(b, name, path)
                        g.LoadModelResponseStart(b)
                        g.LoadModelResponseAddModel(b, m)
                        return g.LoadModelResponseEnd(b)
                    self._send(peer, rid, g.JobResponseBody.LoadModelResponse, load)
                continue
            if kind == g.JobRequestBody.ListModelsRequest:
                self.requests.append(("ListModels", {}))

                answered = []
                for key, load in self._loads.items():
                    load[2] += 1
                    if load[2] >= SLOW_LOAD_STEPS:
                        answered.append(key)

                def lst(b):
                    infos = [self._model_info(b, n, p) for n, p in self.models.items()]
                    infos += [self._model_info(b, n, p, loading=k * SLOW_LOAD_TOTAL //
                                               SLOW_LOAD_STEPS)
                              for n, p, k in self._loads.values()]
                    g.ListModelsResponseStartModelsVector(b, len(infos))
                    for i in reversed(infos):
                        b.PrependUOffsetTRelative(i)
                    v = b.EndVector()
                    g.ListModelsResponseStart(b)
                    g.ListModelsResponseAddModels(b, v)
                    return g.ListModelsResponseEnd(b)
                self._send(peer, rid, g.JobResponseBody.ListModelsResponse, lst)
                for key in answered:
                    name, path, _ = self._loads.pop(key)
                    self.models[name] = path

                    def load(b, name=name, path=path):
                        m = self._model_info(b, name, path)
                        g.LoadModelResponseStart(b)
                        g.LoadModelResponseAddModel(b, m)
                        return g.LoadModelResponseEnd(b)
                    self._send(key[0], key[1], g.JobResponseBody.LoadModelResponse, load)
                continue
            if kind == g.JobRequestBody.CancelRequest:
                c = g.CancelRequest()
                c.Init(table.Bytes, table.Pos)
                target = c.RequestId()
                self.requests.append(("Cancel", {"target": target}))
                if (peer, target) in self._pending:
                    del self._pending[(peer, target)]
                    self._error(peer, target, g.ErrorCode.Cancelled, "Forward cancelled")
                if (peer, target) in self._loads:
                    del self._loads[(peer, target)]
                    self._error(peer, target, g.ErrorCode.Cancelled, "load cancelled")
                self._ack(peer, rid)
                continue
            if kind == g.JobRequestBody.ForwardRequest:
                self._forward(peer, rid, table, frames)
                continue
            self._error(peer, rid, g.ErrorCode.Unimplemented, "test peer: body %d" % kind)

    def _forward(self, peer, rid, table, frames):
        f = g.ForwardRequest()
        f.Init(table.Bytes, table.Pos)
        model, run_id = _s(f.Model()), _s(f.RunId())
        consts = [_s(f.ConstantInputs(i)) for i in range(f.ConstantInputsLength())]
        inputs = {}
        for i in range(f.InputsLength()):
            d = f.Inputs(i)
            shape = tuple(d.Shape(j) for j in range(d.ShapeLength()))
            buf = frames[d.Frame() - 1] if d.Frame() else b""
            assert len(buf) == d.Nbytes(), "nbytes/frame mismatch for %s" % _s(d.Name())
            arr = np.frombuffer(buf, _NP[d.Dtype()]).reshape(shape)
            if d.Dtype() == g.DType.BF16:  # bf16 bits -> the float32 with the same value
                arr = (arr.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            inputs[_s(d.Name())] = arr
        self.requests.append(("Forward", {"model": model, "run_id": run_id, "consts": consts,
                                          "inputs": sorted(inputs), "end_run": f.EndRun(),
                                          "dtypes": {_s(f.Inputs(i).Name()): f.Inputs(i).Dtype()
                                                     for i in range(f.InputsLength())}}))
        if model == "silent":
            return
        if model == "slow":
            self._pending[(peer, rid)] = True
            return
        if model == "garbage":
            self.sock.send_multipart([peer, b"not a flatbuffer at all"])
            return
        if model not in self.models:
            self._error(peer, rid, g.ErrorCode.NotFound, "model '%s' is not loaded" % model)
            return
        if run_id:
            cached = self.runs.setdefault(run_id, {})
            for c in consts:
                if c in inputs:
                    cached[c] = inputs[c]
                elif c in cached:
                    inputs[c] = cached[c]
                else:
                    self._error(peer, rid, g.ErrorCode.FailedPrecondition,
                                "run cache miss: run '%s' has no cached '%s'" % (run_id, c))
                    return
            if f.EndRun():
                self.runs.pop(run_id, None)
        x = inputs["x"].astype(np.float32)
        out = x + np.float32(inputs["context"].astype(np.float32).sum()) + \
            np.float32(inputs["y"].astype(np.float32).sum())
        self._send_output(peer, rid, out, step_seconds=0.001)

    def _send_output(self, peer, rid, out, step_seconds=None):
        """A ForwardResponse carrying `out` (float32) as the output "out" in one frame."""
        out = np.ascontiguousarray(out, dtype=np.float32)

        def resp(b):
            n = b.CreateString("out")
            g.TensorDescStartShapeVector(b, out.ndim)
            for d in reversed(out.shape):
                b.PrependInt64(d)
            shp = b.EndVector()
            g.TensorDescStart(b)
            g.TensorDescAddName(b, n)
            g.TensorDescAddDtype(b, g.DType.F32)
            g.TensorDescAddShape(b, shp)
            g.TensorDescAddNbytes(b, out.nbytes)
            g.TensorDescAddPayload(b, g.PayloadKind.Frame)
            g.TensorDescAddFrame(b, 1)
            t = g.TensorDescEnd(b)
            g.ForwardResponseStartOutputsVector(b, 1)
            b.PrependUOffsetTRelative(t)
            v = b.EndVector()
            g.ForwardResponseStart(b)
            g.ForwardResponseAddOutputs(b, v)
            if step_seconds is not None:
                g.ForwardResponseAddStepSeconds(b, step_seconds)
            return g.ForwardResponseEnd(b)
        self._send(peer, rid, g.JobResponseBody.ForwardResponse, resp, [out.tobytes()])


@pytest.fixture
def peer():
    p = JobPeer()
    yield p
    p.stop()


# ------------------------------------------------------------------------- real cluster

def build_dir():
    return os.environ.get("FLEET_BUILD_DIR", os.path.join(REPO, "build"))


def cluster_binaries():
    b = os.path.join(build_dir(), "bin")
    names = ["fleet", "fleet-coordinator", "fleet-worker"]
    missing = [n for n in names if not os.access(os.path.join(b, n), os.X_OK)]
    return b, missing


def _read_ready(proc, pattern, what, timeout=60.0):
    """Waits for a line of proc's output matching pattern; returns the match. A thread keeps
    draining the output (so the process never blocks on a full pipe) and keeps the lines."""
    import queue  # noqa: PLC0415

    lines = queue.Queue()
    seen = []

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)
    threading.Thread(target=pump, daemon=True).start()
    proc.output = seen
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            break
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            def keep():
                while True:
                    more = lines.get()
                    if more is None:
                        return
                    seen.append(more)
            threading.Thread(target=keep, daemon=True).start()
            return m
    raise RuntimeError("%s did not report ready within %.0f s (exit %s); output:\n%s"
                       % (what, timeout, proc.poll(), "".join(seen[-30:])))


class Cluster:
    """fleet-coordinator + workers cuda:0, cuda:1 (emulated, cpu-backed) + cpu on loopback."""

    def __init__(self, model_root, capacity="1gb"):
        self.bin, missing = cluster_binaries()
        if missing:
            raise RuntimeError("missing binaries in %s: %s" % (self.bin, missing))
        self.model_root = model_root
        self.capacity = capacity
        self.procs = []
        self.workers = []
        self.port = None
        self.devices = ("cuda:0", "cuda:1", "cpu")
        self.start_coordinator()
        for dev in self.devices:
            self.start_worker(dev)
        self.wait_ready()

    def _spawn(self, args):
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def start_coordinator(self, port=None):
        listen = "tcp://127.0.0.1:%d" % (port or 0)
        if not hasattr(self, "register_endpoint"):
            # Workers need the endpoint before they start, and it must survive a coordinator
            # restart: take a free port from the OS once.
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.register_endpoint = "tcp://127.0.0.1:%d" % s.getsockname()[1]
        reg = self.register_endpoint
        self.coordinator = self._spawn([
            os.path.join(self.bin, "fleet-coordinator"), "--listen", listen,
            "--http-listen", "127.0.0.1:%d" % getattr(self, "http_port", 0),
            "--metrics-listen", "", "--register-listen", reg,
            "--model-root", self.model_root])
        m = _read_ready(self.coordinator, r"fleet-coordinator ready (.*)", "fleet-coordinator")
        fields = dict(kv.split("=", 1) for kv in m.group(1).split() if "=" in kv)
        self.address = fields["listen"]
        self.port = int(self.address.rsplit(":", 1)[1])
        self.http = fields["http"]
        self.http_port = int(self.http.rsplit(":", 1)[1])

    def start_worker(self, dev):
        backing = "cpu"
        w = self._spawn([os.path.join(self.bin, "fleet-worker"), "--id", dev, "--backing",
                         backing, "--capacity", self.capacity, "--listen", "tcp://127.0.0.1:0",
                         "--model-root", self.model_root, "--coordinator",
                         self.register_endpoint])
        _read_ready(w, r"fleet-worker ready id=", "fleet-worker " + dev)
        self.workers.append(w)

    def wait_ready(self, timeout=60.0):
        """Until /v2/health/ready is 200 and /v2/workers lists every worker started."""
        deadline = time.monotonic() + timeout
        want = set(self.devices)
        seen = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen("http://%s/v2/health/ready" % self.http,
                                            timeout=2) as r:
                    ready = r.status == 200
                with urllib.request.urlopen("http://%s/v2/workers" % self.http, timeout=2) as r:
                    seen = {w["device"] for w in json.load(r)["workers"] if w.get("up")}
                if ready and want <= seen:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("cluster at %s not ready within %.0f s (workers up: %s, want %s)"
                           % (self.http, timeout, sorted(seen or []), sorted(want)))

    def restart_coordinator(self):
        """Kills the coordinator and starts a new one on the same ports, with fresh workers
        (clients must notice and reconnect)."""
        self.coordinator.send_signal(signal.SIGKILL)
        self.coordinator.wait(10)
        for w in self.workers:
            w.send_signal(signal.SIGTERM)
            w.wait(10)
        self.workers = []
        self.start_coordinator(port=self.port)
        for dev in self.devices:
            self.start_worker(dev)
        self.wait_ready()

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def run_fleet(*args):
    b, _ = cluster_binaries()
    r = subprocess.run([os.path.join(b, "fleet")] + [str(a) for a in args], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise RuntimeError("fleet %s failed (%d): %s" % (" ".join(map(str, args)), r.returncode,
                                                         r.stderr))
    return r.stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    _, missing = cluster_binaries()
    if missing:
        pytest.skip("end-to-end tests need %s in %s/bin (build them first)"
                    % (", ".join(missing), build_dir()))
    root = str(tmp_path_factory.mktemp("models"))
    c = Cluster(root)
    yield c
    c.stop()
    shutil.rmtree(root, ignore_errors=True)


