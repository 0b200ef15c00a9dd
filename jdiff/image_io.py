"""Reading input images and writing PNGs that carry their generation parameters."""

import io
import json
import math
import re
from typing import Mapping

import numpy as np
from PIL import Image, PngImagePlugin

from jdiff import paths
from jdiff.errors import ConfigError
from jdiff.paths import Path


def open_image(path) -> Image.Image:
    """The picture at `path` as Pillow decodes it (its own mode), read whole."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"image {str(path)!r} does not exist.")
    try:
        with path.open("rb") as file, Image.open(file) as image:
            image.load()
            return image.copy()
    except (OSError, SyntaxError) as e:
        raise ConfigError(f"cannot read image {str(path)!r}: {e}") from None


def load_image(path, mode: str = "RGB") -> np.ndarray:
    """[H, W, 3] (mode "RGB") or [H, W] (mode "L") float32 in [0, 1]."""
    return np.asarray(open_image(path).convert(mode), np.float32) / 255.0


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(image, np.float32), 0, 1) * 255).round().astype(np.uint8)


# A1111's names for the samplers it shares with jdiff (its "Sampler:" field; diffusers' docs pair them
# with the same schedulers). Others keep jdiff's name.
A1111_SAMPLERS = {"ddim": "DDIM", "ddpm": "DDPM", "euler": "Euler", "euler_a": "Euler a", "dpm++2m": "DPM++ 2M",
                  "dpm++2m_karras": "DPM++ 2M Karras", "dpm++2m_sde": "DPM++ 2M SDE",
                  "dpm++2m_sde_karras": "DPM++ 2M SDE Karras", "unipc": "UniPC", "lms": "LMS", "heun": "Heun",
                  "lcm": "LCM"}
_JDIFF_SAMPLERS = {v: k for k, v in A1111_SAMPLERS.items()}
# jdiff's setting -> A1111's field, in the order A1111 writes them.
_A1111_FIELDS = (("steps", "Steps"), ("sampler", "Sampler"), ("guidance", "CFG scale"), ("seed", "Seed"),
                 ("size", "Size"), ("model", "Model"), ("strength", "Denoising strength"))
_FIELD = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _quote(value) -> str:
    """A field value as A1111 writes it: JSON-quoted when it holds a comma, colon or line break."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def a1111_parameters(parameters: Mapping, width: int, height: int) -> str | None:
    """The `parameters` text that A1111, Forge, ComfyUI's loaders and image sites read: the prompt,
    a `Negative prompt:` line, then `Steps: 25, Sampler: ..., CFG scale: 7.5, Seed: 1, Size: WxH, ...`.
    None when there is no single prompt (a grid of several)."""
    prompt = parameters.get("prompt")
    if not isinstance(prompt, str):
        return None
    values = {**parameters, "size": f"{width}x{height}"}
    values["sampler"] = A1111_SAMPLERS.get(values.get("sampler"), values.get("sampler"))
    if values.get("model") is not None:
        values["model"] = Path(str(values["model"]).rstrip("/")).name  # the model's name, not the local path
    fields = [f"{name}: {_quote(values[key])}" for key, name in _A1111_FIELDS if values.get(key) is not None]
    lines = [prompt]
    if parameters.get("negative_prompt"):
        lines.append(f"Negative prompt: {parameters['negative_prompt']}")
    return "\n".join(lines + [", ".join(fields)])


def parse_a1111_parameters(text: str) -> dict:
    """An A1111-style `parameters` text as jdiff's keys (prompt, negative_prompt, steps, sampler,
    guidance, seed, width, height, model, strength); fields jdiff has no name for keep A1111's."""
    lines = text.strip().split("\n")
    found = _FIELD.findall(lines[-1])
    fields = dict(found) if len(found) >= 2 else {}
    if fields:
        lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    result = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative) or None}
    by_name = {name: key for key, name in _A1111_FIELDS}
    for name, value in fields.items():
        name, value = name.strip(), value.strip()
        if value.startswith('"'):
            value = json.loads(value)
        key = by_name.get(name, name)
        if key == "size" and re.fullmatch(r"\d+x\d+", value):
            result["width"], result["height"] = (int(v) for v in value.split("x"))
        elif key in ("steps", "seed") and value.lstrip("-").isdigit():
            result[key] = int(value)
        elif key in ("guidance", "strength"):
            result[key] = float(value)
        elif key == "sampler":
            result[key] = _JDIFF_SAMPLERS.get(value, value)
        else:
            result[key] = value
    return result


