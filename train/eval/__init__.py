"""Evaluation of pretrained encoders (k-NN, linear probe) and export to timm."""
