// Helpers shared verbatim by the CUDA and Metal builds (after the backend prelude).
//
// Quantized weights use MLX's affine format: each uint32 packs 32/BITS values, lowest bits
// first; w = scale * q + bias per group of GS consecutive inputs. A 16-byte chunk (uint4)
// holds 128/BITS values, always inside one group for GS >= 32.

// 16-byte weight chunks per lane and row a kernel keeps in flight at once (see linear.inc).
constexpr int CHUNKS_IN_FLIGHT = 8;

// The dot products below never convert an integer to a float: NVIDIA GPUs run that
// conversion at 1/8 of the FMA rate, and it bound every quantized matrix-vector product here.
// Instead each q is moved into the top mantissa bits of 1.0f (a shift and one and/or), which
// is exactly 1 + q / 2^BITS, so sum_i q_i x_i = 2^BITS * (sum_i (1 + q_i / 2^BITS) x_i - xs)
// with xs = sum_i x_i, which every caller already has for the affine bias term.

// Value j of a packed word as 1 + q_j / 2^BITS, exactly.
template <int BITS>
DEVICE_FN float biased_value(const uint32_t word, const int j) {
  constexpr int LOW = 23 - BITS;  // where q's lowest bit goes in the mantissa
  constexpr uint32_t FIELD = ((1u << BITS) - 1u) << LOW;
  const int shift = LOW - BITS * j;
  const uint32_t moved = shift >= 0 ? word << shift : word >> -shift;
  return AS_FLOAT((moved & FIELD) | 0x3f800000u);
}

// sum_j (1 + q_j / 2^BITS) * x_j over the 32/BITS values packed in one word.
template <int BITS>
DEVICE_FN float biased_word_dot(const uint32_t word, const THREAD float* x) {
  float acc = 0.0f;
  UNROLL for (int j = 0; j < 32 / BITS; j++) {
    acc += biased_value<BITS>(word, j) * x[j];
  }
  return acc;
}

// sum_i q_i * x_i over the values packed in one word; xs = sum_i x_i over the same values.
template <int BITS>
DEVICE_FN float qdot_word(const uint32_t word, const THREAD float* x, const float xs) {
  return float(1 << BITS) * (biased_word_dot<BITS>(word, x) - xs);
}

// sum_i q_i * x_i over one 16-byte chunk of packed weights; xs = sum_i x_i over the chunk.
template <int BITS>
DEVICE_FN float qdot(const uint4 w, const THREAD float* x, const float xs) {
  constexpr int PER_WORD = 32 / BITS;
  // Four independent sums, so the FMAs of one chunk do not wait on each other.
  const float acc = (biased_word_dot<BITS>(w.x, x) + biased_word_dot<BITS>(w.y, x + PER_WORD)) +
                    (biased_word_dot<BITS>(w.z, x + 2 * PER_WORD) +
                     biased_word_dot<BITS>(w.w, x + 3 * PER_WORD));
  return float(1 << BITS) * (acc - xs);
}

// The 16-byte chunk's values as 1 + q / 2^BITS, for dotting with several tokens: unpacked
// once, each further token costs one FMA per value.
template <int BITS>
DEVICE_FN void unpack_biased(const uint4 w, THREAD float* out) {
  constexpr int PER_WORD = 32 / BITS;
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  UNROLL for (int i = 0; i < 4; i++) {
    UNROLL for (int j = 0; j < PER_WORD; j++) {
      out[PER_WORD * i + j] = biased_value<BITS>(words[i], j);
    }
  }
}

// sum_i q_i * x_i from unpack_biased values wv; xs = sum_i x_i.
template <int BITS>
DEVICE_FN float unpacked_dot(const THREAD float* wv, const THREAD float* x, const float xs) {
  constexpr int N = 128 / BITS;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  UNROLL for (int i = 0; i < N; i++) {
    acc[i % 4] += wv[i] * x[i];
  }
  return float(1 << BITS) * ((acc[0] + acc[1]) + (acc[2] + acc[3]) - xs);
}

// One step of summing an array over the warp by halving, at lane bit MASK: a lane keeps
// the upper or lower N of its 2N values (by its bit) and adds the partner lane's copy of
// that half. With N == 0, a plain sum of v[0] with the partner's. (The steps are separate
// instantiations so every index is a constant: the arrays stay in registers.)
template <int N, int MASK>
DEVICE_FN void halve_sum(THREAD float* v, const uint32_t lane) {
  if (N == 0) {
    v[0] += shuffle_xor(v[0], MASK);
    return;
  }
  const bool upper = (lane & uint32_t(MASK)) != 0;
  UNROLL for (int i = 0; i < N; i++) {
    const float low = v[i];
    const float high = v[i + N];
    v[i] = (upper ? high : low) + shuffle_xor(upper ? low : high, MASK);
  }
}

DEVICE_FN float silu(float x) {
  return x / (1.0f + exp(-x));
}
