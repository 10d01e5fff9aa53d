"""Offline writers: ``preprocess`` (images -> VAE latents in the reference or packed layout), ``pack`` (reference layout
-> packed arrays) and ``cache_targets`` (the frozen encoders' targets, once per image). Training never imports them;
it reads their output through ``repa_fast.data`` (docs/data.md)."""
