"""Evaluation: ADM-exact FID/sFID/IS/Precision/Recall in PyTorch, CKNNA and linear probes.

Modules are imported on use (``repa_fast.eval.fid``, ``repa_fast.eval.inception``, ...): SciPy and matplotlib are
optional (``pip install 'repa_fast[eval]'``) and this package never imports them at import time.
"""
