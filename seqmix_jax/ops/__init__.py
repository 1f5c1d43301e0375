"""Pure functions on arrays. Each op has `<op>_reference` (the readable definition) and an `impl=` dispatch."""

from seqmix_jax.ops.attention import attention, attention_decode, attention_mask, attention_reference
from seqmix_jax.ops.conv import causal_conv1d, causal_conv1d_reference, causal_conv1d_update
from seqmix_jax.ops.dispatch import IMPLS, Impl, resolve_impl
from seqmix_jax.ops.fftconv import fftconv, fftconv_reference
from seqmix_jax.ops.modal import (as_complex, from_stripedhyena, modal_filter, modal_prefill, modal_prefill_fft,
                                   modal_scan, modal_scan_reference, modal_step, to_stripedhyena)
from seqmix_jax.ops.moe import (DISPATCHES, MoEStats, Routing, expert_capacity, moe_ffn, moe_ffn_reference, moe_stats,
                                route)
from seqmix_jax.ops.moe_parallel import EP_MODES, moe_ffn_expert_parallel
from seqmix_jax.ops.norms import rms_norm, rms_norm_gated, rms_norm_gated_reference, rms_norm_reference
from seqmix_jax.ops.rotary import apply_rotary, apply_rotary_reference, rotary_inv_freq
from seqmix_jax.ops.segments import segment_index, segment_starts
from seqmix_jax.ops.selective_scan import selective_scan, selective_scan_reference, selective_state_update
from seqmix_jax.ops.ssd import ssd, ssd_reference, ssd_state_update

__all__ = [
    "apply_rotary", "apply_rotary_reference", "as_complex", "attention", "attention_decode", "attention_mask",
    "attention_reference", "causal_conv1d", "causal_conv1d_reference", "causal_conv1d_update", "DISPATCHES",
    "EP_MODES", "expert_capacity", "fftconv", "fftconv_reference", "from_stripedhyena", "Impl", "IMPLS",
    "modal_filter", "modal_prefill", "modal_prefill_fft", "modal_scan", "modal_scan_reference", "modal_step",
    "moe_ffn", "moe_ffn_expert_parallel", "moe_ffn_reference", "moe_stats", "MoEStats", "resolve_impl", "rms_norm",
    "rms_norm_gated", "rms_norm_gated_reference", "rms_norm_reference", "rotary_inv_freq", "route", "Routing",
    "segment_index", "segment_starts", "selective_scan", "selective_scan_reference", "selective_state_update", "ssd",
    "ssd_reference", "ssd_state_update", "to_stripedhyena"
]
