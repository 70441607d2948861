"""Encoder latency: original Whisper large-v3 encoder vs the LiteASR low-rank encoder, plain and with the Triton kernels.

Subcommands:
  prepare      (CPU) build a compressed whisper-base (SVD factors) and log-mel features of a few dev clips into
               .bench_carry/ (carried to the GPU machine) and .bench_data/ (kept here, for decoding).
  bench        (GPU) latency table (batch 1/8/32, fp16/bf16, modes eager / graph / compile+graph), analytic FLOPs
               and bytes per op with the ideal ratio, per-layer kernel-vs-stock timings, the real-weights encoder
               outputs with and without kernels, and the turbo-shaped end-to-end run. Writes JSON (and a PNG when
               matplotlib imports) under --out.
  transcripts  (CPU) decode the encoder outputs that `bench` saved, with the compressed whisper-base decoder, and
               compare the transcripts with and without kernels.
  plot         PNG from a JSON written by `bench`.

Timing: CUDA events around each forward, median of --reps (>= 20) after --warmup runs. "graph" captures the whole
encoder forward in one CUDA graph; "compile+graph" compiles each encoder layer with torch.compile (inductor,
default mode, static shapes) and captures that in a CUDA graph; the best mode per model is reported.
"""

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger("encoder_latency")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROFILE = HERE / "large_v3_profile.json"
CARRY = ROOT / ".bench_carry"
DATA = ROOT / ".bench_data"
PEAKS = {"H100": (790e12, 3.0e12), "H200": (790e12, 4.3e12)}
KEYS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

# Compressed whisper-base for the transcript check (plain SVD truncation, so ranks must stay moderate: q/k/v at
# 32/32/48 in layer 0 alone already turned every transcript into "Y Y Y ..."). With these ranks it transcribes the
# first dev clips as the full model does. The rule picks SDPA everywhere at these ranks, so the check also runs with
# the reduced-dimension attention forced on (layer 0: q/k 128, v 256, the only layer the kernel takes).
BASE_RANKS = [{"q_proj": 128, "k_proj": 128, "v_proj": 256, "out_proj": 448, "fc1": 512, "fc2": 512}] + [
    {"q_proj": 384, "k_proj": 384, "v_proj": 384, "out_proj": 448, "fc1": 512} for _ in range(5)
]


# --- analytic FLOPs and bytes -------------------------------------------------------------------------------------


def _gemm(name, m, k, n, itemsize, extra_read=0):
    return {"op": name, "flops": 2 * m * k * n, "bytes": itemsize * (m * k + k * n + m * n + extra_read)}


def layer_ops(ranks, d, heads, ffn, length, batch, itemsize=2, structure="plain"):
    """Ops of one encoder layer with their FLOPs and the fewest bytes each must move.

    structure "plain": the stock op sequence (separate q/k/v projections, bias in the GEMM, GELU and residual adds
    as their own passes), low-rank projections as two GEMMs each. "fused": the same math with the elementwise work
    in GEMM epilogues, the q/k/v first factors as one GEMM, and for the low-rank attention the reduced sides that
    `kernels.encoder.plan_layer` picks.
    """
    from lite_whisper.kernels.encoder import plan_layer
    from lite_whisper.kernels.reference import next_power_of_two

    m = batch * length
    hd = d // heads
    ops = [{"op": "ln1", "flops": 5 * m * d, "bytes": itemsize * 2 * m * d}]
    fused = structure == "fused"
    qk_red = v_red = False
    if fused and all(k in ranks for k in ("q_proj", "k_proj", "v_proj")):
        qk_red, v_red = plan_layer(ranks, heads, hd, length)

    def proj(key, k_in, n_out, fused_epilogue_reads=0):
        r = ranks.get(key)
        if r is None:
            return [_gemm(key, m, k_in, n_out, itemsize, fused_epilogue_reads)]
        return [_gemm(key + ".w1", m, k_in, r, itemsize), _gemm(key + ".w2", m, r, n_out, itemsize, fused_epilogue_reads)]

    if fused and all(k in ranks for k in ("q_proj", "k_proj", "v_proj")):
        rsum = ranks["q_proj"] + ranks["k_proj"] + ranks["v_proj"]
        ops.append(_gemm("qkv.w1", m, d, rsum, itemsize))
        if not qk_red:
            ops += [_gemm("q_proj.w2", m, ranks["q_proj"], d, itemsize), _gemm("k_proj.w2", m, ranks["k_proj"], d, itemsize)]
        if not v_red:
            ops.append(_gemm("v_proj.w2", m, ranks["v_proj"], d, itemsize))
        dk = max(16, next_power_of_two(ranks["k_proj"])) if qk_red else hd
        dv = max(16, next_power_of_two(ranks["v_proj"])) if v_red else hd
        flops = 2 * batch * heads * length * length * (dk + dv)
        if qk_red:
            flops += 2 * m * heads * ranks["q_proj"] * dk
        if v_red:
            flops += 2 * m * dv * d
        width_in = (ranks["q_proj"] + ranks["k_proj"] if qk_red else 2 * d) + (ranks["v_proj"] if v_red else d)
        ops.append({"op": "attention", "flops": flops, "bytes": itemsize * m * (width_in + d)})
    else:
        for key in ("q_proj", "k_proj", "v_proj"):
            ops += proj(key, d, d)
        ops.append({"op": "attention", "flops": 4 * batch * heads * length * length * hd, "bytes": itemsize * 4 * m * d})
    if fused:
        ops += proj("out_proj", d, d, fused_epilogue_reads=m * d)
    else:
        ops += proj("out_proj", d, d)
        ops.append({"op": "residual1", "flops": m * d, "bytes": itemsize * 3 * m * d})
    ops.append({"op": "ln2", "flops": 5 * m * d, "bytes": itemsize * 2 * m * d})
    ops += proj("fc1", d, ffn)
    if not fused:
        ops.append({"op": "gelu", "flops": 8 * m * ffn, "bytes": itemsize * 2 * m * ffn})
    if fused:
        ops += proj("fc2", ffn, d, fused_epilogue_reads=m * d)
    else:
        ops += proj("fc2", ffn, d)
        ops.append({"op": "residual2", "flops": m * d, "bytes": itemsize * 3 * m * d})
    return ops


