"""`python -m mllm.evaluate --task ...` (see mllm/evaluate/__init__.py)."""
import sys

from mllm.evaluate.cli import main

sys.exit(main())
