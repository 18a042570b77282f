"""MoE speed and memory benchmark; prints one JSON line.

Forward plus backward, median of ``--repeats`` timed runs after ``--warmup`` runs, at
d=256, ffn=1024, 8 experts, top-2, batch 16 x 200 frames (the sizes of issue 3; ``--size
librispeech``: d=512, ffn=2048, batch 16 x 500 frames, a LibriSpeech-sized layer):

- ``vs_transformers``: our top-2 SwiGLU MoE time / transformers' ``MixtralSparseMoeBlock``
  time, for every experts implementation transformers registers (those that cannot run here
  are reported with the reason; ``batched_mm`` is skipped when its estimated memory, one
  weight copy per (frame, expert) pair, exceeds half the available memory);
- ``vs_dense_active``: our time / a dense SwiGLU FFN with the same active parameters (2048);
- ``dense_gating_vs_loop``: our dense-softmax MoE layer with 4 paper experts (one ReLU
  layer, 256 -> 1024) / the same layer written as a Python loop over per-expert modules;
- ``dense_gating_floor``: the three matrix products every implementation of that layer
  computes (forward, input and weight gradients, as single GEMMs over all experts) / the
  loop: no implementation computing the same float32 products goes below it on this device;
- ``peak_mib``: peak memory of one forward+backward step of each workload, each in a fresh
  process (CUDA: allocator peak; CPU: growth of the peak resident set).

Each comparison runs in its own subprocess (an out-of-memory kill then costs one entry, not
the benchmark), one after the other in the same invocation. Inside it the compared modules
take turns step by step, so a burst of load from other processes hits both alike; ratios are
of medians over the repeats. Usage::

    nice python benchmarks/moe.py [--device cpu|cuda] [--threads 1] [--repeats 7] [--amp bf16]
                                  [--compile default|reduce-overhead|max-autotune]

``--amp bf16`` runs every workload under ``torch.autocast`` with bfloat16 (how a GPU user
trains: SpeechBrain's ``--precision=bf16``); the default is float32. ``--compile MODE`` runs
every workload through ``torch.compile`` with that mode (SpeechBrain's ``--compile``;
``reduce-overhead`` replays CUDA graphs), compiled against compiled; warm-up steps then
include the compilation. ``--only FIGURES`` (comma-separated names of the figures above, e.g.
``vs_dense_active,dense_gating_vs_loop``) and ``--no-peaks`` measure less, for a short loan of
a GPU: each comparison costs a fresh process, and with ``--compile`` its compilation.
"""

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from sb_crossmodal_kd.nnet.moe import MoE

# (d_model, ffn, experts, top_k, batch, frames) of each --size: issue 3's, and a
# LibriSpeech-sized Conformer layer (d=512, ffn 2048, 8 experts, 16 utterances of 500 frames).
SIZES = {"issue3": (256, 1024, 8, 2, 16, 200), "librispeech": (512, 2048, 8, 2, 16, 500)}
D_MODEL, D_FFN, N_EXPERTS, TOP_K, BATCH, FRAMES = SIZES["issue3"]


def use_size(name):
    """Sets the sizes every workload reads (the parent's and each child process's)."""
    global D_MODEL, D_FFN, N_EXPERTS, TOP_K, BATCH, FRAMES
    D_MODEL, D_FFN, N_EXPERTS, TOP_K, BATCH, FRAMES = SIZES[name]
DEEP_EXPERTS, DEEP_WIDTH, DEEP_WIDTH_SMALL = 4, 1024, 128
# The figures the summary reports, each from the time ratio of the workloads of one pair
# (vs_transformers: one pair per experts implementation of transformers).
FIGURES = {
    "vs_transformers": None,
    "vs_dense_active": ("ours", "dense_swiglu"),
    "dense_gating_vs_loop": ("deep_dense_gating", "deep_loop"),
    "dense_gating_floor": ("deep_gemms", "deep_loop"),
    "dense_gating_vs_loop_small": ("deep_dense_gating_small", "deep_loop_small"),
    "loop_kernel_vs_auto": ("ours", "ours:loop"),  # reported inverted: loop / auto
}


