"""Stand-in for comfy/sd1_clip.py: ComfyUI's text-encoder front end shared by CLIP-L, T5-XXL
and UMT5-XXL: the tokenizer (SDTokenizer, SD1Tokenizer), the prompt-weight parser
(parse_parentheses, token_weights, escape_important, unescape_important), the weighted encode
(ClipTokenWeightEncoder.encode_token_weights) and the encoder wrapper (SDClipModel with
set_clip_options / reset_clip_options / process_tokens / forward, SD1ClipModel).

Upstream: comfy/sd1_clip.py, same names, signatures and semantics:
- SDTokenizer.tokenize_with_weights: parses "(word:1.2)" weights (1.1 per bare parenthesis),
  tokenizes each segment (the tokenizer's start/end tokens cut off), splits the tokens into
  chunks of max_length (start token, up to max_length - 2 tokens, end token, padding to
  max_length when pad_to_max_length; words of 8+ tokens are split across chunks, shorter ones
  move whole to the next chunk), pads the last chunk to min_length / with min_padding.
  "embedding:NAME" loads a textual-inversion embedding from embedding_directory (its rows go in
  the tokens as tensors). The vocabulary comes from the tokenizer class (here the stand-in
  transformers tokenizers: a deterministic word -> id map, since the real BPE / sentencepiece
  vocabularies are not available).
- encode_token_weights: encodes the chunks (plus an empty chunk from gen_empty_tokens when any
  weight differs from 1.0), mixes each weighted token as (z - z_empty) * w + z_empty,
  concatenates the chunks along the sequence, returns the first chunk's pooled output and the
  flattened attention mask when the encoder returns one.
- SDClipModel.process_tokens: integer tokens -> embeddings; the attention mask is 1 up to and
  including the first end token (the first pad token when there is no end token, itself 0),
  0 after; num_tokens is its sum. forward runs the transformer with that mask when
  enable_attention_masks, the layer from set_clip_options ("last", or "hidden" with layer_idx:
  CLIPSetLastLayer), zeroes masked positions when zero_out_masked, returns the projected or
  unprojected pooled output (return_projected_pooled) and the mask (return_attention_masks).
Left out: loading embedding files (load_embed returns None: no embeddings in the tests) and the
transformer compute (comfy/clip_model.py, comfy/text_encoders/t5.py stand-ins have none).
"""

import json
import logging
import numbers
import os
import re

import torch
from transformers import CLIPTokenizer

import comfy.clip_model
import comfy.ops
from . import model_management


def gen_empty_tokens(special_tokens, length):
    start_token = special_tokens.get("start", None)
    end_token = special_tokens.get("end", None)
    pad_token = special_tokens.get("pad")
    output = []
    if start_token is not None:
        output.append(start_token)
    if end_token is not None:
        output.append(end_token)
    output += [pad_token] * (length - len(output))
    return output


class ClipTokenWeightEncoder:
    def encode_token_weights(self, token_weight_pairs):
        to_encode = []
        max_token_len = 0
        has_weights = False
        for x in token_weight_pairs:
            tokens = [a[0] for a in x]
            max_token_len = max(len(tokens), max_token_len)
            has_weights = has_weights or not all(a[1] == 1.0 for a in x)
            to_encode.append(tokens)

        sections = len(to_encode)
        if has_weights or sections == 0:
            if hasattr(self, "gen_empty_tokens"):
                to_encode.append(self.gen_empty_tokens(self.special_tokens, max_token_len))
            else:
                to_encode.append(gen_empty_tokens(self.special_tokens, max_token_len))

        o = self.encode(to_encode)
        out, pooled = o[:2]
        first_pooled = pooled[0:1].to(model_management.intermediate_device()) \
            if pooled is not None else pooled

        output = []
        for k in range(0, sections):
            z = out[k:k + 1]
            if has_weights:
                z_empty = out[-1]
                for i in range(len(z)):
                    for j in range(len(z[i])):
                        weight = token_weight_pairs[k][j][1]
                        if weight != 1.0:
                            z[i][j] = (z[i][j] - z_empty[j]) * weight + z_empty[j]
            output.append(z)

        if len(output) == 0:
            r = (out[-1:].to(model_management.intermediate_device()), first_pooled)
        else:
            r = (torch.cat(output, dim=-2).to(model_management.intermediate_device()),
                 first_pooled)

        if len(o) > 2:
            extra = {}
            for k in o[2]:
                v = o[2][k]
                if k == "attention_mask":
                    v = v[:sections].flatten().unsqueeze(dim=0).to(
                        model_management.intermediate_device())
                extra[k] = v
            r = r + (extra,)
        return r


