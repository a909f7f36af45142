"""Frozen teachers for the teacher-target methods (MaPeT, D-iGPT): CLIP-like image towers loaded from
local weights (`clip.py`), the k-CLIP tokenizer's k-means codebook (`kmeans.py`, `codebook.py`) and the
export of a pretrained encoder as a teacher file (`export.py`)."""
