"""clipground: visual grounding (referring expression comprehension) with CLIP-family models.

>>> import clipground
>>> g = clipground.load("zero-shot", backbone="clipground/world-clip")
>>> pred = g("scene.png", "the red circle")
>>> pred.box, pred.score
"""

from .errors import ClipgroundError
from .grounder import Grounder, Prediction, load
from .methods import METHODS

__version__ = "0.1.0"


def list_methods() -> list[str]:
    """Names of the registered grounding methods."""
    return sorted(METHODS)


__all__ = ["Grounder", "Prediction", "load", "list_methods", "ClipgroundError", "__version__"]