def _rss_bytes():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _build(name, device):
    """(module, input) of one workload."""
    torch.manual_seed(0)
    x = torch.randn(BATCH, FRAMES, D_MODEL, device=device)
    if name.startswith("ours"):
        kernel = name.split(":")[1] if ":" in name else "auto"
        module = MoE(D_MODEL, N_EXPERTS, expert="swiglu", expert_hidden_size=D_FFN, top_k=TOP_K,
                     kernel=kernel, track_stats=False)
    elif name.startswith("transformers:"):
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        config = MixtralConfig(hidden_size=D_MODEL, intermediate_size=D_FFN,
                               num_local_experts=N_EXPERTS, num_experts_per_tok=TOP_K,
                               router_jitter_noise=0.0)
        config._experts_implementation = name.split(":", 1)[1]
        module = MixtralSparseMoeBlock(config)
        for param in module.parameters():
            torch.nn.init.normal_(param, std=0.02)
    elif name == "dense_swiglu":
        module = DenseSwiGLU(D_MODEL, TOP_K * D_FFN)
    elif name.startswith("deep_dense_gating"):
        width = DEEP_WIDTH_SMALL if name.endswith("_small") else DEEP_WIDTH
        module = MoE(D_MODEL, DEEP_EXPERTS, output_size=width, expert="relu", track_stats=False)
    elif name.startswith("deep_loop"):
        width = DEEP_WIDTH_SMALL if name.endswith("_small") else DEEP_WIDTH
        module = LoopMoE(D_MODEL, DEEP_EXPERTS, width)
    elif name == "deep_gemms":
        module = LayerGemms(D_MODEL, DEEP_EXPERTS, DEEP_WIDTH)
    else:
        raise ValueError(f"unknown workload {name!r}")
    return module.to(device), x.requires_grad_(True)


class DenseSwiGLU(torch.nn.Module):
    """A dense SwiGLU FFN with fused gate and up projections."""

    def __init__(self, d, ffn):
        super().__init__()
        self.gate_up = torch.nn.Linear(d, 2 * ffn, bias=False)
        self.down = torch.nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(torch.nn.functional.silu(gate) * up)


class LoopMoE(torch.nn.Module):
    """The paper's MoE layer written naively: a Python loop over per-expert modules."""

    def __init__(self, d, n, width):
        super().__init__()
        self.gate = torch.nn.Linear(d, n)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(d, width) for _ in range(n))

    def forward(self, x):
        gates = torch.softmax(self.gate(x), dim=-1)
        out = 0
        for i, expert in enumerate(self.experts):
            out = out + gates[..., i : i + 1] * torch.relu(expert(x))
        return out


class _ThreeGemms(torch.autograd.Function):
    """``x @ w`` [M, N*H] forward; backward forms a [M, N*H] gradient from the [M, H] one
    (one pass, as mixing's backward must) and runs the input- and weight-gradient GEMMs."""

    @staticmethod
    def forward(ctx, x, w, width):
        ctx.save_for_backward(x, w)
        return (x @ w)[:, :width].clone()

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        grad_pre = grad.repeat(1, w.shape[1] // grad.shape[1])
        return grad_pre @ w.t(), x.t() @ grad_pre, None


class LayerGemms(torch.nn.Module):
    """Only the matrix products of a dense-gating layer of ``n`` ReLU experts of ``width``:
    the floor under any implementation of it that computes the same products."""

    def __init__(self, d, n, width):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(d, n * width) / d**0.5)
        self.width = width

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        out = _ThreeGemms.apply(flat, self.w.to(flat.dtype), self.width)
        return out.view(*x.shape[:-1], self.width)


def _peak_rss_bytes():
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def run_group(names, device, threads, warmup, repeats, memory_only=False, amp=None,
              compile_mode=None):
    """Times the workloads ``names`` in this process, taking turns step by step (or, with
    ``memory_only``, measures the peak memory of one step of a single workload)."""
    torch.set_num_threads(threads)
    built = {name: _build(name, device) for name in names}
    if compile_mode is not None:
        built = {name: (torch.compile(module, mode=compile_mode), x)
                 for name, (module, x) in built.items()}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def step(name):
        module, x = built[name]
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            out = module(x)
        out.float().pow(2).mean().backward()
        module.zero_grad(set_to_none=True)
        x.grad = None

    results = {name: {} for name in names}
    if memory_only:  # a fresh process per workload: growth of its first step's peak
        (name,) = names
        if compile_mode is not None:  # compile (and record graphs) before measuring
            for _ in range(3):
                step(name)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            _reset_peak_rss()
            base = _rss_bytes()
        step(name)
        sync()
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = _peak_rss_bytes() - base
        return {name: {"peak_mib": round(max(peak, 0) / 2**20, 1)}}
    times = {name: [] for name in names}
    for index in range(warmup + repeats):
        for name in names:
            sync()
            start = time.perf_counter()
            step(name)
            sync()
            if index >= warmup:
                times[name].append(time.perf_counter() - start)
    for name in names:
        results[name]["median_s"] = statistics.median(times[name])
    return results


def _available_bytes(device="cpu"):
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _batched_mm_estimate():
    """Bytes transformers' batched_mm needs: a copy of both expert weights per pair, twice
    (forward gather and its gradient)."""
    pairs = BATCH * FRAMES * TOP_K
    per_pair = (2 * D_FFN * D_MODEL + D_MODEL * D_FFN) * 4
    return 2 * pairs * per_pair


