"""Loss defaults, one source for `text4vpr.losses` and the run config (`loss.*`), read without torch."""

DEFAULT_BLOCK = 4096  # tile side of the tiled loss; rows per chunk of the plain loss's backward
MAX_SCALE = 100.0  # a learnable 1/temperature is clamped to this after each optimizer step
