"""Which tokenizer the MLX port decodes with, and how it is checked against the checkpoint's own files.

Decision: decode with mlx-whisper's tiktoken tokenizer (`mlx_whisper.tokenizer.get_tokenizer`, built from the
`multilingual.tiktoken` / `gpt2.tiktoken` files it ships), not with the HF tokenizer. Reasons:

* mlx-whisper's `DecodingTask` and `transcribe` create that tokenizer themselves from `model.is_multilingual` and
  `model.num_languages` (the vocabulary size); using the HF tokenizer would mean forking the decoding loop, the
  timestamp rules and the language detection, which this port reuses unchanged.
* It is the same vocabulary as OpenAI Whisper's HF `tokenizer.json`: the same byte-level BPE entries with the same
  ids, then <|endoftext|>, <|startoftranscript|>, the language tokens, the task tokens and the timestamps, in the
  same order. `check_vocabulary` verifies this entry by entry whenever tokenizer files are available.
* It works with no tokenizer files at all, which is the case of the published LiteWhisper checkpoints, and needs no
  network access.

The folder's processor files (or the base model given with `--tokenizer`, which wins when given) are therefore
used to *check* that the model's vocabulary is the standard one (a fine-tuned model with added tokens would be
refused with a clear message rather than decoded into wrong text), and a base model's generation_config.json
supplies the alignment heads for word timestamps when the model folder has none.
"""

import json
from pathlib import Path

from lite_whisper.utils import get_logger

logger = get_logger(__name__)

# Special tokens that HF tokenizer files name differently from OpenAI's tiktoken files (same id, renamed upstream).
SPECIAL_ALIASES = {"<|nocaptions|>": "<|nospeech|>"}


def _bytes_to_unicode():
    """The byte <-> printable character table of byte-level BPE vocabularies (as in GPT-2 and Whisper)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    characters = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, characters)))


def read_vocabulary(folder):
    """{token string: id} (byte-level BPE strings and special tokens) from tokenizer.json or vocab.json, or None."""
    folder = Path(folder)
    tokenizer_json = folder / "tokenizer.json"
    if tokenizer_json.is_file():
        with open(tokenizer_json, encoding="utf-8") as handle:
            data = json.load(handle)
        vocabulary = dict(data.get("model", {}).get("vocab", {}))
        for token in data.get("added_tokens", []):
            vocabulary[token["content"]] = token["id"]
        return vocabulary
    vocab_json = folder / "vocab.json"
    if vocab_json.is_file():
        with open(vocab_json, encoding="utf-8") as handle:
            vocabulary = json.load(handle)
        added = folder / "added_tokens.json"
        if added.is_file():
            with open(added, encoding="utf-8") as handle:
                vocabulary.update(json.load(handle))
        return vocabulary
    return None


def mlx_tokenizer(model, language=None, task=None):
    """mlx-whisper's tokenizer for this model (what its decoding uses internally)."""
    from mlx_whisper.tokenizer import get_tokenizer

    return get_tokenizer(model.is_multilingual, num_languages=model.num_languages, language=language, task=task)


def check_vocabulary(model, vocabulary, source):
    """Raise ValueError if `vocabulary` ({string: id}) is not the tiktoken vocabulary mlx-whisper decodes with."""
    encoding = mlx_tokenizer(model).encoding
    special = {string: encoding.encode_single_token(string) for string in encoding.special_tokens_set}
    n_regular = encoding.n_vocab - len(special)
    to_byte = {character: byte for byte, character in _bytes_to_unicode().items()}
    largest = max(vocabulary.values())
    if largest >= model.dims.n_vocab:
        raise ValueError(
            f"the tokenizer in {source} has token id {largest}, beyond the model's vocab_size {model.dims.n_vocab}"
        )
    mismatches = []
    for string, token_id in vocabulary.items():
        string = SPECIAL_ALIASES.get(string, string)
        if string in special:
            if special[string] != token_id:
                mismatches.append(f"{string} is {token_id} there, {special[string]} in mlx-whisper's vocabulary")
        elif token_id < n_regular:
            try:
                raw = bytes(to_byte[character] for character in string)
            except KeyError:
                mismatches.append(f"{string!r} (id {token_id}) is not a byte-level BPE token")
                continue
            if raw != encoding.decode_single_token_bytes(token_id):
                mismatches.append(f"id {token_id} is {raw!r} there, {encoding.decode_single_token_bytes(token_id)!r} here")
        else:
            mismatches.append(f"{string!r} (id {token_id}) is not in mlx-whisper's vocabulary")
        if len(mismatches) >= 5:
            break
    if mismatches:
        raise ValueError(
            f"the tokenizer in {source} differs from the Whisper vocabulary that mlx-whisper decodes with "
            f"({'; '.join(mismatches)}); models with a custom vocabulary are not supported by the MLX port"
        )


def resolve_tokenizer(model, folder, base=None):
    """Check the model's vocabulary against `base` (if given) or the folder's tokenizer files; return their folder.

    Returns the folder whose tokenizer files were checked, or None when neither had any (mlx-whisper's bundled
    vocabulary is then used as it is, which is right for every OpenAI-derived Whisper checkpoint).
    """
    candidates = []
    if base is not None:
        from .modeling import resolve_model_path

        base_folder = resolve_model_path(
            base, allow_patterns=["tokenizer.json", "vocab.json", "added_tokens.json", "generation_config.json", "*config.json"]
        )
        if read_vocabulary(base_folder) is None:
            raise FileNotFoundError(f"--tokenizer {base}: {base_folder} has no tokenizer.json or vocab.json")
        candidates.append(base_folder)
    candidates.append(Path(folder))
    for candidate in candidates:
        vocabulary = read_vocabulary(candidate)
        if vocabulary is None:
            continue
        check_vocabulary(model, vocabulary, candidate)
        logger.info(f"vocabulary of {candidate} matches mlx-whisper's tiktoken vocabulary")
        return str(candidate)
    logger.info(
        f"{folder} has no tokenizer files; decoding with mlx-whisper's bundled "
        f"{'multilingual' if model.is_multilingual else 'English'} Whisper vocabulary"
    )
    return None


__all__ = ["check_vocabulary", "mlx_tokenizer", "read_vocabulary", "resolve_tokenizer"]
