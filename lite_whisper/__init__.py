"""lite-whisper: LiteASR low-rank Whisper encoders for Hugging Face Transformers.

Importing this package registers `LiteWhisperConfig` and `LiteWhisperForConditionalGeneration` with AutoConfig,
AutoModel and AutoModelForSpeechSeq2Seq, and lets the automatic-speech-recognition pipeline run LiteWhisper models
as Whisper, so no `trust_remote_code` is needed once it is imported.

The model code itself lives in the two top-level files `configuration_lite_whisper.py` and
`modeling_lite_whisper.py`, which are also the Hub remote-code files copied beside every converted checkpoint. The
package reaches them as `lite_whisper.configuration_lite_whisper` / `lite_whisper.modeling_lite_whisper` (symlinks in
the source tree, real files in the wheel), so there is one source and no top-level module of ours to collide with
other distributions.

Everything else (compress, convert, evaluate, ...) loads on first use (PEP 562), and so does the registration when
the package is imported by our console scripts: they import it through the `lite_whisper_cli` launcher, which asks
for the registration to wait until the arguments are parsed, so that `--help` and argument errors answer without
importing torch and transformers (registering imports both and Whisper's model code: about 5 s on 2 CPU cores).
"""

import importlib
import sys
import types

__version__ = "0.1.0"

_LAZY = {
    "LOW_RANK_KEYS": "configuration_lite_whisper",
    "LiteWhisperConfig": "configuration_lite_whisper",
    "LiteWhisperForConditionalGeneration": "modeling_lite_whisper",
    "LiteWhisperSpeechRecognitionPipeline": "modeling_lite_whisper",
    "LowRankLinear": "modeling_lite_whisper",
    "encoder_parameter_report": "modeling_lite_whisper",
    "build_lite_whisper": "factorize",
    "factors_from_svd": "factorize",
    "enable_fast_generation": "fast_generation",
    "register": "registration",
    "CalibrationError": "compress",
    "CompressionResult": "compress",
    "CompressionSettings": "compress",
    "compress": "compress",
    "ConversionError": "convert",
    "convert": "convert",
    "evaluate": "evaluate",
}
# Public functions named like the submodule that defines them: `lite_whisper.convert` is the function.
_FUNCTIONS_NAMED_LIKE_MODULES = {"compress", "convert", "evaluate"}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # The import system binds a submodule to its package's attribute on first import; keep the public
        # functions `convert`, `evaluate` and `compress` there instead (importing `lite_whisper.convert` as a module
        # still works: `from lite_whisper.convert import ...` reads sys.modules).
        if name in _FUNCTIONS_NAMED_LIKE_MODULES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def _registration_deferred():
    launcher = sys.modules.get("lite_whisper_cli")
    return bool(getattr(launcher, "deferring_registration", False))


if not _registration_deferred():
    from .registration import register as _register

    _register()

__all__ = ["__version__", *_LAZY]
