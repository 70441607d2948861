"""Fast greedy generation for Whisper-family models on CUDA: static KV cache, one CUDA graph per decoder step.

Why: eager `generate()` spends ~1 ms of host time per decoder layer and step launching small kernels, so on a GPU the
decoder is host-bound and hides any encoder saving. Here every decoder step (all layers, the logits, Whisper's logits
processors, argmax and the stopping check) is one CUDA-graph replay over preallocated buffers; the cross-attention
keys/values are computed once per window; the encoder runs as a CUDA graph too.

How it plugs in: `WhisperForConditionalGeneration.generate()` (language/task tokens, prompts, timestamps, long-form
segmentation, temperature fallback) is left as it is; only the token loop it reaches through `GenerationMixin` for
greedy decoding (`_sample`) is replaced, so everything around it behaves exactly as in transformers. A call the fast
loop cannot do exactly (sampling, beam search, attentions or hidden states requested, a streamer, a decoder attention
mask, an unknown stopping criterion) goes to the eager loop, and the log says why once.

Logits processors that are plain functions of the scores and the sequence so far (suppress tokens, begin-suppress,
min length / min new tokens, Whisper's timestamp rules) run on the GPU inside the graph; any other processor is
applied eagerly between the graphed forward and the argmax ("hybrid" steps), which is still exact.

In float16/bfloat16 at batch buckets up to DECODE_KERNELS_MAX_BATCH the graphed step runs on the Triton kernels of
`lite_whisper.kernels.decode` (39 kernels a step instead of ~125; see that module); float32 keeps the PyTorch step.

`LiteWhisperForConditionalGeneration` uses this by default on CUDA (`model.set_fast_generation(False)` turns it off);
`enable_fast_generation(model)` gives a plain `WhisperForConditionalGeneration` the same path, so the two can be
compared like for like.
"""

import contextlib
import contextvars
import math
import os
import time
from collections import OrderedDict

import torch
import torch.nn.functional as F
from transformers.generation.logits_process import (
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    WhisperTimeStampLogitsProcessor,
)
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Cache-length buckets: a step attends over the smallest bucket that holds the sequence, so short transcripts do not
# pay for attention over all 448 positions. One graph per (batch bucket, length bucket), captured when first needed.
LENGTH_BUCKETS = (32, 64, 128, 256)
# Batches are padded up to these sizes so that long-form decoding (whose batch shrinks as clips finish) reuses graphs.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
# Static decoder buffers kept per model (one per batch bucket, least recently used dropped). Each holds the cross
# keys/values of its rows (large-v3 at 32 rows: ~10 GB), so only two are kept.
MAX_DECODER_STATES = 2
MAX_ENCODER_GRAPHS = 4
# How many steps the host may run ahead of the GPU before it looks at the "all finished" flag (no sync per step).
STOP_CHECK_LAG = 2

_active = contextvars.ContextVar("lite_whisper_fast_generation", default=False)
_warned = set()
_fast_classes = {}
last_loop = {}  # steps and wall time of the last graphed token loop (after the prefill), for benchmarks
# Tests run the same loop without graphs on the CPU, to compare it token for token with transformers' own loop.
_anywhere = contextvars.ContextVar("lite_whisper_fast_generation_anywhere", default=False)
# Half-precision graphed steps use the Triton decoder-step kernels (lite_whisper.kernels.decode) up to this batch
# bucket: at 24-32 rows the layer norms folded into every GEMV tile cost more than they save (H100: 950 vs 923 us a
# step at batch 32), so larger batches keep the PyTorch step.
DECODE_KERNELS_MAX_BATCH = 16


@contextlib.contextmanager
def eager_loop_on_any_device():
    """Inside this block the static-cache loop also runs off CUDA (without graphs); for tests and debugging."""
    token = _anywhere.set(True)
    try:
        yield
    finally:
        _anywhere.reset(token)


def _say_once(message, *args):
    key = message % args if args else message
    if key not in _warned:
        _warned.add(key)
        logger.info(message, *args)


# ----------------------------------------------------------------------------------------------------------------
# Switching it on
# ----------------------------------------------------------------------------------------------------------------


