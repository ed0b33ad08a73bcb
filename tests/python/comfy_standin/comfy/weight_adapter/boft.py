"""Stand-in for comfy/weight_adapter/boft.py: BOFTAdapter (recognition only).

weights = (blocks, rescale, alpha, dora_scale): <x>.oft_blocks when it is 4-D, and the
optional <x>.rescale.
"""

from .base import WeightAdapterBase
from .oft import load_blocks


class BOFTAdapter(WeightAdapterBase):
    name = "boft"

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        return load_blocks(cls, x, lora, alpha, dora_scale, loaded_keys, 4)