def save_png(path, image: np.ndarray, parameters: Mapping) -> None:
    """Writes image [H, W, 3] in [0, 1] with its generation parameters in two text chunks:
    `parameters`, in the text form other tools read (`a1111_parameters`), and `jdiff`, every setting
    as JSON. (No chunk named `prompt`: ComfyUI reads that one as its own JSON graph.) Written in one
    piece (`paths.write_bytes`), so an interrupted run never leaves a truncated file under the final name."""
    path = Path(path)
    pixels = to_uint8(image)
    info = PngImagePlugin.PngInfo()
    text = a1111_parameters(parameters, width=pixels.shape[1], height=pixels.shape[0])
    if text is not None:
        info.add_itxt("parameters", text)  # international text: prompts need not be Latin-1
    info.add_itxt("jdiff", json.dumps(dict(parameters), default=str, ensure_ascii=False))
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="PNG", pnginfo=info)
    paths.write_bytes(path, encoded.getvalue())


def read_png_parameters(path) -> dict:
    """A PNG's generation parameters: jdiff's full record when it wrote the file, otherwise those of
    the `parameters` text another tool (A1111, Forge, ...) wrote, or the JSON that earlier jdiff versions wrote there."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"image {str(path)!r} does not exist.")
    with path.open("rb") as file, Image.open(file) as image:
        # Chunks before the pixel data (where jdiff and A1111 write theirs) are read at open; `.text`
        # decodes the whole image to reach any after it, so it is the fallback.
        text = {k: v for k, v in image.info.items() if isinstance(v, str)}
        if "jdiff" not in text and "parameters" not in text:
            text = dict(image.text)
    if "jdiff" in text:
        return json.loads(text["jdiff"])
    if "parameters" in text:
        try:
            return json.loads(text["parameters"])
        except ValueError:
            return parse_a1111_parameters(text["parameters"])
    raise ConfigError(f"{str(path)!r} carries no generation parameters (no 'jdiff' or 'parameters' text chunk).")


def fit(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """image [H, W, 3] in [0, 1] at height x width: scaled (Lanczos) until it covers that size, keeping
    its aspect ratio, then centre-cropped; unchanged when it already has that size."""
    if image.shape[:2] == (height, width):
        return image
    scale = max(height / image.shape[0], width / image.shape[1])
    size = (max(width, round(image.shape[1] * scale)), max(height, round(image.shape[0] * scale)))
    resized = np.asarray(Image.fromarray(to_uint8(image)).resize(size, Image.Resampling.LANCZOS), np.float32) / 255
    top, left = (resized.shape[0] - height) // 2, (resized.shape[1] - width) // 2
    return resized[top:top + height, left:left + width]


def image_grid(images, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Tiles images [N, H, W, 3] (or a list of differently sized [H, W, 3], each placed top-left in a
    cell of the largest size) into one [rows*(H+pad)-pad, cols*(W+pad)-pad, 3] image (white gaps)."""
    if not isinstance(images, np.ndarray):
        images = list(images)
        h, w = max(i.shape[0] for i in images), max(i.shape[1] for i in images)
        cells = np.ones((len(images), h, w, images[0].shape[2]), np.asarray(images[0]).dtype)
        for cell, image in zip(cells, images):
            cell[:image.shape[0], :image.shape[1]] = image
        images = cells
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.ones((rows * (h + pad) - pad, columns * (w + pad) - pad, c), images.dtype)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * (h + pad):r * (h + pad) + h, col * (w + pad):col * (w + pad) + w] = image
    return grid
