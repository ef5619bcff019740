"""The whole learning loop through the studio, at full length, on a simulated community. Prints JSON.

    .venv/bin/python bench/learning_loop.py [--steps 400] [--save tests/learned]

A community generates images of neutral prompts (no colour named) with the starter model; three members vote on
every image by the community's taste (a green background, which no prompt names) and one more member rates them by
their own (an orange background). The studio then learns the house style and that member's `--p` from the verified
votes exactly as `dreamloom learn` does, and the run measures, against the base in the same run, on held-out
neutral prompts and fresh seeds: the share of each taste, and colour adherence on named-colour prompts.

`--save tests/learned` keeps the two learned LoRAs (and this run's figures) as the fixtures `tests/test_learning.py`
checks the shift on: CI cannot afford 2 x 400 training steps on a CPU, so the full run is committed and the test trains
a few steps of the same loop.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.registry import load_registry  # noqa: E402
from engine.service import Engine  # noqa: E402
from engine.training.tastes import adherence, neutral_prompts, taste, taste_share  # noqa: E402
from storage.learning import held_out_prompt  # noqa: E402
from studio.service import Studio  # noqa: E402
from studio.settings import Settings  # noqa: E402
from studio.worker import Worker  # noqa: E402

HOUSE_TASTE = "background:green"
MEMBER_TASTE = "background:orange"
MEMBER = "discord:7"


async def community(scratch: Path, steps: int, objective: str) -> tuple[dict, dict, Path]:
    registry_path = ROOT / "tests" / "registry.toml"
    studio = await Studio.open(Settings(data_dir=scratch / "data", registry=registry_path, max_queued_per_user=1000))
    engine = Engine(studio.registry, scratch / "cache", device="cpu")
    worker = Worker(studio, engine, "bench:1:1")
    house_likes, member_likes = taste(HOUSE_TASTE), taste(MEMBER_TASTE)
    for index, prompt in enumerate(neutral_prompts()):
        await studio.submit_imagine("cli:maker", f"{prompt} --seed {index * 4} --steps 12")
    while await worker.run_one():
        pass
    from PIL import Image

    jobs = [await studio.job(job_id) for job_id in range(1, len(neutral_prompts()) + 1)]
    for image in (image for job in jobs for image in job.images):
        picture = Image.open(image.path)
        for voter in ("discord:1", "discord:2", "discord:3"):
            await studio.community.vote(image.id, voter, 1 if house_likes(picture) else -1)
        await studio.community.vote(image.id, MEMBER, 1 if member_likes(picture) else -1)
    engine.close()
    started = time.perf_counter()
    house = await studio.learn(steps=steps, objective=objective, log_line=lambda line: None)
    house_s = time.perf_counter() - started
    started = time.perf_counter()
    personal = await studio.learn(voter=MEMBER, steps=steps, objective=objective, log_line=lambda line: None)
    personal_s = time.perf_counter() - started
    await studio.close()
    data = scratch / "data"
    return ({"view": house.to_dict(), "train_s": round(house_s, 1), "file": data / "styles" / house.name / f"{house.name}.safetensors"},
            {"view": personal.to_dict(), "train_s": round(personal_s, 1),
             "file": data / "styles" / personal.name / f"{personal.name}.safetensors"}, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--objective", default="kto")
    parser.add_argument("--adherence-prompts", type=int, default=32)
    parser.add_argument("--save", type=Path, help="keep the learned LoRAs here (the test fixtures)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp())
    house, personal, _ = asyncio.run(community(scratch, args.steps, args.objective))
    evaluation = [p for p in neutral_prompts() if held_out_prompt(p)]
    text = (ROOT / "tests" / "registry.toml").read_text().replace('path = "../models/', f'path = "{ROOT}/models/')
    for name, run in (("house", house), ("personal", personal)):
        text += f'\n[[loras]]\nname = "{name}"\npath = "{run["file"]}"\nfamily = "starter"\nweight = 1.0\n'
    (scratch / "models.toml").write_text(text)
    engine = Engine(load_registry(scratch / "models.toml"), scratch / "cache", device="cpu")
    report = {"steps": args.steps, "objective": args.objective, "held_out_prompts": len(evaluation)}
    base_adherence = adherence(engine, "", args.adherence_prompts)
    for name, run, liked in (("house", house, HOUSE_TASTE), ("personal", personal, MEMBER_TASTE)):
        predicate = taste(liked)
        base, styled = (taste_share(engine, evaluation, predicate, suffix) for suffix in ("", f" <lora:{name}:1>"))
        report[name] = {"taste": liked, "name": run["view"]["name"], "train_s": run["train_s"],
                        "held_out_accuracy": run["view"]["evaluation"]["held_out_accuracy"],
                        "status": run["view"]["status"], "base_share": base, "styled_share": styled,
                        "shift": round(styled / base, 2) if base else None,
                        "base_adherence": base_adherence,
                        "styled_adherence": adherence(engine, f" <lora:{name}:1>", args.adherence_prompts)}
    engine.close()
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        for name, run in (("house", house), ("personal", personal)):
            shutil.copy(run["file"], args.save / f"{name}.safetensors")
            (args.save / f"{name}.safetensors").chmod(0o644)
        (args.save / "figures.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
