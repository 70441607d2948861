"""The decoder-step kernels (lite_whisper.kernels.decode) on one GPU: correctness at model shapes, a tile sweep,
and time per call against the PyTorch ops they replace and against the bytes floor.

    python benchmarks/decode_kernels.py --shape turbo --batches 1 16 32 [--sweep] [--out DIR]

Each case is timed inside a CUDA graph of many calls on distinct weight copies (more bytes than the L2 holds), as in
a real decoder step, where every GEMV reads weights the previous one did not: per-call time = replay / calls.
"""

import argparse
import itertools
import json
import logging
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("decode_kernels")
SHAPES = {"turbo": dict(d=1280, ffn=5120, vocab=51866, heads=20), "base": dict(d=512, ffn=2048, vocab=51865, heads=8)}
ROTATE_BYTES = 256e6  # weight copies per graph: well past the H100's 50 MB L2
SWEEP = {
    "block_n": (16, 32, 64),
    "block_k": (128, 256),
    "warps": (4,),
    "stages": (4,),
    "split": (1, 2, 4),
}


def graph_time_us(calls, reps=20):
    """Median time of one call, from a CUDA graph that replays `calls` (a list of thunks) back to back."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def cases(shape, batch, dtype):
    """name -> (kind, N, K, kernel kwargs builder flags)."""
    d, ffn, vocab = shape["d"], shape["ffn"], shape["vocab"]
    return {
        "qkv (LN, KV write)": ("kv", 3 * d, d, dict(norm=True, kv=True)),
        "self out (residual)": ("linear", d, d, dict(residual=True)),
        "cross q (LN)": ("linear", d, d, dict(norm=True)),
        "fc1 (LN, GELU)": ("linear", ffn, d, dict(norm=True, gelu=True)),
        "fc2 (residual)": ("linear", d, ffn, dict(residual=True)),
        "logits (LN, masks, argmax)": ("logits", vocab, d, dict()),
    }


def make_call(kd, name, kind, N, K, flags, batch, dtype, shape, copies, kernel=True):
    """Thunks over `copies` weight copies, plus a check function comparing one call with the reference."""
    from lite_whisper.kernels import reference as ref

    dev = "cuda"
    heads = shape["heads"]
    x = torch.randn(batch, K, device=dev, dtype=dtype) + 3.0
    norm = (1 + 0.1 * torch.randn(K, device=dev, dtype=dtype), 0.1 * torch.randn(K, device=dev, dtype=dtype), 1e-5)
    weights = [torch.randn(N, K, device=dev, dtype=dtype) * K**-0.5 for _ in range(copies)]
    bias = 0.1 * torch.randn(N, device=dev, dtype=dtype)
    length = torch.tensor(60, device=dev)
    if kind == "logits":
        raw = torch.empty(batch, N, device=dev)
        scores = torch.empty_like(raw)
        blocks = kd.logits_blocks(N, batch)
        pv = torch.empty(batch, blocks, device=dev)
        pi = torch.empty(batch, blocks, device=dev, dtype=torch.int32)
        codes = ref.token_mask_codes(N, always=range(50257, 50300)).to(dev)
        if kernel:
            calls = [lambda w=w: kd.decode_logits(x, norm, w, raw, scores, pv, pi, codes, length, 3, 5)
                     for w in weights]
        else:
            def torch_logits(w):
                h = F.layer_norm(x, (K,), norm[0], norm[1])
                raw.copy_(F.linear(h, w).float())
                scores.copy_(raw)
                scores.masked_fill_(codes.bool(), float("-inf"))
                return scores.argmax(dim=-1)
            calls = [lambda w=w: torch_logits(w) for w in weights]

        def check():
            calls[0]()
            want_raw, want_scores, want_best = ref.decode_logits_reference(x, norm, weights[0], codes, length, 3, 5)
            err = ((raw - want_raw).norm() / want_raw.norm()).item()
            best = pv.argmax(dim=1)
            got = pi.gather(1, best[:, None])[:, 0].long()
            return err, bool(torch.equal(got, want_best))
        return calls, check, N * K * dtype.itemsize

    d = N // 3 if flags.get("kv") else N
    out = torch.empty(batch, d, device=dev, dtype=dtype)
    res = torch.randn(batch, N, device=dev, dtype=dtype) if flags.get("residual") else None
    kc = torch.zeros(batch, heads, 448, (N // 3) // heads, device=dev, dtype=dtype) if flags.get("kv") else None
    vc = torch.zeros_like(kc) if kc is not None else None
    ln = norm if flags.get("norm") else None
    gelu = flags.get("gelu", False)
    if kernel:
        workspace = kd.decode_workspace(batch, N, dev)
        calls = [lambda w=w: kd.decode_linear(x, w, bias, out, norm=ln, gelu=gelu, residual=res,
                                              kv=(kc, vc) if kc is not None else None, length=length, kind=kind,
                                              workspace=workspace)
                 for w in weights]
    else:
        def torch_linear(w):
            h = F.layer_norm(x, (K,), ln[0], ln[1]) if ln else x
            y = F.linear(h, w, bias)
            if gelu:
                y = F.gelu(y)
            if res is not None:
                y = y + res
            if kc is not None:
                q, k, v = y.view(batch, 1, 3, heads, -1).permute(2, 0, 3, 1, 4)
                kc.index_copy_(2, (length - 1).view(1), k)
                vc.index_copy_(2, (length - 1).view(1), v)
                return q
            return y
        calls = [lambda w=w: torch_linear(w) for w in weights]

    def check():
        calls[0]()
        want = ref.decode_linear_reference(x, weights[0], bias, norm=ln, gelu=gelu, residual=res)
        if kc is not None:
            want = want.view(batch, 3, heads, -1)
            got = torch.stack([out.view(batch, heads, -1), kc[:, :, 59], vc[:, :, 59]], dim=1)
        else:
            got = out
        want = want.float()
        return ((got.float().view_as(want) - want).norm() / want.norm()).item(), True
    return calls, check, N * K * dtype.itemsize


def attention_rows(kd, shape, batch, dtype, length_value=100):
    heads, d = shape["heads"], shape["d"]
    hd = d // heads
    copies = 16
    q = torch.randn(batch, d, device="cuda", dtype=dtype)
    caches = [torch.randn(batch, heads, 448, hd, device="cuda", dtype=dtype) for _ in range(copies)]
    out = torch.empty_like(q)
    length = torch.tensor(length_value, device="cuda")
    kernel = [lambda c=c: kd.decode_self_attention(q, c, c, length, out, hd**-0.5) for c in caches]
    positions = torch.arange(128, device="cuda")
    qh = q.view(batch, 1, heads, hd).transpose(1, 2)

    def sdpa(c):
        mask = (positions <= (length - 1))[None, :]
        return F.scaled_dot_product_attention(qh, c[:, :, :128], c[:, :, :128], attn_mask=mask, scale=hd**-0.5)
    reference = [lambda c=c: sdpa(c) for c in caches]
    return graph_time_us(kernel), graph_time_us(reference)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="turbo", choices=sorted(SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 32])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--sweep", action="store_true", help="also time every tile configuration in SWEEP")
    parser.add_argument("--sweep-batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--out", default=None, help="folder for decode_kernels_<card>.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    from lite_whisper.kernels import decode as kd

    shape = SHAPES[args.shape]
    card = torch.cuda.get_device_name()
    results = {"card": card, "torch": torch.__version__, "shape": args.shape, "rows": [], "sweep": []}
    print(f"{card}, {args.shape}: per call, in a CUDA graph over distinct weights")
    print(f"{'case':28} {'dtype':9} {'batch':>5} {'kernel us':>10} {'torch us':>9} {'GB/s':>7} {'rel err':>8} argmax")
    for dtype_name, batch in itertools.product(args.dtypes, args.batches):
        dtype = getattr(torch, dtype_name)
        for name, (kind, N, K, flags) in cases(shape, batch, dtype).items():
            copies = max(2, int(ROTATE_BYTES // (N * K * dtype.itemsize)))
            calls, check, nbytes = make_call(kd, name, kind, N, K, flags, batch, dtype, shape, copies)
            err, same = check()
            kernel_us = graph_time_us(calls)
            torch_calls, _, _ = make_call(kd, name, kind, N, K, flags, batch, dtype, shape, copies, kernel=False)
            torch_us = graph_time_us(torch_calls)
            row = dict(case=name, dtype=dtype_name, batch=batch, kernel_us=kernel_us, torch_us=torch_us,
                       GBps=nbytes / kernel_us / 1e3, rel_err=err, argmax_ok=same, config=kd._config(kind, N, K, batch))
            results["rows"].append(row)
            print(f"{name:28} {dtype_name:9} {batch:5} {kernel_us:10.2f} {torch_us:9.2f} {row['GBps']:7.0f} "
                  f"{err:8.1e} {same}")
            if args.sweep and dtype_name == args.dtypes[0] and batch in args.sweep_batches:
                best = None
                for config in itertools.product(*SWEEP.values()):
                    if kind == "logits" and config[-1] != 1:
                        continue
                    kd.CONFIG_OVERRIDE[kind] = config
                    try:
                        calls, check, _ = make_call(kd, name, kind, N, K, flags, batch, dtype, shape, copies)
                        err, same = check()
                        us = graph_time_us(calls, reps=10)
                    except Exception as error:  # noqa: BLE001 - a config that does not compile is skipped
                        logger.info("  %s: %s", config, error)
                        continue
                    finally:
                        kd.CONFIG_OVERRIDE.pop(kind, None)
                    results["sweep"].append(dict(case=name, batch=batch, config=config, us=us, rel_err=err))
                    if best is None or us < best[1]:
                        best = (config, us)
                print(f"  best tile {best[0]}: {best[1]:.2f} us ({nbytes / best[1] / 1e3:.0f} GB/s)")
        self_us, sdpa_us = attention_rows(kd, shape, batch, dtype)
        results["rows"].append(dict(case="self-attention (100 positions)", dtype=dtype_name, batch=batch,
                                    kernel_us=self_us, torch_us=sdpa_us))
        print(f"{'self-attention, 100 pos':28} {dtype_name:9} {batch:5} {self_us:10.2f} {sdpa_us:9.2f}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = "decode_kernels_" + card.split()[1].lower() if len(card.split()) > 1 else "decode_kernels"
        (out / f"{name}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
