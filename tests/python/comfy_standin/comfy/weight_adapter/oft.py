"""Stand-in for comfy/weight_adapter/oft.py: OFTAdapter (recognition only).

weights = (blocks, rescale, alpha, dora_scale): <x>.oft_blocks when it is 3-D (4-D blocks are
BOFT's), and the optional <x>.rescale.
"""

from .base import WeightAdapterBase


def load_blocks(cls, x, lora, alpha, dora_scale, loaded_keys, ndim):
    """Shared by OFT and BOFT, which differ only in the blocks' rank."""
    if loaded_keys is None:
        loaded_keys = set()
    blocks = lora.get(x + ".oft_blocks", None)
    if blocks is None or blocks.ndim != ndim:
        return None
    loaded_keys.add(x + ".oft_blocks")
    rescale = lora.get(x + ".rescale", None)
    if rescale is not None:
        loaded_keys.add(x + ".rescale")
    return cls(loaded_keys, (blocks, rescale, alpha, dora_scale))


class OFTAdapter(WeightAdapterBase):
    name = "oft"

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        return load_blocks(cls, x, lora, alpha, dora_scale, loaded_keys, 3)
