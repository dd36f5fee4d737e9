"""vlm: a small vision-language model — a from-scratch SigLIP encoder, a projector and a pretrained causal LM."""

from vlm.siglip import SiglipVisionConfig, SiglipVisionEncoder, SiglipVisionOutput
from vlm.weights import CheckpointError

__all__ = ["CheckpointError", "SiglipVisionConfig", "SiglipVisionEncoder", "SiglipVisionOutput"]
__version__ = "0.1.0"
