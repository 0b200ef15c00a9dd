"""Orbax checkpoints of a training run: asynchronous saves, keep-the-last-K, and a restore that
survives a damaged newest checkpoint.

A step is written to a temporary folder and renamed when complete, so a process killed mid-save
leaves no half-written step under a real step name. A newest step that cannot be read (a corrupt
file, a truncated array) is moved aside to `<step>.unreadable` with a warning, never deleted, and
the previous one is used.
"""

import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import orbax.checkpoint as ocp

from jdiff.errors import CheckpointError


class Checkpoints:
    """The checkpoints of one training stage, in `directory/<step>/`."""

    def __init__(self, directory, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts saving `state` (a pytree of arrays) and `meta` (JSON: config, data iterator
        state...) as step `step`; returns once the arrays are copied off the devices."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)

    def restore(self, abstract_state: Any) -> Optional[tuple[Any, dict, int]]:
        """(state, meta, step) of the newest readable checkpoint, or None if there is none.

        abstract_state: the state's structure as `jax.ShapeDtypeStruct`s (with shardings), e.g.
        from `jax.eval_shape`; arrays are restored straight into those shardings.
        """
        for step in reversed(self.steps()):
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
            try:
                restored = self.manager.restore(step, args=args)
                return restored["state"], dict(restored["meta"]), step
            except Exception as error:  # orbax/tensorstore raise many types for damaged files
                if "tree structures do not match" in str(error):  # a different model, not damage
                    raise CheckpointError(f"checkpoint step {step} in {self.directory} holds a differently "
                                          f"shaped train state: {str(error)[:300]}") from None
                aside = self.directory / f"{step}.unreadable"
                warnings.warn(f"checkpoint step {step} in {self.directory} cannot be read "
                              f"({type(error).__name__}: {str(error)[:200]}); it was moved to {aside.name} and the "
                              f"previous checkpoint is used.", stacklevel=2)
                shutil.rmtree(aside, ignore_errors=True)
                (self.directory / str(step)).rename(aside)
                self.manager.reload()
        return None

    def read_meta(self, step: int) -> dict:
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def wait(self) -> None:
        """Blocks until every started save is complete on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
