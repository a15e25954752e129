"""loramix: many LoRA experts behind one model, mixed by a learned router.

The Ray-free core. ``pipelines``, ``actors``, ``serve_app`` and ``tune_spaces`` build on it.
"""

from loramix.experts import Expert, ExpertBank
from loramix.layers import MixtureLinear
from loramix.model import MixtureModel
from loramix.routers import ROUTERS, BlockGate, Router, SequenceRouter, TokenRouter, topk_gates

__all__ = [
    "ROUTERS",
    "BlockGate",
    "Expert",
    "ExpertBank",
    "MixtureLinear",
    "MixtureModel",
    "Router",
    "SequenceRouter",
    "TokenRouter",
    "topk_gates",
]
__version__ = "0.1.0"
