"""PyTorch + Hugging Face transformers baseline for Strata's GPU benchmarks (docs/PERFORMANCE.md).

Builds a causal LM from a HF config.json (e.g. bench/configs/llama3_8b.json) with random weights directly
on the GPU, then measures on the same machine and in the same run:
  copy     device-to-device copy of a 2 GiB buffer; GB/s counts bytes read plus bytes written (median).
           It is the memory-bandwidth ceiling, and bandwidth / (bytes of weights read per step) is the
           batch-1 decode roofline.
  prefill  one forward of [1, prefill_tokens] random token ids; tokens/s = prefill_tokens / median time
           (1 warm-up, 3 timed reps).
  decode   for each batch size B: prefill B random prompts of --prompt tokens into a DynamicCache, then
           --decode_tokens greedy steps written by hand (argmax of the last logits fed back as the next
           input); tokens/s = B * steps / time, and ms per step (median and mean).
Decoding deliberately avoids model.generate(): its logits processors, stopping criteria and bookkeeping
are overheads of HF's generation API, not of the model forward and KV cache that Strata is compared with.
Prefill and decode forwards ask for only the last position's logits (logits_to_keep=1) where supported.

Each measurement is guarded: once --time_budget_s has passed the remaining ones are recorded as
"skipped", and an out-of-memory or other error is recorded instead of ending the run. The JSON file is
rewritten after every measurement, so a run killed part way still leaves its results.

Usage: python3 bench/torch_baseline.py --config bench/configs/llama3_8b.json --out results.json
           [--prompt 512] [--decode_tokens 64] [--batches 1,64] [--prefill_tokens 2048]
           [--dtype bfloat16] [--time_budget_s 150]
Needs a CUDA GPU, torch and transformers (4.4x or 5.x); it never touches the network.
"""

import argparse
import gc
import inspect
import json
import os
import statistics
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

T0 = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - T0:7.1f}s]", *a, flush=True)


