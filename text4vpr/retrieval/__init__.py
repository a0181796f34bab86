"""Retrieval: index of database vectors, sharded search, SPEC metrics, evaluation and reports."""
