"""An independent float64 reference of the text encoders Tensorfleet runs, written from ComfyUI's
comfy/clip_model.py and comfy/text_encoders/t5.py as docs/models.md describes them: CLIP text
models (CLIP-L, CLIP-G), T5 v1.1 encoders (T5-XXL) and UMT5 encoders (UMT5-XXL). It shares no
code with the C++ blocks. Only T5's relative position buckets are formed in float32, because
their definition is that float32 arithmetic (a float64 log can move a distance to the next
bucket).

Also: random-weight models with the real key names at any width (`clip_weights`,
`t5_weights`)."""

import math

import torch

F64 = torch.float64
NEG = -torch.finfo(torch.float32).max  # ComfyUI's masks are float32 activations' -max


# ---- random weights with the real key names ----

def _rand(gen, shape, kind):
    r = torch.randn(shape, generator=gen, dtype=torch.float32)
    if kind == "w":
        return r / math.sqrt(shape[-1])
    if kind == "b":
        return r * 0.02
    if kind == "g":
        return 1.0 + 0.1 * r
    if kind == "e":
        return r * 0.5
    return r * 0.1


def clip_weights(*, dim=64, ffn=128, layers=3, vocab=1000, positions=77, projection=True,
                 seed=0):
    """A random CLIP text model with clip_l.safetensors' key names (text_model.*,
    text_projection.weight)."""
    gen = torch.Generator().manual_seed(seed)
    specs = [("text_model.embeddings.token_embedding.weight", (vocab, dim), "e"),
             ("text_model.embeddings.position_embedding.weight", (positions, dim), "e")]
    for i in range(layers):
        p = "text_model.encoder.layers.%d." % i
        for n in ("layer_norm1", "layer_norm2"):
            specs += [(p + n + ".weight", (dim,), "g"), (p + n + ".bias", (dim,), "n")]
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs += [(p + "self_attn.%s.weight" % n, (dim, dim), "w"),
                      (p + "self_attn.%s.bias" % n, (dim,), "b")]
        specs += [(p + "mlp.fc1.weight", (ffn, dim), "w"), (p + "mlp.fc1.bias", (ffn,), "b"),
                  (p + "mlp.fc2.weight", (dim, ffn), "w"), (p + "mlp.fc2.bias", (dim,), "b")]
    specs += [("text_model.final_layer_norm.weight", (dim,), "g"),
              ("text_model.final_layer_norm.bias", (dim,), "n")]
    if projection:
        specs.append(("text_projection.weight", (dim, dim), "w"))
    return {n: _rand(gen, s, k) for n, s, k in specs}


def t5_weights(*, umt5=False, dim=64, heads=4, head_dim=16, ffn=96, layers=3, vocab=500,
               gated=True, seed=0):
    """A random T5 v1.1 (umt5=False) or UMT5 encoder with t5xxl / umt5_xxl files' key names
    (shared.weight, encoder.block.N.layer.{0,1}.*, encoder.final_layer_norm.weight).

    T5 does not scale its attention logits, so q and the residual projections (o, wo) are
    halved: logits and the residual stream stay O(1), where float32's own rounding (which
    unscaled logits amplify) stays well under the tests' 2e-5."""
    gen = torch.Generator().manual_seed(seed)
    inner = heads * head_dim
    specs = [("shared.weight", (vocab, dim), "e")]
    for i in range(layers):
        p = "encoder.block.%d.layer." % i
        for n in ("q", "k", "v"):
            specs.append((p + "0.SelfAttention.%s.weight" % n, (inner, dim), "w"))
        specs.append((p + "0.SelfAttention.o.weight", (dim, inner), "w"))
        if umt5 or i == 0:
            specs.append((p + "0.SelfAttention.relative_attention_bias.weight", (32, heads), "e"))
        specs.append((p + "0.layer_norm.weight", (dim,), "g"))
        if gated:
            specs += [(p + "1.DenseReluDense.wi_0.weight", (ffn, dim), "w"),
                      (p + "1.DenseReluDense.wi_1.weight", (ffn, dim), "w")]
        else:
            specs.append((p + "1.DenseReluDense.wi.weight", (ffn, dim), "w"))
        specs += [(p + "1.DenseReluDense.wo.weight", (dim, ffn), "w"),
                  (p + "1.layer_norm.weight", (dim,), "g")]
    specs.append(("encoder.final_layer_norm.weight", (dim,), "g"))
    out = {n: _rand(gen, s, k) for n, s, k in specs}
    for n in out:
        if n.endswith((".SelfAttention.q.weight", ".SelfAttention.o.weight", ".wo.weight")):
            out[n] = out[n] * 0.5
    return out