class FastGenerationMixin:
    """Routes greedy decoding of a Whisper model through the static-cache CUDA-graph loop (see module docstring)."""

    def generate(self, *args, **kwargs):
        with generation_context(self):
            return super().generate(*args, **kwargs)

    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                streamer=None, **model_kwargs):
        result = sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus,
                        streamer, **model_kwargs)
        if result is NotImplemented:
            return super()._sample(input_ids, logits_processor, stopping_criteria, generation_config,
                                   synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
        return result

    def set_fast_generation(self, enabled):
        set_fast_generation(self, enabled)


def enable_fast_generation(model, enabled=True, compile=False, kernels=True):
    """Give a (plain or Lite) Whisper model the fast CUDA generation path; returns the model.

    A plain `WhisperForConditionalGeneration` instance gets a subclass with `FastGenerationMixin` (its weights,
    config and behaviour elsewhere are untouched); LiteWhisper models have the path built in.

    `compile=True` also runs the decoder layer through torch.compile inside the graph: about 10-15 % faster steps
    on an H100, for 10-20 s of compilation in the first generate() call of the process (and a few seconds for each
    new batch or length bucket), so it pays off for long-running services, not for a few files.
    (`LITE_WHISPER_COMPILE_DECODER=1` switches it on for every model.)

    `kernels=True` (the default) runs float16/bfloat16 decoder steps on the Triton kernels of
    `lite_whisper.kernels.decode` (layer norms, bias, GELU, residuals, cache writes, token masks and argmax fused
    into the GEMVs); `kernels=False` or `LITE_WHISPER_DECODE_KERNELS=0` keeps the PyTorch-op step in the graph.
    """
    if not getattr(model, "_lw_fast_generation_builtin", False) and not isinstance(model, FastGenerationMixin):
        cls = type(model)
        if cls not in _fast_classes:
            _fast_classes[cls] = type(cls.__name__, (FastGenerationMixin, cls), {"__module__": cls.__module__})
        model.__class__ = _fast_classes[cls]
    model._lw_fast_compile = bool(compile)
    model._lw_decode_kernels = bool(kernels)
    set_fast_generation(model, enabled)
    return model


def set_fast_generation(model, enabled):
    model._lw_fast_generation = bool(enabled)
    _drop_state(model)


def is_enabled(model):
    return getattr(model, "_lw_fast_generation", True)


@contextlib.contextmanager
def generation_context(model):
    """Marks a generate() call so that the encoder inside it may run as a CUDA graph."""
    enabled = is_enabled(model)
    if enabled and next(model.parameters()).device.type == "cuda":
        install_encoder_graph(model)
    token = _active.set(enabled)
    try:
        yield
    finally:
        _active.reset(token)


def _drop_state(model):
    for name in ("_lw_decoder_states", "_lw_encoder_graphs"):
        if name in model.__dict__:
            del model.__dict__[name]
    encoder = model.model.encoder if hasattr(model, "model") else None
    if encoder is not None and "forward" in encoder.__dict__ and getattr(encoder.forward, "_lw_graphed", False):
        del encoder.__dict__["forward"]


# ----------------------------------------------------------------------------------------------------------------
# Decoding loop
# ----------------------------------------------------------------------------------------------------------------


def _unsupported_reason(model, input_ids, generation_config, synced_gpus, streamer, model_kwargs, graphs):
    if not is_enabled(model):
        return "switched off"
    if graphs and input_ids.device.type != "cuda":
        return "not on CUDA"
    if generation_config.do_sample:
        return "sampling (temperature fallback) is decoded eagerly"
    if getattr(generation_config, "num_beams", 1) not in (None, 1):
        return "beam search is decoded eagerly"
    if synced_gpus or streamer is not None:
        return "a streamer or synced GPUs need the eager loop"
    if generation_config.output_attentions or generation_config.output_hidden_states:
        return "attentions / hidden states were requested"
    if model_kwargs.get("decoder_attention_mask") is not None:
        return "a decoder attention mask (padded prompts) needs the eager loop"
    encoder_outputs = model_kwargs.get("encoder_outputs")
    if encoder_outputs is None:
        return "no encoder outputs"
    if model.training:
        return "the model is in training mode"
    return None


def _encoder_hidden(model_kwargs):
    encoder_outputs = model_kwargs["encoder_outputs"]
    if isinstance(encoder_outputs, torch.Tensor):
        return encoder_outputs
    if isinstance(encoder_outputs, (tuple, list)):
        return encoder_outputs[0]
    return encoder_outputs["last_hidden_state"] if "last_hidden_state" in encoder_outputs else encoder_outputs[0]


def sample(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
           streamer=None, graphs=None, **model_kwargs):
    """The greedy token loop of GenerationMixin._sample on static buffers; NotImplemented where it does not apply.

    `graphs=None` means CUDA graphs on CUDA (the only place it runs by default); `graphs=False` runs the same loop
    eagerly, on any device (used by the CPU tests to check it token for token against transformers).
    """
    if graphs is None:
        graphs = input_ids.device.type == "cuda"
        if not graphs and not _anywhere.get():
            return NotImplemented
    reason = _unsupported_reason(model, input_ids, generation_config, synced_gpus, streamer, model_kwargs, graphs)
    if reason is not None:
        if reason != "switched off":
            _say_once("fast generation: using the eager loop (%s)", reason)
        return NotImplemented
    plan = _StopPlan.from_criteria(stopping_criteria)
    if plan is None:
        _say_once("fast generation: using the eager loop (a stopping criterion other than max length / EOS)")
        return NotImplemented

    encoder_hidden = _encoder_hidden(model_kwargs)
    batch, prefix = input_ids.shape
    max_length = min(plan.max_length, model.config.max_target_positions)
    if prefix >= max_length:
        return NotImplemented
    pad_id = generation_config._pad_token_tensor
    pad_id = int(pad_id) if pad_id is not None else (plan.eos[0] if plan.eos else 0)

    try:
        state = _decoder_state(model, batch, _model_dtype(model), input_ids.device, graphs)
        program = _Program.build(logits_processor, plan, pad_id, state, prefix)
    except _Unsupported as reason:
        _say_once("fast generation: using the eager loop (%s)", reason)
        return NotImplemented
    want_scores = generation_config.return_dict_in_generate and generation_config.output_scores
    want_logits = generation_config.return_dict_in_generate and getattr(generation_config, "output_logits", False)

    with torch.inference_mode(False), torch.no_grad():
        state.start(input_ids, encoder_hidden, program)
        scores, logits = [], []
        # Prefill: the prompt in one eager pass, then the first token's processors / argmax.
        state.forward_tokens(input_ids, start=0)
        state.post(program, graphs=False)
        cur_len = prefix + 1
        if want_scores:
            scores.append(state.scores.clone())
        if want_logits:
            logits.append(state.raw.clone())
        pending = []
        loop_start, first_len = time.perf_counter(), cur_len
        while cur_len < max_length:
            # The host runs up to STOP_CHECK_LAG steps ahead of the GPU; steps queued after every row finished
            # only append padding, and the output is cut at the recorded length.
            pending.append(state.finished_flag())
            if len(pending) > STOP_CHECK_LAG:
                if pending.pop(0)():
                    break
            state.step(program, cur_len, graphs)
            cur_len += 1
            if want_scores:
                scores.append(state.scores.clone())
            if want_logits:
                logits.append(state.raw.clone())
        done = int(state.done_len.item())  # waits for the GPU
        last_loop.update(steps=cur_len - first_len, seconds=time.perf_counter() - loop_start, batch=batch,
                         compiled=state.compiled, fused=program.fused)
        final_len = done if done > 0 else cur_len
        sequences = state.sequences[:batch, :final_len].clone()
    state.release()

    if not generation_config.return_dict_in_generate:
        return sequences
    from transformers.generation.utils import GenerateEncoderDecoderOutput

    steps = final_len - prefix
    output = {"sequences": sequences}
    if want_scores:
        output["scores"] = tuple(s[:batch] for s in scores[:steps])
    if want_logits:
        output["logits"] = tuple(s[:batch] for s in logits[:steps])
    return GenerateEncoderDecoderOutput(**output)


def _model_dtype(model):
    return model.model.decoder.embed_tokens.weight.dtype


def _decode_kernels(model, batch, dtype, device):
    """lite_whisper.kernels.decode when this state's steps should run on it, else None.

    On for float16/bfloat16 on CUDA with triton; `LITE_WHISPER_DECODE_KERNELS=0` or
    `enable_fast_generation(model, kernels=False)` keeps the PyTorch step (float32 always does: its cuBLAS GEMVs are
    exact, and the kernels would only change rounding). `LITE_WHISPER_DECODE_KERNELS=1` also allows them off CUDA
    (Triton's interpreter; for tests).
    """
    flag = os.environ.get("LITE_WHISPER_DECODE_KERNELS", "").strip().lower()
    if flag in ("0", "false", "no", "off") or not getattr(model, "_lw_decode_kernels", True):
        return None
    if dtype not in (torch.float16, torch.bfloat16) or batch > DECODE_KERNELS_MAX_BATCH:
        return None
    if device.type != "cuda" and flag not in ("1", "true", "yes", "on"):
        return None
    try:
        from lite_whisper.kernels import decode
    except ImportError as error:
        _say_once("fast generation: decoder-step kernels unavailable (%s); using the PyTorch step", error)
        return None
    return decode


class _StopPlan:
    def __init__(self, max_length, eos):
        self.max_length = max_length
        self.eos = eos

    @classmethod
    def from_criteria(cls, criteria):
        max_length, eos = None, []
        for criterion in criteria:
            if isinstance(criterion, MaxLengthCriteria):
                max_length = criterion.max_length if max_length is None else min(max_length, criterion.max_length)
            elif isinstance(criterion, EosTokenCriteria):
                ids = criterion.eos_token_id
                eos.extend(int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)))
            else:
                return None
        if max_length is None:
            return None
        return cls(max_length, sorted(set(eos)))


