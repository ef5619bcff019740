"""The `dreamloom` command line."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from dreamloom.errors import DreamloomError

EXIT_USER_ERROR = 2


def _print_progress(stream):
    def on_step(progress) -> None:
        end = "\n" if progress.step == progress.total or not stream.isatty() else "\r"
        print(f"  step {progress.step}/{progress.total}", end=end, file=stream, flush=True)

    return on_step


def _engine(settings):
    from engine.registry import load_registry
    from engine.service import Engine

    budget = settings.model_memory_budget_mb * 2**20 if settings.model_memory_budget_mb else None
    return Engine(load_registry(settings.registry), settings.cache_dir, device=settings.device, memory_budget_bytes=budget)


def _source(path: Path):
    """An input image and what its PNG metadata says about how it was made."""
    from engine.images import open_image

    image = open_image(path)
    made = json.loads(image.info["dreamloom"]) if "dreamloom" in image.info else {}
    return image, made


def _source_prompt(args, made: dict[str, Any]):
    from engine.params import parse_prompt

    text = args.prompt if args.prompt is not None else made.get("raw_prompt", "")
    prompt = parse_prompt(text, allow_empty=True)
    model = args.model or prompt.model or made.get("settings", {}).get("model")
    return dataclasses.replace(prompt, model=model)


def cmd_imagine(args, settings) -> dict[str, Any]:
    from engine.generation import ImagineRequest
    from engine.images import open_image
    from engine.params import parse_prompt
    from studio.outputs import write_result

    image = open_image(Path(args.image)) if args.image else None
    prompt = parse_prompt(args.prompt, allow_empty=image is not None)
    if args.model:
        prompt = dataclasses.replace(prompt, model=args.model)
    engine = _engine(settings)
    result = engine.imagine(ImagineRequest(prompt, image), on_step=None if args.quiet else _print_progress(sys.stderr))
    return write_result(result, Path(args.out) if args.out else settings.outputs_dir, args.prompt).to_dict()


def cmd_vary(args, settings) -> dict[str, Any]:
    from engine.generation import VaryRequest
    from studio.outputs import write_result

    image, made = _source(Path(args.image))
    prompt = dataclasses.replace(_source_prompt(args, made), seed=args.seed, n=args.n)
    engine = _engine(settings)
    request = VaryRequest(image, prompt, "strong" if args.strong else "subtle")
    result = engine.vary(request, on_step=None if args.quiet else _print_progress(sys.stderr))
    return write_result(result, Path(args.out) if args.out else settings.outputs_dir, prompt.raw, str(args.image)).to_dict()


def cmd_upscale(args, settings) -> dict[str, Any]:
    from engine.generation import UpscaleRequest
    from studio.outputs import write_result

    image, made = _source(Path(args.image))
    seed = args.seed if args.seed is not None else made.get("seed")
    prompt = dataclasses.replace(_source_prompt(args, made), seed=seed, n=1)
    engine = _engine(settings)
    request = UpscaleRequest(image, prompt, "creative" if args.creative else "detail")
    result = engine.upscale(request, on_step=None if args.quiet else _print_progress(sys.stderr))
    return write_result(result, Path(args.out) if args.out else settings.outputs_dir, prompt.raw, str(args.image)).to_dict()


def cmd_models(args, settings) -> dict[str, Any]:
    from engine.registry import load_registry

    registry = load_registry(settings.registry)
    return {
        "registry": str(registry.source), "default": registry.default,
        "models": [{"name": s.name, "family": s.family, "path": str(s.path), "tags": list(s.tags),
                    "description": s.description, "installed": s.path.exists()} for s in registry.models.values()],
    }


def _human(command: str, document: dict[str, Any]) -> str:
    if command == "models":
        lines = [f"{m['name']:<24} {m['family']:<8} {'ok' if m['installed'] else 'MISSING':<8} {m['description']}"
                 for m in document["models"]]
        return "\n".join(lines + [f"(default: {document['default']}; registry: {document['registry']})"])
    p = document["parameters"]
    lines = []
    if document["grid"]:
        lines.append(f"grid: {document['grid']}")
    lines += [f"image {i['index']}: {i['path']}  (seed {i['seed']})" for i in document["images"]]
    lines.append(f"model {p['model']} ({p['family']}), {p['width']}x{p['height']}, {p['steps']} steps, "
                 f"sampler {p['sampler']}, cfg {p['cfg']:g}" + (f", strength {p['strength']:g}" if p["strength"] else "")
                 + (f", chaos {p['chaos']}" if p["chaos"] else ""))
    lines.append(f"prompt: {p['prompt']}" + (f"  --no {p['negative_prompt']}" if p["negative_prompt"] else ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamloom", description="Dreamloom: a Midjourney you run yourself.")
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--json", action="store_true", help="print one JSON document instead of text")
        return sub

    imagine = add("imagine", "Generate a 2x2 grid from a prompt (Midjourney syntax: --ar 3:2 --seed 7 ...).")
    imagine.add_argument("prompt")
    imagine.add_argument("--model", help="registered model name or path to a checkpoint (overrides --model in the prompt)")
    imagine.add_argument("--image", help="an image prompt (weight with --iw in the prompt)")
    imagine.add_argument("--out", help="output folder (default DATA_DIR/outputs)")
    imagine.add_argument("--quiet", action="store_true", help="no step progress on stderr")
    for name, text in (("vary", "Make variations of an image (4 by default)."),
                       ("upscale", "Make a 2x upscale of an image with a detail pass.")):
        sub = add(name, text)
        sub.add_argument("image", help="a PNG written by Dreamloom (its prompt and model are read from it) or any image")
        sub.add_argument("--prompt", help="prompt to use instead of the one stored in the image")
        sub.add_argument("--model", help="model to use instead of the one stored in the image")
        sub.add_argument("--seed", type=int, help="seed (default: random for vary, the source's for upscale)")
        sub.add_argument("--out", help="output folder (default DATA_DIR/outputs)")
        sub.add_argument("--quiet", action="store_true", help="no step progress on stderr")
        if name == "vary":
            sub.add_argument("--strong", action="store_true", help="strong variations (default subtle)")
            sub.add_argument("--n", type=int, default=4, choices=range(1, 5), help="number of variations (1-4)")
        else:
            sub.add_argument("--creative", action="store_true", help="repaint more detail (default: stay close)")
    add("models", "List the registered models.")
    return parser


COMMANDS = {"imagine": cmd_imagine, "vary": cmd_vary, "upscale": cmd_upscale, "models": cmd_models}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dreamloom` console script."""
    args = build_parser().parse_args(argv)
    try:
        from studio.settings import load_settings

        settings = load_settings()
        document = COMMANDS[args.command](args, settings)
    except DreamloomError as error:
        if args.json:
            print(json.dumps({"error": str(error), "type": type(error).__name__}))
        else:
            print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(json.dumps(document, indent=2) if args.json else _human(args.command, document))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
