"""Softmax attention on [B, T, N, H] tensors, with the fused kernel each backend has, chosen in one
place (`implementation_for`):

    gpu  "cudnn"         jax.nn.dot_product_attention(implementation="cudnn"): cuDNN's flash
                         attention, for float16/bfloat16 and head sizes up to 128 (multiples of 8)
    tpu  "pallas_flash"  jax.experimental.pallas.ops.tpu.flash_attention, for sequences in whole
                         blocks of 128 (every self-attention of SD/SDXL from 16x16 latents up);
                         head sizes padded to a multiple of 128 with zeros, which changes nothing
    cpu  "cpu_blocked"   one head and one block of queries at a time with a flash-style backward
                         pass (below): XLA:CPU materialises every head's scores and runs 5x slower
    any  "xla"           jax.nn.dot_product_attention(implementation="xla"): every score
                         materialised; where the others do not apply (text, cross-attention on
                         TPU, head size 160 on GPU, short sequences)

`FORCE` overrides the choice (tests run the TPU kernel on CPU in Pallas interpret mode; bench/scale.py
compiles the "xla" path, the batch-shardable one an accelerator's compiler can partition; set
`jdiff.models.attention.FORCE = "xla"` to rule the fused kernels out). Where cuDNN refuses a shape
or dtype while tracing, XLA's attention runs instead, with a warning.
"""

import warnings
from typing import Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("cudnn", "pallas_flash", "cpu_blocked", "xla")
FORCE: Optional[str] = None  # one of IMPLEMENTATIONS, or None: implementation_for() decides

# Query x key positions per head below which plain XLA attention is as fast (every head's scores
# fit in cache at once; a loop over batch x heads, or a kernel launch per block, costs more).
_SMALL_SCORES = 1 << 16
_TPU_BLOCK = 128  # the TPU kernel's block of queries and keys (its lane width)


def implementation_for(backend: str, dtype, q_len: int, kv_len: int, head_dim: int) -> str:
    """Which attention runs for these shapes on `backend` ("cpu", "gpu", "tpu")."""
    if FORCE is not None:
        return FORCE
    if backend == "gpu":
        fused = jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16) and head_dim <= 128 and head_dim % 8 == 0
        return "cudnn" if fused else "xla"
    if q_len * kv_len <= _SMALL_SCORES:
        return "xla"
    if backend == "tpu":
        return "pallas_flash" if q_len % _TPU_BLOCK == 0 and kv_len % _TPU_BLOCK == 0 else "xla"
    if backend == "cpu":
        return "cpu_blocked"
    return "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: Optional[str] = None) -> jax.Array:
    """softmax(q k^T / sqrt(H)) v for q [B, T, N, H], k and v [B, S, N, H]."""
    b, t, n, h = q.shape
    implementation = implementation or implementation_for(jax.default_backend(), q.dtype, t, k.shape[1], h)
    if implementation == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError) as error:  # raised while tracing, never mid-run
            _warn_once(f"cuDNN attention is not available for {q.dtype} {q.shape} x {k.shape} ({error}); "
                       f"using XLA's attention")
            return jax.nn.dot_product_attention(q, k, v, implementation="xla")
    if implementation == "xla":
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")
    if implementation == "pallas_flash":
        return _tpu_flash_attention(q, k, v)
    if implementation == "cpu_blocked":
        heads = lambda x: x.transpose(0, 2, 1, 3).reshape(b * n, x.shape[1], h)  # noqa: E731
        out = jax.lax.map(lambda qkv: _attention_one_head(*qkv), (heads(q), heads(k), heads(v)))
        return out.reshape(b, n, t, h).transpose(0, 2, 1, 3)
    raise ValueError(f"unknown attention implementation {implementation!r}; use one of {IMPLEMENTATIONS}.")


_warned: set = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


# --- TPU: Pallas flash attention ------------------------------------------------------------------


