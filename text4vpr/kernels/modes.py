"""The similarity modes' names (defined in `common.py`), importable without torch."""

MODES = ("upstream", "cosine", "any-heading")
