"""Stand-in for comfy/model_patcher.py: ModelPatcher (constructor, clone, weight patches,
model patches in model_options["transformer_options"], callbacks, pre_run).

Upstream: comfy/model_patcher.py. add_patches(patches, strength_patch, strength_model) takes
{key: patch} where a key is a state-dict key, (key, offset) or (key, offset, function), keeps
only keys present in model.state_dict() (which is why the node's proxy lists the real weight
names), appends (strength_patch, patch, strength_model, offset, function) to
self.patches[key], gives the patcher a new patches_uuid and returns the keys it took (as given,
tuples included); pre_run sets model.current_patcher and runs the ON_PRE_RUN callbacks; clone
copies the patch lists, patches_uuid and callbacks.
"""

import copy
import uuid

from . import model_management
from .patcher_extension import CallbacksMP


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.size = size
        self.model = model
        if not hasattr(self.model, "device") or self.model.device is None:
            self.model.device = offload_device
        self.patches = {}
        self.backup = {}
        self.object_patches = {}
        self.model_options = {"transformer_options": {}}
        self.model_size()
        self.load_device = load_device
        self.offload_device = offload_device
        self.weight_inplace_update = weight_inplace_update
        self.patches_uuid = uuid.uuid4()
        self.parent = None
        self.callbacks = CallbacksMP.init_callbacks()
        self.hook_patches = {}
        self.forced_hooks = None
        self.is_clip = False
        self.hook_mode = None

    def model_size(self):
        if self.size > 0:
            return self.size
        self.size = model_management.module_size(self.model)
        return self.size

    def clone(self):
        n = ModelPatcher(self.model, self.load_device, self.offload_device, self.size,
                         weight_inplace_update=self.weight_inplace_update)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.patches_uuid = self.patches_uuid
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        n.parent = self
        for k, c in self.callbacks.items():
            n.callbacks[k] = {k1: c1.copy() for k1, c1 in c.items()}
        n.hook_patches = {k: dict(v) for k, v in self.hook_patches.items()}
        n.forced_hooks = self.forced_hooks
        n.is_clip = self.is_clip
        n.hook_mode = self.hook_mode
        return n

    def set_model_patch(self, patch, name):
        to = self.model_options["transformer_options"]
        if "patches" not in to:
            to["patches"] = {}
        to["patches"][name] = to["patches"].get(name, []) + [patch]

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        p = set()
        model_sd = self.model.state_dict()
        for k in patches:
            offset = None
            function = None
            if isinstance(k, str):
                key = k
            else:
                offset = k[1]
                key = k[0]
                if len(k) > 2:
                    function = k[2]
            if key in model_sd:
                p.add(k)
                current_patches = self.patches.get(key, [])
                current_patches.append((strength_patch, patches[k], strength_model, offset,
                                        function))
                self.patches[key] = current_patches
        self.patches_uuid = uuid.uuid4()
        return list(p)

    def model_state_dict(self, filter_prefix=None):
        sd = self.model.state_dict()
        if filter_prefix is not None:
            sd = {k: v for k, v in sd.items() if k.startswith(filter_prefix)}
        return sd

    def get_model_object(self, name):
        obj = self.model
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj

    def add_callback(self, call_type, callback):
        self.add_callback_with_key(call_type, None, callback)

    def add_callback_with_key(self, call_type, key, callback):
        self.callbacks.setdefault(call_type, {}).setdefault(key, []).append(callback)

    def get_all_callbacks(self, call_type):
        c_list = []
        for c in self.callbacks.get(call_type, {}).values():
            c_list.extend(c)
        return c_list

    def pre_run(self):
        if hasattr(self.model, "current_patcher"):
            self.model.current_patcher = self
        for callback in self.get_all_callbacks(CallbacksMP.ON_PRE_RUN):
            callback(self)

    def cleanup(self):
        if hasattr(self.model, "current_patcher"):
            self.model.current_patcher = None
