"""Text normalisation and WER, as used by every score this project reports."""

import functools

from transformers.models.whisper.english_normalizer import EnglishTextNormalizer


@functools.lru_cache(maxsize=1)
def _normalizer():
    # Whisper's English normaliser (numbers, contractions, punctuation, casing). The British->American spelling
    # table that OpenAI ships beside it is not on PyPI; references and hypotheses pass through the same rules, so
    # it only matters where a clip's reference and the model disagree on spelling.
    return EnglishTextNormalizer({})


def normalize(text):
    return _normalizer()(text or "")


def wer_scores(references, hypotheses):
    """Corpus WER (total errors / total reference words) and mean per-utterance WER, both in percent.

    Empty references after normalisation are skipped in the mean (they have no words to score against).
    """
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    refs = [normalize(r) for r in references]
    hyps = [normalize(h) for h in hypotheses]
    errors = words = 0
    per_utterance = []
    for ref, hyp in zip(refs, hyps):
        n = len(ref.split())
        if n == 0:
            continue
        out = jiwer.process_words(ref, hyp if hyp.strip() else "")
        e = out.substitutions + out.deletions + out.insertions
        errors += e
        words += n
        per_utterance.append(e / n)
    if words == 0:
        raise ValueError("no reference words to score")
    return {
        "wer": 100.0 * errors / words,
        "mean_utterance_wer": 100.0 * sum(per_utterance) / len(per_utterance),
        "errors": errors,
        "words": words,
        "utterances": len(per_utterance),
    }


__all__ = ["normalize", "wer_scores"]
