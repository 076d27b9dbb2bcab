// Helpers shared verbatim by the CUDA and Metal builds (after the backend prelude).
//
// Quantized weights use MLX's affine format: each uint32 packs 32/BITS values, lowest bits
// first; w = scale * q + bias per group of GS consecutive inputs. A 16-byte chunk (uint4)
// holds 128/BITS values, always inside one group for GS >= 32.

// sum_i q_i * x_i over one 16-byte chunk of packed weights.
template <int BITS>
DEVICE_FN float qdot(const uint4 w, const THREAD float* x) {
  constexpr int PER_WORD = 32 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  float acc = 0.0f;
  UNROLL for (int i = 0; i < 4; i++) {
    UNROLL for (int j = 0; j < PER_WORD; j++) {
      acc += float((words[i] >> (BITS * j)) & MASK) * x[PER_WORD * i + j];
    }
  }
  return acc;
}

DEVICE_FN float silu(float x) {
  return x / (1.0f + exp(-x));
}