def _tpu_flash_attention(q, k, v):
    from jax.experimental.pallas.ops.tpu import flash_attention as pallas

    head_dim = q.shape[-1]
    padded = -(-head_dim // _TPU_BLOCK) * _TPU_BLOCK
    # [B, T, N, H] -> [B, N, T, H'] with H' a whole number of lanes; zero columns add nothing to q.k
    # and the output's extra columns (zero weights of v) are dropped.
    layout = lambda x: jnp.pad(x.transpose(0, 2, 1, 3), [(0, 0)] * 3 + [(0, padded - head_dim)])  # noqa: E731
    block = lambda n: min(n, 512 if n % 512 == 0 else _TPU_BLOCK)  # noqa: E731
    bq, bk = block(q.shape[1]), block(k.shape[1])
    sizes = pallas.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
                              block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq,
                              block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)
    out = pallas.flash_attention(layout(q), layout(k), layout(v), sm_scale=head_dim ** -0.5, block_sizes=sizes)
    return out[..., :head_dim].transpose(0, 2, 1, 3)


# --- CPU: one head, one block of queries at a time ------------------------------------------------

# Query rows per block of the CPU attention: keeps one block of scores (rows x keys) near 16 MB.
_CPU_SCORE_ELEMENTS = 1 << 22


def _query_blocks(x: jax.Array, rows: int) -> jax.Array:
    """[T, ...] -> [blocks, rows, ...], the last block padded with zeros."""
    blocks = -(-x.shape[0] // rows)
    padding = [(0, blocks * rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, padding).reshape(blocks, rows, *x.shape[1:])


def _rows_per_block(q: jax.Array, k: jax.Array) -> int:
    return max(1, min(q.shape[0], _CPU_SCORE_ELEMENTS // k.shape[0]))


def _attention_forward(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Softmax attention for one head, [T,H] x [S,H] -> [T,H], one block of queries at a time so its
    scores stay in cache; also returns each query's log-sum-exp of scores, for the backward pass."""
    t = q.shape[0]

    def block(qb):
        scores = qb @ k.T
        peak = jnp.max(scores, axis=-1, keepdims=True)
        p = jnp.exp(scores - peak)
        total = jnp.sum(p, axis=-1, keepdims=True)
        return (p @ v) / total.astype(v.dtype), (peak + jnp.log(total))[:, 0].astype(jnp.float32)

    out, lse = jax.lax.map(block, _query_blocks(q * (q.shape[-1] ** -0.5), _rows_per_block(q, k)))
    return out.reshape(-1, v.shape[-1])[:t], lse.reshape(-1)[:t]


@jax.custom_vjp
def _attention_one_head(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return _attention_forward(q, k, v)[0]


def _attention_one_head_fwd(q, k, v):
    out, lse = _attention_forward(q, k, v)
    return out, (q, k, v, out, lse)


def _attention_one_head_bwd(residuals, d_out):
    """Flash attention's backward pass: each block's probabilities are recomputed from the saved
    log-sum-exp, so no T x S array is kept between the passes and no max or sum is differentiated."""
    q, k, v, out, lse = residuals
    t, scale = q.shape[0], q.shape[-1] ** -0.5
    rows = _rows_per_block(q, k)
    # rowsum(dO * O): the softmax Jacobian's correction term, per query.
    correction = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    blocks = tuple(_query_blocks(x, rows) for x in (q * scale, d_out, lse, correction))

    def block(carry, xs):
        dk, dv = carry
        qb, d_ob, lse_b, correction_b = xs
        p = jnp.exp(qb @ k.T - lse_b[:, None].astype(qb.dtype))
        dv = dv + (p.T @ d_ob).astype(jnp.float32)
        d_scores = p * (d_ob @ v.T - correction_b[:, None].astype(p.dtype))
        dk = dk + (d_scores.T @ qb).astype(jnp.float32)
        return (dk, dv), d_scores @ k

    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    (dk, dv), dq = jax.lax.scan(block, zeros, blocks)
    dq = dq.reshape(-1, q.shape[-1])[:t] * scale
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_attention_one_head.defvjp(_attention_one_head_fwd, _attention_one_head_bwd)