class SDClipModel(torch.nn.Module, ClipTokenWeightEncoder):
    LAYERS = ["last", "pooled", "hidden", "all"]

    def __init__(self, device="cpu", max_length=77, freeze=True, layer="last", layer_idx=None,
                 textmodel_json_config=None, dtype=None,
                 model_class=comfy.clip_model.CLIPTextModel,
                 special_tokens={"start": 49406, "end": 49407, "pad": 49407},
                 layer_norm_hidden_state=True, enable_attention_masks=False,
                 zero_out_masked=False, return_projected_pooled=True,
                 return_attention_masks=False, model_options={}):
        super().__init__()
        assert layer in self.LAYERS
        if textmodel_json_config is None:
            textmodel_json_config = os.path.join(os.path.dirname(os.path.realpath(__file__)),
                                                 "sd1_clip_config.json")
            if "model_name" not in model_options:
                model_options = {**model_options, "model_name": "clip_l"}
        if isinstance(textmodel_json_config, dict):
            config = textmodel_json_config
        else:
            with open(textmodel_json_config) as f:
                config = json.load(f)
        te_model_options = model_options.get(
            "{}_model_config".format(model_options.get("model_name", "")), {})
        for k, v in te_model_options.items():
            config[k] = v

        operations = model_options.get("custom_operations", None)
        if operations is None:
            scaled_fp8 = model_options.get("scaled_fp8", None)
            operations = comfy.ops.scaled_fp8_ops(override_dtype=scaled_fp8) \
                if scaled_fp8 is not None else comfy.ops.manual_cast
        self.operations = operations
        self.transformer = model_class(config, dtype, device, self.operations)
        self.num_layers = self.transformer.num_layers
        self.max_length = max_length
        if freeze:
            self.freeze()
        self.layer = layer
        self.layer_idx = None
        self.special_tokens = special_tokens
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6055))
        self.enable_attention_masks = enable_attention_masks
        self.zero_out_masked = zero_out_masked
        self.layer_norm_hidden_state = layer_norm_hidden_state
        self.return_projected_pooled = return_projected_pooled
        self.return_attention_masks = return_attention_masks
        if layer == "hidden":
            assert layer_idx is not None
            assert abs(layer_idx) < self.num_layers
            self.set_clip_options({"layer": layer_idx})
        self.options_default = (self.layer, self.layer_idx, self.return_projected_pooled)

    def freeze(self):
        self.transformer = self.transformer.eval()
        for param in self.parameters():
            param.requires_grad = False

    def set_clip_options(self, options):
        layer_idx = options.get("layer", self.layer_idx)
        self.return_projected_pooled = options.get("projected_pooled",
                                                   self.return_projected_pooled)
        if self.layer == "all":
            pass
        elif layer_idx is None or abs(layer_idx) > self.num_layers:
            self.layer = "last"
        else:
            self.layer = "hidden"
            self.layer_idx = layer_idx

    def reset_clip_options(self):
        self.layer = self.options_default[0]
        self.layer_idx = self.options_default[1]
        self.return_projected_pooled = self.options_default[2]

    def process_tokens(self, tokens, device):
        end_token = self.special_tokens.get("end", None)
        cmp_token = self.special_tokens.get("pad", -1) if end_token is None else end_token
        embeds_out, attention_masks, num_tokens = [], [], []
        for x in tokens:
            attention_mask, tokens_temp, eos = [], [], False
            for y in x:
                if isinstance(y, numbers.Integral):
                    attention_mask.append(0 if eos else 1)
                    token = int(y)
                    tokens_temp += [token]
                    if not eos and token == cmp_token:
                        if end_token is None:
                            attention_mask[-1] = 0
                        eos = True
                else:
                    raise NotImplementedError("the stand-in has no embeddings")
            tokens_embed = torch.tensor([tokens_temp], device=device, dtype=torch.long)
            embeds_out.append(self.transformer.get_input_embeddings()(tokens_embed))
            attention_masks.append(attention_mask)
            num_tokens.append(sum(attention_mask))
        return (torch.cat(embeds_out),
                torch.tensor(attention_masks, device=device, dtype=torch.long), num_tokens, [])

    def forward(self, tokens):
        device = self.transformer.get_input_embeddings().weight.device
        embeds, attention_mask, num_tokens, embeds_info = self.process_tokens(tokens, device)
        attention_mask_model = attention_mask if self.enable_attention_masks else None
        intermediate_output = "all" if self.layer == "all" else self.layer_idx
        outputs = self.transformer(None, attention_mask_model, embeds=embeds,
                                   num_tokens=num_tokens, intermediate_output=intermediate_output,
                                   final_layer_norm_intermediate=self.layer_norm_hidden_state,
                                   dtype=torch.float32, embeds_info=embeds_info)
        z = outputs[0].float() if self.layer == "last" else outputs[1].float()
        if self.zero_out_masked:
            z *= attention_mask.unsqueeze(-1).float()
        pooled_output = None
        if len(outputs) >= 3:
            if not self.return_projected_pooled and len(outputs) >= 4 and \
                    outputs[3] is not None:
                pooled_output = outputs[3].float()
            elif outputs[2] is not None:
                pooled_output = outputs[2].float()
        extra = {}
        if self.return_attention_masks:
            extra["attention_mask"] = attention_mask
        if len(extra) > 0:
            return z, pooled_output, extra
        return z, pooled_output

    def encode(self, tokens):
        return self(tokens)

    def load_sd(self, sd):
        return self.transformer.load_state_dict(sd, strict=False)