def _in_subprocess(names, args, memory_only=False):
    command = ([sys.executable, __file__, "--workloads", ",".join(names), "--device", args.device,
               "--threads", str(args.threads), "--warmup", str(args.warmup),
               "--repeats", str(args.repeats), "--size", args.size]
               + (["--memory-only"] if memory_only else []))
    if args.amp:
        command += ["--amp", args.amp]
    if args.compile:
        command += ["--compile", args.compile]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        reason = "killed (likely out of memory)" if proc.returncode < 0 else tail
        return {"error": f"exit {proc.returncode}: {reason}"[:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", choices=list(SIZES), default="issue3",
                        help="issue3: d=256, ffn 1024, batch 16 x 200 frames (default); "
                             "librispeech: d=512, ffn 2048, batch 16 x 500 frames")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None,
                        help="run under torch.autocast with this dtype (default: float32)")
    parser.add_argument("--compile", default=None,
                        choices=["default", "reduce-overhead", "max-autotune",
                                 "max-autotune-no-cudagraphs"],
                        help="run every workload through torch.compile with this mode")
    parser.add_argument("--only", default=None,
                        help="comma-separated figures to measure (default: all): "
                             + ", ".join(FIGURES))
    parser.add_argument("--no-peaks", action="store_true",
                        help="skip the peak-memory processes")
    parser.add_argument("--workloads", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    use_size(args.size)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.compile is not None:  # compilation and CUDA-graph recording happen in warm-up
        args.warmup = max(args.warmup, 3)
    if args.workloads is not None:
        result = run_group(args.workloads.split(","), args.device, args.threads, args.warmup,
                           args.repeats, args.memory_only, args.amp, args.compile)
        print(json.dumps(result))
        return

    wanted = set(FIGURES) if args.only is None else set(args.only.split(","))
    if wanted - set(FIGURES):
        parser.error(f"--only: unknown figures {sorted(wanted - set(FIGURES))}; "
                     f"choose from {', '.join(FIGURES)}")
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    implementations = ["eager"] + sorted(ALL_EXPERTS_FUNCTIONS.keys())
    groups, skipped = [], {}
    for impl in implementations:
        available = _available_bytes(args.device)
        if "vs_transformers" not in wanted:
            skipped[impl] = {"skipped": "not asked for (--only)"}
        elif impl == "batched_mm" and _batched_mm_estimate() > 0.5 * available:
            skipped[impl] = {"skipped": f"estimated {_batched_mm_estimate() / 2**30:.1f} GiB "
                             f"> half of {available / 2**30:.1f} GiB available"}
        elif impl in ("deepgemm", "sonicmoe") and args.device != "cuda":
            skipped[impl] = {"skipped": f"{impl} needs CUDA kernels"}
        else:
            groups.append(("ours", f"transformers:{impl}"))
    groups += [pair for figure, pair in FIGURES.items()
               if figure != "vs_transformers" and figure in wanted]
    measured = {pair: _in_subprocess(pair, args) for pair in groups}

    def ratio(a, b):
        if (a, b) not in measured:
            return {"skipped": "not asked for (--only)"}
        result = measured[(a, b)]
        if "error" in result:
            return result
        return round(result[a]["median_s"] / result[b]["median_s"], 3)

    vs_transformers = {}
    for impl in implementations:
        if impl in skipped:
            vs_transformers[impl] = skipped[impl]
        else:
            vs_transformers[impl] = ratio("ours", f"transformers:{impl}")
    timed = [v for v in vs_transformers.values() if isinstance(v, float)]
    peak, median = {}, {}
    names = sorted({name for pair in groups for name in pair} - {"deep_gemms"})
    # Peaks are per process, so these runs may overlap (the timings above may not).
    with concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        if args.no_peaks:
            names = []
        results = pool.map(lambda name: _in_subprocess([name], args, memory_only=True), names)
        for name, result in zip(names, results, strict=True):
            peak[name] = result if "error" in result else result[name]["peak_mib"]
    for pair, result in measured.items():
        if "error" in result:
            continue
        for name in pair:
            median[f"{name} (with {[n for n in pair if n != name][0]})"] = round(
                result[name]["median_s"], 4)
    summary = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "amp": args.amp or "float32",
        "compile": args.compile,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "grouped_mm": hasattr(torch, "_grouped_mm"),
        # SpeechBrain's import turns TF32 on for CUDA float32 matmuls, for every module here
        "tf32": args.device == "cuda" and torch.backends.cuda.matmul.allow_tf32,
        "threads": args.threads,
        "repeats": args.repeats,
        "sizes": {"d": D_MODEL, "ffn": D_FFN, "experts": N_EXPERTS, "top_k": TOP_K,
                  "batch": BATCH, "frames": FRAMES, "deep_experts": DEEP_EXPERTS,
                  "deep_width": DEEP_WIDTH, "deep_width_small": DEEP_WIDTH_SMALL},
        "vs_transformers": vs_transformers,
        "vs_fastest_transformers": round(max(timed), 3) if timed else None,
        **{figure: ratio(*pair) for figure, pair in FIGURES.items()
           if figure not in ("vs_transformers", "loop_kernel_vs_auto")},
        "loop_kernel_vs_auto": (lambda r: round(1 / r, 3) if isinstance(r, float) else r)(
            ratio(*FIGURES["loop_kernel_vs_auto"])),
        "median_s": median,
        "peak_mib": peak,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
