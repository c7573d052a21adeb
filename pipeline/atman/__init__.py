"""AtMan: attention-manipulation explanations for causal LMs (Deiseroth et al., NeurIPS 2023).

The method only: torch + transformers, no Ray, no file I/O.
"""

from pipeline.atman.attention import UnsupportedModelError
from pipeline.atman.config import AtManConfig
from pipeline.atman.explainer import Explainer
from pipeline.atman.explanation import Explanation

__all__ = ["AtManConfig", "Explainer", "Explanation", "UnsupportedModelError"]
