#!/usr/bin/python3
"""An independent Flux.1 forward pass in python3-torch, written from
the description in docs/models.md, "Flux as ComfyUI computes it" (not from our C++), used as the
oracle for fleet-run-local. It computes in float64 by default; only the timestep sinusoid is
formed in float32, exactly as ComfyUI does (docs/models.md, "Precision: what a reference must
copy").

Its safetensors I/O lives in safetensors_io.py (re-exported here).

    python3 flux_reference.py MODEL INPUTS OUT [--dtype float64|float32]
"""
import json
import math
import sys

import torch
import torch.nn.functional as F

from safetensors_io import load_safetensors, save_safetensors  # noqa: F401 (re-exported)


# ---------------------------------------------------------------------------------------------
# Building blocks, each from its description in docs/models.md ("Flux as ComfyUI computes it").

def layer_norm(x, eps=1e-6):
    """LayerNorm over the last axis without affine parameters."""
    mu = x.mean(dim=-1, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def rms_norm(x, gain, eps=1e-6):
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * gain


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x):
    return x * torch.sigmoid(x)


def dense(x, w, b):
    return x @ w.t() + b if b is not None else x @ w.t()


def sinusoid_f32(scaled):
    """256-dim embedding of an already x1000-scaled value: cosines then sines, float32."""
    k = torch.arange(128, dtype=torch.float32)
    freqs = torch.exp(-math.log(10000.0) * k / 128)
    angles = scaled.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_angles(length_txt, hp, wp, axes, theta):
    """Angles [T, sum(axes)/2] (float64) for ids: text (0,0,0), image token (r, c) -> (0, r, c)."""
    rows = [0] * length_txt + [r for r in range(hp) for _ in range(wp)]
    cols = [0] * length_txt + [c for _ in range(hp) for c in range(wp)]
    ids = torch.tensor([[0.0] * len(rows), rows, cols], dtype=torch.float64)  # [3, T]
    parts = []
    for a, dim in enumerate(axes):
        j = torch.arange(dim // 2, dtype=torch.float64)
        omega = theta ** (-2.0 * j / dim)
        parts.append(ids[a][:, None] * omega[None, :])
    return torch.cat(parts, dim=1)


def rotate_pairs(x, cos, sin):
    """x [B, H, T, d]: rotate (x[2i], x[2i+1]) by the angle whose cos/sin are [T, d/2]."""
    even, odd = x[..., 0::2], x[..., 1::2]
    r0 = cos * even - sin * odd
    r1 = sin * even + cos * odd
    return torch.stack([r0, r1], dim=-1).flatten(-2)


class FluxReference:
    def __init__(self, weights, metadata=None, dtype=torch.float64):
        prefix = "model.diffusion_model." if any(
            k.startswith("model.diffusion_model.") for k in weights) else ""
        self.w = {k[len(prefix):]: v for k, v in weights.items()}
        self.dtype = dtype
        w = self.w
        self.hidden = w["img_in.weight"].shape[0]
        self.head = w["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
        self.heads = self.hidden // self.head
        self.depth = len({k.split(".")[1] for k in w if k.startswith("double_blocks.")})
        self.depth_single = len({k.split(".")[1] for k in w if k.startswith("single_blocks.")})
        self.vec_in = w["vector_in.in_layer.weight"].shape[1]
        self.guidance_embed = "guidance_in.in_layer.weight" in w
        self.channels = w["img_in.weight"].shape[1] // 4
        # The file's `config` metadata holds ComfyUI's Flux keyword arguments; files written
        # before it existed carry only `fleet.axes_dim`.
        metadata = metadata or {}
        config = json.loads(metadata.get("config", "{}"))
        self.axes = config.get("axes_dim") or json.loads(metadata.get("fleet.axes_dim",
                                                                      "[16, 56, 56]"))
        self.theta = float(config.get("theta", 10000.0))

    def p(self, name):
        return self.w[name].to(self.dtype)

    def mlp_embedder(self, name, x):
        h = silu(dense(x, self.p(name + ".in_layer.weight"), self.p(name + ".in_layer.bias")))
        return dense(h, self.p(name + ".out_layer.weight"), self.p(name + ".out_layer.bias"))

    def qkv_heads(self, qkv, norm_prefix):
        b, t, _ = qkv.shape
        q, k, v = qkv.reshape(b, t, 3, self.heads, self.head).permute(2, 0, 3, 1, 4)
        q = rms_norm(q, self.p(norm_prefix + "query_norm.scale"))
        k = rms_norm(k, self.p(norm_prefix + "key_norm.scale"))
        return q, k, v

    def attend(self, q, k, v, cos, sin):
        q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
        scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(self.head)
        out = torch.einsum("bhij,bhjd->bhid", torch.softmax(scores, dim=-1), v)
        b, h, t, d = out.shape
        return out.transpose(1, 2).reshape(b, t, h * d)

    def forward(self, x, timestep, context, y, guidance=None, guidance_dtype=None):
        """Returns (out, {"<block>/<name>": tensor}) with the same trace names as the C++.

        guidance_dtype: the dtype 1000*guidance is formed in (the model dtype in ComfyUI: bf16
        for a bf16 model); default float32."""
        dt = self.dtype
        bsz, _, h, w = x.shape
        trace = {}
        # 1. Patchify after circular padding on the bottom/right.
        ph, pw = h % 2, w % 2
        xp = F.pad(x.to(dt), (0, pw, 0, ph), mode="circular") if (ph or pw) else x.to(dt)
        hp, wp = (h + ph) // 2, (w + pw) // 2
        img = F.unfold(xp, kernel_size=2, stride=2).transpose(1, 2)  # [B, N, C*4] (c, r, col)
        img = dense(img, self.p("img_in.weight"), self.p("img_in.bias"))
        # 4. Timestep vector (1000 t in float32), guidance, pooled text vector.
        t_emb = sinusoid_f32(timestep.to(torch.float32) * 1000.0).to(dt)
        vec = self.mlp_embedder("time_in", t_emb)
        if self.guidance_embed and guidance is not None:
            gdt = guidance_dtype or torch.float32
            g_scaled = guidance.to(gdt) * 1000.0
            vec = vec + self.mlp_embedder("guidance_in", sinusoid_f32(g_scaled).to(dt))
        vec = vec + self.mlp_embedder("vector_in", y[:, :self.vec_in].to(dt))
        # 5. Text.
        txt = dense(context.to(dt), self.p("txt_in.weight"), self.p("txt_in.bias"))
        n_txt = txt.shape[1]
        ang = rope_angles(n_txt, hp, wp, self.axes, self.theta)
        cos, sin = torch.cos(ang).to(dt), torch.sin(ang).to(dt)
        trace.update({"stem/img": img, "stem/txt": txt, "stem/vec": vec})

        def mods(name, count):
            m = dense(silu(vec), self.p(name + ".weight"), self.p(name + ".bias"))
            return [c[:, None, :] for c in m.chunk(count, dim=-1)]

        # 7. Double-stream blocks.
        for i in range(self.depth):
            pre = f"double_blocks.{i}."
            streams = {}
            for s, val in (("img", img), ("txt", txt)):
                m = mods(pre + s + "_mod.lin", 6)
                qkv_in = layer_norm(val) * (1 + m[1]) + m[0]
                qkv = dense(qkv_in, self.p(pre + s + "_attn.qkv.weight"),
                            self.p(pre + s + "_attn.qkv.bias"))
                streams[s] = (m, self.qkv_heads(qkv, pre + s + "_attn.norm."))
            q = torch.cat([streams["txt"][1][0], streams["img"][1][0]], dim=2)
            k = torch.cat([streams["txt"][1][1], streams["img"][1][1]], dim=2)
            v = torch.cat([streams["txt"][1][2], streams["img"][1][2]], dim=2)
            att = self.attend(q, k, v, cos, sin)
            parts = {"txt": att[:, :n_txt], "img": att[:, n_txt:]}
            new = {}
            for s, val in (("img", img), ("txt", txt)):
                m = streams[s][0]
                val = val + m[2] * dense(parts[s], self.p(pre + s + "_attn.proj.weight"),
                                         self.p(pre + s + "_attn.proj.bias"))
                hid = gelu_tanh(dense(layer_norm(val) * (1 + m[4]) + m[3],
                                      self.p(pre + s + "_mlp.0.weight"),
                                      self.p(pre + s + "_mlp.0.bias")))
                val = val + m[5] * dense(hid, self.p(pre + s + "_mlp.2.weight"),
                                         self.p(pre + s + "_mlp.2.bias"))
                new[s] = val
            img, txt = new["img"], new["txt"]
            trace.update({f"double_blocks.{i}/img": img, f"double_blocks.{i}/txt": txt})
        # Single-stream blocks over text-then-image tokens.
        seq = torch.cat([txt, img], dim=1)
        for i in range(self.depth_single):
            pre = f"single_blocks.{i}."
            shift, scale, gate = mods(pre + "modulation.lin", 3)
            lin1 = dense(layer_norm(seq) * (1 + scale) + shift, self.p(pre + "linear1.weight"),
                         self.p(pre + "linear1.bias"))
            qkv, mlp = lin1[..., :3 * self.hidden], lin1[..., 3 * self.hidden:]
            q, k, v = self.qkv_heads(qkv, pre + "norm.")
            att = self.attend(q, k, v, cos, sin)
            seq = seq + gate * dense(torch.cat([att, gelu_tanh(mlp)], dim=-1),
                                     self.p(pre + "linear2.weight"), self.p(pre + "linear2.bias"))
            trace[f"single_blocks.{i}/hidden"] = seq
        img = seq[:, n_txt:]
        # Final layer: (shift, scale), LN, linear, unpatchify, crop.
        shift, scale = mods("final_layer.adaLN_modulation.1", 2)
        out = dense(layer_norm(img) * (1 + scale) + shift, self.p("final_layer.linear.weight"),
                    self.p("final_layer.linear.bias"))  # [B, N, C*4]
        out = F.fold(out.transpose(1, 2), output_size=(hp * 2, wp * 2), kernel_size=2, stride=2)
        out = out[:, :, :h, :w]
        trace["final_layer/out"] = out
        return out, trace


def run_reference(model_path, inputs_path, dtype=torch.float64, guidance_dtype=None):
    weights, meta = load_safetensors(model_path)
    inputs, _ = load_safetensors(inputs_path)
    ref = FluxReference(weights, meta, dtype)
    if guidance_dtype is None and "guidance" in inputs:
        # ComfyUI forms 1000*guidance in the dtype the guidance arrives in (the model dtype).
        guidance_dtype = inputs["guidance"].dtype
    return ref.forward(inputs["x"], inputs["timestep"], inputs["context"], inputs["y"],
                       inputs.get("guidance"), guidance_dtype=guidance_dtype)


def main(argv):
    if len(argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    dtype = torch.float64
    if "--dtype" in argv:
        dtype = {"float64": torch.float64, "float32": torch.float32}[argv[argv.index("--dtype") + 1]]
    out, _ = run_reference(argv[1], argv[2], dtype)
    save_safetensors({"out": out.to(torch.float32)}, argv[3])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