# ----------------------------------------------------------------------------------------------------------------
# Logits processors on the GPU
# ----------------------------------------------------------------------------------------------------------------


class _Program:
    """The logits processors of one generate call, as GPU operations where they are known, else kept eager.

    Programs are cached per decoder state by `signature` (the processors' parameters): a captured graph holds
    pointers to the program's tensors (masks, EOS ids), so the same program object must serve every replay.
    """

    def __init__(self, signature, ops, eager, plan, pad_id, timestamp, state):
        self.signature = signature
        self.ops = ops  # callables (scores, state) -> None, in processor order
        self.eager = eager  # LogitsProcessorList run eagerly between graph steps (hybrid), or None
        self.plan = plan
        self.pad_id = pad_id
        self.timestamp = timestamp  # the timestamp-rules op, if any (it keeps per-row state)
        self.eos = torch.tensor(plan.eos, dtype=torch.long, device=state.device)
        self.codes, self.begin, self.below = self._token_codes(state.vocab, state.device)

    @property
    def fused(self):
        return self.eager is None

    def _token_codes(self, vocab, device):
        """The program as one int8 code per token for `decode_logits` (bit 1: always masked, 2: masked at length ==
        begin, 4: while length < below), or (None, -1, -1) when it is more than such masks (timestamp rules, two
        different begin / below lengths, eager processors)."""
        if not self.fused or self.timestamp is not None:
            return None, -1, -1
        codes = torch.zeros(vocab, dtype=torch.int8, device=device)
        begin = below = None
        for op in self.ops:
            if op.begin is not None:
                if begin not in (None, op.begin):
                    return None, -1, -1
                begin, bit = op.begin, 2
            elif op.below is not None:
                if below not in (None, op.below):
                    return None, -1, -1
                below, bit = op.below, 4
            else:
                bit = 1
            codes |= op.mask.to(torch.int8) * bit
        return codes, -1 if begin is None else begin, -1 if below is None else below

    @classmethod
    def build(cls, processors, plan, pad_id, state, prefix):
        parts = []
        for p in processors:
            part = _describe_processor(p)
            if part is None:
                _say_once("fast generation: %s runs eagerly between graph steps", type(p).__name__)
                signature = ("hybrid", tuple(plan.eos), pad_id)
                # Not cached: the processors may hold per-call state (e.g. the no-speech detector's inputs).
                return cls(signature, [], processors, plan, pad_id, None, state)
            parts.append(part)
        signature = (tuple(parts), tuple(plan.eos), pad_id)
        cached = state.programs.get(signature)
        if cached is not None:
            return cached
        ops, timestamp = [], None
        vocab, device = state.vocab, state.device
        for p in processors:
            if isinstance(p, SuppressTokensAtBeginLogitsProcessor):
                ops.append(_MaskOp(_vocab_mask(p.begin_suppress_tokens, vocab, device), begin=p.begin_index))
            elif isinstance(p, SuppressTokensLogitsProcessor):
                ops.append(_MaskOp(_vocab_mask(p.suppress_tokens, vocab, device)))
            elif isinstance(p, MinNewTokensLengthLogitsProcessor):
                ops.append(_MaskOp(_vocab_mask(p.eos_token_id, vocab, device),
                                   below=p.prompt_length_to_skip + p.min_new_tokens))
            elif isinstance(p, MinLengthLogitsProcessor):
                ops.append(_MaskOp(_vocab_mask(p.eos_token_id, vocab, device), below=p.min_length))
            else:
                if p.begin_index != prefix:
                    raise _Unsupported("the timestamp rules start after the prompt")
                timestamp = _TimestampOp(p, state)
                ops.append(timestamp)
        program = cls(signature, ops, None, plan, pad_id, timestamp, state)
        state.programs[signature] = program
        return program


