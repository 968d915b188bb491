"""Test-only ComfyUI nodes (linked into the test server's custom_nodes, never shipped): they feed fixed
tensors from a safetensors file in the input folder into a graph, so one conditioning and one latent can
be run through the native and our model alike, without a text encoder of the real size."""

import os

import folder_paths
from safetensors.torch import load_file


def _read(file: str) -> dict:
    return load_file(os.path.join(folder_paths.get_input_directory(), file))


class ZImageTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"file": ("STRING", {"default": ""}), "key": ("STRING", {"default": "positive"})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, file, key):
        return ([[_read(file)[key], {"pooled_output": None}]],)


class ZImageTestLatent:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"file": ("STRING", {"default": ""}), "mask": ("BOOLEAN", {"default": False})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, file, mask):
        t = _read(file)
        out = {"samples": t["samples"]}
        if mask:
            out["noise_mask"] = t["noise_mask"]
        return (out,)


NODE_CLASS_MAPPINGS = {"ZImageTestConditioning": ZImageTestConditioning, "ZImageTestLatent": ZImageTestLatent}
