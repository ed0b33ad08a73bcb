"""Stand-in for comfy/weight_adapter/lora.py: LoRAAdapter (LoRA, LoCon, DoRA).

weights = (up, down, alpha, mid, dora_scale, reshape). The up/down spellings are tried in
upstream's order; only the kohya spelling (.lora_up.weight) has a Tucker mid
(.lora_mid.weight). `<x>.reshape_weight`, when present and convertible to a list, gives
`reshape`.
"""

from .base import WeightAdapterBase

# (up suffix, down suffix, mid suffix or None), in the order upstream checks them.
_SPELLINGS = (
    (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight"),  # kohya / LyCORIS
    ("_lora.up.weight", "_lora.down.weight", None),  # diffusers
    (".lora_B.weight", ".lora_A.weight", None),  # diffusers / PEFT
    (".lora.up.weight", ".lora.down.weight", None),  # diffusers
    (".lora_B", ".lora_A", None),  # Mochi
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", None),  # transformers
    (".lora_B.default.weight", ".lora_A.default.weight", None),  # Qwen (PEFT default adapter)
)


class LoRAAdapter(WeightAdapterBase):
    name = "lora"

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        if loaded_keys is None:
            loaded_keys = set()
        for up_suffix, down_suffix, mid_suffix in _SPELLINGS:
            up_name = x + up_suffix
            if up_name in lora:
                break
        else:
            return None
        down_name = x + down_suffix
        mid = None
        if mid_suffix is not None and x + mid_suffix in lora:
            mid = lora[x + mid_suffix]
            loaded_keys.add(x + mid_suffix)
        reshape = None
        reshape_name = x + ".reshape_weight"
        if reshape_name in lora:
            try:
                reshape = lora[reshape_name].tolist()
                loaded_keys.add(reshape_name)
            except Exception:
                pass
        weights = (lora[up_name], lora[down_name], alpha, mid, dora_scale, reshape)
        loaded_keys.add(up_name)
        loaded_keys.add(down_name)
        return cls(loaded_keys, weights)
