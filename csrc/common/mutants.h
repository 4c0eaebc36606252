// Mutation testing (tests/mutants/, `nox -s mutants`): a build with -DATTN_KERNELS_MUTANT=<name>
// (setup.py passes the ATTN_KERNELS_MUTANT environment variable through) compiles in exactly one named
// bug; every normal build has none. The test suite must fail on each of them.
//
// The catalog: one line per mutant, `#define AK_MUTANT_<name> <id>  // <what the bug is>`.
// tests/mutants/run.py reads these lines; a CPU test checks that each name is used in csrc/.
#pragma once

// based_prefill
#define AK_MUTANT_prefill_split_carry 1    // split path: a segment ignores the state carried from earlier ones
#define AK_MUTANT_prefill_scan_skipped 2   // split path: the prefix scan over segment states is not launched
#define AK_MUTANT_prefill_tail_dropped 3   // the last partial chunk of 64 tokens is skipped (silent truncation)
#define AK_MUTANT_prefill_causal_diag 4    // the causal mask drops the diagonal (token i does not see itself)
#define AK_MUTANT_prefill_state_bf16 5     // the running state S is rounded to bf16 after every chunk
#define AK_MUTANT_prefill_init_ignored_num 6  // initial_state ignored when normalize=False
#define AK_MUTANT_prefill_z_last_chunk 7   // z (the keys' moments) misses the last chunk's keys
#define AK_MUTANT_prefill_eps_dropped 8    // eps not added to the denominator
#define AK_MUTANT_prefill_quad_scale 9     // the s^2 / 2 term computed with c^2 instead of c^2 / 2
#define AK_MUTANT_prefill_den_inter_ks 10  // den from earlier chunks misses the linear term c q.sum(k)
#define AK_MUTANT_prefill_missing_barrier 11  // no barrier between building phi / W and the wgmma that read them
#define AK_MUTANT_prefill_varlen_len 12    // varlen: a sequence runs to the length bound, into the next sequence
#define AK_MUTANT_prefill_varlen_out_row 13  // varlen: o written at sequence-relative rows (start ignored)
#define AK_MUTANT_prefill_pool_slot_ignored 14  // state pool: sequence b's state goes to slot b, not its index
#define AK_MUTANT_prefill_pool_bad_index_computed 15  // state pool: an out-of-range index gives computed outputs
#define AK_MUTANT_prefill_fp16_tiny_packed 54  // fp16: rows with |x| below the normal range of sqrt(c) x take the packed path
// based_decode
#define AK_MUTANT_decode_z_not_updated 16  // z is not written back
#define AK_MUTANT_decode_read_before_update 17  // o reads the state before this token's update
#define AK_MUTANT_decode_normalize_ignored 18   // the numerator-only mode still divides
#define AK_MUTANT_decode_pair_order 19     // the x_i x_j features enumerated column-major, not row-major
#define AK_MUTANT_decode_last_head 20      // the grid misses the last (b, h) head
#define AK_MUTANT_decode_pool_index_ignored 21  // state pool: row b uses slot b, not state_indices[b]
#define AK_MUTANT_decode_pool_padding_written 22  // state pool: a padding row (-1) updates slot P - 1
#define AK_MUTANT_decode_pool_bad_index_written 23  // state pool: an out-of-range index is clamped into [0, P)
#define AK_MUTANT_decode_pool_stale_guess 57  // state pool: the slot read before the PDL wait is never checked
// sliding_window_decode
#define AK_MUTANT_swd_window_off_by_one 24  // the slot about to be overwritten is attended too (W + 1 keys)
#define AK_MUTANT_swd_unwritten_slots 25   // slots never written (position < window - 1) are attended
#define AK_MUTANT_swd_position_wrap 26     // slot = p & (W - 1) instead of p mod W
#define AK_MUTANT_swd_negative_position 27  // a negative position is not refused on the device
#define AK_MUTANT_swd_scale_ignored 28     // scores not multiplied by the scale
#define AK_MUTANT_swd_pool_index_ignored 29  // pooled: row b uses pool row b, not cache_indices[b]
#define AK_MUTANT_swd_pool_padding_written 30  // pooled: a padding row (-1) uses (writes) pool row 0
#define AK_MUTANT_swd_pool_bad_index_written 31  // pooled: an out-of-range index uses (writes) pool row 0
#define AK_MUTANT_swd_pool_stale_guess 32  // pooled: the pool row read before the PDL wait is never checked
// sliding_window_prefill
#define AK_MUTANT_swp_window_off_by_one 33  // each query attends W + 1 keys (i - W .. i)
#define AK_MUTANT_swp_tile_skipped 34      // the oldest key tile of a block's window is not visited
#define AK_MUTANT_swp_ring_slot 35         // the ring fill writes position p into slot (p + 1) % W
#define AK_MUTANT_swp_varlen_boundary 36   // keys of the previous packed sequence are attended
#define AK_MUTANT_swp_fully_masked_nan 37  // a row whose keys so far are all masked gives NaN (no -inf guard)
#define AK_MUTANT_swp_bad_index_computed 38  // an out-of-range cache index gives computed outputs, not NaN
#define AK_MUTANT_swp_subblock_skip_off_by_one 53  // a warp also skips the oldest 16-key sub-block its window reaches
#define AK_MUTANT_swp_wgmma_skip_not_zeroed 58  // wgmma path: a skipped sub-block enters P V as its raw scores, not 0
#define AK_MUTANT_swp_e128_qk_first_atom_only 59  // e = 128: S = Q K^T sums head dims 0-63 only (second atom skipped)
// based_prefill_backward
#define AK_MUTANT_bwd_causal_diag 39      // the backward's causal mask drops the diagonal (A, ds: key < query)
#define AK_MUTANT_bwd_tail_dropped 40     // both sweeps skip the last partial chunk of 64 tokens
#define AK_MUTANT_bwd_forward_state_frozen 41  // forward sweep: S, z never advance (every chunk sees S0, z0)
#define AK_MUTANT_bwd_dstate_frozen 42    // backward sweep: dS, dz never accumulate the later chunks' queries
#define AK_MUTANT_bwd_dden_dropped 43     // normalize: the denominator's gradient dden taken as 0
#define AK_MUTANT_bwd_grad_state_ignored 44  // the gradient into the returned S (grad_S) ignored
#define AK_MUTANT_bwd_square_vjp 45       // the square features' derivative a/sqrt(2) instead of sqrt(2) a
#define AK_MUTANT_bwd_split_forward_carry 50   // split: a segment's forward sweep ignores the earlier segments' key sums
#define AK_MUTANT_bwd_split_backward_carry 51  // split: a segment's backward sweep ignores the later segments' dS, dz
#define AK_MUTANT_bwd_split_scan_skipped 52    // split: the segments' sums never scanned (only the neighbour's carried)
// the binding (csrc/binding.cpp)
#define AK_MUTANT_binding_v_stride 46      // v's head stride taken from a contiguous layout
#define AK_MUTANT_binding_state_dtype 47   // a bfloat16 initial state dropped (read as zeros)
#define AK_MUTANT_binding_op_missing 48    // sliding_window_decode's CUDA kernel not registered
#define AK_MUTANT_binding_bwd_grad_o_strides 49  // based_prefill_backward: grad_o's strides taken as contiguous

#define AK_MUTANT_CAT_(a, b) a##b
#define AK_MUTANT_CAT(a, b) AK_MUTANT_CAT_(a, b)
#ifdef ATTN_KERNELS_MUTANT
#define AK_MUTANT_ID AK_MUTANT_CAT(AK_MUTANT_, ATTN_KERNELS_MUTANT)
#if !(AK_MUTANT_ID > 0)
#error "ATTN_KERNELS_MUTANT names no mutant of csrc/common/mutants.h"
#endif
#else
#define AK_MUTANT_ID 0
#endif
// True in the build of that one mutant: `if constexpr (AK_MUTANT(prefill_tail_dropped)) ...`
#define AK_MUTANT(name) (AK_MUTANT_ID == AK_MUTANT_##name)
