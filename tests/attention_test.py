"""The CPU's blocked attention (per head, in query blocks, checkpointed) against JAX's reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff.models import layers


@pytest.fixture
def blocked(monkeypatch):
    """Force the blocked path with several query blocks, the last one padded (37 = 3 x 12 + 1)."""
    monkeypatch.setattr(layers, "_SMALL_SCORES", 0)
    monkeypatch.setattr(layers, "_CPU_SCORE_ELEMENTS", 12 * 29)
    monkeypatch.setattr(layers, "CPU_BLOCKED_ATTENTION", True)


def _inputs():
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (2, 37, 3, 8))
    k, v = (jax.random.normal(key, (2, 29, 3, 8)) for key in keys[1:3])
    weight = jax.random.normal(keys[3], (2, 37, 3, 8))
    return q, k, v, weight


def test_blocked_attention_matches_reference(blocked):
    assert jax.default_backend() == "cpu"
    q, k, v, weight = _inputs()
    np.testing.assert_allclose(layers.dot_product_attention(q, k, v), jax.nn.dot_product_attention(q, k, v),
                               rtol=1e-5, atol=1e-5)

    def loss(attention):
        return lambda q, k, v: jnp.sum(attention(q, k, v) * weight)

    ours = jax.jit(jax.grad(loss(layers.dot_product_attention), argnums=(0, 1, 2)))(q, k, v)
    reference = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", ours, reference):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"gradient of {name}")
