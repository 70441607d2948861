"""lite-whisper: LiteASR low-rank Whisper encoders for Hugging Face Transformers.

Importing this package registers `LiteWhisperConfig` and `LiteWhisperForConditionalGeneration` with AutoConfig,
AutoModel and AutoModelForSpeechSeq2Seq, and lets the automatic-speech-recognition pipeline run LiteWhisper models
as Whisper, so no `trust_remote_code` is needed once it is imported.

The model code itself lives in the two top-level files `configuration_lite_whisper.py` and
`modeling_lite_whisper.py`, which are also the Hub remote-code files copied beside every converted checkpoint. The
package reaches them as `lite_whisper.configuration_lite_whisper` / `lite_whisper.modeling_lite_whisper` (symlinks in
the source tree, real files in the wheel), so there is one source and no top-level module of ours to collide with
other distributions.
"""

from .configuration_lite_whisper import LOW_RANK_KEYS, LiteWhisperConfig
from .modeling_lite_whisper import (
    LiteWhisperForConditionalGeneration,
    LiteWhisperSpeechRecognitionPipeline,
    LowRankLinear,
    encoder_parameter_report,
)
from .factorize import build_lite_whisper, factors_from_svd
from .fast_generation import enable_fast_generation
from .registration import register
from .compress import CalibrationError, CompressionResult, CompressionSettings, compress
from .convert import ConversionError, convert
from .evaluate import evaluate

__version__ = "0.1.0"

register()

__all__ = [
    "LOW_RANK_KEYS",
    "LiteWhisperConfig",
    "LiteWhisperForConditionalGeneration",
    "LiteWhisperSpeechRecognitionPipeline",
    "LowRankLinear",
    "CalibrationError",
    "CompressionResult",
    "CompressionSettings",
    "ConversionError",
    "compress",
    "convert",
    "evaluate",
    "build_lite_whisper",
    "encoder_parameter_report",
    "enable_fast_generation",
    "factors_from_svd",
    "register",
]
