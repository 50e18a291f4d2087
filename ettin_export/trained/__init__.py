"""A trained ModernBERT cross-encoder made offline: stdlib docstrings, distilled from packaged all-MiniLM-L6-v2."""
