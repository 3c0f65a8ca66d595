"""Where a batched prefill's time goes on the GPU (issue 10 item 5): the `bench decode --model` workload
(8 prompts of 4096 tokens, small shape, random weights) run three times on one engine: cold (compiles,
graph captures), warm, and warm under torch.profiler. Prints each pass's per-step wall time with the
prompt tokens the step prefilled and its decode rows, then the profiler's top ops by CUDA and CPU time.
Then the serving pattern: 16 prompts of random lengths (256-2048 tokens) through a second engine, three
times with fresh lengths each time; a pass after the first that is still slow points at kernels compiled
again for new lengths (Triton specialises integer arguments on divisibility by 16 and on == 1).
Usage: python bench/gpu/prefill_profile.py OUT_DIR [offload on|off]"""

import sys
import tempfile
import time

import torch

from nosa.bench.shapes import build_model, save_model
from nosa.engine import LLM, SamplingParams


def one_pass(llm, prompts, label, log):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ids = [llm.add_request(p, params) for p in prompts]
    start = time.perf_counter()
    first, step = {}, 0
    while llm.has_unfinished():
        before = llm.stats()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = llm.step()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        after = llm.stats()
        for out in outs:
            first.setdefault(out.request_id, time.perf_counter() - start)
        print(f"{label} step {step:3d} {1e3 * dt:8.1f} ms  prefill tokens {after.prefill_tokens - before.prefill_tokens:5d}  "
              f"decode tokens {after.decode_tokens - before.decode_tokens:3d}", file=log, flush=True)
        step += 1
    ttft = sorted(first.values())
    print(f"{label}: {step} steps, {time.perf_counter() - start:.2f} s, TTFT min {ttft[0]:.3f} max {ttft[-1]:.3f} s", file=log, flush=True)


def compiled_variants() -> dict[str, int]:
    """Compiled specialisations per Triton kernel of nosa (a kernel compiled again for every new pattern of
    its integer arguments' divisibility by 16 shows as many variants)."""
    import importlib
    import pkgutil

    import nosa.ops.kernels as kernels

    counts = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"nosa.ops.kernels.{info.name}")
        for name, obj in vars(module).items():
            # A JITFunction holds its own caches; an autotuner (or heuristics) wraps one as `.fn`. (A JITFunction's
            # own `.fn` is the plain Python function, so looking there first missed every plain kernel.)
            caches = getattr(obj, "device_caches", None)
            if not isinstance(caches, dict):
                caches = getattr(getattr(obj, "fn", None), "device_caches", None)
            if isinstance(caches, dict):
                n = sum(len(v[0]) if isinstance(v, tuple) else len(v) for v in caches.values())
                if n:
                    counts[f"{info.name}.{name}"] = n
    return counts


def main():
    out_dir = sys.argv[1]
    offload = (sys.argv[2] if len(sys.argv) > 2 else "on") == "on"
    model_dir = tempfile.mkdtemp()
    save_model(build_model("small"), model_dir)
    llm = LLM(model_dir, device="cuda", offload=offload, max_model_len=4096 + 64, max_num_seqs=8, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 260, (4096,), generator=g).tolist() for _ in range(8)]
    name = f"{out_dir}/prefill_profile_{'on' if offload else 'off'}.txt"
    with open(name, "w") as log:
        one_pass(llm, prompts, "cold", log)
        one_pass(llm, prompts, "warm", log)
        print(f"compiled variants after the fixed-length passes: {compiled_variants()}", file=log, flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            one_pass(llm, prompts, "profiled", log)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), file=log)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25), file=log)
        mixed = LLM(model_dir, device="cuda", offload=offload, max_model_len=2048 + 64, max_num_seqs=16, dtype=torch.bfloat16)
        for rep in range(3):
            lengths = torch.randint(256, 2049, (16,), generator=g).tolist()
            one_pass(mixed, [torch.randint(3, 260, (n,), generator=g).tolist() for n in lengths], f"mixed{rep}", log)
            print(f"compiled variants after mixed{rep}: {compiled_variants()}", file=log, flush=True)
    print(open(name).read()[-6000:])


if __name__ == "__main__":
    main()
