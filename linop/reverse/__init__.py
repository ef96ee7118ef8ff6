"""Feature-level reverse propagation (seed 001 §3): embedding, reverse steps, the walk."""
from .embed import EMBEDDINGS, embed
from .walk import Reconstruction, StepReport, reconstruct, resolve_to_layer

__all__ = ["embed", "EMBEDDINGS", "reconstruct", "resolve_to_layer", "Reconstruction", "StepReport"]