def cuda_time_s(fn):
    """Runs fn() once; returns (its GPU time in seconds, measured with CUDA events, its result)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    value = fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3, value


def build_model(cfg_dict, dtype):
    """Returns (model, config): random weights of dtype, on cuda, SDPA attention, eval mode."""
    try:
        config = LlamaConfig(**cfg_dict)
    except Exception:  # A transformers whose strict config rejects some legacy key: take the file path.
        config = LlamaConfig.from_dict(dict(cfg_dict))
    config.use_cache = True
    model = None
    with torch.device("cuda"):
        for dtype_kw in ("dtype", "torch_dtype"):  # transformers 5 uses dtype=, 4.x torch_dtype=.
            try:
                model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", **{dtype_kw: dtype})
                break
            except TypeError:
                continue
        if model is None:
            model = AutoModelForCausalLM.from_config(config)
    if any(q.device.type != "cuda" or q.dtype != dtype for q in model.parameters()):
        model = model.to(device="cuda", dtype=dtype)  # Only then: it would also cast the fp32 rope buffers.
    # Re-initialise on the GPU so every weight is defined whatever init transformers skipped: linear and
    # embedding weights N(0, 0.02), RMSNorm weights 1, biases 0. A few hundred kernels, well under a second.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.eval().requires_grad_(False)
    torch.cuda.synchronize()
    return model, model.config  # from_config may have copied the config; use the model's.


def last_logits_kwargs(model):
    """Keyword that limits the lm_head to the last position, under whichever name this version uses."""
    params = inspect.signature(model.forward).parameters
    return next(({kw: 1} for kw in ("logits_to_keep", "num_logits_to_keep") if kw in params), {})


def new_cache(config):
    try:
        return DynamicCache(config=config)
    except TypeError:
        return DynamicCache()


def measure_copy(args):
    n = 2 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 256)
    dst = torch.empty_like(src)
    cuda_time_s(lambda: dst.copy_(src))  # Warm-up.
    gbps = [2 * n / cuda_time_s(lambda: dst.copy_(src))[0] / 1e9 for _ in range(10)]
    return {"bytes": n, "reps": len(gbps), "gb_per_s_median": statistics.median(gbps), "gb_per_s_all": gbps}


def measure_prefill(args, model, config, kw):
    ids = torch.randint(0, config.vocab_size, (1, args.prefill_tokens), device="cuda")
    run = lambda: model(input_ids=ids, past_key_values=new_cache(config), use_cache=True, **kw)
    cuda_time_s(run)  # Warm-up.
    torch.cuda.reset_peak_memory_stats()
    times = [cuda_time_s(run)[0] for _ in range(3)]
    t = statistics.median(times)
    return {"tokens": args.prefill_tokens, "s_median": t, "s_all": times, "tokens_per_s": args.prefill_tokens / t,
            "peak_mem_bytes": torch.cuda.max_memory_allocated()}


def measure_decode(args, model, config, kw, batch):
    """Prefill of batch x prompt tokens, then args.decode_tokens greedy steps; returns the figures."""

    def one_round(steps, timed):
        ids = torch.randint(0, config.vocab_size, (batch, args.prompt), device="cuda")
        cache = new_cache(config)
        prefill_s, out = cuda_time_s(lambda: model(input_ids=ids, past_key_values=cache, use_cache=True, **kw))
        cache = out.past_key_values
        nxt = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
        del out
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        done = 0
        for i in range(steps):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True, **kw)
            cache = out.past_key_values
            nxt = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
            events[i + 1].record()
            done = i + 1
            if timed and i % 8 == 7 and time.perf_counter() - T0 > args.time_budget_s:
                break  # Over the time budget: keep the steps done so far.
        torch.cuda.synchronize()
        step_ms = [events[i].elapsed_time(events[i + 1]) for i in range(done)]
        return prefill_s, step_ms, events[0].elapsed_time(events[done]) / 1e3

    one_round(min(4, args.decode_tokens), timed=False)  # Warm-up at this batch size.
    torch.cuda.reset_peak_memory_stats()
    prefill_s, step_ms, total_s = one_round(args.decode_tokens, timed=True)
    steps = len(step_ms)
    return {"batch": batch, "prompt": args.prompt, "steps": steps, "prefill_s": prefill_s,
            "prefill_tokens_per_s": batch * args.prompt / prefill_s, "decode_s": total_s,
            "tokens_per_s": batch * steps / total_s, "ms_per_step_median": statistics.median(step_ms),
            "ms_per_step_mean": statistics.fmean(step_ms),
            "kv_bytes_at_end": batch * (args.prompt + steps) * kv_bytes_per_token(config, model.dtype),
            "peak_mem_bytes": torch.cuda.max_memory_allocated()}


def kv_bytes_per_token(config, dtype):
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * elem


def guarded(name, results, fn, args, write):
    """Runs fn() unless over budget; stores its dict, or the reason it has none, under results[name]."""
    elapsed = time.perf_counter() - T0
    if elapsed > args.time_budget_s:
        out = {"skipped": f"time budget {args.time_budget_s}s spent at {elapsed:.1f}s"}
        log(f"{name}: skipped, {out['skipped']}")
    else:
        log(f"{name}: running")
        try:
            out = fn()
        except Exception as e:  # OOM (torch.cuda.OutOfMemoryError) or any other failure of this measurement.
            out = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        # The exception (and the frames holding its tensors) is gone here, so the memory can be released.
        gc.collect()
        torch.cuda.empty_cache()
        log(f"{name}: {json.dumps(out)[:300]}")
    results[name] = out
    write()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="HF config.json of the model")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens per sequence before decode")
    p.add_argument("--decode_tokens", type=int, default=64, help="greedy decode steps timed per batch")
    p.add_argument("--batches", default="1,64", help="comma-separated decode batch sizes")
    p.add_argument("--prefill_tokens", type=int, default=2048, help="tokens in the batch-1 prefill")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--time_budget_s", type=float, default=150.0, help="skip measurements after this")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if min([args.prompt, args.decode_tokens, args.prefill_tokens] + batches) < 1:
        sys.exit("torch_baseline.py: --prompt, --decode_tokens, --prefill_tokens and --batches must be >= 1")
    if not torch.cuda.is_available():
        sys.exit("torch_baseline.py: no CUDA device")
    dtype = getattr(torch, args.dtype)
    with open(args.config) as f:
        cfg_dict = json.load(f)
    torch.manual_seed(0)
    results = {"config_name": os.path.splitext(os.path.basename(args.config))[0], "config_path": args.config,
               "device": torch.cuda.get_device_name(), "torch_version": torch.__version__,
               "cuda_version": torch.version.cuda, "transformers_version": transformers.__version__,
               "dtype": args.dtype, "attn_implementation": "sdpa", "args": vars(args)}

    def write():
        results["elapsed_s"] = time.perf_counter() - T0
        with open(args.out + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(args.out + ".tmp", args.out)

    with torch.inference_mode():
        guarded("copy", results, lambda: measure_copy(args), args, write)
    t = time.perf_counter()
    try:  # Built outside inference_mode: parameters made there would be inference tensors.
        model, config = build_model(cfg_dict, dtype)
    except Exception as e:
        results["build_error"] = f"{type(e).__name__}: {str(e)[:500]}"
        write()
        raise
    results["build_s"] = time.perf_counter() - t
    with torch.inference_mode():
        results["attn_implementation"] = getattr(config, "_attn_implementation", None)
        results["params"] = sum(q.numel() for q in model.parameters())
        results["weight_bytes"] = sum(q.numel() * q.element_size() for q in model.parameters())
        # Bytes one decode step must read: every weight but the input embedding table (a gather of B rows),
        # unless it is tied to the lm_head.
        emb = model.get_input_embeddings().weight
        tied = emb.data_ptr() == model.get_output_embeddings().weight.data_ptr()
        results["weight_bytes_per_step"] = results["weight_bytes"] - (0 if tied else emb.numel() * emb.element_size())
        results["kv_bytes_per_token"] = kv_bytes_per_token(config, dtype)
        rope = getattr(config, "rope_parameters", None)  # Where transformers 5 keeps rope_theta.
        results["rope_theta"] = getattr(config, "rope_theta", None) or (rope or {}).get("rope_theta")
        log(f"model: {results['params'] / 1e9:.2f} B params, {results['weight_bytes'] / 2**30:.1f} GiB, "
            f"built in {results['build_s']:.1f}s, attention {results['attn_implementation']}")
        kw = last_logits_kwargs(model)
        guarded("prefill", results, lambda: measure_prefill(args, model, config, kw), args, write)
        results["decode"] = {}
        for b in batches:
            guarded(str(b), results["decode"], lambda: measure_decode(args, model, config, kw, b), args, write)
    bw = results["copy"].get("gb_per_s_median")
    if bw:
        results["decode_roofline_b1_tokens_per_s"] = bw * 1e9 / results["weight_bytes_per_step"]
    write()
    print_table(results, args)


def print_table(results, args):
    def fmt(d, key, spec):  # The figure, else why there is none.
        return format(d[key], spec) if key in d else ("skipped" if "skipped" in d else d.get("error", "-")[:60])

    lines = [f"\n{results['device']}, torch {results['torch_version']}, transformers "
             f"{results['transformers_version']}, {results['config_name']} {args.dtype}, "
             f"{results['params'] / 1e9:.2f} B params",
             f"copy bandwidth (read + write): {fmt(results['copy'], 'gb_per_s_median', '.0f')} GB/s",
             f"batch-1 decode roofline: {fmt(results, 'decode_roofline_b1_tokens_per_s', '.1f')} tok/s",
             f"prefill [1, {args.prefill_tokens}]: {fmt(results['prefill'], 'tokens_per_s', '.0f')} tok/s",
             "| batch | prompt | prompt prefill tok/s | steps | decode tok/s | ms/step median | ms/step mean |"]
    for b, d in results["decode"].items():
        if "tokens_per_s" not in d:
            lines.append(f"| {b} | {args.prompt} | {fmt(d, 'tokens_per_s', '')} | | | | |")
            continue
        lines.append(f"| {b} | {args.prompt} | {d['prefill_tokens_per_s']:.0f} | {d['steps']} | "
                     f"{d['tokens_per_s']:.1f} | {d['ms_per_step_median']:.2f} | {d['ms_per_step_mean']:.2f} |")
    print("\n".join(lines + [f"wrote {args.out}"]), flush=True)


if __name__ == "__main__":
    main()
