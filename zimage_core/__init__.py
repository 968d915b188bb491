"""Z-Image (Tongyi-MAI's S3-DiT) in plain PyTorch: transformer, Qwen3 prompt encoder, FLUX autoencoder,
flow-matching sampler and offloading. Never imports ComfyUI; the ComfyUI nodes in ``nodes/`` wrap it.

Public API (see README): ``load_transformer``, ``load_text_encoder``, ``load_autoencoder``, ``generate``.
"""

from .errors import ZImageError
from .text_encoder import Qwen3PromptEncoder, load_text_encoder
from .transformer import ZImageConfig, ZImageTransformer
from .transformer_files import load_transformer

__all__ = ["ZImageError", "ZImageConfig", "ZImageTransformer", "load_transformer", "Qwen3PromptEncoder", "load_text_encoder"]
__version__ = "0.1.0"
