"""Stand-in for comfy/weight_adapter/lokr.py: LoKrAdapter (LyCORIS Kronecker product).

weights = (w1, w2, alpha, w1_a, w1_b, w2_a, w2_b, t2, dora_scale): each from <x>.lokr_<part>
when present (and then recorded as loaded, even if no adapter results); an adapter when any of
lokr_w1, lokr_w2, lokr_w1_a, lokr_w2_a is there.
"""

from .base import WeightAdapterBase, take

_PARTS = ("w1", "w2", "w1_a", "w1_b", "t2", "w2_a", "w2_b")


class LoKrAdapter(WeightAdapterBase):
    name = "lokr"

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        if loaded_keys is None:
            loaded_keys = set()
        p = {part: take(lora, "{}.lokr_{}".format(x, part), loaded_keys) for part in _PARTS}
        if all(p[k] is None for k in ("w1", "w2", "w1_a", "w2_a")):
            return None
        return cls(loaded_keys, (p["w1"], p["w2"], alpha, p["w1_a"], p["w1_b"], p["w2_a"],
                                 p["w2_b"], p["t2"], dora_scale))
