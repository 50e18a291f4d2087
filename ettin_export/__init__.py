"""ettin-export: ModernBERT (Ettin) rerankers to packed, unpadded, parity-checked artifacts."""

__version__ = "0.1.0"
