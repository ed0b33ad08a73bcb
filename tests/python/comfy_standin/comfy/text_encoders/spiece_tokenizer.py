"""Stand-in for comfy/text_encoders/spiece_tokenizer.py: SPieceTokenizer, the sentencepiece
tokenizer of UMT5-XXL (WAN), built from the file's "spiece_model" bytes (tokenizer_data) or a
path.

Upstream: from_pretrained(path) -> SPieceTokenizer(path); __call__(text) -> {"input_ids":
sentencepiece ids + [1] (add_eos)}; get_vocab; serialize_model. sentencepiece and the real
vocabulary are not available here: ids come from the stand-in word vocabulary
(transformers.word_ids, ids 3..999), the end token 1 as upstream; the model bytes, when given,
are kept and serialised back.
"""

import torch

from transformers import word_ids


class SPieceTokenizer:
    @staticmethod
    def from_pretrained(path, **kwargs):
        return SPieceTokenizer(path, **kwargs)

    def __init__(self, tokenizer_path, add_bos=False, add_eos=True):
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.model = tokenizer_path.numpy().tobytes() if torch.is_tensor(tokenizer_path) \
            else tokenizer_path

    def get_vocab(self):
        return {"<pad>": 0, "</s>": 1}

    def __call__(self, string):
        return {"input_ids": word_ids(string, 3, 1000) + ([1] if self.add_eos else [])}

    def serialize_model(self):
        return torch.ByteTensor(list(self.model if isinstance(self.model, bytes) else b""))
