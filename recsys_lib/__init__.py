"""recsys_lib: the computing half of the MovieLens two-stage recommender study.

Notebooks in ``notebooks/`` narrate and call; this package downloads and loads data,
splits it under docs/PROTOCOL.md, builds features, fits models and evaluates them.
"""

__version__ = "0.1.0"
