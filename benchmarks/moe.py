"""MoE speed and memory benchmark; prints one JSON line.

Forward plus backward, median of ``--repeats`` timed runs after ``--warmup`` runs, at
d=256, ffn=1024, 8 experts, top-2, batch 16 x 200 frames (the sizes of issue 3):

- ``vs_transformers``: our top-2 SwiGLU MoE time / transformers' ``MixtralSparseMoeBlock``
  time, for every experts implementation transformers registers (those that cannot run here
  are reported with the reason; ``batched_mm`` is skipped when its estimated memory, one
  weight copy per (frame, expert) pair, exceeds half the available memory);
- ``vs_dense_active``: our time / a dense SwiGLU FFN with the same active parameters (2048);
- ``dense_gating_vs_loop``: our dense-softmax MoE layer with 4 paper experts (one ReLU
  layer, 256 -> 1024) / the same layer written as a Python loop over per-expert modules;
- ``peak_mib``: peak memory of each workload (CUDA: allocator peak; CPU: peak RSS growth).

Every workload runs in its own subprocess (an out-of-memory kill then costs one entry, not
the benchmark), one after the other in the same invocation, for ``--rounds`` rounds in
rotating order; times are medians over rounds. Usage::

    nice python benchmarks/moe.py [--device cpu|cuda] [--threads 1] [--repeats 7]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from sb_crossmodal_kd.nnet.moe import MoE

D_MODEL, D_FFN, N_EXPERTS, TOP_K, BATCH, FRAMES = 256, 1024, 8, 2, 16, 200
DEEP_EXPERTS, DEEP_WIDTH = 4, 1024


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
    elif name == "deep_dense_gating":
        module = MoE(D_MODEL, DEEP_EXPERTS, output_size=DEEP_WIDTH, expert="relu",
                     track_stats=False)
    elif name == "deep_loop":
        module = LoopMoE(D_MODEL, DEEP_EXPERTS, DEEP_WIDTH)
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


def run_workload(name, device, threads, warmup, repeats):
    """Times one workload in this process; returns its result dict."""
    torch.set_num_threads(threads)
    module, x = _build(name, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rss_before = _rss_bytes()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()

    def step():
        out = module(x)
        out.float().pow(2).mean().backward()
        module.zero_grad(set_to_none=True)
        x.grad = None

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    return {"median_s": statistics.median(times), "peak_mib": round(max(peak, 0) / 2**20, 1)}


def _available_bytes():
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


def _in_subprocess(name, args):
    command = [sys.executable, __file__, "--workload", name, "--device", args.device,
               "--threads", str(args.threads), "--warmup", str(args.warmup),
               "--repeats", str(args.repeats)]
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
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.workload is not None:
        result = run_workload(args.workload, args.device, args.threads, args.warmup,
                              args.repeats)
        print(json.dumps(result))
        return

    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    implementations = ["eager"] + sorted(ALL_EXPERTS_FUNCTIONS.keys())
    workloads = ["ours", "ours:loop"]
    results = {}
    for impl in implementations:
        name = f"transformers:{impl}"
        if impl == "batched_mm" and _batched_mm_estimate() > 0.5 * _available_bytes():
            results[name] = {"skipped": f"estimated {_batched_mm_estimate() / 2**30:.1f} GiB "
                             f"> half of {_available_bytes() / 2**30:.1f} GiB available"}
        elif impl in ("deepgemm", "sonicmoe") and args.device != "cuda":
            results[name] = {"skipped": f"{impl} needs CUDA kernels"}
        else:
            workloads.append(name)
    workloads += ["dense_swiglu", "deep_dense_gating", "deep_loop"]
    # Several rounds in rotating order; each workload's time is the median over rounds of
    # its per-round medians, so a burst of load from other processes hits every entry alike.
    per_round = {name: [] for name in workloads}
    for round_index in range(args.rounds):
        shift = round_index % len(workloads)
        for name in workloads[shift:] + workloads[:shift]:
            per_round[name].append(_in_subprocess(name, args))
    for name, runs in per_round.items():
        ok = [r for r in runs if "median_s" in r]
        if not ok:
            results[name] = runs[-1]
            continue
        results[name] = {"median_s": statistics.median(r["median_s"] for r in ok),
                         "peak_mib": max(r["peak_mib"] for r in ok)}

    def ratio(a, b):
        if "median_s" not in results.get(a, {}) or "median_s" not in results.get(b, {}):
            return None
        return round(results[a]["median_s"] / results[b]["median_s"], 3)

    vs_transformers = {}
    for impl in implementations:
        name = f"transformers:{impl}"
        value = ratio("ours", name)
        vs_transformers[impl] = value if value is not None else results[name]
    timed = [v for v in vs_transformers.values() if isinstance(v, float)]
    summary = {
        "device": args.device,
        "torch": torch.__version__,
        "grouped_mm": hasattr(torch, "_grouped_mm"),
        "threads": args.threads,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "sizes": {"d": D_MODEL, "ffn": D_FFN, "experts": N_EXPERTS, "top_k": TOP_K,
                  "batch": BATCH, "frames": FRAMES},
        "vs_transformers": vs_transformers,
        "vs_fastest_transformers": round(max(timed), 3) if timed else None,
        "vs_dense_active": ratio("ours", "dense_swiglu"),
        "dense_gating_vs_loop": ratio("deep_dense_gating", "deep_loop"),
        "loop_kernel_vs_auto": ratio("ours:loop", "ours"),
        "median_s": {k: round(v["median_s"], 4) for k, v in results.items() if "median_s" in v},
        "peak_mib": {k: v["peak_mib"] for k, v in results.items() if "peak_mib" in v},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
