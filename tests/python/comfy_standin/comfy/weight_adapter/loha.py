"""Stand-in for comfy/weight_adapter/loha.py: LoHaAdapter (LyCORIS Hadamard product).

weights = (w1a, w1b, alpha, w2a, w2b, t1, t2, dora_scale), from <x>.hada_w1_a / hada_w1_b /
hada_w2_a / hada_w2_b and, when <x>.hada_t1 is present, the Tucker cores hada_t1 / hada_t2.
"""

from .base import WeightAdapterBase


class LoHaAdapter(WeightAdapterBase):
    name = "loha"

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        if loaded_keys is None:
            loaded_keys = set()
        if x + ".hada_w1_a" not in lora:
            return None
        t1 = t2 = None
        if x + ".hada_t1" in lora:
            t1, t2 = lora[x + ".hada_t1"], lora[x + ".hada_t2"]
            loaded_keys.update((x + ".hada_t1", x + ".hada_t2"))
        names = [x + s for s in (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b")]
        w1a, w1b, w2a, w2b = (lora[n] for n in names)
        loaded_keys.update(names)
        return cls(loaded_keys, (w1a, w1b, alpha, w2a, w2b, t1, t2, dora_scale))
