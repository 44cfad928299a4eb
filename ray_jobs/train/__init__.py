"""Decoded clips -> a fine-tuned model: the Ray Train worker loop and the cache of decoded clips its epochs read."""