def _ids(value):
    if isinstance(value, torch.Tensor):
        return tuple(sorted(int(v) for v in value.flatten().tolist()))
    if isinstance(value, int):
        return (value,)
    return tuple(sorted(int(v) for v in value))


def _describe_processor(p):
    """A hashable description of a processor the graph can run, or None."""
    kind = type(p)
    if kind is SuppressTokensAtBeginLogitsProcessor:
        return ("begin-suppress", _ids(p.begin_suppress_tokens), int(p.begin_index))
    if kind is SuppressTokensLogitsProcessor:
        return ("suppress", _ids(p.suppress_tokens))
    if kind is MinNewTokensLengthLogitsProcessor:
        return ("min-new", int(p.prompt_length_to_skip), int(p.min_new_tokens), _ids(p.eos_token_id))
    if kind is MinLengthLogitsProcessor:
        return ("min-length", int(p.min_length), _ids(p.eos_token_id))
    if kind is WhisperTimeStampLogitsProcessor:
        return ("timestamps", p.no_timestamps_token_id, p.timestamp_begin, p.eos_token_id, p.begin_index,
                p.max_initial_timestamp_index, bool(p._detect_timestamp_from_logprob))
    return None


def _vocab_mask(token_ids, vocab, device):
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.flatten().tolist()
    elif isinstance(token_ids, int):
        token_ids = [token_ids]
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    ids = [int(t) for t in token_ids if 0 <= int(t) < vocab]
    if ids:
        mask[torch.tensor(ids, device=device)] = True
    return mask


class _MaskOp:
    """scores[:, mask] = -inf: always, at the step whose sequence length is `begin`, or while it is below `below`."""

    def __init__(self, mask, begin=None, below=None):
        self.mask = mask
        self.begin = begin
        self.below = below

    def __call__(self, scores, state):
        # state.length is a 0-d tensor on the device: the condition needs no host sync, so it is graph-safe.
        if self.begin is not None:
            scores.masked_fill_(self.mask & (state.length == self.begin), -math.inf)
        elif self.below is not None:
            scores.masked_fill_(self.mask & (state.length < self.below), -math.inf)
        else:
            scores.masked_fill_(self.mask, -math.inf)


class _TimestampOp:
    """WhisperTimeStampLogitsProcessor as batched tensor operations over per-row state (no host round trip).

    Per row it keeps: whether the last / penultimate generated token (after begin_index) was a timestamp, and the last
    timestamp token, which is all the processor reads from the sequence.
    """

    def __init__(self, processor, state):
        self.no_timestamps = processor.no_timestamps_token_id
        self.begin = processor.timestamp_begin
        self.eos = processor.eos_token_id
        self.begin_index = processor.begin_index
        self.max_initial = processor.max_initial_timestamp_index
        self.from_logprob = processor._detect_timestamp_from_logprob
        self.vocab_ids = torch.arange(state.vocab, device=state.device)

    def reset(self, state):
        state.ts_last.zero_()
        state.ts_penult.fill_(True)
        state.ts_value.fill_(-1)

    def __call__(self, scores, state):
        begin = self.begin
        scores[:, self.no_timestamps] = -math.inf
        generated = state.length - self.begin_index  # tokens generated so far (0-d tensor)
        last = state.ts_last & (generated >= 1)
        penult = state.ts_penult | (generated < 2)
        text_forbidden = (last & penult).unsqueeze(-1)
        non_text_only = (last & ~penult).unsqueeze(-1)
        vocab = self.vocab_ids
        scores.masked_fill_(text_forbidden & (vocab >= begin), -math.inf)
        scores.masked_fill_(non_text_only & (vocab < self.eos), -math.inf)
        has_ts = state.ts_value >= 0
        floor = torch.where(has_ts & ~(last & ~penult), state.ts_value + 1, state.ts_value)
        floor = torch.where(has_ts, floor, torch.full_like(floor, begin)).unsqueeze(-1)
        scores.masked_fill_((vocab >= begin) & (vocab < floor), -math.inf)
        at_begin = generated == 0
        scores.masked_fill_(at_begin & (vocab < begin), -math.inf)
        if self.max_initial is not None:
            scores.masked_fill_(at_begin & (vocab > begin + self.max_initial), -math.inf)
        if self.from_logprob:
            logprobs = F.log_softmax(scores.float(), dim=-1)
            timestamp_logprob = logprobs[:, begin:].logsumexp(dim=-1)
            max_text = logprobs[:, :begin].max(dim=-1).values
            pick_timestamp = (timestamp_logprob > max_text).unsqueeze(-1)
            scores.masked_fill_(pick_timestamp & (vocab < begin), -math.inf)

    def update(self, state, tokens):
        is_ts = tokens >= self.begin
        state.ts_penult.copy_(state.ts_last)
        state.ts_last.copy_(is_ts)
        state.ts_value.copy_(torch.where(is_ts, tokens, state.ts_value))


