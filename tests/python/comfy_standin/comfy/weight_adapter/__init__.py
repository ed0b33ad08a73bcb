"""Stand-in for comfy/weight_adapter/: the adapter classes ComfyUI's load_lora tries, in
upstream's order (`adapters`), and the name -> class table of the trainer (`adapter_maps`).

Upstream: comfy/weight_adapter/__init__.py. Each adapter keeps upstream's `name`,
`loaded_keys`, `weights` tuple layout and `load(x, lora, alpha, dora_scale, loaded_keys)`
recognition; the weight arithmetic (`calculate_weight`) is left out: Tensorfleet's cluster
applies the patches, and a stand-in adapter raises NotImplementedError if asked to.
"""

from .base import WeightAdapterBase
from .lora import LoRAAdapter
from .loha import LoHaAdapter
from .lokr import LoKrAdapter
from .glora import GLoRAAdapter
from .oft import OFTAdapter
from .boft import BOFTAdapter

adapters = [LoRAAdapter, LoHaAdapter, LoKrAdapter, GLoRAAdapter, OFTAdapter, BOFTAdapter]

adapter_maps = {"LoRA": LoRAAdapter, "LoHa": LoHaAdapter, "LoKr": LoKrAdapter,
                "OFT": OFTAdapter}

__all__ = ["WeightAdapterBase", "adapters", "adapter_maps"] + [a.__name__ for a in adapters]
