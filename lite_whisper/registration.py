"""Registration of LiteWhisper with transformers' Auto classes and the ASR pipeline (done on import)."""

from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForSpeechSeq2Seq,
    AutoProcessor,
    AutoTokenizer,
    WhisperFeatureExtractor,
    WhisperProcessor,
    WhisperTokenizer,
    WhisperTokenizerFast,
)
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_lite_whisper import LiteWhisperConfig
from .modeling_lite_whisper import LiteWhisperForConditionalGeneration, LiteWhisperSpeechRecognitionPipeline

ASR_TASK = "automatic-speech-recognition"
_registered = False


def _register_quietly(register, *args, **kwargs):
    try:
        register(*args, **kwargs)
    except ValueError:  # already registered (e.g. the module was reloaded)
        pass


def register():
    """Register LiteWhisper with the Auto classes and the ASR pipeline. Idempotent."""
    global _registered
    if _registered:
        return
    _register_quietly(AutoConfig.register, LiteWhisperConfig.model_type, LiteWhisperConfig, exist_ok=True)
    for auto in (AutoModel, AutoModelForSpeechSeq2Seq):
        _register_quietly(auto.register, LiteWhisperConfig, LiteWhisperForConditionalGeneration, exist_ok=True)
    # Processor classes, so the published checkpoints (which ship no processor files) still resolve the Whisper
    # tokenizer and feature extractor when given a folder that has them, keyed by the lite-whisper config.
    _register_quietly(AutoFeatureExtractor.register, LiteWhisperConfig, WhisperFeatureExtractor, exist_ok=True)
    _register_quietly(AutoProcessor.register, LiteWhisperConfig, WhisperProcessor, exist_ok=True)
    try:
        AutoTokenizer.register(
            LiteWhisperConfig, slow_tokenizer_class=WhisperTokenizer, fast_tokenizer_class=WhisperTokenizerFast,
            exist_ok=True,
        )
    except (ValueError, TypeError):
        try:
            AutoTokenizer.register(LiteWhisperConfig, WhisperTokenizer, WhisperTokenizerFast, exist_ok=True)
        except (ValueError, TypeError):
            pass

    # The stock ASR pipeline chooses Whisper decoding from `config.model_type == "whisper"` and would run a
    # LiteWhisper model as CTC. Swap in a subclass that differs only for LiteWhisper models; every other model runs
    # exactly as before. (Remote-code users get the same class through config.json's `custom_pipelines`.)
    task = PIPELINE_REGISTRY.supported_tasks[ASR_TASK]
    task["impl"] = LiteWhisperSpeechRecognitionPipeline
    # Our own config copy may now drop its `custom_pipelines` entry (which would otherwise make pipeline() demand
    # trust_remote_code for a task the package already handles).
    LiteWhisperConfig._package_pipeline_registered = True
    _registered = True