def encoder_cost(base, low_rank_config, batch, peak_flops, peak_bytes, structure, itemsize=2):
    d, heads, ffn = base["d_model"], base["encoder_attention_heads"], base["encoder_ffn_dim"]
    length, mels = base["max_source_positions"], base["num_mel_bins"]
    frames = 2 * length
    ops = [
        {"op": "conv1+gelu", "flops": 2 * batch * frames * mels * 3 * d, "bytes": itemsize * batch * (frames * mels + 2 * frames * d)},
        {"op": "conv2+gelu", "flops": 2 * batch * length * d * 3 * d, "bytes": itemsize * batch * (frames * d + 2 * length * d)},
    ]
    for ranks in low_rank_config:
        ops += layer_ops(ranks, d, heads, ffn, length, batch, itemsize, structure)
    flops = sum(o["flops"] for o in ops)
    ideal = sum(max(o["flops"] / peak_flops, o["bytes"] / peak_bytes) for o in ops)
    return {"flops": flops, "bytes": sum(o["bytes"] for o in ops), "ideal_s": ideal, "ops_per_layer0": ops[2:]}


# --- models ---------------------------------------------------------------------------------------------------


def load_profile():
    with open(PROFILE) as f:
        return json.load(f)


def build_models(profile, decoder_layers=2):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from lite_whisper import LiteWhisperConfig, LiteWhisperForConditionalGeneration

    base = dict(profile["base"])
    common = dict(
        base, decoder_layers=decoder_layers, decoder_attention_heads=base["encoder_attention_heads"],
        decoder_ffn_dim=base["encoder_ffn_dim"], vocab_size=51866, max_target_positions=448,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        original = WhisperForConditionalGeneration(WhisperConfig(**common)).half().eval()
        lite = LiteWhisperForConditionalGeneration(
            LiteWhisperConfig(low_rank_config=profile["low_rank_config"], use_triton_kernels=False, **common)
        ).half().eval()
    for model in (original, lite):
        model.config._attn_implementation = "sdpa"
    return original, lite


# --- timing ---------------------------------------------------------------------------------------------------


def time_fn(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times), max(times)


def set_compiled(encoder, on):
    for layer in encoder.layers:
        if on:
            layer.compile(dynamic=False)
        else:
            layer._compiled_call_impl = None


def run_mode(encoder, features, mode, warmup, reps):
    """Median ms of encoder(features) in `mode`, and the output (for the cross-check)."""
    set_compiled(encoder, mode.startswith("compile"))
    try:
        with torch.inference_mode():
            if mode in ("eager", "compile"):
                fn = lambda: encoder(features).last_hidden_state  # noqa: E731
                out = fn()
                return time_fn(fn, warmup, reps), out
            static_in = features.clone()
            for _ in range(3):  # warm-up outside capture: compiles, triton JIT, cuBLAS handles
                encoder(static_in)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = encoder(static_in).last_hidden_state
            timing = time_fn(graph.replay, warmup, reps)
            out = static_out.clone()
            del graph, static_out
            return timing, out
    finally:
        set_compiled(encoder, False)
        torch.cuda.empty_cache()


def card_name():
    name = torch.cuda.get_device_name()
    return "H200" if "H200" in name else "H100" if "H100" in name else name


def bench_encoders(args, profile, original, lite, results):
    from lite_whisper import kernels

    card = card_name()
    peak_flops, peak_bytes = PEAKS.get(card, PEAKS["H100"])
    base = profile["base"]
    full_config = [{} for _ in profile["low_rank_config"]]
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        original.to(dtype)
        lite.to(dtype)
        for batch in args.batches:
            features = torch.randn(batch, base["num_mel_bins"], 2 * base["max_source_positions"], device="cuda", dtype=dtype)
            costs = {
                name: encoder_cost(base, cfg, batch, peak_flops, peak_bytes, structure)
                for name, cfg, structure in (
                    ("original", full_config, "plain"), ("lowrank_plain", profile["low_rank_config"], "plain"),
                    ("original_fused", full_config, "fused"), ("lowrank_fused", profile["low_rank_config"], "fused"),
                )
            }
            entry = {"card": card, "dtype": dtype_name, "batch": batch, "modes": {}, "costs": {
                k: {"tflop": v["flops"] / 1e12, "gbytes": v["bytes"] / 1e9, "ideal_ms": v["ideal_s"] * 1e3} for k, v in costs.items()}}
            outputs = {}
            for variant in ("original", "lowrank_plain", "lowrank_kernels"):
                model = original if variant == "original" else lite
                if variant == "lowrank_kernels":
                    kernels.enable(lite)
                else:
                    kernels.disable(lite)
                entry["modes"][variant] = {}
                for mode in args.modes:
                    if mode.startswith("compile") and (dtype_name not in args.compile_dtypes or batch not in args.compile_batches):
                        continue
                    t0 = time.time()
                    try:
                        (median, lo, hi), out = run_mode(model.model.encoder, features, mode, args.warmup, args.reps)
                    except Exception as error:  # keep the rest of the table when one mode fails
                        logger.exception("%s %s b%d %s failed", variant, dtype_name, batch, mode)
                        entry["modes"][variant][mode] = {"error": repr(error)[:300]}
                        continue
                    entry["modes"][variant][mode] = {"ms": median, "min_ms": lo, "max_ms": hi, "setup_s": time.time() - t0}
                    outputs.setdefault(variant, out.float())
                    logger.info("%s %s b%d %-14s %8.2f ms", card, dtype_name, batch, variant + "/" + mode, median)
            kernels.disable(lite)
            ref = outputs.get("lowrank_plain")
            if ref is not None and "lowrank_kernels" in outputs:
                entry["kernels_vs_plain_rel_err"] = ((outputs["lowrank_kernels"] - ref).norm() / ref.norm()).item()
            best = {}
            for variant, modes in entry["modes"].items():
                timed = {m: v["ms"] for m, v in modes.items() if "ms" in v}
                if timed:
                    mode = min(timed, key=timed.get)
                    flops = costs["original" if variant == "original" else "lowrank_plain"]["flops"]
                    best[variant] = {"mode": mode, "ms": timed[mode], "tflops": flops / (timed[mode] * 1e-3) / 1e12}
            entry["best"] = best
            if "original" in best:
                for variant in ("lowrank_plain", "lowrank_kernels"):
                    if variant in best:
                        best[variant]["speedup"] = best["original"]["ms"] / best[variant]["ms"]
            entry["ideal_ratio_plain_ops"] = costs["original"]["ideal_s"] / costs["lowrank_plain"]["ideal_s"]
            entry["ideal_ratio_fused_ops"] = costs["original_fused"]["ideal_s"] / costs["lowrank_fused"]["ideal_s"]
            entry["flop_ratio"] = costs["original"]["flops"] / costs["lowrank_plain"]["flops"]
            rows.append(entry)
            del features
    original.half()
    lite.half()
    results["encoder"] = rows


def bench_layers(args, profile, lite, results):
    """Per-layer time of the kernel forward vs the stock forward (eager, CUDA-graph replay), to check the rule."""
    from lite_whisper import kernels
    from lite_whisper.kernels import encoder as encoder_module

    slowdown = encoder_module.ATTENTION_KERNEL_SLOWDOWN
    base = profile["base"]
    out = []
    for dtype_name in args.dtypes[:1]:
        dtype = getattr(torch, dtype_name)
        lite.to(dtype)
        x = torch.randn(args.layer_batch, base["max_source_positions"], base["d_model"], device="cuda", dtype=dtype)
        for index in args.layers:
            layer = lite.model.encoder.layers[index]
            row = {"layer": index, "dtype": dtype_name, "batch": args.layer_batch}
            for variant in ("stock", "kernels", "kernels_sdpa_only"):
                if variant == "stock":
                    kernels.disable(lite)
                else:
                    kernels.disable(lite)
                    encoder_module.ATTENTION_KERNEL_SLOWDOWN = 1e6 if variant == "kernels_sdpa_only" else slowdown
                    kernels.enable(lite)
                    encoder_module.ATTENTION_KERNEL_SLOWDOWN = slowdown
                    row["plan_" + variant] = layer._lite_whisper_plan.describe()
                with torch.inference_mode():
                    for _ in range(3):
                        layer(x, None)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        layer(x, None)
                    row[variant + "_ms"] = time_fn(graph.replay, 5, args.reps)[0]
                    del graph
            kernels.disable(lite)
            logger.info("layer %d: %s", index, row)
            out.append(row)
    lite.half()
    results["layers"] = out


def bench_attention_kernel(args, results):
    """Our attention kernel against SDPA at the benchmark's shapes (calibrates the rule), a sweep of its tile
    configs, and its error against the reference across head widths and reduced sides."""
    from torch.nn import functional as F

    from lite_whisper.kernels import attention as attention_module
    from lite_whisper.kernels.attention import lowrank_attention
    from lite_whisper.kernels.reference import lowrank_attention_reference, qk_matrices

    rows = []
    for batch in (1, 8):
        heads, hd, length = 20, 64, 1500
        q, k, v = (torch.randn(batch * length, heads * hd, device="cuda", dtype=torch.float16) for _ in range(3))

        def sdpa():
            def h(t):
                return t.view(batch, length, heads, hd).transpose(1, 2)
            return F.scaled_dot_product_attention(h(q), h(k), h(v)).transpose(1, 2).reshape(batch * length, -1)

        ref = sdpa()
        flops = 4 * batch * heads * length * length * hd
        row = {"batch": batch, "sdpa_ms": time_fn(sdpa, 5, args.reps)[0], "triton": {}}
        for config in (None, (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 2), (128, 32, 4, 3)):
            attention_module.CONFIG_OVERRIDE = config
            try:
                err = ((lowrank_attention(q, k, v, batch, heads, hd).float() - ref.float()).norm() / ref.float().norm()).item()
                t = time_fn(lambda: lowrank_attention(q, k, v, batch, heads, hd), 5, args.reps)[0]
                row["triton"][str(config)] = {"ms": t, "rel_err": err, "tflops": flops / t / 1e9}
            except Exception as error:
                row["triton"][str(config)] = {"error": repr(error)[:200]}
        attention_module.CONFIG_OVERRIDE = None
        row["sdpa_tflops"] = flops / row["sdpa_ms"] / 1e9
        rows.append(row)
        logger.info("attention b%d: sdpa %.3f ms; triton %s", batch, row["sdpa_ms"],
                    {c: round(v.get("ms", -1), 3) for c, v in row["triton"].items()})
    results["attention_kernel"] = rows

    diag = []
    for hd in (16, 32, 64):
        for length in (37, 300):
            for qk_red, v_red in ((True, True), (True, False), (False, True), (False, False)):
                heads, rq, rk, rv, batch = 2, 32, 32, 48, 2
                dt = torch.float16
                xq, xk, xv = (torch.randn(batch * length, r, device="cuda", dtype=dt) for r in (rq, rk, rv))
                wq, wk, wv = (torch.randn(r, heads * hd, device="cuda", dtype=dt) / r**0.5 for r in (rq, rk, rv))
                bq, bv = (torch.randn(heads * hd, device="cuda", dtype=dt) * 0.5 for _ in range(2))
                ref = lowrank_attention_reference(xq.view(batch, length, -1), xk.view(batch, length, -1), xv.view(batch, length, -1),
                                                  wq, bq, wk, wv, bv, heads).reshape(batch * length, -1)
                kw = {}
                if qk_red:
                    m, u = qk_matrices(wq, bq, wk, heads)
                    qs, ks = xq, xk
                    kw.update(qk_matrix=m.to(dt), qk_bias=u.to(dt))
                else:
                    qs, ks = (xq.float() @ wq.float() + bq.float()).to(dt), (xk.float() @ wk.float()).to(dt)
                if v_red:
                    vs = xv
                    kw.update(v_weight=wv, v_bias=bv)
                else:
                    vs = (xv.float() @ wv.float() + bv.float()).to(dt)
                try:
                    out = lowrank_attention(qs, ks, vs, batch, heads, hd, **kw)
                    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                except Exception as error:
                    err = repr(error)[:100]
                diag.append({"head_dim": hd, "length": length, "qk_reduced": qk_red, "v_reduced": v_red, "rel_err": err})
    bad = [d for d in diag if not isinstance(d["rel_err"], float) or d["rel_err"] > 4e-3]
    logger.info("attention diagnostics: %d cases, bad: %s", len(diag), bad)
    results["attention_diag"] = diag


def bench_linear_kernel(args, results):
    """Fused Triton GEMM+epilogue vs cuBLAS GEMM then the elementwise pass, for the profile's fc1/fc2 shapes."""
    from torch.nn import functional as F

    from lite_whisper.kernels import linear as linear_module
    from lite_whisper.kernels.linear import fused_linear

    rows = []
    for batch in (1, 8):
        m = batch * 1500
        for name, k, n, gelu in (("fc1.w2 r768", 768, 5120, True), ("fc2 full", 5120, 1280, False),
                                 ("out.w2 r320", 320, 1280, False), ("fc1.w2 r368", 368, 5120, True)):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            w = torch.randn(k, n, device="cuda", dtype=torch.float16) / k**0.5
            b = torch.randn(n, device="cuda", dtype=torch.float16)
            r = None if gelu else torch.randn(m, n, device="cuda", dtype=torch.float16)

            def torch_path():
                y = torch.addmm(b, x, w)
                return F.gelu(y) if gelu else y + r

            def triton_path():
                return fused_linear(x, w, b, gelu=gelu, residual=r)

            err = ((triton_path().float() - torch_path().float()).norm() / torch_path().float().norm()).item()
            t_torch = time_fn(torch_path, 5, args.reps)[0]
            t_tri = time_fn(triton_path, 5, args.reps)[0]
            t_mm = time_fn(lambda: torch.mm(x, w), 5, args.reps)[0]
            row = {"op": name, "batch": batch, "cublas_plus_epilogue_ms": t_torch, "cublas_mm_only_ms": t_mm,
                   "triton_fused_ms": t_tri, "rel_err": err, "triton_tflops": 2 * m * k * n / t_tri / 1e9,
                   "cublas_tflops": 2 * m * k * n / t_mm / 1e9}
            if gelu:
                lt = lambda: torch._addmm_activation(b, x, w, use_gelu=True)  # noqa: E731
                row["cublaslt_gelu_ms"] = time_fn(lt, 5, args.reps)[0]
                row["cublaslt_gelu_rel_err"] = ((lt().float() - torch_path().float()).norm() / torch_path().float().norm()).item()
            else:
                aug = lambda: torch.addmm(r, x, w)  # noqa: E731
                row["cublas_beta1_residual_ms"] = time_fn(aug, 5, args.reps)[0]
            if batch == 8 and name.startswith("fc1.w2 r768"):
                row["triton_configs"] = {}
                for config in ((128, 256, 64, 8, 4), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3),
                               (128, 256, 32, 8, 4), (64, 256, 64, 4, 4)):
                    linear_module.CONFIG_OVERRIDE = config
                    try:
                        row["triton_configs"][str(config)] = time_fn(triton_path, 5, args.reps)[0]
                    except Exception as error:
                        row["triton_configs"][str(config)] = repr(error)[:100]
                linear_module.CONFIG_OVERRIDE = None
            rows.append(row)
            logger.info("%s", row)
    results["linear_kernel"] = rows


