"""Stand-in for comfy/hooks.py: EnumHookMode, which comfy.sd.CLIP sets on its patcher.

Upstream: comfy/hooks.py (EnumHookMode.MinVram / MaxSpeed; the hook classes themselves are
left out: the stand-in has no hooks).
"""

import enum


class EnumHookMode(enum.Enum):
    MinVram = "minvram"
    MaxSpeed = "maxspeed"
