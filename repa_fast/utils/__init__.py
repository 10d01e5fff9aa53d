"""Small helpers shared across repa_fast (file readers); no heavy imports here."""
