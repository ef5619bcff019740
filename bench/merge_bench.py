"""Merging two SD1.5-sized checkpoints: wall time and peak memory against the size of one model. Prints JSON.

    .venv/bin/python bench/merge_bench.py [--method weighted_sum]

Two checkpoints with random weights are built from the shipped SD1.5 configs (UNet, VAE, CLIP text encoder; fp16,
the layout A1111 writes), each in a process of its own. The merge then runs in a fresh process, which reports its
peak resident memory (ru_maxrss) and the resident memory it had before the merge (Python, torch and the imports):
the difference is what merging cost. Baseline: the size of one model file, and a naive merge that loads both
files whole (safetensors' load_file) and writes the result with save_file, in its own fresh process too.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent

BUILD = r'''
import sys, torch
from pathlib import Path
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel
from safetensors.torch import save_file
from engine.convert import unet_to_ldm, vae_to_ldm, text_encoder_ldm_name
configs = Path("engine/configs/sd15")
torch.manual_seed(int(sys.argv[2]))
tensors = {}
unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
tensors.update({k: v.half() for k, v in unet_to_ldm(unet.state_dict(), dict(unet.config)).items()})
del unet
vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))
tensors.update({k: v.half() for k, v in vae_to_ldm(vae.state_dict(), dict(vae.config)).items()})
del vae
text = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder"))
tensors.update({text_encoder_ldm_name(k): v.half() for k, v in text.state_dict().items() if not k.endswith("position_ids")})
save_file({k: v.contiguous() for k, v in tensors.items()}, sys.argv[1])
'''

MERGE = r'''
import json, resource, sys, time
from pathlib import Path
from engine.merge import MergeRecipe, plan_merge, write_merge
from engine.registry import ModelSpec, Registry
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
a, b, out, method = sys.argv[1:5]
registry = Registry(models={"a": ModelSpec("a", Path(a), "sd15"), "b": ModelSpec("b", Path(b), "sd15"),
                            "c": ModelSpec("c", Path(a), "sd15")}, loras={}, default="a")
started = time.perf_counter()
recipe = MergeRecipe(a="a", b="b", c="c" if method != "weighted_sum" else None, method=method, alpha=0.5)
write_merge(plan_merge(recipe, registry), Path(out), {"format": "pt"})
print(json.dumps({"seconds": time.perf_counter() - started, "rss_before_kib": before,
                  "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
'''

NAIVE = r'''
import json, resource, sys, time
from safetensors.torch import load_file, save_file
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
save_file({k: (a[k].float() * 0.5 + b[k].float() * 0.5).half() for k in a}, sys.argv[3])
print(json.dumps({"seconds": time.perf_counter() - started, "rss_before_kib": before,
                  "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
'''


def _python(code: str, *args: str) -> dict | None:
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="weighted_sum", choices=["weighted_sum", "add_difference", "ties", "dare"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        a, b = Path(scratch) / "a.safetensors", Path(scratch) / "b.safetensors"
        _python(BUILD, str(a), "1")
        _python(BUILD, str(b), "2")
        size_mib = a.stat().st_size / 2**20
        ours = _python(MERGE, str(a), str(b), str(Path(scratch) / "merged.safetensors"), args.method)
        naive = _python(NAIVE, str(a), str(b), str(Path(scratch) / "naive.safetensors"))
    report = {"bench": "merge", "method": args.method, "model_file_mib": round(size_mib, 1)}
    for name, figures in (("streamed", ours), ("load_whole_baseline", naive)):
        added = (figures["peak_kib"] - figures["rss_before_kib"]) / 1024
        report[name] = {"seconds": round(figures["seconds"], 2), "peak_rss_mib": round(figures["peak_kib"] / 1024, 1),
                        "rss_added_by_merge_mib": round(added, 1), "added_vs_one_model": round(added / size_mib, 2)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
