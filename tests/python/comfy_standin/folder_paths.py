"""Stand-in for ComfyUI's folder_paths.py: model folders by kind.

Upstream: folder_paths.py (folder_names_and_paths, get_filename_list, get_full_path,
get_full_path_or_raise, get_folder_paths). Tests point folder_names_and_paths["diffusion_models"]
(and "loras", which LoraLoader reads, and "text_encoders", which the CLIP loaders read) at a
temp folder.
"""

import os

# As ComfyUI: supported_pt_extensions, no .gguf.
supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}

folder_names_and_paths = {"diffusion_models": ([], supported_pt_extensions),
                          "loras": ([], supported_pt_extensions),
                          "text_encoders": ([], supported_pt_extensions),
                          "embeddings": ([], supported_pt_extensions)}


def get_folder_paths(folder_name):
    return folder_names_and_paths[folder_name][0][:]


def get_filename_list(folder_name):
    paths, exts = folder_names_and_paths[folder_name]
    out = []
    for base in paths:
        for root, _, files in os.walk(base):
            for f in files:
                if os.path.splitext(f)[1] in exts:
                    out.append(os.path.relpath(os.path.join(root, f), base))
    return sorted(out)


def get_full_path(folder_name, filename):
    paths, _ = folder_names_and_paths.get(folder_name, ([], None))
    filename = os.path.relpath(os.path.join("/", filename), "/")
    for base in paths:
        full = os.path.join(base, filename)
        if os.path.isfile(full):
            return full
    return None


def get_full_path_or_raise(folder_name, filename):
    full_path = get_full_path(folder_name, filename)
    if full_path is None:
        raise FileNotFoundError("Model in folder '{}' with filename '{}' not found.".format(
            folder_name, filename))
    return full_path
