"""metalm: causal language models as general-purpose interfaces (MetaLM, Hao et al. 2022)."""

from metalm.data.processor import Encode, ImageInput, InputError, MetaLMProcessor, Target, register_processor
from metalm.data.segments import EncodedSegment, TextSegment, collate
from metalm.modalities.audio import AudioInput
from metalm.model.configuration_metalm import MetaLMConfig, MetaLMConfigError
from metalm.model.modeling_metalm import MetaLMForCausalLM, SlotCountError, register_auto_classes
from metalm.recipe import EncoderRecipe, ModelRecipe, build_metalm

register_auto_classes()
register_processor()  # AutoProcessor.from_pretrained(model_folder) -> MetaLMProcessor

__version__ = "0.1.0"

__all__ = [
    "AudioInput",
    "Encode",
    "EncodedSegment",
    "EncoderRecipe",
    "ImageInput",
    "InputError",
    "MetaLMConfig",
    "MetaLMConfigError",
    "MetaLMForCausalLM",
    "MetaLMProcessor",
    "ModelRecipe",
    "SlotCountError",
    "Target",
    "TextSegment",
    "build_metalm",
    "collate",
]
