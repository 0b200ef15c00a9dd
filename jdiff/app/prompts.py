"""Prompt lists for batch generation: plain text lines, or JSON lines with per-prompt settings."""

import dataclasses
import json
from typing import Optional

from jdiff.errors import ConfigError
from jdiff.paths import Path


@dataclasses.dataclass(frozen=True)
class Job:
    """One image to generate."""

    prompt: str
    negative_prompt: Optional[str]  # None: not given (SDXL may then use zeros, as diffusers does)
    seed: int


def read_prompts_file(path) -> list[dict]:
    """Lines of `path`: plain prompts, or JSON objects {"prompt", "negative_prompt", "seed"}.
    Blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompts file {str(path)!r} does not exist.")
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{number}: not valid JSON: {e}") from None
            unknown = set(entry) - {"prompt", "negative_prompt", "seed"}
            if "prompt" not in entry or unknown:
                raise ConfigError(f"{path}:{number}: a JSON line needs \"prompt\" and may have "
                                  f"\"negative_prompt\" and \"seed\" (got {sorted(entry)}).")
        else:
            entry = {"prompt": line}
        entries.append(entry)
    if not entries:
        raise ConfigError(f"prompts file {str(path)!r} holds no prompts.")
    return entries


def make_jobs(entries: list[dict], num_images: int, seed: int, negative_prompt: Optional[str]) -> list[Job]:
    """`num_images` jobs per entry. Without its own seed, entry i's image k gets seed
    seed + i * num_images + k, so every image of a run has a different seed."""
    if num_images < 1:
        raise ConfigError(f"num_images must be at least 1, got {num_images}.")
    jobs = []
    for i, entry in enumerate(entries):
        base = int(entry["seed"]) if "seed" in entry else seed + i * num_images
        negative = entry.get("negative_prompt", negative_prompt)
        jobs += [Job(entry["prompt"], negative, base + k) for k in range(num_images)]
    return jobs
