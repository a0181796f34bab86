"""Text4VPR: locate a street place from four text descriptions.

Library layout: `data/` (ingestion, shards, loader), `models/` (encoders), `losses.py`,
`kernels/` (Triton + torch search kernels), `retrieval/` (index, search, metrics).
The trainer (`text4vpr.train`) and CLI (`text4vpr.cli`) sit on top and are never imported
by the library.
"""

__version__ = "0.1.0"
