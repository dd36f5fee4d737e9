"""vlm: a small vision-language model — a from-scratch SigLIP encoder, a projector and a pretrained causal LM."""

from vlm.siglip import SiglipVisionConfig, SiglipVisionEncoder, SiglipVisionOutput
from vlm.siglip_model import SiglipConfig, SiglipModel, SiglipOutput, retrieval_recall
from vlm.siglip_text import SiglipTextConfig, SiglipTextEncoder, SiglipTextOutput
from vlm.weights import CheckpointError

__all__ = [
    "CheckpointError",
    "SiglipConfig",
    "SiglipModel",
    "SiglipOutput",
    "SiglipTextConfig",
    "SiglipTextEncoder",
    "SiglipTextOutput",
    "SiglipVisionConfig",
    "SiglipVisionEncoder",
    "SiglipVisionOutput",
    "retrieval_recall",
]
__version__ = "0.1.0"
