"""Prompt lists for batch generation: plain text lines, or JSON lines with per-prompt settings; and
resolution buckets, the fixed set of shapes mixed sizes are drawn at."""

import dataclasses
import json
import math
import re
from typing import Optional

from jdiff.errors import ConfigError
from jdiff.paths import Path


@dataclasses.dataclass(frozen=True)
class Job:
    """One image to generate."""

    prompt: str
    negative_prompt: Optional[str]  # None: not given (SDXL may then use zeros, as diffusers does)
    seed: int
    height: Optional[int] = None  # None: the run's size
    width: Optional[int] = None
    # The second and third text encoders' prompts (SDXL, SD3, Flux; diffusers' prompt_2, prompt_3):
    # {"prompt_2": ..., "negative_prompt_3": ...}, the ones given. Missing: the prompt (negative prompt).
    encoder_prompts: tuple[tuple[str, str], ...] = ()


ENCODER_PROMPT_KEYS = ("prompt_2", "negative_prompt_2", "prompt_3", "negative_prompt_3")
_KEYS = ("prompt", "negative_prompt", "seed", "height", "width") + ENCODER_PROMPT_KEYS


def read_prompts_file(path) -> list[dict]:
    """Lines of `path`: plain prompts, or JSON objects {"prompt", "negative_prompt", "seed", "height",
    "width", "prompt_2", "negative_prompt_2", "prompt_3", "negative_prompt_3"}. Blank lines and
    lines starting with '#' are skipped."""
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
            unknown = set(entry) - set(_KEYS)
            if "prompt" not in entry or unknown:
                raise ConfigError(f"{path}:{number}: a JSON line needs \"prompt\" and may have "
                                  f"{', '.join(repr(k) for k in _KEYS[1:])} (got {sorted(entry)}).")
            for key in ("seed", "height", "width"):
                if key in entry and (not isinstance(entry[key], int) or isinstance(entry[key], bool)
                                     or key != "seed" and entry[key] < 1):
                    raise ConfigError(f"{path}:{number}: {key!r} must be a{' positive' if key != 'seed' else 'n'} "
                                      f"integer, got {entry[key]!r}.")
            for key in ("prompt", "negative_prompt") + ENCODER_PROMPT_KEYS:
                if key in entry and not isinstance(entry[key], str) and (key == "prompt" or entry[key] is not None):
                    raise ConfigError(f"{path}:{number}: {key!r} must be a string, got {entry[key]!r}.")
        else:
            entry = {"prompt": line}
        entries.append(entry)
    if not entries:
        raise ConfigError(f"prompts file {str(path)!r} holds no prompts.")
    return entries


def make_jobs(entries: list[dict], num_images: int, seed: int, negative_prompt: Optional[str],
              encoder_prompts: Optional[dict] = None) -> list[Job]:
    """`num_images` jobs per entry. Without its own seed, entry i's image k gets seed
    seed + i * num_images + k, so every image of a run has a different seed. `negative_prompt` and
    `encoder_prompts` ({"prompt_2": ..., ...}) apply to the entries that do not set their own."""
    if num_images < 1:
        raise ConfigError(f"num_images must be at least 1, got {num_images}.")
    jobs = []
    for i, entry in enumerate(entries):
        base = int(entry["seed"]) if "seed" in entry else seed + i * num_images
        negative = entry.get("negative_prompt", negative_prompt)
        more = {**(encoder_prompts or {}), **{k: entry[k] for k in ENCODER_PROMPT_KEYS if k in entry}}
        more = tuple((k, more[k]) for k in ENCODER_PROMPT_KEYS if more.get(k) is not None)
        jobs += [Job(entry["prompt"], negative, base + k, entry.get("height"), entry.get("width"), more)
                 for k in range(num_images)]
    return jobs


def parse_buckets(text: str) -> list[tuple[int, int]]:
    """"WxH,WxH,..." (sample.py --buckets) as [(height, width), ...]."""
    buckets = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        match = re.fullmatch(r"(\d+)[xX](\d+)", item)
        if not match or int(match[1]) < 1 or int(match[2]) < 1:
            raise ConfigError(f"--buckets: {item!r} is not WIDTHxHEIGHT (for example 512x768).")
        buckets.append((int(match[2]), int(match[1])))
    if not buckets:
        raise ConfigError("--buckets is empty: give sizes as WIDTHxHEIGHT,WIDTHxHEIGHT,...")
    return list(dict.fromkeys(buckets))


def bucket_for(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket a request of height x width is drawn in: the nearest aspect ratio (in log ratio);
    among equally near ones, the smallest that covers the request, else the largest."""
    def distance(bucket):
        return round(abs(math.log(bucket[0] / bucket[1]) - math.log(height / width)), 9)

    nearest = min(distance(b) for b in buckets)
    candidates = [b for b in buckets if distance(b) == nearest]
    covering = [b for b in candidates if b[0] >= height and b[1] >= width]
    if covering:
        return min(covering, key=lambda b: b[0] * b[1])
    return max(candidates, key=lambda b: b[0] * b[1])
