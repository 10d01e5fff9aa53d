"""repa_fast: fast, faithful REPA / ERW training of SiT diffusion transformers."""

__version__ = "0.1.0"
