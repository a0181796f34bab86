"""Dataset constants shared by the readers, the loader and retrieval."""

NUM_VIEWS = 4  # Street360Loc: four views (pos 1..4) per location
