"""jdiff.executable_cache: generate()'s compiled programs written once, loaded whole by later calls
(in a real run, later processes) without tracing."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jdiff
from jdiff import executable_cache, pipeline


@pytest.fixture
def cache(tmp_path):
    executable_cache.enable(tmp_path / "executables")
    before = dict(executable_cache.stats)
    yield tmp_path / "executables", before
    executable_cache.disable()


def draw(pipe, **kw):
    return jdiff.generate(pipe, ["a red circle"], steps=2, guidance=3.0, height=32, width=32, **kw)


def test_a_written_program_is_loaded_without_tracing(tiny_sd_folder, cache, monkeypatch):
    folder, before = cache
    pipe = jdiff.load_pipeline(tiny_sd_folder)
    executable_cache.disable()
    reference = draw(pipe, seed=3)  # the ordinary jit path
    executable_cache.enable(folder)
    first = draw(pipe, seed=3)
    assert len(list(folder.glob("*.jaxexe"))) == 1 and executable_cache.stats["compiled"] == before["compiled"] + 1
    np.testing.assert_array_equal(first, reference)

    executable_cache._loaded.clear()  # as a new process: only the file is left
    monkeypatch.setattr(pipeline._generate, "lower", lambda *a, **k: pytest.fail("traced again"), raising=False)
    again = draw(pipe, seed=3)
    assert executable_cache.stats["read"] == before["read"] + 1
    np.testing.assert_array_equal(again, reference)
    other_seed = draw(pipe, seed=4)  # same program, other inputs
    assert not np.array_equal(other_seed, reference) and len(list(folder.glob("*.jaxexe"))) == 1


def test_a_program_already_in_jaxs_persistent_cache_is_written_whole(cache):
    """An executable JAX's persistent cache hands back serialises without its kernels; the copy
    written must be compiled afresh, or a later process fails running it."""
    import functools

    import jax
    import jax.numpy as jnp

    folder, before = cache
    assert jax.config.jax_compilation_cache_dir  # conftest's cache: the jit call below fills it
    program = jax.jit(lambda x, *, power: jnp.exp(x * power).sum(), static_argnames="power")
    x = jnp.linspace(0.0, 1.0, 97)
    expected = program(x, power=2.5)  # compiled, and written to the persistent cache
    jax.clear_caches()
    np.testing.assert_allclose(program(x, power=2.5), expected, rtol=1e-6)  # now from that cache, kept in memory
    call = functools.partial(executable_cache.call, program, (x,), {"power": 2.5}, lambda: "exp-sum 2.5")
    np.testing.assert_allclose(call(), expected, rtol=1e-6)
    executable_cache._loaded.clear()
    np.testing.assert_allclose(call(), expected, rtol=1e-6)
    assert executable_cache.stats["read"] == before["read"] + 1  # the file ran, not compiled again
    assert executable_cache.stats["compiled"] == before["compiled"] + 1 and jax.config.jax_enable_compilation_cache

    # As another process writing the same program: its compile must not come from the persistent cache either.
    for entry in folder.glob("*.jaxexe"):
        entry.unlink()
    executable_cache._loaded.clear()
    jax.clear_caches()
    call()
    executable_cache._loaded.clear()
    np.testing.assert_allclose(call(), expected, rtol=1e-6)
    assert executable_cache.stats["read"] == before["read"] + 2 and executable_cache.stats["compiled"] == before["compiled"] + 2

    # and JAX's persistent cache is still in use afterwards.
    entries = len(os.listdir(jax.config.jax_compilation_cache_dir))
    jax.jit(lambda x: jnp.cos(x * 1.25).sum())(x)
    assert len(os.listdir(jax.config.jax_compilation_cache_dir)) > entries


def test_other_shapes_or_settings_get_their_own_program(tiny_sd_folder, cache, one_device):
    folder, before = cache
    pipe = jdiff.load_pipeline(tiny_sd_folder)
    draw(pipe)
    draw(pipe, guidance_rescale=0.5)  # a traced value: the same program
    assert len(list(folder.glob("*.jaxexe"))) == 1
    jdiff.generate(pipe, ["a red circle"], steps=2, guidance=3.0, height=32, width=48)  # another shape
    jdiff.generate(pipe, ["a red circle"], steps=2, guidance=1.0, height=32, width=32)  # no guidance: static
    assert len(list(folder.glob("*.jaxexe"))) == 3
    on_one = draw(pipe, mesh=one_device)  # one device of the eight: a program of its own, loaded for that device
    assert len(list(folder.glob("*.jaxexe"))) == 4
    executable_cache._loaded.clear()
    np.testing.assert_array_equal(draw(pipe, mesh=one_device), on_one)
    assert executable_cache.stats["read"] == before["read"] + 1


def test_a_damaged_entry_is_compiled_again(tiny_sd_folder, cache):
    folder, before = cache
    pipe = jdiff.load_pipeline(tiny_sd_folder)
    reference = draw(pipe)
    (entry,) = folder.glob("*.jaxexe")
    entry.write_bytes(b"not an executable")
    executable_cache._loaded.clear()
    np.testing.assert_array_equal(draw(pipe), reference)
    assert executable_cache.stats["compiled"] == before["compiled"] + 2 and entry.stat().st_size > 100


def test_sample_py_reuses_programs_across_processes(tiny_sd_folder, tmp_path):
    """Two sample.py processes with one --compile-cache: the second loads the first's program."""
    probe = ("import sys, sample; from jdiff import executable_cache; code = sample.main(sys.argv[1:]); "
             "print(executable_cache.stats); sys.exit(code)")
    common = ["--model", str(tiny_sd_folder), "--prompt", "a red circle", "--steps", "2", "--num-images", "1",
              "--height", "32", "--width", "32", "--compile-cache", str(tmp_path / "cache")]
    runs = []
    for name in ("first", "second"):
        done = subprocess.run([sys.executable, "-c", probe, *common, "--out", str(tmp_path / name)],
                              capture_output=True, text=True, cwd=str(Path(__file__).resolve().parents[1]))
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(done.stdout.strip().splitlines()[-1])
    assert runs == ["{'compiled': 1, 'read': 0}", "{'compiled': 0, 'read': 1}"]
    first, second = (read_png(tmp_path / name / "00000.png") for name in ("first", "second"))
    np.testing.assert_array_equal(first, second)


def read_png(path):
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image)
