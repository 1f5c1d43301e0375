"""Mixture of experts (Shazeer et al. 2017; GShard; Switch; Mixtral): top-k routing and SwiGLU experts.

Axis letters (MoE-local): t tokens (b·l flattened), d model width, e experts, k choices per token (top_k),
f expert hidden width, c expert capacity (slots per expert).

    logits = x W_r                     (t, e), float32
    probs  = softmax(logits) | sigmoid(logits)
    experts, weights = top_k(probs)    ties -> lower expert id (as torch.topk); weights renormalized to sum 1
                                       when `renormalize` (Mixtral), left as they are otherwise (Jamba)
    expert_i(h) = (act(h Wi_i[:, :f]) * (h Wi_i[:, f:])) Wo_i        gate first, then up (transformers' fused
                                                                     `gate_up_proj.chunk(2)` order)
    y_t = sum_j weights[t, j] * expert_{experts[t, j]}(x_t)          a dropped (t, j) contributes 0

Dispatch paths of `moe_ffn` (same function where nothing is dropped):
  reference  every expert on every token, weighted by the token's combine weight for that expert (0 when not
             chosen): e times the FLOPs, no data movement; the readable definition.
  capacity   GShard/Switch fixed buffers: each expert has c = ceil(t k / e * capacity_factor) slots (capped at
             t, which no expert can exceed), filled in token order with choice-major priority (every first
             choice before any second choice); the overflow is dropped and counted. The slot of a (token,
             choice) pair is the running count of one-hot assignments (a cumsum), as in GShard; tokens are then
             moved with a gather into the (e, c, d) buffers and back with a gather, which is the one-hot
             dispatch/combine einsum without materializing the (t, e, c) tensors.
  dropless   sort the (token, choice) pairs by expert, run each expert on its group of rows (a grouped
             matmul), unsort; nothing is dropped (MegaBlocks). On GPU and TPU the grouped matmul is
             `jax.lax.ragged_dot` (a real grouped GEMM there). On CPU, ragged_dot lowers to a dense product of
             an (e, n, d) masked copy of the rows, e times the FLOPs and memory, so "blocked" runs instead:
             each group of g_i rows is cut into ceil(g_i / B) blocks of B rows (B = power of two >= n / e, in
             [8, 128]; at most n + e (B - 1) rows of work), and a loop over the blocks multiplies (B, d) by that
             expert's weights sliced in place. Its custom VJP recomputes a block's hidden state and adds the
             weight gradients in place (autodiff of a scan over the blocks: 10x the memory, 2x the time), so
             that path has no forward-mode derivative (jvp). `dropless_ffn(..., grouped_impl=)` picks either.
             Measured (2-core CPU, t 4096, d 256, f 512, forward + backward, XLA temporary memory): e 8, k 2:
             blocked 248 ms / 41 MiB, ragged_dot 1.39 s / 777 MiB, capacity (factor 1.25) 230 ms / 145 MiB;
             e 64, k 2: blocked 310 ms / 44 MiB, ragged_dot 10.7 s / 5.6 GiB, capacity 273 ms / 97 MiB (blocked
             runs ~1.45 n rows there against capacity's 1.25 n, which drops 0.7%). Forward alone, blocked is
             the fastest of the three (e 64, k 2: 74 ms vs capacity 103 ms, ragged_dot 3.4 s).
Expert parallelism (tokens exchanged over a mesh axis with shard_map) lives in `moe_parallel`.

Statistics (`MoEStats`, over the valid tokens, i.e. `token_mask` True):
  load_balance_loss = e * sum_i f_i P_i with f_i = (number of tokens that chose expert i) / (number of tokens)
                      (so sum_i f_i = k) and P_i = mean router prob of expert i: transformers'
                      `load_balancing_loss_func` for one layer (Switch eq. 4 when k = 1); counts before dropping.
  z_loss            = mean_t logsumexp(logits_t)^2 (ST-MoE).
  drop_fraction     = dropped (token, choice) pairs / all valid pairs (0 for dropless and reference).
  tokens_per_expert = number of valid (token, choice) pairs routed to each expert, before dropping.
"""

from __future__ import annotations

import math
import numbers
from functools import partial
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from seqmix_jax.ops import _checks as ck

Dispatch = Literal["dropless", "capacity", "reference"]
DISPATCHES = ("dropless", "capacity", "reference")
SCORINGS = ("softmax", "sigmoid")
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
_HI = lax.Precision.HIGHEST