def parse_parentheses(string):
    result = []
    current_item = ""
    nesting_level = 0
    for char in string:
        if char == "(":
            if nesting_level == 0:
                if current_item:
                    result.append(current_item)
                current_item = "("
            else:
                current_item += char
            nesting_level += 1
        elif char == ")":
            nesting_level -= 1
            if nesting_level == 0:
                result.append(current_item + ")")
                current_item = ""
            else:
                current_item += char
        else:
            current_item += char
    if current_item:
        result.append(current_item)
    return result


def token_weights(string, current_weight):
    out = []
    for x in parse_parentheses(string):
        weight = current_weight
        if len(x) >= 2 and x[-1] == ")" and x[0] == "(":
            x = x[1:-1]
            xx = x.rfind(":")
            weight *= 1.1
            if xx > 0:
                try:
                    weight = float(x[xx + 1:])
                    x = x[:xx]
                except ValueError:
                    pass
            out += token_weights(x, weight)
        else:
            out += [(x, current_weight)]
    return out


def escape_important(text):
    return text.replace("\\)", "\0\1").replace("\\(", "\0\2")


def unescape_important(text):
    return text.replace("\0\1", ")").replace("\0\2", "(")


def load_embed(embedding_name, embedding_directory, embedding_size, embed_key=None):
    return None  # the stand-in has no embedding files


