"""Reusable layers: attention with KV cache, positions (RoPE, relative), transformer blocks and XL memory."""
