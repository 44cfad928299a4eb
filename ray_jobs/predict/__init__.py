"""Decoded clips -> labels: the prediction pipeline shared by infer and eval, and resolving --model into a model."""
