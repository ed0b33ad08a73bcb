"""Stand-in for comfy/model_management.py: devices, interrupt flag, small helpers.

Upstream: comfy/model_management.py (get_torch_device, unet_offload_device,
InterruptProcessingException, interrupt_current_processing, processing_interrupted,
throw_exception_if_processing_interrupted, cast_to_device, module_size; for text encoders:
intermediate_device, text_encoder_device, text_encoder_offload_device, text_encoder_dtype,
text_encoder_initial_device, dtype_size, pick_weight_dtype, supports_cast, load_models_gpu /
load_model_gpu). Loading here only checks what upstream's would trip over: a model whose weights
are on the meta device cannot be moved to the load device ("Cannot copy out of meta tensor").
"""

import threading

import torch


class InterruptProcessingException(Exception):
    pass


interrupt_processing_mutex = threading.RLock()
interrupt_processing = False


def interrupt_current_processing(value=True):
    global interrupt_processing
    with interrupt_processing_mutex:
        interrupt_processing = value


def processing_interrupted():
    with interrupt_processing_mutex:
        return interrupt_processing


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    with interrupt_processing_mutex:
        if interrupt_processing:
            interrupt_processing = False
            raise InterruptProcessingException()


def get_torch_device():
    return torch.device("cpu")


def unet_offload_device():
    return torch.device("cpu")


def cast_to_device(tensor, device, dtype, copy=False):
    return tensor.to(device=device, dtype=dtype, copy=copy)


def module_size(module):
    module_mem = 0
    sd = module.state_dict()
    for k in sd:
        t = sd[k]
        module_mem += t.nelement() * t.element_size()
    return module_mem


def intermediate_device():
    return torch.device("cpu")


def text_encoder_device():
    return torch.device("cpu")


def text_encoder_offload_device():
    return torch.device("cpu")


def text_encoder_dtype(device=None):
    return torch.float16


def text_encoder_initial_device(load_device, offload_device, model_size=0):
    return offload_device


def dtype_size(dtype):
    return torch.tensor([], dtype=dtype).element_size() if dtype is not None else 4


def pick_weight_dtype(dtype, fallback_dtype, device=None):
    if dtype is None:
        dtype = fallback_dtype
    elif dtype_size(dtype) > dtype_size(fallback_dtype):
        dtype = fallback_dtype
    return dtype


def supports_cast(device, dtype):
    return True


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    for m in models:
        for name, t in m.model.state_dict().items():
            if t.device.type == "meta":
                raise NotImplementedError("Cannot copy out of meta tensor; %s has no data" % name)


def load_model_gpu(model):
    return load_models_gpu([model])
