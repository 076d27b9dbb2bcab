// Metal prelude: the small vocabulary the shared kernel bodies (*.inc) are written in.
// prelude.cuda.h defines the same names for NVIDIA GPUs; keep the two in step.
// Everything above the "body prefix" marker is the kernel header; the lines below it
// are pasted at the top of every kernel body (thread and threadgroup indices; MLX adds
// the Metal attributes they name to the kernel signature).

#define DEVICE_FN inline
#define THREAD thread
#define SHARED threadgroup
#define BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define UNROLL _Pragma("unroll")
#define PRAGMA(x) _Pragma(#x)
#define UNROLL_BY(n) PRAGMA(unroll n)  // the next loop unrolled n times
#define LOAD_U4(ptr, i) (((const device uint4*)(ptr))[(i)])
#define AS_FLOAT(u) as_type<float>(u)
#define MAKE_FLOAT4(a, b, c, d) float4((a), (b), (c), (d))

// Sum over the 32 lanes of a SIMD group; every lane gets the total.
DEVICE_FN float warp_sum(float v) {
  return simd_sum(v);
}

// Bit i set where lane i's predicate holds (popcount is Metal's own).
DEVICE_FN uint32_t warp_ballot(bool p) {
  return uint32_t(static_cast<ulong>(simd_ballot(p)));
}

DEVICE_FN float warp_max(float v) {
  return simd_max(v);
}

// Lane src's value.
DEVICE_FN float shuffle_at(float v, int src) {
  return simd_shuffle(v, ushort(src));
}

// Lane (lane ^ m)'s value.
DEVICE_FN float shuffle_xor(float v, int m) {
  return simd_shuffle_xor(v, ushort(m));
}

DEVICE_FN int shuffle_xor(int v, int m) {
  return simd_shuffle_xor(v, ushort(m));
}

// Split kernels (see prelude.cuda.h): tickets from a device-memory counter, a device-scope
// fence before a ticket is drawn, and plain loads of other threadgroups' writes after it.
#define DEVICE_FENCE() atomic_thread_fence(mem_flags::mem_device, memory_order_seq_cst, thread_scope_device)
#define BARRIER_DEVICE() threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup)

DEVICE_FN uint32_t take_ticket(const device uint32_t* counter, uint32_t amount = 1u) {
  return atomic_fetch_add_explicit((device atomic_uint*)counter, amount, memory_order_relaxed);
}

DEVICE_FN float load_coherent(const device float* p) {
  return *((const volatile device float*)p);
}

// Four consecutive floats (16-byte aligned), read as load_coherent does.
DEVICE_FN float4 load_coherent4(const device float* p) {
  return *((const volatile device float4*)p);
}

// Four consecutive activations as floats; p is aligned to their size.
DEVICE_FN void load4(const device bfloat16_t* p, thread float* o) {
  const uint2 u = *((const device uint2*)p);
  o[0] = as_type<float>(u.x << 16);
  o[1] = as_type<float>(u.x & 0xffff0000u);
  o[2] = as_type<float>(u.y << 16);
  o[3] = as_type<float>(u.y & 0xffff0000u);
}

DEVICE_FN void load4(const device half* p, thread float* o) {
  const half4 h = *((const device half4*)p);
  o[0] = float(h.x); o[1] = float(h.y); o[2] = float(h.z); o[3] = float(h.w);
}

DEVICE_FN void load4(const device float* p, thread float* o) {
  const float4 a = *((const device float4*)p);
  o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
}

// Eight consecutive activations as floats; p is 16-byte aligned.
DEVICE_FN void load8(const device bfloat16_t* p, thread float* o) {
  const uint4 u = *((const device uint4*)p);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
  UNROLL for (int i = 0; i < 4; i++) {
    o[2 * i] = as_type<float>(w[i] << 16);
    o[2 * i + 1] = as_type<float>(w[i] & 0xffff0000u);
  }
}

DEVICE_FN void load8(const device half* p, thread float* o) {
  UNROLL for (int i = 0; i < 8; i++) {
    o[i] = float(p[i]);
  }
}

DEVICE_FN void load8(const device float* p, thread float* o) {
  const float4 a = ((const device float4*)p)[0];
  const float4 b = ((const device float4*)p)[1];
  o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
  o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}

// ---- body prefix ----
const uint32_t tid = thread_index_in_threadgroup;
const uint32_t lane = thread_index_in_simdgroup;
const uint32_t warp = simdgroup_index_in_threadgroup;
const uint32_t bid_x = threadgroup_position_in_grid.x;
const uint32_t bid_y = threadgroup_position_in_grid.y;
(void)bid_x;
(void)bid_y;
