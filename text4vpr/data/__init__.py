"""Data layer: Street360Loc ingestion, synthetic data, WebDataset shards and loader."""
