"""Search kernels: group-similarity top-k over a database of view groups.

`group_topk` (in `topk.py`) is the entry point; it runs the torch reference path on CPU
and the fused Triton kernel (`group_topk_triton.py`) on CUDA tensors.
"""
