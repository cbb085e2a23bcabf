"""Models: plain torch modules that know nothing of Flower or of federation.

``build_model(spec, variant)`` is the only constructor both sides call, seeded
so that the server's initial shared tensors and every site's initial personal
tensors come from the same draw.
"""

from models.spec import ModelSpec, build_model, fill, VARIANTS

__all__ = ["ModelSpec", "build_model", "fill", "VARIANTS"]
