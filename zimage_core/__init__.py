"""Z-Image (Tongyi-MAI's S3-DiT) in plain PyTorch: transformer, Qwen3 prompt encoder, FLUX autoencoder,
flow-matching sampler and offloading. Never imports ComfyUI; the ComfyUI nodes in ``nodes/`` wrap it.

Public API (see README): ``load_transformer``, ``load_text_encoder``, ``load_autoencoder``, ``sample``,
``sigmas``, ``comfy_noise``, ``ZImagePipeline``.
"""

from .autoencoder import AutoEncoder, from_model_space, load_autoencoder, to_model_space
from .blocks import BlockCall, BlockRun
from .errors import ZImageError, ZImageInterrupted
from .noise import comfy_noise
from .pipeline import GenerationSettings, ZImagePipeline, find_weights
from .sampler import Step, sample
from .schedule import PRESETS, sigmas, start_index
from .text_encoder import Qwen3PromptEncoder, load_text_encoder
from .transformer import ZImageConfig, ZImageTransformer
from .transformer_files import load_transformer

__all__ = [
    "AutoEncoder", "BlockCall", "BlockRun", "GenerationSettings", "PRESETS", "Qwen3PromptEncoder", "Step", "ZImageConfig", "ZImageError",
    "ZImageInterrupted", "ZImagePipeline", "ZImageTransformer", "comfy_noise", "find_weights", "from_model_space",
    "load_autoencoder", "load_text_encoder", "load_transformer", "sample", "sigmas", "start_index", "to_model_space",
]
__version__ = "0.1.0"
