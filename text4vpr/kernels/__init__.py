"""Search kernels: group-similarity top-k over a database of view groups; `topk.group_topk` runs
the torch path on CPU and the fused Triton kernel (`group_topk_triton.py`) on CUDA tensors."""

MODES = ("upstream", "cosine", "any-heading")  # defined in common.py; here to be read without torch
