"""The synthetic-data makers: random text (text.py), random-weights checkpoints of the exact Ettin
configs or tiny ones (checkpoints.py), and benchmark pairs of exact token lengths (lengths.py)."""
