"""Stand-in for comfy/clip_vision.py: Output, what CLIPVisionEncode returns (CLIP_VISION_OUTPUT).

Upstream: comfy/clip_vision.py. An attribute bag (also indexable by name) holding
last_hidden_state, image_embeds, penultimate_hidden_states ([B, 257, 1280] for WAN's CLIP-H),
mm_projected; WAN21.extra_conds reads penultimate_hidden_states as `clip_fea`.
"""


class Output:
    def __getitem__(self, key):
        return getattr(self, key)

    def __setitem__(self, key, item):
        setattr(self, key, item)
