"""Frozen teachers for the teacher-target methods (MaPeT, D-iGPT): CLIP-like image towers loaded from
local weights (`clip.py`), the k-CLIP tokenizer (`tokenizer.py`) with its k-means codebook (`kmeans.py`,
fitted by `codebook.py`) and the export of a pretrained encoder as a teacher file (`export.py`)."""
