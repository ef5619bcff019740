"""The router learns from a community's explicit choices: accuracy before and after, through the studio. Prints JSON.

    .venv/bin/python bench/route_learning_bench.py

A simulated server whose members keep choosing a model or LoRA themselves for styles the shipped examples do not
cover (slice of life and city pop on the niji model, bauhaus and pop-art posters with the outline LoRA, film noir
and candlelit scenes with the night LoRA): each choice is queued through the studio (`--niji`, `<lora:...>`),
finished with small stored images (no engine: routing is what is measured), and up-voted by another verified
member. Then new prompts in the same styles (never chosen) are routed before and after, and the routing table's
test part is routed again on that server to show that what it learned did not spoil the rest.
"""
from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from studio.service import Studio  # noqa: E402
from studio.settings import Settings  # noqa: E402
from tests.routing_table import TEST  # noqa: E402
from tests.test_studio import finish  # noqa: E402

S, N = "starter-shapes", "starter-niji"
GUILD = "4242"
# (what members wrote, with their explicit choice) -- the server's habits.
CHOICES = [
    ("a slice of life scene in a bakery --niji", N, []),
    ("slice of life, two friends walking home after school --niji", N, []),
    ("a quiet slice of life morning in a small apartment --niji", N, []),
    ("a city pop album cover with a convertible --niji", N, []),
    ("city pop aesthetic, a girl with headphones by the sea --niji", N, []),
    ("an 80s city pop poster of a night drive --niji", N, []),
    ("a bauhaus poster of a fox <lora:outline>", S, ["outline"]),
    ("bauhaus style poster with a circle and a square <lora:outline>", S, ["outline"]),
    ("a bauhaus exhibition poster <lora:outline>", S, ["outline"]),
    ("pop art portrait of a woman <lora:outline>", S, ["outline"]),
    ("a pop art soup can <lora:outline>", S, ["outline"]),
    ("roy lichtenstein style pop art <lora:outline>", S, ["outline"]),
    ("film noir detective in the rain <lora:night>", S, ["night"]),
    ("a film noir scene with a femme fatale <lora:night>", S, ["night"]),
    ("noir style alley with a lone figure <lora:night>", S, ["night"]),
    ("a candlelit dinner table <lora:night>", S, ["night"]),
    ("a candlelit room with old books <lora:night>", S, ["night"]),
    ("candlelit portrait of a monk <lora:night>", S, ["night"]),
]
# New prompts in the same styles, never chosen by anyone.
NEW = [
    ("slice of life scene at a flower shop", N, []),
    ("a slice of life afternoon on a train", N, []),
    ("city pop style illustration of a summer night drive", N, []),
    ("a city pop record sleeve with palm trees", N, []),
    ("a bauhaus poster of a bicycle", S, ["outline"]),
    ("bauhaus design with a triangle", S, ["outline"]),
    ("pop art comic of a kiss", S, ["outline"]),
    ("a pop art banana", S, ["outline"]),
    ("a film noir private eye in his office", S, ["night"]),
    ("noir street with a trench coat detective", S, ["night"]),
    ("a candlelit church", S, ["night"]),
    ("candlelit bath with roses", S, ["night"]),
]


def accuracy(studio: Studio, table, guild: str | None) -> tuple[float, list]:
    wrong = []
    for prompt, model, loras in table:
        decision = studio.route(prompt, guild_id=guild)
        got = (decision.model, sorted(l.name for l in decision.loras))
        if got != (model, sorted(loras)):
            wrong.append({"prompt": prompt, "got": got, "want": (model, sorted(loras))})
    return round(1 - len(wrong) / len(table), 4), wrong


async def main() -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        settings = Settings(data_dir=Path(scratch), registry=ROOT / "tests" / "registry.toml")
        studio = await Studio.open(settings)
        try:
            await studio.prepare_routing()
            before_new, _ = accuracy(studio, NEW, GUILD)
            before_test, _ = accuracy(studio, TEST, GUILD)
            started = time.perf_counter()
            for index, (text, _, _) in enumerate(CHOICES):
                job = await studio.submit_imagine(f"discord:{100 + index % 6}", text, guild_id=GUILD)
                images = await finish(studio, job.id)
                await studio.community.vote(images[0], f"discord:{200 + index % 4}", 1, source="reaction")
            learning_s = time.perf_counter() - started
            examples = await studio.route_examples(GUILD)
            after_new, misses = accuracy(studio, NEW, GUILD)
            after_test, test_misses = accuracy(studio, TEST, GUILD)
            other_server, _ = accuracy(studio, NEW, "9999")
        finally:
            await studio.close()
    return {"choices": len(CHOICES), "learned_examples": len(examples), "new_prompts": len(NEW),
            "new_prompts_accuracy": {"before": before_new, "after": after_new, "another_server_after": other_server},
            "routing_table_test_accuracy": {"before": before_test, "after": after_test},
            "misses_after": misses, "test_misses_after": test_misses,
            "studio_seconds_for_the_choices": round(learning_s, 2)}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main()), indent=2))