class Routing(NamedTuple):
    logits: jax.Array  # (t, e) float32
    probs: jax.Array  # (t, e) float32, softmax or sigmoid of the logits
    weights: jax.Array  # (t, k) float32 combine weights of the chosen experts
    experts: jax.Array  # (t, k) int32 chosen expert ids, best first


class MoEStats(NamedTuple):
    load_balance_loss: jax.Array  # () float32
    z_loss: jax.Array  # () float32
    drop_fraction: jax.Array  # () float32
    tokens_per_expert: jax.Array  # (e,) float32


# --- routing ------------------------------------------------------------------------------------------------------

def route(x: Float[Array, "t d"], router_kernel: Float[Array, "d e"], *, top_k: int, scoring: str = "softmax",
          renormalize: bool = True, router_bias: Float[Array, "e"] | None = None) -> Routing:
    """Top-k router.

    Args:
      x: (t, d) tokens.
      router_kernel: (d, e); the logits x @ router_kernel are computed in float32 (both upcast, HIGHEST
        precision: a routing decision should not depend on the matmul's rounding).
      top_k: k choices per token, 1 <= k <= e.
      scoring: "softmax" (Mixtral, Jamba) or "sigmoid" (DeepSeek-V3) probabilities.
      renormalize: divide the k chosen probabilities by their sum (Mixtral: True; Jamba: False).
      router_bias: optional (e,) added to the probabilities for the choice only, never to the weights
        (DeepSeek-V3's load-balancing bias).
    """
    ck.check_rank("x", x, 2, "(t, d)")
    ck.check_float("x", x)
    ck.check_rank("router_kernel", router_kernel, 2, "(d, e)")
    if router_kernel.shape[0] != x.shape[1]:
        raise ValueError(f"router_kernel must have shape (d={x.shape[1]}, e), got {tuple(router_kernel.shape)}")
    e = router_kernel.shape[1]
    check_top_k(top_k, e)
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    logits = jnp.dot(x.astype(jnp.float32), router_kernel.astype(jnp.float32), precision=_HI)
    probs = jax.nn.softmax(logits, axis=-1) if scoring == "softmax" else jax.nn.sigmoid(logits)
    scores = probs
    if router_bias is not None:
        ck.check_shape("router_bias", router_bias, (e,), "(e,)")
        scores = probs + router_bias.astype(jnp.float32)
    _, experts = lax.top_k(lax.stop_gradient(scores), top_k)
    weights = jnp.take_along_axis(probs, experts, axis=-1)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(logits, probs, weights, experts.astype(jnp.int32))


def check_top_k(top_k, num_experts: int) -> None:
    ck.check_positive_int("top_k", top_k)
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} must be <= num_experts={num_experts}")


