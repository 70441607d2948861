"""MLX port of LiteWhisper (installed as lite_whisper.mlx_port): run LiteWhisper and Whisper checkpoints with MLX.

    from lite_whisper.mlx_port import load_model, transcribe
    model = load_model("path/to/lite-whisper-folder")          # or a Hub repo id
    print(transcribe(model, "speech.flac")["text"])

Built on mlx-whisper (its Whisper model, decoding and `transcribe`); the encoder projections listed in the
checkpoint's `low_rank_config` run as two thin products (x @ weight1) @ weight2 + bias. Requires the `mlx` extra:
`pip install "lite-whisper[mlx]"`. The package imports without MLX; the names below load it on first use, so a
missing install fails there with a message naming the extra.
"""

from .backend import MLX_INSTALL_HINT, MLXUnavailableError

_LAZY = {
    "LiteWhisperMLX": "modeling",
    "LowRankLinear": "modeling",
    "load_model": "modeling",
    "encoder_projection": "modeling",
    "transcribe": "inference",
    "greedy_decode": "inference",
    "log_mel": "inference",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MLX_INSTALL_HINT", "MLXUnavailableError", *_LAZY]