class SDTokenizer:
    def __init__(self, tokenizer_path=None, max_length=77, pad_with_end=True,
                 embedding_directory=None, embedding_size=768, embedding_key="clip_l",
                 tokenizer_class=CLIPTokenizer, has_start_token=True, has_end_token=True,
                 pad_to_max_length=True, min_length=None, pad_token=None, end_token=None,
                 min_padding=None, tokenizer_data={}, tokenizer_args={}):
        self.tokenizer = tokenizer_class.from_pretrained(tokenizer_path, **tokenizer_args)
        self.max_length = tokenizer_data.get("{}_max_length".format(embedding_key), max_length)
        self.min_length = tokenizer_data.get("{}_min_length".format(embedding_key), min_length)
        self.end_token = None
        self.min_padding = min_padding
        empty = self.tokenizer("")["input_ids"]
        self.tokenizer_adds_end_token = has_end_token
        if has_start_token:
            self.tokens_start = 1
            self.start_token = empty[0]
            if end_token is not None:
                self.end_token = end_token
            elif has_end_token:
                self.end_token = empty[1]
        else:
            self.tokens_start = 0
            self.start_token = None
            if end_token is not None:
                self.end_token = end_token
            elif has_end_token:
                self.end_token = empty[0]
        if pad_token is not None:
            self.pad_token = pad_token
        elif pad_with_end:
            self.pad_token = self.end_token
        else:
            self.pad_token = 0
        self.pad_with_end = pad_with_end
        self.pad_to_max_length = pad_to_max_length
        vocab = self.tokenizer.get_vocab()
        self.inv_vocab = {v: k for k, v in vocab.items()}
        self.embedding_directory = embedding_directory
        self.max_word_length = 8
        self.embedding_identifier = "embedding:"
        self.embedding_size = embedding_size
        self.embedding_key = embedding_key

    def _try_get_embedding(self, embedding_name):
        split_embed = embedding_name.split()
        embedding_name = split_embed[0]
        leftover = " ".join(split_embed[1:])
        embed = load_embed(embedding_name, self.embedding_directory, self.embedding_size,
                           self.embedding_key)
        return (embed, leftover)

    def tokenize_with_weights(self, text, return_word_ids=False, tokenizer_options={}, **kwargs):
        min_length = tokenizer_options.get("{}_min_length".format(self.embedding_key),
                                           self.min_length)
        min_padding = tokenizer_options.get("{}_min_padding".format(self.embedding_key),
                                            self.min_padding)
        text = escape_important(text)
        if kwargs.get("disable_weights", False):
            parsed_weights = [(text, 1.0)]
        else:
            parsed_weights = token_weights(text, 1.0)

        tokens = []
        for weighted_segment, weight in parsed_weights:
            to_tokenize = unescape_important(weighted_segment)
            split = re.split(" {0}|\n{0}".format(self.embedding_identifier), to_tokenize)
            to_tokenize = [split[0]]
            for i in range(1, len(split)):
                to_tokenize.append("{}{}".format(self.embedding_identifier, split[i]))
            to_tokenize = [x for x in to_tokenize if x != ""]
            for word in to_tokenize:
                if word.startswith(self.embedding_identifier) and \
                        self.embedding_directory is not None:
                    embedding_name = word[len(self.embedding_identifier):].strip("\n")
                    embed, leftover = self._try_get_embedding(embedding_name)
                    if embed is None:
                        logging.warning("warning, embedding:%s does not exist, ignoring",
                                        embedding_name)
                    elif len(embed.shape) == 1:
                        tokens.append([(embed, weight)])
                    else:
                        tokens.append([(embed[x], weight) for x in range(embed.shape[0])])
                    if leftover != "":
                        word = leftover
                    else:
                        continue
                end = -1 if self.tokenizer_adds_end_token else 999999999999
                tokens.append([(t, weight) for t in
                               self.tokenizer(word)["input_ids"][self.tokens_start:end]])

        batched_tokens = []
        batch = []
        if self.start_token is not None:
            batch.append((self.start_token, 1.0, 0))
        batched_tokens.append(batch)
        for i, t_group in enumerate(tokens):
            is_large = len(t_group) >= self.max_word_length
            has_end_token = 1 if self.end_token is not None else 0
            while len(t_group) > 0:
                if len(t_group) + len(batch) > self.max_length - has_end_token:
                    remaining_length = self.max_length - len(batch) - has_end_token
                    if is_large:
                        batch.extend([(t, w, i + 1) for t, w in t_group[:remaining_length]])
                        if self.end_token is not None:
                            batch.append((self.end_token, 1.0, 0))
                        t_group = t_group[remaining_length:]
                    else:
                        if self.end_token is not None:
                            batch.append((self.end_token, 1.0, 0))
                        if self.pad_to_max_length:
                            batch.extend([(self.pad_token, 1.0, 0)] * remaining_length)
                    batch = []
                    if self.start_token is not None:
                        batch.append((self.start_token, 1.0, 0))
                    batched_tokens.append(batch)
                else:
                    batch.extend([(t, w, i + 1) for t, w in t_group])
                    t_group = []

        if self.end_token is not None:
            batch.append((self.end_token, 1.0, 0))
        if min_padding is not None:
            batch.extend([(self.pad_token, 1.0, 0)] * min_padding)
        if self.pad_to_max_length and len(batch) < self.max_length:
            batch.extend([(self.pad_token, 1.0, 0)] * (self.max_length - len(batch)))
        if min_length is not None and len(batch) < min_length:
            batch.extend([(self.pad_token, 1.0, 0)] * (min_length - len(batch)))

        if not return_word_ids:
            batched_tokens = [[(t, w) for t, w, _ in x] for x in batched_tokens]
        return batched_tokens

    def untokenize(self, token_weight_pair):
        return [(a, self.inv_vocab.get(a[0])) for a in token_weight_pair]

    def state_dict(self):
        return {}


