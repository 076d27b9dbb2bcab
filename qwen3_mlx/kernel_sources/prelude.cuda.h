// CUDA prelude: the small vocabulary the shared kernel bodies (*.inc) are written in.
// prelude.metal.h defines the same names for Apple GPUs; keep the two in step.
// Everything above the "body prefix" marker is the kernel header; the lines below it
// are pasted at the top of every kernel body (thread and block indices).

#define DEVICE_FN __device__ __forceinline__
#define THREAD
#define SHARED __shared__
#define BARRIER() __syncthreads()
#define UNROLL _Pragma("unroll")
#define PRAGMA(x) _Pragma(#x)
#define UNROLL_BY(n) PRAGMA(unroll n)  // the next loop unrolled n times
#define LOAD_U4(ptr, i) (reinterpret_cast<const uint4*>(ptr)[(i)])
#define AS_FLOAT(u) __uint_as_float(u)
#define MAKE_FLOAT4(a, b, c, d) make_float4((a), (b), (c), (d))

// Sum over the 32 lanes of a warp; every lane gets the total.
DEVICE_FN float warp_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 16);
  v += __shfl_xor_sync(0xffffffffu, v, 8);
  v += __shfl_xor_sync(0xffffffffu, v, 4);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v;
}

// Bit i set where lane i's predicate holds; the count of set bits.
DEVICE_FN uint32_t warp_ballot(bool p) {
  return __ballot_sync(0xffffffffu, p);
}

DEVICE_FN int popcount(uint32_t v) {
  return __popc(v);
}

DEVICE_FN float warp_max(float v) {
  UNROLL for (int m = 16; m > 0; m >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
  }
  return v;
}

// Lane src's value.
DEVICE_FN float shuffle_at(float v, int src) {
  return __shfl_sync(0xffffffffu, v, src);
}

// Lane (lane ^ m)'s value.
DEVICE_FN float shuffle_xor(float v, int m) {
  return __shfl_xor_sync(0xffffffffu, v, m);
}

DEVICE_FN int shuffle_xor(int v, int m) {
  return __shfl_xor_sync(0xffffffffu, v, m);
}

// Split kernels: the threadgroups that share one result each take a ticket from a counter
// in device memory; the one that draws the last ticket finishes the work. DEVICE_FENCE makes
// a thread's device-memory writes visible to every threadgroup before its ticket is drawn,
// and load_coherent reads another threadgroup's writes past the (non-coherent) L1 cache.
#define DEVICE_FENCE() __threadfence()
#define BARRIER_DEVICE() __syncthreads()

DEVICE_FN uint32_t take_ticket(const uint32_t* counter, uint32_t amount = 1u) {
  return atomicAdd(const_cast<uint32_t*>(counter), amount);
}

DEVICE_FN float load_coherent(const float* p) {
  return __ldcg(p);
}

// Four consecutive floats (16-byte aligned), read as load_coherent does.
DEVICE_FN float4 load_coherent4(const float* p) {
  return __ldcg(reinterpret_cast<const float4*>(p));
}

// Four consecutive activations as floats; p is aligned to their size.
DEVICE_FN void load4(const __nv_bfloat16* p, float* o) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  o[0] = __uint_as_float(u.x << 16);
  o[1] = __uint_as_float(u.x & 0xffff0000u);
  o[2] = __uint_as_float(u.y << 16);
  o[3] = __uint_as_float(u.y & 0xffff0000u);
}

DEVICE_FN void load4(const __half* p, float* o) {
  const __half2* h = reinterpret_cast<const __half2*>(p);
  const float2 a = __half22float2(h[0]);
  const float2 b = __half22float2(h[1]);
  o[0] = a.x; o[1] = a.y; o[2] = b.x; o[3] = b.y;
}

DEVICE_FN void load4(const float* p, float* o) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
}

// Eight consecutive activations as floats; p is 16-byte aligned.
DEVICE_FN void load8(const __nv_bfloat16* p, float* o) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
  UNROLL for (int i = 0; i < 4; i++) {
    o[2 * i] = __uint_as_float(w[i] << 16);
    o[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

DEVICE_FN void load8(const __half* p, float* o) {
  const __half2* h = reinterpret_cast<const __half2*>(p);
  UNROLL for (int i = 0; i < 4; i++) {
    const float2 f = __half22float2(h[i]);
    o[2 * i] = f.x;
    o[2 * i + 1] = f.y;
  }
}

DEVICE_FN void load8(const float* p, float* o) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
  o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}

// ---- body prefix ----
const uint32_t tid = threadIdx.x;
const uint32_t lane = tid & 31u;
const uint32_t warp = tid >> 5;
const uint32_t bid_x = blockIdx.x;
const uint32_t bid_y = blockIdx.y;
(void)bid_x;
(void)bid_y;