def check_capacity_factor(capacity_factor) -> None:
    if (not isinstance(capacity_factor, numbers.Real) or isinstance(capacity_factor, bool)
            or not capacity_factor > 0 or not math.isfinite(capacity_factor)):
        raise ValueError(f"capacity_factor must be a finite number > 0 for dispatch='capacity', "
                         f"got {capacity_factor!r}")


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(t k / e * capacity_factor), at least 1 and at most t (a token picks an expert
    at most once, so no expert ever receives more than t pairs)."""
    check_capacity_factor(capacity_factor)
    return int(min(max(1, math.ceil(num_tokens * top_k / num_experts * capacity_factor)), max(num_tokens, 1)))


# --- statistics ---------------------------------------------------------------------------------------------------

def moe_stats(routing: Routing, token_mask: Bool[Array, "t"] | None = None, dropped=0) -> MoEStats:
    """MoEStats of a routing over the valid tokens; `dropped` is the number of dropped (token, choice) pairs."""
    t, e = routing.logits.shape
    k = routing.experts.shape[1]
    m = jnp.ones((t,), jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m), 1.0)
    assigned = jnp.sum(jax.nn.one_hot(routing.experts, e, dtype=jnp.float32) * m[:, None, None], axis=(0, 1))
    mean_prob = jnp.sum(routing.probs * m[:, None], axis=0) / n
    load_balance = e * jnp.sum(assigned / n * mean_prob)
    z = jax.nn.logsumexp(routing.logits, axis=-1)
    z_loss = jnp.sum(m * z * z) / n
    drop = jnp.asarray(dropped, jnp.float32) / jnp.maximum(jnp.sum(m) * k, 1.0)
    return MoEStats(load_balance, z_loss, drop, assigned)


# --- the experts --------------------------------------------------------------------------------------------------

def _swiglu(h, wi_gate_up, activation):
    f = wi_gate_up.shape[-1] // 2
    return ACTIVATIONS[activation](h[..., :f]) * h[..., f:]


def experts_on_buffers(h: Float[Array, "e c d"], wi, wo, activation: str) -> Float[Array, "e c d"]:
    """Each expert on its own buffer of tokens (empty slots are zero rows and stay zero: no biases)."""
    gu = jnp.einsum("ecd,edf->ecf", h, wi)
    return jnp.einsum("ecf,efd->ecd", _swiglu(gu, wi, activation), wo)


def capacity_slots(experts: Int[Array, "t k"], valid: Bool[Array, "t k"], num_experts: int, capacity: int):
    """(slot (t, k) int32 in [0, e c), keep (t, k) bool): the buffer slot of every (token, choice) pair.

    Slots of an expert are filled in token order with choice-major priority: the pairs are listed as
    (choice 0 of every token, choice 1 of every token, ...) and the position of a pair within its expert is
    the number of earlier pairs that chose the same expert (a cumsum of one-hot rows, GShard). Pairs at
    position >= capacity, and invalid pairs, are not kept."""
    t, k = experts.shape
    onehot = jax.nn.one_hot(experts.T, num_experts, dtype=jnp.int32) * valid.T[..., None].astype(jnp.int32)
    position = jnp.cumsum(onehot.reshape(k * t, num_experts), axis=0).reshape(k, t, num_experts) - 1
    position = jnp.sum(position * onehot, axis=-1).T  # (t, k)
    keep = valid & (position < capacity)
    return (experts * capacity + position).astype(jnp.int32), keep


def dispatch_to_slots(x: Float[Array, "t d"], slot, keep, num_slots: int) -> Float[Array, "s d"]:
    """(num_slots, d) buffer: row s holds the token of the kept pair in slot s, zeros where no pair is."""
    t, k = slot.shape
    token = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, k))
    # Empty slots point at an extra zero row; dropped pairs write out of bounds and are discarded.
    src = jnp.full((num_slots,), t, jnp.int32).at[jnp.where(keep, slot, num_slots)].set(token, mode="drop")
    return jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])[src]


def combine_from_slots(out: Float[Array, "s d"], slot, keep, weights) -> Float[Array, "t d"]:
    """y_t = sum over t's kept pairs of weight * out[slot], accumulated in float32."""
    gathered = out[jnp.where(keep, slot, 0)].astype(jnp.float32)  # (t, k, d)
    return jnp.sum(jnp.where(keep, weights, 0.0)[..., None].astype(jnp.float32) * gathered, axis=1)


def capacity_ffn(x, weights, experts, valid, wi, wo, activation: str, capacity: int):
    """(y float32 (t, d), number of dropped pairs) of the capacity path for experts [0, wi.shape[0])."""
    e = wi.shape[0]
    slot, keep = capacity_slots(experts, valid, e, capacity)
    buffers = dispatch_to_slots(x, slot, keep, e * capacity).reshape(e, capacity, x.shape[1])
    out = experts_on_buffers(buffers, wi, wo, activation)
    y = combine_from_slots(out.reshape(e * capacity, -1), slot, keep, weights)
    return y, jnp.sum(valid & ~keep)


