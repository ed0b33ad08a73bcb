"""The Tensorfleet job-API client: one ZeroMQ DEALER connection to a coordinator.

Requests are [JobRequest header][data frames...]; replies are matched to requests by id (replies
to requests given up on earlier are dropped). The first request on every connection is Hello;
the client says Hello again by itself after the coordinator restarted (it watches the socket's
connect/disconnect events) and retries the interrupted call once.

Thread safety: a Client may be shared between threads; calls are serialised by an internal lock
(one request in flight per client). Use one Client per thread for parallel requests.
"""

import collections
import logging
import math
import threading
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import tensors as _tensors
from . import wire
from .errors import (CancelledError, DeadlineExceededError, FailedPreconditionError,
                     InvalidArgumentError, ProtocolError, TensorfleetError, UnavailableError,
                     VersionMismatchError, error_from_wire)

log = logging.getLogger("tensorfleet.client")

DEFAULT_ADDRESS = "tcp://127.0.0.1:7770"
RUN_CACHE_MISS = "run cache miss"
PROGRESS_INTERVAL = 0.2  # seconds between load-progress questions


class _ConnectionLost(Exception):
    """Internal: the connection dropped while a reply was awaited."""



def _descriptors(encoded, names):
    """Tensor descriptors (name, dtype, shape, nbytes, 1-based frame; 0 for no payload) and the
    data frames of `names` among `encoded` ({name: to_wire(...)})."""
    descs, frames = [], []
    for n in names:
        dt, shape, arr = encoded[n]
        frame = 0
        if arr.nbytes:
            frames.append(arr)
            frame = len(frames)
        descs.append((n, dt, shape, arr.nbytes, frame))
    return descs, frames

