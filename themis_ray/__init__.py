"""themis-ray: train, evaluate and serve LLM judges at scale on Ray."""

__version__ = "0.1.0"
