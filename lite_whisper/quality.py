"""Catching a broken compression: transcripts that loop.

An over-compressed Whisper encoder rarely yields garbage words; it makes the decoder repeat itself ("the the the
..." or one sentence over and over) until the token limit. Two tests, either one flags a transcript:

* a run of one word n-gram (n = 1..8) repeated at least `min_repeats` times in a row, covering at least
  `min_words` words;
* Whisper's own test: the text compresses too well (gzip ratio above 2.4, what `generate` uses for temperature
  fallback), for texts long enough for the ratio to mean something.
"""

import zlib

from .text import normalize
from .utils import get_logger

logger = get_logger(__name__)

COMPRESSION_RATIO_THRESHOLD = 2.4


def compression_ratio(text):
    data = text.encode("utf-8")
    return len(data) / max(1, len(zlib.compress(data)))


def find_repetition(text, min_repeats=4, max_ngram=8, min_words=8):
    """A description of the first loop in `text` (e.g. "'of the' x 12"), or None when it does not loop."""
    words = normalize(text).split() or str(text or "").split()
    for n in range(1, max_ngram + 1):
        i = 0
        while i + n <= len(words):
            gram = words[i : i + n]
            repeats = 1
            while words[i + repeats * n : i + (repeats + 1) * n] == gram:
                repeats += 1
            if repeats >= min_repeats and repeats * n >= min_words:
                return f"{' '.join(gram)!r} x {repeats}"
            i += 1
    raw = str(text or "")
    if len(raw) >= 120 and compression_ratio(raw) > COMPRESSION_RATIO_THRESHOLD:
        return f"compression ratio {compression_ratio(raw):.1f} > {COMPRESSION_RATIO_THRESHOLD}"
    return None


def looping_transcripts(ids, texts):
    """[{"id", "loop", "text"}] for every transcript that loops."""
    found = []
    for id_, text in zip(ids, texts):
        loop = find_repetition(text)
        if loop:
            found.append({"id": id_, "loop": loop, "text": text[:200]})
    return found


def greedy_transcripts(model, processor, audio, batch_size=8, max_new_tokens=128, language="en"):
    """Greedy transcripts of clips of at most 30 s (one window each), as the checks and the benchmarks score them."""
    import torch

    texts = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(audio), batch_size):
            inputs = processor.feature_extractor(audio[start : start + batch_size], sampling_rate=16000,
                                                 return_tensors="pt")
            ids = model.generate(input_features=inputs["input_features"].to(model.device, model.dtype),
                                 language=language, task="transcribe", max_new_tokens=max_new_tokens)
            texts.extend(processor.tokenizer.batch_decode(ids, skip_special_tokens=True))
    return texts


def check_loops(model, processor, audio, ids, max_clips=6, window_s=10, max_new_tokens=64):
    """Transcribe up to `max_clips` clips (their first 10 s) greedily and report the ones that loop.

    Returns {"clips": n, "looping": [...], "ok": bool}. Costs one encoder window and a short greedy decode per clip:
    10 s of speech is about 40 tokens, so 64 tokens leave room for a loop to show without decoding to the limit.
    """
    clips = [a[: 16000 * window_s] for a in audio[:max_clips]]
    texts = greedy_transcripts(model, processor, clips, max_new_tokens=max_new_tokens)
    looping = looping_transcripts(ids[: len(clips)], texts)
    return {"clips": len(clips), "looping": looping, "ok": not looping}


__all__ = ["compression_ratio", "find_repetition", "looping_transcripts", "greedy_transcripts", "check_loops"]
