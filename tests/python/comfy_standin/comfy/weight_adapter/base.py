"""Stand-in for comfy/weight_adapter/base.py: WeightAdapterBase.

An adapter holds `loaded_keys` (upstream passes load_lora's own set in, so it is that set, with
this adapter's keys added) and `weights` (a tuple whose layout each subclass fixes). `load`
returns an adapter when the LoRA has this kind's tensors for module `x`, else None.
"""


class WeightAdapterBase:
    name = None

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        raise NotImplementedError

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=None, original_weight=None):
        raise NotImplementedError("stand-in: no weight arithmetic (the cluster applies patches)")

    def to_train(self):
        raise NotImplementedError("stand-in: no training")


def take(lora, name, loaded_keys):
    """lora[name] (recorded in loaded_keys) when present, else None."""
    if name not in lora:
        return None
    loaded_keys.add(name)
    return lora[name]
