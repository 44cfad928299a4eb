"""Weights in and out, safetensors only: fine-tuned checkpoints, pretrained encoders, and the one explicit pickle conversion."""
