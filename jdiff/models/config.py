"""Model configs as frozen dataclasses, parsed strictly from diffusers/transformers `config.json`.

A checkpoint's config lists every constructor argument of the reference class. We accept the ones we
implement, accept the ones we do not implement only at their reference default, and reject anything
else by name, so a checkpoint never loads into a silently different architecture.
"""

import dataclasses
import difflib
from typing import Any, Mapping

from jdiff.errors import ConfigError


def _freeze(value: Any) -> Any:
    """JSON lists become tuples so configs are hashable (Flax module attributes must be)."""
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def parse_config(
    cls,
    raw: Mapping[str, Any],
    *,
    source: str,
    unsupported_defaults: Mapping[str, Any] = {},
    ignored: frozenset = frozenset(),
):
    """Builds dataclass `cls` from `raw`, with errors that name the field and the source file.

    unsupported_defaults: reference fields jdiff does not implement, with the only value accepted.
    ignored: fields without architectural meaning (library versions, names, generation options).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key.startswith("_") or key in ignored:
            continue
        value = _freeze(value)
        if key in names:
            kwargs[key] = value
        elif key in unsupported_defaults:
            default = _freeze(unsupported_defaults[key])
            if value != default:
                raise ConfigError(
                    f"{source}: config field {key!r} = {value!r} is not supported by jdiff "
                    f"(only {default!r} is)."
                )
        else:
            known = sorted(names | set(unsupported_defaults))
            close = difflib.get_close_matches(key, known, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"{source}: unknown config field {key!r}.{hint}")
    try:
        config = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{source}: {e}") from None
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate(source)
    return config


def config_to_dict(config) -> dict:
    """The dataclass as JSON-ready data (tuples become lists)."""

    def thaw(v):
        return [thaw(x) for x in v] if isinstance(v, tuple) else v

    return {k: thaw(v) for k, v in dataclasses.asdict(config).items()}


def per_block(value, n: int, name: str, source: str = "config") -> tuple:
    """Expands an int (or None) to one value per block, and checks a tuple's length."""
    if isinstance(value, tuple):
        if len(value) != n:
            raise ConfigError(f"{source}: {name} has {len(value)} entries but there are {n} blocks.")
        return value
    return (value,) * n
