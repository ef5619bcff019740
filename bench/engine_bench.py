"""Engine benchmark: our grid vs a bare diffusers call, batched vs sequential, memory. Prints JSON.

    .venv/bin/python bench/engine_bench.py [--repeats 5] [--sd15]

Every comparison runs both sides in the same process, alternating, on the same inputs.
`--sd15` also times an SD1.5-architecture UNet with random weights at 512x512 (use on a GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from diffusers import DPMSolverMultistepScheduler  # noqa: E402

from engine.generation import ImagineRequest  # noqa: E402
from engine.params import parse_prompt  # noqa: E402
from engine.registry import load_registry  # noqa: E402
from engine.service import Engine  # noqa: E402

PROMPT = "a red circle on a blue background"


def timed(function, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def summary(times: list[float]) -> dict:
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4), "runs": len(times)}


def bench_overhead(engine: Engine, repeats: int, steps: int) -> dict:
    """Our engine's 4-image grid vs the bare pipeline call with the same settings."""
    spec = engine.registry.get(engine.registry.default)
    request = ImagineRequest(parse_prompt(f"{PROMPT} --seed 7 --steps {steps} --sampler dpmpp_2m --cfg 7.5"))
    ours = lambda: engine.imagine(request)  # noqa: E731
    ours()  # load and warm up

    def bare():
        with engine.cache.acquire(spec) as entry:
            pipe = entry.pipe
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
            generators = [torch.Generator("cpu").manual_seed(7 + i) for i in range(4)]
            pipe(PROMPT, num_images_per_prompt=4, width=64, height=64, num_inference_steps=steps, guidance_scale=7.5,
                 generator=generators)

    bare()
    ours_times, bare_times = [], []
    for _ in range(repeats):
        ours_times += timed(ours, 1)
        bare_times += timed(bare, 1)
    overhead = statistics.median(ours_times) / statistics.median(bare_times) - 1
    return {"ours": summary(ours_times), "bare_diffusers": summary(bare_times), "overhead_pct": round(100 * overhead, 2)}


def bench_batched(engine: Engine, repeats: int, steps: int) -> dict:
    """One batched 4-image call vs four single-image calls."""
    grid = ImagineRequest(parse_prompt(f"{PROMPT} --seed 7 --steps {steps}"))
    singles = [ImagineRequest(parse_prompt(f"{PROMPT} --seed {7 + i} --n 1 --steps {steps}")) for i in range(4)]
    batched_times, sequential_times = [], []
    for _ in range(repeats):
        batched_times += timed(lambda: engine.imagine(grid), 1)
        sequential_times += timed(lambda: [engine.imagine(r) for r in singles], 1)
    return {"batched": summary(batched_times), "sequential": summary(sequential_times),
            "sequential_over_batched": round(statistics.median(sequential_times) / statistics.median(batched_times), 3)}


def bench_sd15_architecture(repeats: int) -> dict:
    """SD1.5-size UNet with random weights at 512x512: batched grid vs sequential, and peak GPU memory."""
    from diffusers import UNet2DConditionModel

    from engine.configs import HERE

    config = json.loads((HERE / "sd15" / "unet" / "config.json").read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    unet = UNet2DConditionModel.from_config(config).to(device, dtype).eval()
    context = torch.randn(8, 77, 768, device=device, dtype=dtype)

    def steps(batch: int, count: int = 20):
        latents = torch.randn(batch * 2, 4, 64, 64, device=device, dtype=dtype)  # x2: classifier-free guidance
        with torch.no_grad():
            for t in range(count):
                unet(latents, torch.tensor(999 - t * 50, device=device), context[: batch * 2]).sample

    steps(4, 2)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    batched = timed(lambda: steps(4), repeats)
    sequential = timed(lambda: [steps(1) for _ in range(4)], repeats)
    result = {"device": device, "batched_20_steps": summary(batched), "sequential_20_steps": summary(sequential),
              "sequential_over_batched": round(statistics.median(sequential) / statistics.median(batched), 3)}
    if device == "cuda":
        result["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return result


def bench_cli_rss() -> dict:
    """Peak resident memory of one `dreamloom imagine` on the starter model."""
    with tempfile.TemporaryDirectory() as data:
        env = {**os.environ, "DREAMLOOM_DATA_DIR": data}
        started = time.perf_counter()
        subprocess.run([str(Path(sys.executable).parent / "dreamloom"), "imagine", f"{PROMPT} --seed 7", "--quiet"],
                       check=True, capture_output=True, env=env)
        wall = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"peak_rss_mib": round(peak_kib / 1024, 1), "wall_s": round(wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sd15", action="store_true")
    args = parser.parse_args()
    registry = load_registry(ROOT / "models.toml")
    with tempfile.TemporaryDirectory() as cache:
        engine = Engine(registry, Path(cache))
        report = {
            "device": engine.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "grid_vs_bare_diffusers": bench_overhead(engine, args.repeats, args.steps),
            "batched_vs_sequential_starter": bench_batched(engine, args.repeats, args.steps),
            "model_cache": {"starter_estimate_mib": round(engine.cache.used_bytes / 2**20, 1),
                            "budget_mib": round(engine.cache.budget_bytes / 2**20)},
        }
        engine.close()
    report["dreamloom_imagine_cli"] = bench_cli_rss()
    if args.sd15:
        report["sd15_architecture_512"] = bench_sd15_architecture(max(2, args.repeats // 2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
