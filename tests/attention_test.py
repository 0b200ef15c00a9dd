"""Attention kernels against JAX's reference: the CPU's blocked attention (per head, in query
blocks, checkpointed), the TPU's Pallas flash kernel (run here in Pallas' TPU interpret mode), and
which one each backend runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff.models import attention


@pytest.fixture
def blocked(monkeypatch):
    """Force the blocked path with several query blocks, the last one padded (37 = 3 x 12 + 1)."""
    monkeypatch.setattr(attention, "_SMALL_SCORES", 0)
    monkeypatch.setattr(attention, "_CPU_SCORE_ELEMENTS", 12 * 29)
    monkeypatch.setattr(attention, "FORCE", None)


def _inputs(q_len=37, kv_len=29, heads=3, head_dim=8):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (2, q_len, heads, head_dim))
    k, v = (jax.random.normal(key, (2, kv_len, heads, head_dim)) for key in keys[1:3])
    weight = jax.random.normal(keys[3], (2, q_len, heads, head_dim))
    return q, k, v, weight


def _check_values_and_gradients(ours, q, k, v, weight, jit=True):
    reference = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")  # noqa: E731
    np.testing.assert_allclose(ours(q, k, v), reference(q, k, v), rtol=1e-5, atol=1e-5)

    def loss(attend):
        return lambda q, k, v: jnp.sum(attend(q, k, v) * weight)

    grad = jax.grad(loss(ours), argnums=(0, 1, 2))
    for name, a, b in zip("qkv", (jax.jit(grad) if jit else grad)(q, k, v),
                          jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"gradient of {name}")


def test_blocked_attention_matches_reference(blocked):
    assert jax.default_backend() == "cpu"
    assert attention.implementation_for("cpu", jnp.float32, 37, 29, 8) == "cpu_blocked"
    _check_values_and_gradients(attention.dot_product_attention, *_inputs())


@pytest.mark.parametrize("head_dim", [40, 160])  # SD1.5's smallest and largest heads: padded to 128 and 256
def test_tpu_flash_kernel_matches_reference_in_interpret_mode(head_dim):
    from jax.experimental.pallas import tpu as pltpu

    q, k, v, weight = _inputs(q_len=256, kv_len=128, heads=2, head_dim=head_dim)
    flash = lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="pallas_flash")  # noqa: E731
    with pltpu.force_tpu_interpret_mode():
        _check_values_and_gradients(flash, q, k, v, weight, jit=False)


def test_each_backend_runs_its_fused_kernel_where_it_applies(monkeypatch):
    monkeypatch.setattr(attention, "FORCE", None)
    choose = attention.implementation_for
    # GPU: cuDNN for half precision and heads up to 128 (SD1.5's 160-wide heads fall back to XLA).
    assert choose("gpu", jnp.bfloat16, 4096, 4096, 64) == "cudnn"
    assert choose("gpu", jnp.float16, 4096, 77, 40) == "cudnn"
    assert choose("gpu", jnp.bfloat16, 1024, 1024, 160) == "xla"
    assert choose("gpu", jnp.float32, 4096, 4096, 64) == "xla"
    # TPU: the Pallas kernel for whole 128-blocks (self-attention); cross-attention's 77 keys: XLA.
    assert choose("tpu", jnp.bfloat16, 4096, 4096, 64) == "pallas_flash"
    assert choose("tpu", jnp.bfloat16, 4096, 77, 64) == "xla"
    assert choose("tpu", jnp.bfloat16, 64, 64, 64) == "xla"  # 8x8 latents: too short to gain
    # CPU: the blocked kernel for long sequences.
    assert choose("cpu", jnp.float32, 4096, 4096, 40) == "cpu_blocked"
    assert choose("cpu", jnp.float32, 64, 77, 40) == "xla"
    monkeypatch.setattr(attention, "FORCE", "xla")
    assert choose("tpu", jnp.bfloat16, 4096, 4096, 64) == "xla"
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attention.dot_product_attention(*_inputs()[:3], implementation="flash")


def test_cudnn_refusal_falls_back_to_xla(monkeypatch):
    """On CPU, jax refuses implementation="cudnn" while tracing: the call still answers, via XLA."""
    q, k, v, _ = _inputs()
    with pytest.warns(UserWarning, match="cuDNN attention is not available"):
        out = attention.dot_product_attention(q, k, v, implementation="cudnn")
    np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v), rtol=1e-6)
