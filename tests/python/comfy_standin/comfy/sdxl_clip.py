"""Stand-in for comfy/sdxl_clip.py: SDXLClipGTokenizer, the CLIP-G tokenizer SD3's tokenizer
holds.

Upstream: comfy/sdxl_clip.py (SDXLClipGTokenizer: an SDTokenizer with pad_with_end=False,
embedding_size 1280, embedding_key "clip_g"). The CLIP-G models (SDXLClipG, SDXLClipModel, ...)
are left out: Tensorfleet does not run CLIP-G.
"""

from comfy import sd1_clip


class SDXLClipGTokenizer(sd1_clip.SDTokenizer):
    def __init__(self, tokenizer_path=None, embedding_directory=None, tokenizer_data={}):
        super().__init__(tokenizer_path, pad_with_end=False,
                         embedding_directory=embedding_directory, embedding_size=1280,
                         embedding_key="clip_g", tokenizer_data=tokenizer_data)