class _Unsupported(Exception):
    pass


# ----------------------------------------------------------------------------------------------------------------
# Static decoder
# ----------------------------------------------------------------------------------------------------------------


def _bucket(value, buckets):
    for b in buckets:
        if value <= b:
            return b
    return value


def decoder_layer_step(hidden, index, causal, weights, k_cache, v_cache, span, cross_k, cross_v, heads, scaling):
    """One Whisper decoder layer for `hidden` (rows, T, d) at positions `index`, writing its keys/values into the
    static cache (rows, heads, max_len, head_dim) and attending over the first `span` cache positions.

    A function of tensors only (weights passed in), so one torch.compile artifact serves every layer.
    """
    (ln1_w, ln1_b, qkv_w, qkv_b, o_w, o_b, ln2_w, ln2_b, cq_w, cq_b, co_w, co_b, ln3_w, ln3_b,
     fc1_w, fc1_b, fc2_w, fc2_b) = weights
    rows, count, d_model = hidden.shape
    dim = d_model // heads
    x = F.layer_norm(hidden, (d_model,), ln1_w, ln1_b)
    q, k, v = F.linear(x, qkv_w, qkv_b).view(rows, count, 3, heads, dim).permute(2, 0, 3, 1, 4)
    k_cache.index_copy_(2, index, k)
    v_cache.index_copy_(2, index, v)
    out = F.scaled_dot_product_attention(q, k_cache[:, :, :span], v_cache[:, :, :span], attn_mask=causal,
                                         scale=scaling)
    hidden = hidden + F.linear(out.transpose(1, 2).reshape(rows, count, d_model), o_w, o_b)
    x = F.layer_norm(hidden, (d_model,), ln2_w, ln2_b)
    q = F.linear(x, cq_w, cq_b).view(rows, count, heads, dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, cross_k, cross_v, scale=scaling)
    hidden = hidden + F.linear(out.transpose(1, 2).reshape(rows, count, d_model), co_w, co_b)
    x = F.layer_norm(hidden, (d_model,), ln3_w, ln3_b)
    return hidden + F.linear(F.gelu(F.linear(x, fc1_w, fc1_b)), fc2_w, fc2_b)


_compiled = None


def _compile_wanted(model):
    flag = os.environ.get("LITE_WHISPER_COMPILE_DECODER")
    if flag is not None:
        return flag.strip().lower() not in ("0", "false", "no", "off", "")
    return getattr(model, "_lw_fast_compile", False)


def _compiled_layer_step():
    """decoder_layer_step through torch.compile (inductor fuses the layer norms, residual adds, GELU and cache
    writes; cuBLAS keeps the GEMMs). No CUDA graphs of its own: the whole step is captured by _DecoderState."""
    global _compiled
    if _compiled is None:
        import torch._dynamo

        config = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):  # one entry per (batch bucket, length bucket)
            if hasattr(config, name):
                setattr(config, name, max(getattr(config, name), 64))
        _compiled = torch.compile(decoder_layer_step, dynamic=False)
    return _compiled


def _decoder_state(model, batch, dtype, device, graphs):
    states = model.__dict__.setdefault("_lw_decoder_states", OrderedDict())
    key = (_bucket(batch, BATCH_BUCKETS) if graphs else batch, dtype, str(device), graphs)
    state = states.get(key)
    if state is not None and not state.matches(model):
        state = None
    if state is None:
        while len(states) >= MAX_DECODER_STATES:
            states.popitem(last=False)
        state = _DecoderState(model, key[0], dtype, device)
        states[key] = state
    states.move_to_end(key)
    return state