def dropless_ffn(x, weights, experts, valid, wi, wo, activation: str, *, grouped_impl: str = "auto",
                 block_rows: int | None = None):
    """y float32 (t, d) of the dropless path for experts [0, wi.shape[0]); invalid pairs do nothing.

    grouped_impl (internal): "ragged_dot" (`jax.lax.ragged_dot`: a grouped matmul on GPU and TPU, a dense
    masked one, e times the work, on CPU), "blocked" (`_blocked_experts`) or "auto" (ragged_dot on
    gpu/cuda/rocm/tpu, blocked elsewhere). block_rows: the blocked path's B (default `block_rows_for`)."""
    t, k = experts.shape
    e = wi.shape[0]
    impl = resolve_grouped_impl(grouped_impl)
    flat = jnp.where(valid, experts, e).reshape(-1)  # invalid pairs sort after every expert's group
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.sum(jax.nn.one_hot(flat, e, dtype=jnp.int32), axis=0)  # id e (invalid) is all-zero
    xs = x[order // k]
    if impl == "ragged_dot":
        h = _swiglu(lax.ragged_dot(xs, wi, group_sizes), wi, activation)
        out_sorted = lax.ragged_dot(h, wo, group_sizes)
    else:
        out_sorted = _blocked_experts(xs, group_sizes, wi, wo, activation, block_rows)
    out = out_sorted[jnp.argsort(order)].reshape(t, k, wo.shape[2])
    # Rows past the groups are not defined by ragged_dot on every backend: mask them, not just weight them.
    out = jnp.where(valid[..., None], out, 0).astype(jnp.float32)
    return jnp.sum(jnp.where(valid, weights, 0.0)[..., None].astype(jnp.float32) * out, axis=1)


GROUPED_IMPLS = ("auto", "ragged_dot", "blocked")
NATIVE_RAGGED_DOT = ("gpu", "cuda", "rocm", "tpu")


def resolve_grouped_impl(grouped_impl: str) -> str:
    """The dropless path's grouped matmul: "auto" is ragged_dot where it is native, blocked elsewhere."""
    if grouped_impl not in GROUPED_IMPLS:
        raise ValueError(f"grouped_impl must be one of {GROUPED_IMPLS}, got {grouped_impl!r}")
    if grouped_impl == "auto":
        return "ragged_dot" if jax.default_backend() in NATIVE_RAGGED_DOT else "blocked"
    return grouped_impl


def block_rows_for(num_pairs: int, num_experts: int) -> int:
    """Default B of the blocked path: the power of two >= n / e (the mean group size), between 8 and 128."""
    mean = max(1, -(-num_pairs // num_experts))
    return min(128, max(8, 1 << (mean - 1).bit_length()))


def _blocked_experts(xs, group_sizes, wi, wo, activation, block_rows):
    """Expert i on its group of rows of xs (n, d), the pairs sorted by expert: (n, d), rows past the groups 0.

    Every group of g_i rows is cut into ceil(g_i / B) blocks of B rows starting at its first row; the last
    block of a group is masked past the group's end (its rows belong to the next group, or to B zero rows
    appended to xs). sum_i ceil(g_i / B) <= (n + min(e, n) (B - 1)) / B bounds the number of blocks; a loop
    runs only the blocks that exist. Work: sum_i B ceil(g_i / B) <= n + e (B - 1) rows instead of e n."""
    n, d = xs.shape
    e = wi.shape[0]
    block = block_rows_for(n, e) if block_rows is None else block_rows
    ck.check_positive_int("block_rows", block)
    if n == 0:
        return jnp.zeros((0, wo.shape[2]), jnp.result_type(xs, wi, wo))
    bound = (n + min(e, n) * (block - 1)) // block
    per_expert = (group_sizes + block - 1) // block
    ends = jnp.cumsum(per_expert)
    ids = jnp.arange(bound, dtype=jnp.int32)
    expert = jnp.minimum(jnp.searchsorted(ends, ids, side="right"), e - 1).astype(jnp.int32)
    j = ids - (ends - per_expert)[expert]  # block j of its expert's group
    start = ((jnp.cumsum(group_sizes) - group_sizes)[expert] + j * block).astype(jnp.int32)
    length = jnp.clip(group_sizes[expert] - j * block, 0, block).astype(jnp.int32)
    table = jnp.stack([expert, start, length], axis=1)  # (bound, 3); blocks past ends[-1] are never run
    xs = jnp.concatenate([xs, jnp.zeros((block, d), xs.dtype)])
    xs, wi, wo, table = _vary_alike(xs, wi, wo, table)
    return _grouped_ffn(xs, wi, wo, table, ends[-1].astype(jnp.int32), block, activation)[:n]


def _vary_alike(*arrays):
    """Inside shard_map, a loop carry must vary over the mesh axes of everything that updates it: give every
    operand the union of their varying axes by adding a zero that varies over all of them (zeros_like keeps the
    varying axes; autodiff turns the implied broadcast into a psum of the cotangent). Outside shard_map: a + 0."""
    zero = sum(jnp.zeros_like(a, shape=(), dtype=jnp.int32) for a in arrays)
    return tuple(a + zero.astype(a.dtype) for a in arrays)


def _act(gu, activation):
    f = gu.shape[-1] // 2
    return ACTIVATIONS[activation](gu[..., :f]) * gu[..., f:]


def _block_operands(b, table, block, wi, wo):
    expert, start, length = table[b, 0], table[b, 1], table[b, 2]
    w1 = lax.dynamic_index_in_dim(wi, expert, keepdims=False)  # sliced in the loop: no per-block copies kept
    w2 = lax.dynamic_index_in_dim(wo, expert, keepdims=False)
    return expert, start, (jnp.arange(block) < length)[:, None], w1, w2


def _masked_write(buf, rows, start, mask):
    return lax.dynamic_update_slice_in_dim(
        buf, jnp.where(mask, rows.astype(buf.dtype), lax.dynamic_slice_in_dim(buf, start, rows.shape[0])), start, 0)


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _grouped_ffn(xs, wi, wo, table, used, block, activation):
    """out[r] = expert_i(xs[r]) for the rows r of the first `used` blocks (expert i, start, length) of `table`,
    0 elsewhere.

    A custom VJP, because autodiff of the loop would carry (e, d, 2f) zero-padded weight cotangents per block;
    the backward recomputes the block's hidden state instead of storing (n, 2f) of them (measured as fast).
    Forward-mode differentiation (jvp) of this path is therefore not available."""
    def body(b, out):
        _, start, mask, w1, w2 = _block_operands(b, table, block, wi, wo)
        h = _act(jnp.dot(lax.dynamic_slice_in_dim(xs, start, block), w1), activation)
        return _masked_write(out, jnp.dot(h, w2), start, mask)

    out = jnp.zeros_like(xs, shape=(xs.shape[0], wo.shape[2]), dtype=jnp.result_type(xs, wi, wo))
    return lax.fori_loop(0, used, body, out)


def _grouped_ffn_fwd(xs, wi, wo, table, used, block, activation):
    return _grouped_ffn(xs, wi, wo, table, used, block, activation), (xs, wi, wo, table, used)


def _grouped_ffn_bwd(block, activation, res, dout):
    """Per block: dx rows, and dWi_i += x_b^T dgu_b, dWo_i += a_b^T dout_b accumulated in place in float32."""
    xs, wi, wo, table, used = res
    acc = jnp.promote_types(wi.dtype, jnp.float32)

    def body(b, carry):
        dxs, dwi, dwo = carry
        i, start, mask, w1, w2 = _block_operands(b, table, block, wi, wo)
        xb = lax.dynamic_slice_in_dim(xs, start, block)
        dob = jnp.where(mask, lax.dynamic_slice_in_dim(dout, start, block), 0)  # rows of other groups: no grad
        a, act_vjp = jax.vjp(lambda gu: _act(gu, activation), jnp.dot(xb, w1))
        dgu = act_vjp(jnp.dot(dob, w2.T).astype(a.dtype))[0]
        dxs = _masked_write(dxs, jnp.dot(dgu, w1.T), start, mask)
        gi = lax.dynamic_index_in_dim(dwi, i, keepdims=False) + jnp.dot(xb.T, dgu, preferred_element_type=acc)
        go = lax.dynamic_index_in_dim(dwo, i, keepdims=False) + jnp.dot(a.T, dob, preferred_element_type=acc)
        return dxs, lax.dynamic_update_index_in_dim(dwi, gi, i, 0), lax.dynamic_update_index_in_dim(dwo, go, i, 0)

    init = (jnp.zeros_like(xs), jnp.zeros_like(wi, dtype=acc), jnp.zeros_like(wo, dtype=acc))
    dxs, dwi, dwo = lax.fori_loop(0, used, body, init)
    return dxs, dwi.astype(wi.dtype), dwo.astype(wo.dtype), None, None


_grouped_ffn.defvjp(_grouped_ffn_fwd, _grouped_ffn_bwd)


# --- the op -------------------------------------------------------------------------------------------------------

def check_ffn_inputs(x, routing: Routing, wi, wo, activation: str, token_mask) -> None:
    ck.check_rank("x", x, 2, "(t, d)")
    ck.check_float("x", x)
    t, d = x.shape
    ck.check_rank("wi", wi, 3, "(e, d, 2f)")
    if wi.shape[1] != d or wi.shape[2] % 2:
        raise ValueError(f"wi must have shape (e, d={d}, 2f) with an even last dimension, got {tuple(wi.shape)}")
    e, f = wi.shape[0], wi.shape[2] // 2
    ck.check_shape("wo", wo, (e, f, d), "(e, f, d)")
    if not isinstance(routing, Routing):
        raise ValueError(f"routing must be a Routing (from route), got {type(routing).__name__}")
    ck.check_shape("routing.logits", routing.logits, (t, e), "(t, e)")
    ck.check_shape("routing.probs", routing.probs, (t, e), "(t, e)")
    ck.check_rank("routing.experts", routing.experts, 2, "(t, k)")
    k = routing.experts.shape[1]
    ck.check_shape("routing.experts", routing.experts, (t, k), "(t, k)")
    ck.check_int("routing.experts", routing.experts)
    ck.check_shape("routing.weights", routing.weights, (t, k), "(t, k)")
    check_top_k(k, e)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if token_mask is not None:
        ck.check_shape("token_mask", token_mask, (t,), "(t,)")
        if token_mask.dtype != jnp.bool_:
            raise ValueError(f"token_mask must be bool, got dtype {jnp.dtype(token_mask.dtype).name}")


def _valid_pairs(token_mask, t: int, k: int):
    if token_mask is None:
        return jnp.ones((t, k), bool)
    return jnp.broadcast_to(token_mask[:, None], (t, k))


def moe_ffn(x: Float[Array, "t d"], routing: Routing, wi: Float[Array, "e d f2"], wo: Float[Array, "e f d"], *,
            dispatch: Dispatch = "dropless", capacity_factor: float = 1.25, activation: str = "silu",
            token_mask: Bool[Array, "t"] | None = None) -> tuple[Float[Array, "t d"], MoEStats]:
    """Sparse SwiGLU experts on routed tokens: (y (t, d) in x.dtype, MoEStats).

    Args:
      x: (t, d) tokens (the experts run in the dtype of x and the weights; the combine in float32).
      routing: from `route`.
      wi: (e, d, 2f) fused [gate | up] input projections.
      wo: (e, f, d) output projections.
      dispatch: "dropless", "capacity" or "reference" (see the module docstring).
      capacity_factor: slots per expert relative to a perfectly balanced load (capacity path only, > 0).
      activation: "silu" (SwiGLU), "gelu" or "gelu_tanh" on the gate branch.
      token_mask: optional (t,) bool; False tokens (padding) are routed nowhere, take no capacity, are left
        out of the statistics and get y = 0.
    """
    if dispatch not in DISPATCHES:
        raise ValueError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
    check_ffn_inputs(x, routing, wi, wo, activation, token_mask)
    if dispatch == "capacity":
        check_capacity_factor(capacity_factor)
    if dispatch == "reference":
        return moe_ffn_reference(x, routing, wi, wo, activation=activation, token_mask=token_mask)
    t, k = routing.experts.shape
    valid = _valid_pairs(token_mask, t, k)
    dropped = 0
    if dispatch == "capacity":
        capacity = expert_capacity(t, wi.shape[0], k, capacity_factor)
        y, dropped = capacity_ffn(x, routing.weights, routing.experts, valid, wi, wo, activation, capacity)
    else:
        y = dropless_ffn(x, routing.weights, routing.experts, valid, wi, wo, activation)
    return y.astype(x.dtype), moe_stats(routing, token_mask, dropped)


def moe_ffn_reference(x: Float[Array, "t d"], routing: Routing, wi: Float[Array, "e d f2"],
                      wo: Float[Array, "e f d"], *, activation: str = "silu",
                      token_mask: Bool[Array, "t"] | None = None) -> tuple[Float[Array, "t d"], MoEStats]:
    """The definition: every expert on every token, y = sum_i gate[t, i] * expert_i(x_t) with gate[t, i] the
    token's weight for expert i (0 when i was not chosen or the token is masked). Slow on purpose."""
    check_ffn_inputs(x, routing, wi, wo, activation, token_mask)
    t, k = routing.experts.shape
    e = wi.shape[0]
    valid = _valid_pairs(token_mask, t, k)
    chosen = jax.nn.one_hot(routing.experts, e, dtype=jnp.float32)  # (t, k, e)
    gate = jnp.einsum("tk,tke->te", jnp.where(valid, routing.weights, 0.0).astype(jnp.float32), chosen)
    h = jnp.einsum("td,edf->etf", x, wi)
    out = jnp.einsum("etf,efd->etd", _swiglu(h, wi, activation), wo)
    y = jnp.einsum("te,etd->td", gate, out.astype(jnp.float32), precision=_HI)
    return y.astype(x.dtype), moe_stats(routing, token_mask, 0)