def transcript_outputs(args, results):
    """Encoder outputs of the compressed whisper-base on real clips, with and without kernels (decoded on CPU)."""
    from safetensors.torch import load_file

    from lite_whisper import LiteWhisperConfig, LiteWhisperForConditionalGeneration, kernels

    folder = CARRY / "whisper_base_lite"
    if not folder.is_dir():
        logger.warning("no %s: skipping the real-weights check", folder)
        return
    config = LiteWhisperConfig.from_pretrained(folder)
    config.use_triton_kernels = False
    with torch.device("cuda"):
        model = LiteWhisperForConditionalGeneration(config).half().eval()
    state = load_file(str(folder / "encoder.safetensors"), device="cuda")
    missing, unexpected = model.model.encoder.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise RuntimeError(f"encoder weights: missing {missing}, unexpected {unexpected}")
    features = load_file(str(CARRY / "features.safetensors"), device="cuda")["features"].half()
    from safetensors.torch import save_file

    from lite_whisper.kernels import encoder as encoder_module

    report = {"clips": features.shape[0]}
    with torch.inference_mode():
        plain = model.model.encoder(features).last_hidden_state
        # One file each: the device returns files of at most 16 MB.
        save_file({"plain": plain.cpu().contiguous()}, os.path.join(args.out, "base_encoder_plain.safetensors"))
        for name, override in (("kernels", None), ("kernels_forced", (True, True))):
            encoder_module.ATTENTION_PLAN_OVERRIDE = override
            changed = kernels.enable(model)
            encoder_module.ATTENTION_PLAN_OVERRIDE = None
            fast = model.model.encoder(features).last_hidden_state
            plans = [layer._lite_whisper_plan.describe() for layer in model.model.encoder.layers]
            kernels.disable(model)
            save_file({name: fast.cpu().contiguous()}, os.path.join(args.out, f"base_encoder_{name}.safetensors"))
            err = ((fast.float() - plain.float()).norm() / plain.float().norm()).item()
            report[name] = {"layers_with_kernels": changed, "plans": plans, "rel_err": err}
            logger.info("whisper-base compressed, %s: %d layers, encoder rel err %.2e, plans %s", name, changed, err, plans)
    results["real_weights"] = report