class SD1Tokenizer:
    def __init__(self, embedding_directory=None, tokenizer_data={}, clip_name="l",
                 tokenizer=SDTokenizer, name=None):
        if name is not None:
            self.clip_name = name
            self.clip = "{}".format(self.clip_name)
        else:
            self.clip_name = clip_name
            self.clip = "clip_{}".format(self.clip_name)
        tokenizer = tokenizer_data.get("{}_tokenizer_class".format(self.clip), tokenizer)
        setattr(self, self.clip, tokenizer(embedding_directory=embedding_directory,
                                           tokenizer_data=tokenizer_data))

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        return {self.clip_name: getattr(self, self.clip).tokenize_with_weights(
            text, return_word_ids, **kwargs)}

    def untokenize(self, token_weight_pair):
        return getattr(self, self.clip).untokenize(token_weight_pair)

    def state_dict(self):
        return getattr(self, self.clip).state_dict()


class SD1CheckpointClipModel(SDClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(device=device, return_projected_pooled=False, dtype=dtype,
                         model_options=model_options)


class SD1ClipModel(torch.nn.Module):
    def __init__(self, device="cpu", dtype=None, model_options={}, clip_name="l",
                 clip_model=SD1CheckpointClipModel, name=None, **kwargs):
        super().__init__()
        if name is not None:
            self.clip_name = name
            self.clip = "{}".format(self.clip_name)
        else:
            self.clip_name = clip_name
            self.clip = "clip_{}".format(self.clip_name)
        clip_model = model_options.get("{}_class".format(self.clip), clip_model)
        model_options = {**model_options, "model_name": self.clip}
        setattr(self, self.clip, clip_model(device=device, dtype=dtype,
                                            model_options=model_options, **kwargs))
        self.dtypes = set()
        if dtype is not None:
            self.dtypes.add(dtype)

    def set_clip_options(self, options):
        getattr(self, self.clip).set_clip_options(options)

    def reset_clip_options(self):
        getattr(self, self.clip).reset_clip_options()

    def encode_token_weights(self, token_weight_pairs):
        token_weight_pairs = token_weight_pairs[self.clip_name]
        return getattr(self, self.clip).encode_token_weights(token_weight_pairs)

    def load_sd(self, sd):
        return getattr(self, self.clip).load_sd(sd)