class _DecoderState:
    """Preallocated buffers and graphs for one batch size: self-attention cache, cross K/V, tokens, scores."""

    def __init__(self, model, batch, dtype, device):
        config = model.config
        decoder = model.model.decoder
        self.batch, self.dtype, self.device = batch, dtype, device
        self.heads = config.decoder_attention_heads
        self.d_model = config.d_model
        self.head_dim = self.d_model // self.heads
        self.max_len = config.max_target_positions
        self.vocab = model.proj_out.weight.shape[0]
        self.layers = list(decoder.layers)
        self.decoder = decoder
        self.proj_out = model.proj_out.weight
        self.embed_scale = getattr(decoder, "embed_scale", 1.0) or 1.0
        self._fingerprint = self._fingerprint_of(model)
        # Per layer, the tensors `decoder_layer_step` reads, with one q/k/v GEMM instead of three (k_proj has no bias
        # in Whisper). The LayerNorm eps of Whisper is torch's default, 1e-5.
        self.weights = []
        for layer in self.layers:
            attn, cross = layer.self_attn, layer.encoder_attn
            k_bias = attn.k_proj.bias if attn.k_proj.bias is not None else torch.zeros_like(attn.q_proj.bias)
            self.weights.append((
                layer.self_attn_layer_norm.weight, layer.self_attn_layer_norm.bias,
                torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).to(dtype),
                torch.cat([attn.q_proj.bias, k_bias, attn.v_proj.bias]).to(dtype),
                attn.out_proj.weight, attn.out_proj.bias,
                layer.encoder_attn_layer_norm.weight, layer.encoder_attn_layer_norm.bias,
                cross.q_proj.weight, cross.q_proj.bias, cross.out_proj.weight, cross.out_proj.bias,
                layer.final_layer_norm.weight, layer.final_layer_norm.bias,
                layer.fc1.weight, layer.fc1.bias, layer.fc2.weight, layer.fc2.bias,
            ))
        self.final_norm = (decoder.layer_norm.weight, decoder.layer_norm.bias)
        self.scaling = self.head_dim**-0.5
        self.gelu = config.activation_function == "gelu"
        if not self.gelu:
            raise _Unsupported(f"activation {config.activation_function!r}")
        self.layer_fn = decoder_layer_step
        self.compiled = False
        if device.type == "cuda" and _compile_wanted(model):
            self.layer_fn, self.compiled = _compiled_layer_step(), True
        n, b, h, d = len(self.layers), batch, self.heads, self.head_dim
        self.kernels = _decode_kernels(model, batch, dtype, device)
        if self.kernels is not None:
            self._kernel_buffers(model, batch, dtype, device)
        self.k_cache = torch.zeros(n, b, h, self.max_len, d, dtype=dtype, device=device)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.cross_k = None  # (n, b, h, frames, d), allocated for the encoder length on first use
        self.cross_v = None
        self.cross_kernel = False
        self.tokens = torch.zeros(b, 1, dtype=torch.long, device=device)
        self.sequences = torch.zeros(b, self.max_len, dtype=torch.long, device=device)
        self.length = torch.zeros((), dtype=torch.long, device=device)  # tokens in the sequence before this step
        self.unfinished = torch.ones(b, dtype=torch.bool, device=device)
        self.done_len = torch.zeros((), dtype=torch.long, device=device)
        self.raw = torch.zeros(b, self.vocab, dtype=torch.float32, device=device)
        self.scores = torch.zeros_like(self.raw)
        self.ts_last = torch.zeros(b, dtype=torch.bool, device=device)
        self.ts_penult = torch.ones(b, dtype=torch.bool, device=device)
        self.ts_value = torch.full((b,), -1, dtype=torch.long, device=device)
        self.positions = torch.arange(self.max_len, device=device)
        self.programs = {}  # signature -> _Program
        self.graphs = {}  # (length bucket, program signature) -> CUDAGraph
        self.pool = None
        self.rows = b
        self.program = None
        self.cuda = device.type == "cuda"
        ring = STOP_CHECK_LAG + 2
        self._flags = [torch.zeros((), dtype=torch.bool, device=device) for _ in range(ring)]
        self._flags_host = [torch.zeros((), dtype=torch.bool, pin_memory=self.cuda) for _ in range(ring)]
        self._events = [torch.cuda.Event() for _ in range(ring)] if self.cuda else []
        self._ring = 0

    def _kernel_buffers(self, model, batch, dtype, device):
        decoder = self.decoder
        norms = [m for layer in self.layers for m in (layer.self_attn_layer_norm, layer.encoder_attn_layer_norm,
                                                       layer.final_layer_norm)] + [decoder.layer_norm]
        self.eps = norms[0].eps
        if any(m.eps != self.eps for m in norms):
            raise _Unsupported("layer norms with different eps")
        self.embed = decoder.embed_tokens.weight.contiguous()
        self.positions_table = decoder.embed_positions.weight.contiguous()
        self.weights = [tuple(w.contiguous() for w in ws) for ws in self.weights]
        self.proj_out = self.proj_out.contiguous()
        ffn = self.layers[0].fc1.weight.shape[0]
        self.hidden = torch.zeros(batch, self.d_model, dtype=dtype, device=device)
        self.q = torch.zeros_like(self.hidden)
        self.attn = torch.zeros_like(self.hidden)
        self.mlp = torch.zeros(batch, ffn, dtype=dtype, device=device)
        blocks = self.kernels.logits_blocks(self.vocab, batch)
        self.workspace = self.kernels.decode_workspace(batch, max(3 * self.d_model, ffn), device)
        self.partial_v = torch.zeros(batch, blocks, dtype=torch.float32, device=device)
        self.partial_i = torch.zeros(batch, blocks, dtype=torch.int32, device=device)

    @staticmethod
    def _fingerprint_of(model):
        weight = model.model.decoder.layers[0].self_attn.q_proj.weight
        return (weight.data_ptr(), weight._version, model.proj_out.weight.data_ptr())

    def matches(self, model):
        return self._fingerprint == self._fingerprint_of(model)

    # --- per call ---------------------------------------------------------------------------------------------

    def start(self, input_ids, encoder_hidden, program):
        rows, prefix = input_ids.shape
        self.rows = rows
        frames = encoder_hidden.shape[1]
        if self.cross_k is None or self.cross_k.shape[3] != frames:
            shape = (len(self.layers), self.batch, self.heads, frames, self.head_dim)
            self.cross_k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.cross_v = torch.zeros_like(self.cross_k)
            self.graphs.clear()
            kd = self.kernels
            # The split-KV kernel where it pays (one row, with programmatic dependent launch), else SDPA.
            self.cross_kernel = (kd is not None and kd.cross_attention_kernel(self.batch, self.hidden)
                                 and self.workspace[0].numel()
                                 >= kd.cross_attention_workspace(self.batch, self.heads, frames, self.head_dim))
        hidden = encoder_hidden.to(self.dtype)
        for i, layer in enumerate(self.layers):
            attn = layer.encoder_attn
            k = F.linear(hidden, attn.k_proj.weight, attn.k_proj.bias)
            v = F.linear(hidden, attn.v_proj.weight, attn.v_proj.bias)
            self.cross_k[i, :rows].copy_(k.view(rows, frames, self.heads, self.head_dim).transpose(1, 2))
            self.cross_v[i, :rows].copy_(v.view(rows, frames, self.heads, self.head_dim).transpose(1, 2))
        self.sequences.fill_(program.pad_id)
        self.sequences[:rows, :prefix].copy_(input_ids)
        self.unfinished.fill_(True)
        self.unfinished[rows:] = False  # padding rows of the batch bucket never count as unfinished
        self.done_len.zero_()
        self.length.fill_(prefix)
        if program.timestamp is not None:
            program.timestamp.reset(self)
        self.program = program

    def release(self):
        self.program = None

    def finished_flag(self):
        """A callable that tells (waiting for the GPU to get there) whether every row had finished at this point."""
        if not self.cuda:
            done = bool(self.done_len.item() > 0)
            return lambda: done
        slot = self._ring = (self._ring + 1) % len(self._flags)
        flag, host, event = self._flags[slot], self._flags_host[slot], self._events[slot]
        torch.ne(self.done_len, 0, out=flag)
        host.copy_(flag, non_blocking=True)
        event.record()

        def read():
            event.synchronize()
            return bool(host)

        return read

    # --- the decoder ------------------------------------------------------------------------------------------

    def forward_tokens(self, tokens, start):
        """Run `tokens` (rows, T) at positions start..start+T-1 through the decoder; logits of the last into `raw`."""
        rows, count = tokens.shape
        index = torch.arange(start, start + count, device=self.device)
        span = _bucket(start + count, LENGTH_BUCKETS + (self.max_len,))
        logits = self._decode(tokens, index, span, rows)
        self.raw[:rows].copy_(logits[:, -1].float())

    def _decode(self, tokens, index, span, rows):
        hidden = self.decoder.embed_tokens(tokens) * self.embed_scale
        hidden = (hidden + self.decoder.embed_positions.weight.index_select(0, index)).to(self.dtype)
        causal = self.positions[:span].unsqueeze(0) <= index.unsqueeze(1)  # (T, span)
        layer_fn = self.layer_fn
        for i in range(len(self.layers)):
            hidden = layer_fn(hidden, index, causal, self.weights[i], self.k_cache[i, :rows], self.v_cache[i, :rows],
                              span, self.cross_k[i, :rows], self.cross_v[i, :rows], self.heads, self.scaling)
        hidden = F.layer_norm(hidden, (self.d_model,), *self.final_norm)
        return F.linear(hidden, self.proj_out)

    # --- one step -----------------------------------------------------------------------------------------------

    def post(self, program, graphs):
        """Processors, argmax, padding of finished rows, append, stopping; all on the device."""
        # Fused programs run over every row of the batch bucket (padding rows are finished from the start and only
        # append padding); eager processors see exactly the caller's rows.
        rows = self.batch if program.fused else self.rows
        scores = self.scores[:rows]
        if program.fused:
            scores.copy_(self.raw[:rows])
            for op in program.ops:
                op(scores, self)
        else:
            current = self.sequences[: self.rows, : int(self.length)]
            scores[: self.rows].copy_(program.eager(current, self.raw[: self.rows].clone()))
        tokens = scores.argmax(dim=-1)
        unfinished = self.unfinished[:rows]
        tokens = torch.where(unfinished, tokens, torch.full_like(tokens, program.pad_id))
        self.sequences[:rows].index_copy_(1, self.length.view(1), tokens.unsqueeze(1))
        if program.timestamp is not None:
            program.timestamp.update(self, tokens)
        if program.eos.numel():
            unfinished &= ~torch.isin(tokens, program.eos)
        self.length += 1
        # Length of the output when every row has finished: recorded once, read after the loop.
        finished_now = (~self.unfinished.any()) & (self.done_len == 0)
        self.done_len.copy_(torch.where(finished_now, self.length, self.done_len))
        self.tokens[:rows].copy_(tokens.unsqueeze(1))

    def _kernel_step(self, program):
        """The step on lite_whisper.kernels.decode: 8 kernels per layer plus embedding, logits and bookkeeping."""
        kd, rows, eps, ws = self.kernels, self.batch, self.eps, self.workspace
        h, q, attn = self.hidden, self.q, self.attn
        kd.decode_embed(self.tokens, self.embed, self.positions_table, self.length, h, self.embed_scale)
        for i, (ln1_w, ln1_b, qkv_w, qkv_b, o_w, o_b, ln2_w, ln2_b, cq_w, cq_b, co_w, co_b, ln3_w, ln3_b,
                fc1_w, fc1_b, fc2_w, fc2_b) in enumerate(self.weights):
            k_cache, v_cache = self.k_cache[i], self.v_cache[i]
            kd.decode_linear(h, qkv_w, qkv_b, q, norm=(ln1_w, ln1_b, eps), kv=(k_cache, v_cache), length=self.length,
                             workspace=ws)
            kd.decode_self_attention(q, k_cache, v_cache, self.length, attn, self.scaling)
            kd.decode_linear(attn, o_w, o_b, h, residual=h, workspace=ws)
            kd.decode_linear(h, cq_w, cq_b, q, norm=(ln2_w, ln2_b, eps), workspace=ws)
            if self.cross_kernel:
                kd.decode_cross_attention(q, self.cross_k[i], self.cross_v[i], attn, self.scaling, ws)
                out = attn
            else:
                # SDPA: from batch 8 it already runs at the memory floor.
                heads = q.view(rows, 1, self.heads, self.head_dim).transpose(1, 2)
                out = F.scaled_dot_product_attention(heads, self.cross_k[i], self.cross_v[i], scale=self.scaling)
                out = out.transpose(1, 2).reshape(rows, self.d_model)
            kd.decode_linear(out, co_w, co_b, h, residual=h, workspace=ws)
            kd.decode_linear(h, fc1_w, fc1_b, self.mlp, norm=(ln3_w, ln3_b, eps), gelu=True, workspace=ws)
            kd.decode_linear(self.mlp, fc2_w, fc2_b, h, residual=h, workspace=ws)
        norm = (*self.final_norm, eps)
        if program.codes is None:
            kd.decode_logits(h, norm, self.proj_out, self.raw)
            if program.fused:
                self.post(program, graphs=True)
            return
        kd.decode_logits(h, norm, self.proj_out, self.raw, self.scores, self.partial_v, self.partial_i, program.codes,
                         self.length, program.begin, program.below)
        kd.decode_finish(self.partial_v, self.partial_i, self.sequences, self.tokens, self.unfinished.view(torch.uint8),
                         self.length, self.done_len, program.eos, program.pad_id)

    def _step_body(self, program, span):
        if self.kernels is not None:
            self._kernel_step(program)
            return
        index = (self.length - 1).view(1)
        logits = self._decode(self.tokens, index, span, self.batch)
        self.raw.copy_(logits[:, -1].float())
        if program.fused:
            self.post(program, graphs=True)

    def step(self, program, cur_len, graphs):
        """Decode the token at position cur_len - 1 and append the next one."""
        # The kernels' self-attention reads the length from the device: one graph serves every length.
        span = 0 if self.kernels is not None else _bucket(cur_len, LENGTH_BUCKETS + (self.max_len,))
        if not graphs and self.kernels is not None:
            self._kernel_step(program)
            if not program.fused:
                self.post(program, graphs=False)
            return
        if not graphs:
            index = torch.tensor([cur_len - 1], device=self.device)
            logits = self._decode(self.tokens[: self.rows], index, span, self.rows)
            self.raw[: self.rows].copy_(logits[:, -1].float())
            self.post(program, graphs=False)
            return
        graph = self.graphs.get((span, program.signature))
        if graph is None:
            try:
                graph = self._capture(program, span)
            except Exception as error:  # noqa: BLE001 - an inductor failure must not break transcription
                if not self.compiled:
                    raise
                logger.warning("fast generation: the compiled decoder step failed (%s: %s); using the uncompiled "
                               "step", type(error).__name__, error)
                self.layer_fn, self.compiled = decoder_layer_step, False
                self.graphs.clear()
                graph = self._capture(program, span)
        graph.replay()
        if not program.fused:
            self.post(program, graphs=False)

    def _capture(self, program, span):
        # Warm up on a side stream (allocator, cuBLAS handles, SDPA kernel choice), then capture. The warm-up
        # mutates the small step state, which is saved and restored; the K/V it writes at the current position are
        # the values the real step writes again. Capture itself only records.
        saved = [t.clone() for t in self._mutable()]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step_body(program, span)
        torch.cuda.current_stream().wait_stream(stream)
        for tensor, value in zip(self._mutable(), saved):
            tensor.copy_(value)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread may allocate pinned memory while we capture.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self._step_body(program, span)
        self.graphs[(span, program.signature)] = graph
        return graph

    def _mutable(self):
        return [self.length, self.tokens, self.sequences, self.unfinished, self.done_len, self.ts_last,
                self.ts_penult, self.ts_value, self.raw, self.scores]


