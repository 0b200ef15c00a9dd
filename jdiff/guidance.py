"""Classifier-free guidance as a wrapper of the denoise function.

The conditional and unconditional predictions come from one U-Net call on a doubled batch, laid out
[unconditional; conditional] as diffusers does. The scale and the rescale factor are traced values:
changing them never recompiles.
"""

import jax
import jax.numpy as jnp


def rescale_guidance(guided, conditional, rescale):
    """Guidance rescale (Lin et al. 2023, sec. 3.4): pull the guided prediction's per-sample standard
    deviation back towards the conditional one's, which over-exposed images of zero-terminal-SNR
    models need. rescale = 0 leaves `guided` unchanged."""
    def apply(guided):
        axes = tuple(range(1, guided.ndim))
        std_conditional = jnp.std(conditional, axis=axes, keepdims=True, ddof=1)
        std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
        rescaled = guided * (std_conditional / std_guided)
        return rescale * rescaled + (1 - rescale) * guided

    return jax.lax.cond(jnp.asarray(rescale) > 0, apply, lambda guided: guided, guided)


def _doubled(tree):
    return jax.tree.map(lambda a: jnp.concatenate([a, a]), tree)


def classifier_free_guidance(model_fn, cond, negative_cond, scale, rescale=0.0, extra_inputs=None):
    """Returns denoise(x, t) = uncond + scale * (cond - uncond), from one batched call of
    `model_fn(x, t, cond, extra_inputs)`.

    cond, negative_cond: the conditioning of the prompts and of the negative prompts (the empty
      prompt for plain guidance), pytrees of batch-major arrays (context, pooled embeddings, ...).
    extra_inputs: optional channels the model takes beside x, for both halves (inpainting models).
    """
    both_cond = jax.tree.map(lambda n, c: jnp.concatenate([n, c]), negative_cond, cond)
    both_extra = None if extra_inputs is None else _doubled(extra_inputs)

    def denoise(x, t):
        both = model_fn(jnp.concatenate([x, x]), t, both_cond, both_extra)
        unconditional, conditional = jnp.split(both, 2)
        guided = unconditional + scale * (conditional - unconditional)
        return rescale_guidance(guided, conditional, rescale)

    return denoise


def unguided(model_fn, cond, extra_inputs=None):
    """denoise(x, t) = model_fn(x, t, cond, extra_inputs): the same interface without guidance."""

    def denoise(x, t):
        return model_fn(x, t, cond, extra_inputs)

    return denoise


def guidance_scale_embedding(w, dim: int):
    """LCM's embedding of the guidance scale w (fed as the U-Net's `timestep_cond`), diffusers'
    `get_guidance_scale_embedding`: sinusoids of 1000 * w."""
    w = jnp.atleast_1d(jnp.asarray(w, jnp.float32)) * 1000.0
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(jnp.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb
