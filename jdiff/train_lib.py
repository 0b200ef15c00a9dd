"""The training loop shared by every stage: train state with EMA, a pure jitted train step over a
device mesh, checkpoints, NaN guard, TensorBoard and console logging.

A stage (see `jdiff/app/stages.py`) supplies what differs: how to initialise its trainable parameters,
its loss, its frozen parameters, how a host batch becomes model inputs, and its evaluation.
"""

import dataclasses
import functools
import json
import signal
import time
from typing import Any, Callable, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from jdiff import sharding
from jdiff.checkpoint import Checkpoints
from jdiff.errors import TrainingError
from jdiff.paths import Path
from jdiff.preemption import Preempted, StopOnSignal


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array  # raw key data; step k uses fold_in(key, k), so a resumed run draws the same numbers


@dataclasses.dataclass(frozen=True)
class Stage:
    """What one training stage contributes to the shared loop."""

    name: str
    init_params: Callable[[jax.Array], Any]  # rng -> trainable params
    loss_fn: Callable[..., tuple]  # (params, frozen, batch, rng) -> (loss, metrics dict)
    prepare_batch: Callable[[dict], dict]  # host numpy batch -> model inputs (numpy)
    frozen: Any = None  # parameters the stage uses but does not train
    evaluate: Optional[Callable[[Any, int], dict]] = None  # (ema params, step) -> scalars (and images)
    model_meta: dict = dataclasses.field(default_factory=dict)  # configs a resume must agree with
    # True: loss_fn finds the EMA of the trained params in frozen["ema"] (a consistency model's target
    # network is an EMA of the student, at the section's ema_decay)
    reads_ema: bool = False


class TrainResult(NamedTuple):
    state: TrainState
    history: list  # per logging interval: {"step", "loss", "grad_norm", "learning_rate", ...}


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine decay, global-norm clipping, optional accumulation."""
    schedule = learning_rate_schedule(config)
    optimizer = optax.chain(
        optax.clip_by_global_norm(config.grad_clip) if config.grad_clip else optax.identity(),
        optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                    weight_decay=config.weight_decay),
    )
    if config.grad_accum_steps > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=config.grad_accum_steps)
    return optimizer


def learning_rate_schedule(config):
    total = max(config.steps // max(config.grad_accum_steps, 1), 1)
    warmup = min(config.warmup_steps, total - 1)
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, total,
                                              end_value=config.learning_rate * config.final_lr_fraction)


def init_state(rng, stage: Stage, optimizer) -> TrainState:
    params = stage.init_params(rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      ema_params=params, rng=jax.random.key_data(jax.random.fold_in(rng, 1)))


def train_step(state: TrainState, batch: dict, frozen, *, loss_fn, optimizer, ema_decay: float,
               reads_ema: bool = False):
    """One optimizer (micro-)step. Pure: the randomness is fold_in(state.rng, state.step)."""
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if reads_ema:
        frozen = {**frozen, "ema": jax.lax.stop_gradient(state.ema_params)}
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen, batch, rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # EMA warm-up (as diffusers' EMAModel): early on, a 0.999 average would still be mostly the
    # random initialisation; the effective decay grows from 0.1 towards ema_decay.
    decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
    # new + decay (old - new), EMAModel's update rearranged: exactly `old` where a parameter did not
    # move and exactly `new` at decay 0 (decay * old + (1 - decay) * new can be an ulp off either way,
    # and its rounding depends on how the compiler fuses it).
    ema = jax.tree.map(lambda new, old: (new + decay * (old - new)).astype(old.dtype), params, state.ema_params)
    if isinstance(optimizer, optax.MultiSteps):  # the EMA follows real updates, not micro-steps
        updated = optimizer.has_updated(opt_state)
        ema = jax.tree.map(lambda new, old: jnp.where(updated, new, old), ema, state.ema_params)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics


def _global_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Each process's batch (a pytree of arrays) becomes its slice of global arrays split over the data axis."""
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, np.asarray(v)), batch)


class _Logger:
    """TensorBoard scalars and images plus console lines, from process 0 only."""

    def __init__(self, workdir: Path, stage: str):
        self.enabled = jax.process_index() == 0
        self.writer = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            from jdiff import tensorboard_objects

            tensorboard_objects.register(workdir / "tensorboard")
            self.writer = SummaryWriter(str(workdir / "tensorboard"))
        self.stage = stage

    def scalars(self, step: int, values: dict, prefix: str = "train") -> None:
        if self.writer:
            for key, value in values.items():
                if np.ndim(value) == 0:
                    self.writer.add_scalar(f"{prefix}/{key}", float(value), step)
            self.writer.flush()

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        if self.writer:
            self.writer.add_image(name, np.asarray(image), step, dataformats="HWC")
            self.writer.flush()

    def line(self, text: str) -> None:
        if self.enabled:
            tqdm.write(f"[{self.stage}] {text}")

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def _check_compatible(saved: dict, current: dict, directory: Path) -> None:
    """Refuses to resume a checkpoint of a different model, naming every differing field."""
    saved, current = _flatten(saved), _flatten(json.loads(json.dumps(current)))  # tuples read back as lists
    differences = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if differences:
        details = "; ".join(f"{k}: checkpoint {json.dumps(saved.get(k))} vs config {json.dumps(current.get(k))}"
                            for k in differences[:8])
        raise TrainingError(f"cannot resume from {directory}: the model config differs from the checkpoint's "
                            f"({details}). Use a new --workdir, or the checkpoint's settings.")


def train(stage: Stage, config, workdir, loader, *, mesh: Optional[Mesh] = None, total_batch: int) -> TrainResult:
    """Runs (or resumes) `stage` up to config.steps steps (at most config.run_steps in this call,
    if set: time-sliced jobs); returns the final state and the logged metrics.

    loader: a grain dataset whose iterator has get_state/set_state (the data position is saved
    with every checkpoint). total_batch: the global batch size, for images/s.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = mesh or sharding.make_mesh(config.get("mesh", {"data": -1}), num_devices=config.get("num_devices", 0))
    sharding.batch_size_per_process(mesh, total_batch)
    batch_sharding = sharding.batch_sharding(mesh)
    optimizer = make_optimizer(config)
    rng = jax.random.key(config.seed)

    # The state is created already laid out over the mesh (each device computes only its shards),
    # never whole on one device; a restore reads straight into the same layout.
    create = functools.partial(init_state, stage=stage, optimizer=optimizer)
    abstract = jax.eval_shape(create, rng)
    state_shardings = sharding.tree_shardings(abstract, mesh)
    abstract = sharding.with_shardings(abstract, state_shardings)
    create = jax.jit(create, out_shardings=state_shardings)
    checkpoints = Checkpoints(workdir / "checkpoints", keep=config.keep_checkpoints, async_save=config.async_checkpoints)
    data = iter(loader)
    for step in reversed(checkpoints.steps()):  # refuse a different model before touching any array
        try:
            saved_meta = checkpoints.read_meta(step)
        except Exception:  # unreadable: `restore` below sets it aside and falls back
            continue
        _check_compatible(saved_meta.get("model", {}), stage.model_meta, checkpoints.directory)
        break
    restored = checkpoints.restore(abstract)
    logger = _Logger(workdir, stage.name)
    if restored:
        state, meta, saved_step = restored
        data.set_state(meta["data"])
        logger.line(f"resumed from step {saved_step} in {checkpoints.directory}")
    else:
        state = create(rng)
    frozen_shardings = sharding.tree_shardings(stage.frozen, mesh)
    frozen = sharding.put(stage.frozen, frozen_shardings)

    step_fn = jax.jit(
        functools.partial(train_step, loss_fn=stage.loss_fn, optimizer=optimizer, ema_decay=config.ema_decay,
                          reads_ema=stage.reads_ema),
        in_shardings=(state_shardings, batch_sharding, frozen_shardings),
        out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
    schedule = learning_rate_schedule(config)
    start = int(state.step)
    stop = min(config.steps, start + config.run_steps) if config.get("run_steps", 0) else config.steps
    history: list[dict] = []  # the logged averages, returned for callers and tests
    pending: list[tuple[int, dict]] = []  # metrics not yet checked on the host (no sync every step)
    last_good = checkpoints.steps()[-1] if checkpoints.steps() else None
    timer, timed_steps = time.perf_counter(), 0

    def flush(step: int) -> dict:
        """Fetches pending metrics; stops training if any loss is not finite."""
        nonlocal pending
        fetched = [(s, jax.device_get(m)) for s, m in pending]
        pending = []
        for s, m in fetched:
            if not all(np.all(np.isfinite(v)) for v in m.values()):
                bad = {k: float(v) for k, v in m.items() if np.ndim(v) == 0}
                raise TrainingError(
                    f"{stage.name}: a non-finite value at step {s + 1} ({bad}); training stopped. The last good "
                    f"checkpoint is step {last_good} in {checkpoints.directory} (nothing after it was saved). "
                    f"Lower the learning rate or check the data.")
        return {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]} if fetched else {}

    stops = StopOnSignal(f"the {stage.name} stage")
    try:
        with stops, tqdm(total=config.steps, initial=start, desc=stage.name, unit="step",
                         disable=jax.process_index() != 0) as bar:
            for step in range(start, stop):
                batch = _global_batch(stage.prepare_batch(next(data)), batch_sharding)
                state, metrics = step_fn(state, batch, frozen)
                pending.append((step, metrics))
                timed_steps += 1
                done = step + 1
                if done % config.log_every == 0 or done == stop:
                    averages = flush(done)
                    elapsed = time.perf_counter() - timer
                    averages["learning_rate"] = float(schedule(done // max(config.grad_accum_steps, 1)))
                    averages["images_per_s"] = timed_steps * total_batch / elapsed
                    timer, timed_steps = time.perf_counter(), 0
                    logger.scalars(done, averages)
                    history.append({"step": done, **averages})
                    logger.line(f"step {done}/{config.steps} " + " ".join(
                        f"{k} {v:.4g}" for k, v in averages.items()))
                preempted = stops.stop_now(done)
                if done % config.checkpoint_every == 0 or done == stop or preempted:
                    flush(done)  # never save parameters that came from a non-finite step
                    checkpoints.save(done, state, {"data": data.get_state(), "model": stage.model_meta,
                                                   "stage": stage.name})
                    last_good = done
                if preempted:  # no evaluation: the time left before the machine goes may be short
                    checkpoints.wait()
                    logger.line(f"stopped by {signal.Signals(stops.signum).name}: step {done} saved")
                    raise Preempted(stage.name, done, stops.signum, checkpoints.directory)
                if stage.evaluate and (done % config.eval_every == 0 or done == config.steps):
                    results = stage.evaluate(state.ema_params, done)
                    images = {k: results.pop(k) for k in [k for k in results if np.ndim(results[k]) == 3]}
                    logger.scalars(done, results, prefix="eval")
                    for name, image in images.items():
                        logger.image(done, f"eval/{name}", image)
                    if results:
                        logger.line(f"eval at step {done}: " + " ".join(f"{k} {v:.4g}" for k, v in results.items()))
                bar.update(1)
            # A signal during the last step's save or evaluation (one process; on several, JAX's
            # service carries it to the next stage's loop, where all hosts stop together).
            if stops.signum is not None:
                checkpoints.wait()
                raise Preempted(stage.name, stop, stops.signum, checkpoints.directory)
    finally:
        checkpoints.close()
        logger.close()
    return TrainResult(state, history)