# ----------------------------------------------------------------------------------------------------------------
# Encoder as a CUDA graph
# ----------------------------------------------------------------------------------------------------------------


def install_encoder_graph(model):
    """Make the encoder replay a CUDA graph (per input shape) when called inside a fast generate() on CUDA."""
    encoder = model.model.encoder
    if getattr(encoder.__dict__.get("forward"), "_lw_graphed", False):
        return
    eager = encoder.forward
    graphs = model.__dict__.setdefault("_lw_encoder_graphs", OrderedDict())

    def forward(input_features=None, *args, **kwargs):
        usable = (
            _active.get()
            and isinstance(input_features, torch.Tensor)
            and input_features.device.type == "cuda"
            and not torch.is_grad_enabled()
            and not args
            and not kwargs.get("output_attentions")
            and not kwargs.get("output_hidden_states")
            and kwargs.get("head_mask") is None
            and not encoder.training
        )
        if not usable:
            return eager(input_features, *args, **kwargs)
        # A graph holds the addresses of the weights it read: moving or recasting the model must recapture.
        weights = next(encoder.parameters()).data_ptr()
        key = (tuple(input_features.shape), input_features.dtype, weights)
        entry = graphs.get(key)
        if entry is None:
            while len(graphs) >= MAX_ENCODER_GRAPHS:
                graphs.popitem(last=False)
            entry = _capture_encoder(eager, input_features)
            graphs[key] = entry
        graphs.move_to_end(key)
        static_in, static_out, graph = entry
        static_in.copy_(input_features)
        graph.replay()
        hidden = static_out.clone()
        return BaseModelOutput(last_hidden_state=hidden) if kwargs.get("return_dict", True) is not False else (hidden,)

    forward._lw_graphed = True
    encoder.forward = forward


def _capture_encoder(eager, features):
    static_in = features.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # the first call may switch kernels on and pick attention backends
            eager(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        static_out = eager(static_in)[0]
    return static_in, static_out, graph