class Client:
    """A connection to a coordinator's job API.

    Connecting is lazy: the first call (or `connect()`) opens the socket and says Hello.
    `timeout` bounds every call except Forward (`forward_timeout`) and LoadModel
    (`load_timeout`); `None` waits forever.
    """

    def __init__(self, address=DEFAULT_ADDRESS, timeout=30.0, forward_timeout=600.0,
                 load_timeout=1800.0, connect_timeout=10.0, peer_name="fleet-client",
                 context=None):
        self.address = address
        self.timeout = timeout
        self.forward_timeout = forward_timeout
        self.load_timeout = load_timeout
        self.connect_timeout = connect_timeout
        self.peer_name = peer_name
        self.server = None  # wire.HelloInfo of the coordinator, after Hello
        self.last_forward = None  # wire.ForwardResult of the latest Forward (timings, bytes)
        self._ctx = context or zmq.Context.instance()
        self._sock = None
        self._mon = None
        self._next_id = 1
        self._lock = threading.RLock()
        # (model, run_id) of runs whose constant inputs this connection has sent, LRU-bounded.
        self._runs = collections.OrderedDict()
        self._max_runs = 256
        self.reconnects = 0
        self.run_cache_misses = 0  # steps resent in full because the coordinator lost a run

    # ----------------------------------------------------------------------------- lifecycle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        with self._lock:
            self._reset()

    def connect(self):
        """Opens the connection and says Hello now. Returns the coordinator's HelloInfo."""
        with self._lock:
            self._ensure_connected()
            return self.server

    def _reset(self):
        if self._mon is not None:
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._mon.close(linger=0)
            self._mon = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        self.server = None
        self._runs.clear()  # a new connection may be a new coordinator: resend constants

    def _open(self):
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        mon = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        try:
            sock.connect(self.address)
        except zmq.ZMQError as e:
            mon.close(linger=0)
            sock.close(linger=0)
            raise InvalidArgumentError("cannot connect to coordinator address '%s': %s"
                                       % (self.address, e), "Hello") from None
        self._sock, self._mon = sock, mon

    def _ensure_connected(self):
        if self._sock is not None and self._drain_monitor():
            log.info("tensorfleet: connection to %s was lost; reconnecting", self.address)
            self._reset()
            self.reconnects += 1
        if self._sock is not None:
            return
        self._open()
        rid = self._take_id()
        try:
            reply, _ = self._roundtrip(wire.hello_request(rid, self.peer_name), [],
                                       self.connect_timeout, "Hello", rid, hello=True)
        except DeadlineExceededError:
            self._reset()
            raise UnavailableError(
                "no reply from the coordinator at %s within %.1f s: is fleet-coordinator running "
                "and listening there?" % (self.address, self.connect_timeout), "Hello") from None
        except BaseException:
            self._reset()
            raise
        if reply.kind == "Error":  # e.g. the coordinator refused our protocol version
            self._reset()
            code, message = reply.value
            raise error_from_wire(code, "coordinator at %s refused Hello: %s"
                                  % (self.address, message), "Hello")
        if reply.kind != "Hello":
            self._reset()
            raise ProtocolError("the coordinator answered Hello with %s" % reply.kind, "Hello")
        hello = reply.value
        if hello.major != wire.PROTOCOL_MAJOR:
            self._reset()
            raise VersionMismatchError(
                "coordinator at %s speaks protocol %d.%d, this client %d.%d (majors must match; "
                "update the ComfyUI node or the coordinator)"
                % (self.address, hello.major, hello.minor, wire.PROTOCOL_MAJOR,
                   wire.PROTOCOL_MINOR), "Hello")
        self.server = hello

    def _drain_monitor(self):
        """Returns True when a disconnect was seen since the last call."""
        lost = False
        while self._mon is not None and self._mon.poll(0):
            try:
                event = recv_monitor_message(self._mon, zmq.NOBLOCK)
            except zmq.Again:
                break
            if event["event"] == zmq.EVENT_DISCONNECTED:
                lost = True
        return lost

    def _take_id(self):
        rid = self._next_id
        self._next_id += 1
        return rid

    # --------------------------------------------------------------------------- transport

    def _roundtrip(self, header, frames, timeout, what, rid, hello=False, should_cancel=None,
                   on_models=None):
        """Sends [header][frames...] and waits for the reply with the same id.

        Returns (Response, data frames). Raises DeadlineExceededError, _ConnectionLost,
        ProtocolError, CancelledError (when should_cancel() turned true and the coordinator
        confirmed or did not answer within a grace period).
        on_models: while waiting, ListModels is asked every PROGRESS_INTERVAL seconds on the same
        connection (the coordinator answers it at once, beside the queued request) and each
        answer ([ModelInfo]) is passed to on_models.
        """
        try:
            self._sock.send_multipart([header] + list(frames), copy=False)
        except zmq.ZMQError as e:
            raise _ConnectionLost("send failed: %s" % e) from None
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._mon, zmq.POLLIN)
        cancel_sent = False
        listing = set()  # ids of ListModels asked for on_models, not answered yet
        next_listing = time.monotonic() + PROGRESS_INTERVAL
        while True:
            if should_cancel is not None and not cancel_sent and should_cancel():
                cancel_sent = True
                self._sock.send(wire.cancel_request(self._take_id(), rid))
                grace = time.monotonic() + 10.0
                deadline = grace if deadline is None else min(deadline, grace)
            if on_models is not None and not cancel_sent and time.monotonic() >= next_listing \
                    and len(listing) < 4:
                lid = self._take_id()
                self._sock.send(wire.list_models_request(lid))
                listing.add(lid)
                next_listing = time.monotonic() + PROGRESS_INTERVAL
            wait_ms = 50 if should_cancel is not None or on_models is not None else 1000
            if deadline is not None:
                wait_ms = max(0, min(wait_ms, int((deadline - time.monotonic()) * 1000) + 1))
            events = dict(poller.poll(wait_ms))
            if self._mon in events and self._drain_monitor() and not hello:
                raise _ConnectionLost("connection to %s lost while waiting for %s"
                                      % (self.address, what))
            if self._sock in events:
                msg = self._sock.recv_multipart(copy=False)
                reply = wire.parse_response(msg[0].buffer)
                if reply.id == rid:
                    return reply, msg[1:]
                if reply.id in listing:
                    listing.discard(reply.id)
                    if reply.kind == "ListModelsResponse":
                        on_models(reply.value)
                    continue
                log.debug("tensorfleet: dropping reply %d (%s) while waiting for %d",
                          reply.id, reply.kind, rid)
                continue
            if deadline is not None and time.monotonic() >= deadline:
                # The reply may still come later: drop the connection so that it cannot be
                # mistaken for anything, and start clean on the next call.
                self._reset()
                if cancel_sent:
                    raise CancelledError("%s cancelled (the coordinator did not confirm within "
                                         "10 s)" % what, what)
                raise DeadlineExceededError("no reply to %s from %s within %.1f s"
                                            % (what, self.address, timeout), what)

    def _call(self, build, what, timeout, frames=(), should_cancel=None, retry=True,
              on_models=None):
        """Builds a request with a fresh id (build(id) -> header), sends it and returns the
        non-error reply as (Response, frames). Reconnects and retries once when the
        connection was lost."""
        with self._lock:
            for attempt in (0, 1):
                self._ensure_connected()
                rid = self._take_id()
                try:
                    reply, data = self._roundtrip(build(rid), frames, timeout, what, rid,
                                                  should_cancel=should_cancel,
                                                  on_models=on_models)
                except _ConnectionLost as e:
                    self._reset()
                    self.reconnects += 1
                    if attempt == 1 or not retry:
                        raise UnavailableError(str(e), what) from None
                    log.info("tensorfleet: %s; reconnecting and retrying %s once", e, what)
                    continue
                if reply.kind == "Error":
                    code, message = reply.value
                    raise error_from_wire(code, message, what)
                return reply, data
        raise AssertionError("unreachable")

    @staticmethod
    def _expect(reply, kind, what):
        if reply.kind != kind:
            raise ProtocolError("the coordinator answered %s with %s, expected %s"
                                % (what, reply.kind, kind), what)
        return reply.value

    # -------------------------------------------------------------------------- job API

    def load_model(self, spec, name="", timeout=None, progress=None, should_cancel=None):
        """Loads (or re-uses) a model. Returns its ModelInfo. `spec` is a wire.ModelSpec.

        progress: called as progress(bytes_loaded, bytes_total) while the coordinator loads
          (from its ListModels, every PROGRESS_INTERVAL seconds) and once at the end.
        should_cancel: a callable polled while waiting; when it returns true the load is
          cancelled on the coordinator (it stops before its next block and evicts what it
          loaded) and CancelledError is raised.
        """
        on_models = None
        if progress is not None:
            def on_models(models):
                for m in models:
                    if m.state == "loading" and (m.name == name if name else m.path == spec.path):
                        progress(m.bytes_loaded, m.bytes_total)
        reply, _ = self._call(lambda rid: wire.load_model_request(rid, spec, name), "LoadModel",
                              self.load_timeout if timeout is None else timeout,
                              should_cancel=should_cancel, on_models=on_models)
        info = self._expect(reply, "LoadModelResponse", "LoadModel")
        if progress is not None:
            progress(info.bytes_loaded, info.bytes_total)
        return info

    def unload_model(self, name, timeout=None):
        reply, _ = self._call(lambda rid: wire.unload_model_request(rid, name), "UnloadModel",
                              self.timeout if timeout is None else timeout)
        self._expect(reply, "Ack", "UnloadModel")
        with self._lock:
            for key in [k for k in self._runs if k[0] == name]:
                del self._runs[key]

    def list_models(self, timeout=None):
        reply, _ = self._call(wire.list_models_request, "ListModels",
                              self.timeout if timeout is None else timeout)
        return self._expect(reply, "ListModelsResponse", "ListModels")

    def plan(self, spec, timeout=None):
        """Validates a spec and returns the placement the coordinator would use (wire.Plan),
        against what the cluster holds now: `evicts` names the models a load of `spec` would
        evict first to make room, least recently used first (empty when it fits beside them).
        A spec that would not fit even after evicting every model it may evict raises
        ResourceExhaustedError, as its load would."""
        reply, _ = self._call(lambda rid: wire.plan_request(rid, spec), "Plan",
                              self.timeout if timeout is None else timeout)
        return self._expect(reply, "PlanResponse", "Plan")

    def status(self, timeout=None):
        reply, _ = self._call(wire.status_request, "Status",
                              self.timeout if timeout is None else timeout)
        return self._expect(reply, "StatusResponse", "Status")

    def put_patches(self, model, patch_id, groups, tensors, timeout=None):
        """Gives the coordinator weight patches for `model` under `patch_id`; Forwards name them
        with patches=patch_id. An id the coordinator holds already is kept (nothing is re-read).

        groups: [(strength, [wire.PatchModule])], the patches of one strength each (ComfyUI:
          one LoRA loader's); tensors: {key: torch tensor | numpy array}, the modules' parts.
        """
        encoded = {name: _tensors.to_wire(name, value) for name, value in tensors.items()}
        descs, frames = _descriptors(encoded, list(encoded))
        reply, _ = self._call(
            lambda rid: wire.put_patches_request(rid, model, patch_id, groups, descs),
            "PutPatches", self.load_timeout if timeout is None else timeout, frames)
        self._expect(reply, "Ack", "PutPatches")

    def forward(self, model, inputs, run_id="", constant_inputs=(), end_run=False, timeout=None,
                should_cancel=None, as_torch=None, loras=(), patches=""):
        """Runs one model step. Returns {output name: tensor}.

        inputs: {name: torch tensor | numpy array}. Flux: x, timestep (float32), context, y,
          guidance, each already in the dtype the model expects.
        run_id / constant_inputs: inputs named in constant_inputs are sent on the first step of
          a run only; later steps of the same run_id omit them (the coordinator keeps them). When
          the coordinator no longer has them ("run cache miss") the step is resent in full.
        end_run: the coordinator drops the run's cached tensors after this step.
        should_cancel: a callable polled while waiting; when it returns true the in-flight
          Forward is cancelled on the coordinator and CancelledError is raised.
        as_torch: return torch tensors (default: if any input is a torch tensor).
        loras: LoRA files to patch the model with for this step, stacked in order: paths
          relative to a model root, or (path, strength) pairs (strength 1.0 by default). The
          loaded weights are not modified; the next step may use other LoRAs or strengths.
        patches: a patch set given by put_patches (not with loras); a coordinator that no
          longer has it answers NotFoundError.
        """
        if not isinstance(model, str) or not model:
            raise InvalidArgumentError("forward: model must be a non-empty model name", "Forward")
        lora_refs = []
        for lora in loras:
            path, strength = (lora, 1.0) if isinstance(lora, str) else lora
            if not isinstance(path, str) or not path or not math.isfinite(float(strength)):
                raise InvalidArgumentError("forward: LoRA %r: expected a path or (path, finite "
                                           "strength)" % (lora,), "Forward")
            lora_refs.append((path, float(strength)))
        if as_torch is None:
            as_torch = any(_tensors.is_torch_tensor(v) for v in inputs.values())
        unknown = [c for c in constant_inputs if c not in inputs]
        if unknown:
            raise InvalidArgumentError("forward: constant input(s) %s are not among the inputs %s"
                                       % (unknown, sorted(inputs)), "Forward")
        if constant_inputs and not run_id:
            raise InvalidArgumentError("forward: constant_inputs need a run_id", "Forward")
        encoded = {name: _tensors.to_wire(name, value) for name, value in inputs.items()}
        timeout = self.forward_timeout if timeout is None else timeout
        key = (model, run_id)
        with self._lock:
            for attempt in (0, 1):
                full = attempt == 1 or not run_id or key not in self._runs
                names = [n for n in encoded if full or n not in constant_inputs]
                descs, frames = _descriptors(encoded, names)
                try:
                    reply, data = self._call(
                        lambda rid: wire.forward_request(rid, model, descs, run_id,
                                                         list(constant_inputs), end_run,
                                                         _timeout_ms(timeout), lora_refs,
                                                         patches),
                        "Forward", _client_wait(timeout), frames,
                        should_cancel=should_cancel)
                except FailedPreconditionError as e:
                    self._runs.pop(key, None)
                    if not full and e.message.startswith(RUN_CACHE_MISS):
                        self.run_cache_misses += 1
                        log.info("tensorfleet: %s; resending run %s with all inputs",
                                 e.message, run_id)
                        continue
                    raise
                break
            if run_id:
                if end_run:
                    self._runs.pop(key, None)
                else:
                    self._runs[key] = True
                    self._runs.move_to_end(key)
                    while len(self._runs) > self._max_runs:
                        self._runs.popitem(last=False)
        result = self._expect(reply, "ForwardResponse", "Forward")
        self.last_forward = result
        outputs = {}
        for ref in result.outputs:
            if ref.payload == 0 and ref.nbytes == 0:
                buf = b""
            elif ref.payload != 1 or not 1 <= ref.frame <= len(data):
                raise ProtocolError("Forward output '%s': payload kind %d, frame %d, but the reply "
                                    "has %d data frames" % (ref.name, ref.payload, ref.frame,
                                                            len(data)), "Forward")
            else:
                buf = data[ref.frame - 1].buffer
            if len(buf) != ref.nbytes:
                raise ProtocolError("Forward output '%s': nbytes says %d, frame %d has %d"
                                    % (ref.name, ref.nbytes, ref.frame, len(buf)), "Forward")
            outputs[ref.name] = _tensors.from_wire(ref.name, ref.dtype, ref.shape, buf, as_torch)
        return outputs


def _client_wait(timeout):
    """The coordinator enforces a Forward's timeout_ms; the client waits a little longer so that
    the coordinator's DeadlineExceeded (with its explanation) normally arrives first."""
    if timeout is None:
        return None
    return timeout + min(5.0, max(0.5, 0.1 * timeout))


def _timeout_ms(timeout):
    if timeout is None:
        return 0
    return max(1, min(int(timeout * 1000), 0xFFFFFFFF))


__all__ = ["Client", "DEFAULT_ADDRESS", "TensorfleetError"]