_LLAMA_CPP_T5 = [  # ComfyUI-GGUF's T5_SD_MAP read backwards: our names -> llama.cpp's
    ("encoder.final_layer_norm", "enc.output_norm"), ("shared", "token_embd"),
    ("layer.0.SelfAttention.relative_attention_bias", "attn_rel_b"),
    ("layer.0.SelfAttention.q", "attn_q"), ("layer.0.SelfAttention.k", "attn_k"),
    ("layer.0.SelfAttention.v", "attn_v"), ("layer.0.SelfAttention.o", "attn_o"),
    ("layer.0.layer_norm", "attn_norm"), ("layer.1.DenseReluDense.wi_1", "ffn_up"),
    ("layer.1.DenseReluDense.wo", "ffn_down"), ("layer.1.DenseReluDense.wi_0", "ffn_gate"),
    ("layer.1.layer_norm", "ffn_norm"), ("encoder.block.", "enc.blk."),
]


def llama_cpp_name(name):
    """A T5 weight's name as llama.cpp's converter writes it ("enc.blk.0.attn_q.weight")."""
    for ours, theirs in _LLAMA_CPP_T5:
        name = name.replace(ours, theirs)
    return name


# ---- shared pieces ----

def _w(weights, name):
    return weights[name].to(F64)


def _linear(weights, name, x, bias=True):
    y = x @ _w(weights, name + ".weight").T
    if bias:
        y = y + _w(weights, name + ".bias")
    return y


def _attention(q, k, v, heads, mask):
    """softmax(q k^T / sqrt(d) + mask) v over heads; q, k, v [B, L, H*d]."""
    b, l, inner = q.shape
    d = inner // heads

    def split(t):
        return t.reshape(b, -1, heads, d).transpose(1, 2)

    s = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        s = s + mask
    return (torch.softmax(s, dim=-1) @ split(v)).transpose(1, 2).reshape(b, l, inner)


def _padding_mask(attention_mask):
    """[B, L] (1 = attend) -> additive [B, 1, L, L] (-float32 max on masked keys)."""
    b, l = attention_mask.shape
    m = (attention_mask.to(F64) == 0).reshape(b, 1, 1, l).expand(b, 1, l, l)
    return torch.where(m, torch.tensor(NEG, dtype=F64), torch.tensor(0.0, dtype=F64))


def _layer_index(layer, layers):
    if layer is None:
        return None
    return layers + layer if layer < 0 else layer


# ---- CLIP ----

def _layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _clip_act(x, act):
    if act == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if act == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def clip_forward(weights, tokens, *, heads, attention_mask=None, num_tokens=None, layer=None,
                 layer_norm_hidden_state=True, activation="quick_gelu", eos=49407, eps=1e-5):
    """CLIPTextModel as ComfyUI runs it. Returns (out, pooled, pooled_projected or None, hidden
    states after each layer)."""
    b, l = tokens.shape
    x = _w(weights, "text_model.embeddings.token_embedding.weight")[tokens]
    x = x + _w(weights, "text_model.embeddings.position_embedding.weight")[:l]
    causal = torch.triu(torch.full((l, l), NEG, dtype=F64), 1)
    mask = causal if attention_mask is None else _padding_mask(attention_mask) + causal
    layers = sum(1 for n in weights if n.endswith(".self_attn.q_proj.weight"))
    chosen = _layer_index(layer, layers)
    states, intermediate = [], None
    for i in range(layers):
        p = "text_model.encoder.layers.%d." % i
        h = _layer_norm(x, _w(weights, p + "layer_norm1.weight"), _w(weights, p + "layer_norm1.bias"), eps)
        q = _linear(weights, p + "self_attn.q_proj", h)
        k = _linear(weights, p + "self_attn.k_proj", h)
        v = _linear(weights, p + "self_attn.v_proj", h)
        x = x + _linear(weights, p + "self_attn.out_proj", _attention(q, k, v, heads, mask))
        h = _layer_norm(x, _w(weights, p + "layer_norm2.weight"), _w(weights, p + "layer_norm2.bias"), eps)
        x = x + _linear(weights, p + "mlp.fc2", _clip_act(_linear(weights, p + "mlp.fc1", h), activation))
        states.append(x)
        if i == chosen:
            intermediate = x

    def final(t):
        return _layer_norm(t, _w(weights, "text_model.final_layer_norm.weight"),
                           _w(weights, "text_model.final_layer_norm.bias"), eps)

    normed = final(x)
    if num_tokens is not None:
        index = torch.tensor(num_tokens) - 1
    else:
        index = (tokens == eos).int().argmax(dim=-1)
    pooled = normed[torch.arange(b), index]
    projected = None
    if "text_projection.weight" in weights:
        projected = pooled @ _w(weights, "text_projection.weight").T
    out = normed
    if intermediate is not None:
        out = final(intermediate) if layer_norm_hidden_state else intermediate
    return out, pooled, projected, states


