"""Stand-in for comfy/weight_adapter/glora.py: GLoRAAdapter (recognition only).

weights = (a1, a2, b1, b2, alpha, dora_scale), from <x>.a1.weight / a2 / b1 / b2.
"""

from .base import WeightAdapterBase


class GLoRAAdapter(WeightAdapterBase):
    name = "glora"

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        if loaded_keys is None:
            loaded_keys = set()
        if x + ".a1.weight" not in lora:
            return None
        names = [x + s for s in (".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight")]
        a1, a2, b1, b2 = (lora[n] for n in names)
        loaded_keys.update(names)
        return cls(loaded_keys, (a1, a2, b1, b2, alpha, dora_scale))
