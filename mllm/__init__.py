"""Stage two: the unified MLLM (Llama + UniTok codes). Under construction; see the open issues."""
