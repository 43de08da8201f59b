"""`UniMLLMConfig`: a LlamaConfig plus the visual embedder and depth-head shapes.

The release hard-codes these shapes; here they live in config.json so any Llama size and any
tokenizer size work. Defaults reproduce the released Llama-2-7B model (REFERENCE.md 6-7).
"""
from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

IMAGE_TOKEN_INDEX = -200  # placeholder id for one image in templated token lists (expanded to h*w positions)


@strict
class UniMLLMConfig(LlamaConfig):
    """Llama backbone + UniTok visual embedder + depth head."""

    model_type = "unitok_mllm"

    num_codebooks: int = 8
    """K: sub-codes per image position (tokenizer's num_codebooks)."""
    codebook_size: int = 4096
    """Entries per sub-codebook."""
    code_dim: int = 8
    """Width of one sub-code vector; the embedder input is num_codebooks * code_dim (64)."""
    embed_width: int = 1024
    """Output width of the causal attention projection (the tokenizer's token width)."""
    embed_num_heads: int = 16
    """Heads of the causal attention projection."""
    depth_num_layers: int = 3
    """Layers of the depth head (3 in the release)."""
    depth_hidden_size: int | None = None
    """Depth-head width; None = hidden_size (the release). Another width adds an input projection."""
    depth_num_heads: int | None = None
    """Depth-head attention heads; None = num_attention_heads."""
    depth_num_key_value_heads: int | None = None
    """Depth-head key/value heads (grouped-query attention when fewer than depth_num_heads); None =
    depth_num_heads (plain multi-head, as released). A model built on a base checkpoint follows the base's
    layout (mllm.modeling.base)."""
    depth_intermediate_size: int | None = None
    """Depth-head MLP width; None = intermediate_size."""
    boi_token_id: int = 3
    """Image-start token: the release's Llama-2 byte piece <0x00>; a model built from a base checkpoint
    records its text tokenizer's (`mllm.data.templates.image_marker_ids`)."""
    eoi_token_id: int = 4
    """Image-end token (<0x01> as released; see boi_token_id)."""
    z_loss_weight: float = 5e-5
    """Weight of mean(max image logit^2), the release's z-loss variant."""
    image_size: int | None = None
    """Pixel side of the images whose codes the model was trained on (grid = image_size / 16), recorded
    by mllm.train from the code shards' manifests; chat and eval refuse another size. None: unknown
    (the released model used 256)."""

    def __post_init__(self, **kwargs):
        if self.depth_hidden_size is None:
            self.depth_hidden_size = self.hidden_size
        if self.depth_num_heads is None:
            self.depth_num_heads = self.num_attention_heads
        if self.depth_num_key_value_heads is None:
            self.depth_num_key_value_heads = self.depth_num_heads
        if self.depth_intermediate_size is None:
            self.depth_intermediate_size = self.intermediate_size
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Checked by transformers' strict dataclass validation."""
        super().validate_architecture()
        for name in ("num_codebooks", "codebook_size", "code_dim", "embed_width", "embed_num_heads",
                     "depth_num_layers", "depth_hidden_size", "depth_num_heads", "depth_num_key_value_heads",
                     "depth_intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.image_size is not None and (self.image_size <= 0 or self.image_size % 16):
            raise ValueError(f"image_size must be a positive multiple of 16, got {self.image_size}")
        if self.embed_width % self.embed_num_heads:
            raise ValueError("embed_width must be divisible by embed_num_heads")
        if self.depth_hidden_size % self.depth_num_heads:
            raise ValueError("depth_hidden_size must be divisible by depth_num_heads")
        if self.depth_num_heads % self.depth_num_key_value_heads:
            raise ValueError(f"depth_num_heads ({self.depth_num_heads}) must be divisible by depth_num_key_value_heads "
                             f"({self.depth_num_key_value_heads})")
        if (self.depth_hidden_size // self.depth_num_heads) % 2:
            raise ValueError("depth-head head_dim must be even (RoPE)")

    @property
    def latent_dim(self) -> int:
        """Width of the concatenated code vectors (64 at release)."""
        return self.num_codebooks * self.code_dim
