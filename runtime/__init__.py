"""Shared training runtime for both stages: distributed setup, checkpoints, logging, DeepSpeed configs."""
