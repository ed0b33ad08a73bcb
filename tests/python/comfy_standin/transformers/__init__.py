"""Stand-in for the two Hugging Face `transformers` tokenizers ComfyUI's text encoders use
(CLIPTokenizer for CLIP-L / CLIP-G, T5TokenizerFast for T5-XXL), through the interface ComfyUI
calls: from_pretrained(path, **args), tokenizer(text)["input_ids"] and get_vocab().

Upstream: transformers' CLIPTokenizer (BPE over ComfyUI's sd1_tokenizer vocabulary) returns
[49406 (start), ids..., 49407 (end)]; T5TokenizerFast (sentencepiece, t5_tokenizer) returns
[ids..., 1 (end)]. The real vocabularies are not available here, so both map each lower-cased
word or punctuation mark to a fixed id by a hash (`word_ids`): deterministic, one id per word,
the special tokens where upstream has them. ComfyUI's own code (comfy/sd1_clip.py SDTokenizer)
does all chunking, padding and weighting around these calls, as upstream.
"""

import re
import zlib

_WORD = re.compile(r"\w+|[^\w\s]")


def word_ids(text, lo, hi):
    """One id in [lo, hi) per lower-cased word or punctuation mark of `text`."""
    return [lo + zlib.crc32(w.encode()) % (hi - lo) for w in _WORD.findall(text.lower())]


class CLIPTokenizer:
    START, END = 49406, 49407

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        return cls()

    def __call__(self, text):
        return {"input_ids": [self.START] + word_ids(text, 1, 49400) + [self.END]}

    def get_vocab(self):
        return {"<|startoftext|>": self.START, "<|endoftext|>": self.END}


class T5TokenizerFast:
    PAD, END = 0, 1

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        return cls()

    def __call__(self, text):
        return {"input_ids": word_ids(text, 3, 1000) + [self.END]}

    def get_vocab(self):
        return {"<pad>": self.PAD, "</s>": self.END}
