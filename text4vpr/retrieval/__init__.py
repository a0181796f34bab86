"""Retrieval: index of database vectors, sharded search, the published metric, evaluation and reports."""
