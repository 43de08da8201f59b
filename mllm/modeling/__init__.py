"""The unified MLLM as a registered transformers model (`model_type = "unitok_mllm"`)."""
from runtime.requirements import require

require("torch", "transformers")  # before transformers is imported: it ignores a torch below 2.6

from transformers import AutoConfig, AutoModelForCausalLM

from mllm.modeling.configuration import IMAGE_TOKEN_INDEX, UniMLLMConfig
from mllm.modeling.modeling import UniMLLMForCausalLM, default_attn_implementation

AutoConfig.register(UniMLLMConfig.model_type, UniMLLMConfig, exist_ok=True)
AutoModelForCausalLM.register(UniMLLMConfig, UniMLLMForCausalLM, exist_ok=True)

__all__ = ["IMAGE_TOKEN_INDEX", "UniMLLMConfig", "UniMLLMForCausalLM", "default_attn_implementation"]