# ---- T5 / UMT5 ----

def relative_buckets(length):
    """T5's bidirectional relative position buckets (32 buckets, max distance 128) [L, L], in
    ComfyUI's float32 arithmetic."""
    pos = torch.arange(length, dtype=torch.long)
    rel = pos[None, :] - pos[:, None]
    buckets = (rel > 0).long() * 16
    rel = rel.abs()
    large = 8 + (torch.log(rel.float() / 8) / math.log(128 / 8) * 8).long()
    large = torch.clamp(large, max=15)
    return buckets + torch.where(rel < 8, rel, large)


def _t5_norm(x, gain, eps=1e-6):
    return gain * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def t5_forward(weights, tokens, *, attention_mask=None, layer=None, layer_norm_hidden_state=True,
               activation=None):
    """The T5 / UMT5 encoder as ComfyUI runs it. Returns (out, hidden states after each
    block)."""
    b, l = tokens.shape
    x = _w(weights, "shared.weight")[tokens]
    mask = None if attention_mask is None else _padding_mask(attention_mask)
    layers = sum(1 for n in weights if n.endswith(".0.SelfAttention.q.weight"))
    heads = weights["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[1]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in weights
    act = activation or ("gelu_pytorch_tanh" if gated else "relu")
    chosen = _layer_index(layer, layers)
    buckets = relative_buckets(l)
    bias, states, intermediate = None, [], None
    for i in range(layers):
        p = "encoder.block.%d.layer." % i
        table = p + "0.SelfAttention.relative_attention_bias.weight"
        if table in weights:  # T5: block 0 only, then reused; UMT5: every block
            bias = _w(weights, table)[buckets].permute(2, 0, 1).unsqueeze(0)
        h = _t5_norm(x, _w(weights, p + "0.layer_norm.weight"))
        q = _linear(weights, p + "0.SelfAttention.q", h, bias=False)
        k = _linear(weights, p + "0.SelfAttention.k", h, bias=False)
        v = _linear(weights, p + "0.SelfAttention.v", h, bias=False)
        d = q.shape[-1] // heads
        m = bias if mask is None else mask + bias
        # No logit scaling in T5: multiply back what _attention divides by.
        x = x + _linear(weights, p + "0.SelfAttention.o",
                        _attention(q, k * math.sqrt(d), v, heads, m), bias=False)
        h = _t5_norm(x, _w(weights, p + "1.layer_norm.weight"))
        if gated:
            g = _linear(weights, p + "1.DenseReluDense.wi_0", h, bias=False)
            u = _linear(weights, p + "1.DenseReluDense.wi_1", h, bias=False)
            f = (_clip_act(g, act) if act != "relu" else torch.relu(g)) * u
        else:
            f = _linear(weights, p + "1.DenseReluDense.wi", h, bias=False)
            f = torch.relu(f) if act == "relu" else _clip_act(f, act)
        x = x + _linear(weights, p + "1.DenseReluDense.wo", f, bias=False)
        states.append(x)
        if i == chosen:
            intermediate = x
    gain = _w(weights, "encoder.final_layer_norm.weight")
    out = _t5_norm(x, gain)
    if intermediate is not None:
        out = _t5_norm(intermediate, gain) if layer_norm_hidden_state else intermediate
    return out, states
