"""Encoder (timm ViT over token subsets), decoders and masking helpers shared by the methods."""
