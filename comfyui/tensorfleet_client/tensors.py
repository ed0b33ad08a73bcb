"""Tensors <-> wire bytes: numpy arrays and torch tensors (torch is optional).

A tensor travels as one data frame of contiguous, row-major, little-endian bytes described by a
TensorDesc {name, dtype, shape, nbytes, payload = Frame, frame}. bfloat16 has no numpy type, so it
needs torch on both ends of this module. Stateless; safe to use from any thread.
"""

import sys

import numpy as np

from ._generated import job_generated as _wire
from .errors import InvalidArgumentError, ProtocolError

if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
    raise ImportError("tensorfleet_client needs a little-endian host")

_D = _wire.DType
# wire dtype -> (numpy dtype used to carry the bytes, torch dtype name, readable name)
_WIRE = {
    _D.F32: (np.float32, "float32", "float32"),
    _D.F16: (np.float16, "float16", "float16"),
    _D.BF16: (np.int16, "bfloat16", "bfloat16"),
    _D.F64: (np.float64, "float64", "float64"),
    _D.I64: (np.int64, "int64", "int64"),
    _D.I32: (np.int32, "int32", "int32"),
    _D.I16: (np.int16, "int16", "int16"),
    _D.I8: (np.int8, "int8", "int8"),
    _D.U8: (np.uint8, "uint8", "uint8"),
    _D.Bool: (np.bool_, "bool", "bool"),
}
_FROM_NUMPY = {
    np.dtype(np.float32): _D.F32,
    np.dtype(np.float16): _D.F16,
    np.dtype(np.float64): _D.F64,
    np.dtype(np.int64): _D.I64,
    np.dtype(np.int32): _D.I32,
    np.dtype(np.int16): _D.I16,
    np.dtype(np.int8): _D.I8,
    np.dtype(np.uint8): _D.U8,
    np.dtype(np.bool_): _D.Bool,
}


def _torch():
    try:
        import torch  # noqa: PLC0415 - optional dependency
    except ImportError:
        return None
    return torch


def is_torch_tensor(value):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def dtype_name(wire_dtype):
    entry = _WIRE.get(wire_dtype)
    return entry[2] if entry else "dtype %d" % wire_dtype


def to_wire(name, value):
    """Returns (wire dtype, shape tuple, buffer) for a torch tensor or numpy array (or scalar).

    The buffer is contiguous host memory, zero-copy where the input already is.
    """
    if is_torch_tensor(value):
        torch = sys.modules["torch"]
        t = value.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        t = t.contiguous()
        if t.dtype == torch.bfloat16:
            return _D.BF16, tuple(t.shape), t.view(torch.int16).numpy()
        try:
            arr = t.numpy()
        except TypeError as e:
            raise InvalidArgumentError(
                "input '%s': torch dtype %s cannot be sent (%s)" % (name, t.dtype, e)) from None
        wire = _FROM_NUMPY.get(arr.dtype)
        if wire is None:
            raise InvalidArgumentError("input '%s': torch dtype %s is not supported on the wire"
                                       % (name, t.dtype))
        return wire, tuple(arr.shape), arr
    arr = np.asarray(value)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    arr = np.ascontiguousarray(arr)
    wire = _FROM_NUMPY.get(arr.dtype)
    if wire is None:
        raise InvalidArgumentError(
            "input '%s': numpy dtype %s is not supported on the wire (use float32, float16, "
            "float64, int64, int32, int16, int8, uint8, bool, or a torch bfloat16 tensor)"
            % (name, arr.dtype))
    return wire, tuple(arr.shape), arr


def from_wire(name, wire_dtype, shape, buf, as_torch):
    """Builds a tensor from a received frame's bytes (one copy, so the result is writable)."""
    entry = _WIRE.get(wire_dtype)
    if entry is None:
        raise ProtocolError("output '%s': unsupported dtype %d (this client knows %s)"
                            % (name, wire_dtype, ", ".join(v[2] for v in _WIRE.values())))
    np_dtype, torch_name, readable = entry
    count = 1
    for d in shape:
        if d < 0:
            raise ProtocolError("output '%s': negative dimension in shape %s" % (name, list(shape)))
        count *= d
    expected = count * np.dtype(np_dtype).itemsize
    if len(buf) != expected:
        raise ProtocolError("output '%s': frame has %d bytes, %s%s needs %d"
                            % (name, len(buf), readable, list(shape), expected))
    arr = np.frombuffer(buf, dtype=np_dtype).reshape(shape).copy()
    if wire_dtype == _D.BF16 or as_torch:
        torch = _torch()
        if torch is None:
            raise InvalidArgumentError(
                "output '%s' is %s, which needs torch (numpy has no such dtype)" % (name, readable))
        t = torch.from_numpy(arr)
        if wire_dtype == _D.BF16:
            t = t.view(torch.bfloat16)
        assert str(t.dtype) == "torch." + torch_name
        return t
    return arr
