"""Stage two: the unified MLLM (Llama + UniTok codes). `import mllm` registers the model with transformers."""
from mllm.modeling import IMAGE_TOKEN_INDEX, UniMLLMConfig, UniMLLMForCausalLM

__all__ = ["IMAGE_TOKEN_INDEX", "UniMLLMConfig", "UniMLLMForCausalLM"]