def bench_turbo(args, profile, results):
    """Turbo-shaped model (32 encoder, 4 decoder layers) transcribing 30 s at batch 16: encoder + greedy decoding.

    Each encoder runs in compile+graph mode (the best mode of the original in the encoder table); the decoders are
    identical, eager, with a KV cache and a fixed number of greedy tokens. The three models are timed interleaved
    (A B C A B C ...) so that drift of the host-bound decoding hits all of them alike.
    """
    from lite_whisper import kernels

    original, lite_plain = build_models(profile, decoder_layers=4)
    _, lite_kernels = build_models(profile, decoder_layers=4)
    kernels.enable(lite_kernels)
    batch, new_tokens = args.turbo_batch, args.turbo_tokens
    features = torch.randn(batch, profile["base"]["num_mel_bins"], 3000, device="cuda", dtype=torch.float16)
    out = {"card": card_name(), "batch": batch, "new_tokens": new_tokens, "dtype": "float16",
           "encoder_mode": "compile+graph", "decoder": "eager, KV cache, greedy, fixed token count",
           "timing": f"median of {args.turbo_reps} interleaved runs after 2 warm-up runs"}
    runners, graphs = {}, []
    for name, model in (("original", original), ("lowrank_plain", lite_plain), ("lowrank_kernels", lite_kernels)):
        encoder = model.model.encoder
        set_compiled(encoder, True)
        with torch.inference_mode():
            static_in = features.clone()
            for _ in range(3):
                encoder(static_in)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = encoder(static_in).last_hidden_state
        graphs.append(graph)

        def run(model=model, graph=graph, static_out=static_out):
            graph.replay()
            ids = torch.full((batch, 1), 50258, device="cuda", dtype=torch.long)
            past = None
            for _ in range(new_tokens):
                o = model(encoder_outputs=(static_out,), decoder_input_ids=ids[:, -1:], past_key_values=past, use_cache=True)
                past = o.past_key_values
                ids = torch.cat([ids, o.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            return ids

        runners[name] = run
        out[name + "_encoder_ms"] = time_fn(graph.replay, 3, args.reps)[0]
    samples = {name: [] for name in runners}
    with torch.inference_mode():
        for name, run in runners.items():
            for _ in range(2):
                run()
        for _ in range(args.turbo_reps):
            for name, run in runners.items():
                samples[name].append(time_fn(run, 0, 1)[0])
    for name, values in samples.items():
        out[name + "_ms"] = statistics.median(values)
    out["speedup_plain"] = out["original_ms"] / out["lowrank_plain_ms"]
    out["speedup_kernels"] = out["original_ms"] / out["lowrank_kernels_ms"]
    out["encoder_speedup_kernels"] = out["original_encoder_ms"] / out["lowrank_kernels_encoder_ms"]
    logger.info("turbo e2e: %s", out)
    results["turbo_e2e"] = out
    for model in (original, lite_plain, lite_kernels):
        set_compiled(model.model.encoder, False)
    del graphs, runners, original, lite_plain, lite_kernels
    torch.cuda.empty_cache()


def bench_sdpa_layout(args, results):
    """Does the SDPA call of the kernel path (strided views of (B*T, H*d), output transposed back) cost more than
    SDPA on contiguous (B, H, T, d) tensors, as the stock attention passes them? For the notes."""
    from torch.nn import functional as F

    rows = []
    for batch in (1, 8):
        heads, hd, length = 20, 64, 1500
        flat = [torch.randn(batch * length, heads * hd, device="cuda", dtype=torch.float16) for _ in range(3)]
        views = [t.view(batch, length, heads, hd).transpose(1, 2) for t in flat]
        dense = [v.contiguous() for v in views]
        t_views = time_fn(lambda: F.scaled_dot_product_attention(*views).transpose(1, 2).reshape(batch * length, -1), 5, args.reps)[0]
        t_dense = time_fn(lambda: F.scaled_dot_product_attention(*dense), 5, args.reps)[0]
        t_dense_out = time_fn(lambda: F.scaled_dot_product_attention(*dense).transpose(1, 2).reshape(batch * length, -1), 5, args.reps)[0]
        rows.append({"batch": batch, "views_plus_reshape_ms": t_views, "contiguous_ms": t_dense, "contiguous_plus_reshape_ms": t_dense_out})
        logger.info("sdpa layout %s", rows[-1])
    results["sdpa_layout"] = rows


def choose_sdpa(args):
    """Set the SDPA backend priority for the whole process (every model gets the same), return what was chosen."""
    from torch.nn import functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(8, 20, 1500, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    timings = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                timings[name] = time_fn(lambda: F.scaled_dot_product_attention(q, k, v), 5, args.reps)[0]
        except Exception as error:
            timings[name + "_error"] = repr(error)[:200]
    choice = args.sdpa
    if choice == "auto":
        choice = "cudnn" if timings.get("cudnn", 1e9) < timings.get("flash", 1e9) else "default"
    if choice == "cudnn":
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        sdpa_kernel(order, set_priority=True).__enter__()  # for the rest of the process
    logger.info("SDPA b8 (20 heads, 1500, 64): %s -> %s for every model", timings, choice)
    return {"timings_ms": timings, "choice": choice}


def print_table(results):
    rows = results.get("encoder", [])
    print(f"\n{'card':5} {'dtype':9} {'b':>3} | {'original':>16} | {'low-rank plain':>22} | {'low-rank+kernels':>22} | ideal(plain/fused) flop")
    for e in rows:
        b = e["best"]

        def cell(v):
            if v not in b:
                return "-"
            s = f"{b[v]['ms']:.2f}ms {b[v]['mode'][:7]}"
            return s + (f" {b[v]['speedup']:.2f}x" if "speedup" in b[v] else f" {b[v]['tflops']:.0f}TF")
        print(f"{e['card']:5} {e['dtype']:9} {e['batch']:>3} | {cell('original'):>16} | {cell('lowrank_plain'):>22} | "
              f"{cell('lowrank_kernels'):>22} | {e['ideal_ratio_plain_ops']:.2f}/{e['ideal_ratio_fused_ops']:.2f} {e['flop_ratio']:.2f}")
    if "turbo_e2e" in results:
        t = results["turbo_e2e"]
        print(f"turbo e2e b{t['batch']} {t['new_tokens']} tokens ({t['card']}, encoders {t['encoder_mode']}): "
              f"encoders {t['original_encoder_ms']:.1f} / {t['lowrank_plain_encoder_ms']:.1f} / {t['lowrank_kernels_encoder_ms']:.1f} ms; "
              f"original {t['original_ms']:.1f} ms, "
              f"plain {t['lowrank_plain_ms']:.1f} ms ({t['speedup_plain']:.3f}x), kernels {t['lowrank_kernels_ms']:.1f} ms "
              f"({t['speedup_kernels']:.3f}x)")


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib missing: no PNG (run `plot` on another machine)")
        return
    rows = results.get("encoder", [])
    dtypes = sorted({e["dtype"] for e in rows})
    if not rows:
        return
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        sel = [e for e in rows if e["dtype"] == dtype]
        labels = [f"b{e['batch']}" for e in sel]
        for i, variant in enumerate(("lowrank_plain", "lowrank_kernels")):
            ax.bar([j + 0.3 * i for j in range(len(sel))], [e["best"].get(variant, {}).get("speedup", 0) for e in sel],
                   width=0.3, label=variant)
        ax.plot([j + 0.15 for j in range(len(sel))], [e["ideal_ratio_fused_ops"] for e in sel], "k_", markersize=30, label="ideal (fused ops)")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xticks([j + 0.15 for j in range(len(sel))], labels)
        ax.set_title(f"{dtype} on {sel[0]['card'] if sel else ''}: speedup over original (best modes)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --- CPU side: prepare and decode -----------------------------------------------------------------------------


def prepare(args):
    from safetensors.torch import save_file
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    from lite_whisper import build_lite_whisper, factors_from_svd
    from lite_whisper.audio import load_audio, read_manifest
    from lite_whisper.factorize import dense_weight
    from lite_whisper.modeling_lite_whisper import encoder_projection
    from lite_whisper.whisper_base import whisper_base_path

    path = whisper_base_path()
    whisper = WhisperForConditionalGeneration.from_pretrained(path).eval()
    factors = {}
    for i, ranks in enumerate(BASE_RANKS):
        for key, rank in ranks.items():
            weight, bias = dense_weight(encoder_projection(whisper.model.encoder.layers[i], key))
            factors[(i, key)] = factors_from_svd(weight, bias, rank)
    lite = build_lite_whisper(whisper, factors)
    (DATA / "whisper_base_lite").mkdir(parents=True, exist_ok=True)
    lite.save_pretrained(DATA / "whisper_base_lite")
    out = CARRY / "whisper_base_lite"
    out.mkdir(parents=True, exist_ok=True)
    lite.config.save_pretrained(out)
    save_file({k: v.half().contiguous() for k, v in lite.model.encoder.state_dict().items()}, str(out / "encoder.safetensors"))
    manifest = read_manifest(args.manifest)
    clips = [c for c in manifest if c.get("condition") == "real"][: args.clips]
    extractor = WhisperFeatureExtractor.from_pretrained(path)
    audio = [load_audio(c["audio"]) for c in clips]
    features = extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    save_file({"features": features.half().contiguous()}, str(CARRY / "features.safetensors"))
    with open(CARRY / "clips.json", "w") as f:
        json.dump([{"id": c["id"], "text": c["text"]} for c in clips], f, indent=1)
    logger.info("prepared %d clips, features %s, encoder of %d projections", len(clips), tuple(features.shape), len(factors))


def transcripts(args):
    from safetensors.torch import load_file
    from transformers import WhisperProcessor
    from transformers.modeling_outputs import BaseModelOutput

    from lite_whisper import LiteWhisperForConditionalGeneration
    from lite_whisper.whisper_base import whisper_base_path

    outputs = {}
    for path in args.encoder_outputs:
        outputs.update(load_file(path))
    model = LiteWhisperForConditionalGeneration.from_pretrained(DATA / "whisper_base_lite").eval()
    processor = WhisperProcessor.from_pretrained(whisper_base_path())
    features = load_file(str(CARRY / "features.safetensors"))["features"].float()
    clips = json.load(open(CARRY / "clips.json"))
    texts = {}
    with torch.inference_mode():
        for name in outputs:
            enc = BaseModelOutput(last_hidden_state=outputs[name].float())
            ids = model.generate(features, encoder_outputs=enc, language="en", task="transcribe", max_new_tokens=120)
            texts[name] = processor.batch_decode(ids, skip_special_tokens=True)
    report = {"clips": len(clips),
              "identical_to_plain": {name: sum(a == b for a, b in zip(texts["plain"], texts[name])) for name in texts},
              "rows": [dict({"id": c["id"], "reference": c["text"]}, **{name: texts[name][i] for name in texts})
                       for i, c in enumerate(clips)]}
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--manifest", default=str(ROOT.parent / "shared/eval/dev/manifest.jsonl"))
    p.add_argument("--clips", type=int, default=6)
    b = sub.add_parser("bench")
    b.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    b.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    b.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    b.add_argument("--modes", nargs="+", default=["eager", "graph", "compile+graph"])
    b.add_argument("--compile-dtypes", nargs="+", default=["float16", "bfloat16"])
    b.add_argument("--compile-batches", type=int, nargs="+", default=[1, 8, 32])
    b.add_argument("--sdpa", choices=["default", "cudnn", "auto"], default="auto",
                   help="SDPA backend priority for ALL models: auto times flash vs cuDNN once and takes the faster")
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--reps", type=int, default=20)
    b.add_argument("--parts", nargs="+", default=["kernels", "layers", "encoder", "real", "turbo"])
    b.add_argument("--layers", type=int, nargs="+", default=[0, 1, 3, 6, 7])
    b.add_argument("--layer-batch", type=int, default=8)
    b.add_argument("--turbo-batch", type=int, default=16)
    b.add_argument("--turbo-tokens", type=int, default=96)
    b.add_argument("--turbo-reps", type=int, default=7)
    t = sub.add_parser("transcripts")
    t.add_argument("encoder_outputs", nargs="+", help="base_encoder_plain/kernels.safetensors from `bench`")
    t.add_argument("--json")
    pl = sub.add_parser("plot")
    pl.add_argument("json")
    pl.add_argument("png")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)

    if args.command == "prepare":
        return prepare(args)
    if args.command == "transcripts":
        return transcripts(args)
    if args.command == "plot":
        return plot(json.load(open(args.json)), args.png)

    os.makedirs(args.out, exist_ok=True)
    torch._dynamo.config.cache_size_limit = 256
    torch._dynamo.config.accumulated_cache_size_limit = 4096
    results = {"device": torch.cuda.get_device_name(), "card": card_name(), "torch": torch.__version__,
               "args": {k: v for k, v in vars(args).items()}}
    import transformers
    import triton

    results["transformers"], results["triton"] = transformers.__version__, triton.__version__
    profile = load_profile()
    results["sdpa"] = choose_sdpa(args)
    json_path = os.path.join(args.out, "encoder_latency.json")

    def save():
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)

    steps = []
    if "kernels" in args.parts:
        steps += [lambda: bench_attention_kernel(args, results), lambda: bench_linear_kernel(args, results)]
    if "real" in args.parts:
        steps.append(lambda: transcript_outputs(args, results))
    if "layers" in args.parts or "encoder" in args.parts:
        def encoders():
            original, lite = build_models(profile)
            if "layers" in args.parts:
                bench_layers(args, profile, lite, results)
                save()
            if "encoder" in args.parts:
                bench_encoders(args, profile, original, lite, results)
        steps.append(encoders)
    if "turbo" in args.parts:
        steps.append(lambda: bench_turbo(args, profile, results))
    if "sdpa_layout" in args.parts:
        steps.append(lambda: bench_sdpa_layout(args, results))
    for step in steps:
        try:
            step()
        except Exception:
            logger.exception("step failed")
        save()
        torch.cuda.empty_cache()
    print_table(results)
    plot(results, os.path.join(args.out, "encoder_latency.png"))


if __name__ == "__main__":
    main()
