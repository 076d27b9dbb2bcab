// A C++ emulation of the Metal Shading Language vocabulary the kernel sources in
// qwen3_mlx/kernel_sources/ use, so their Metal build (prelude.metal.h + common.h + *.inc,
// wrapped in the signature MLX's metal_kernel writes) compiles with clang++ and runs on the
// CPU (runtime.cpp). Only what the sources use; grep them before adding more.
//
// Two modes:
//   EMU_STRICT defined: address spaces are clang address spaces (device 1, constant 2,
//     threadgroup 3; thread = the default one). A pointer of one address space does not
//     convert to another, so passing a `constant` or `threadgroup` pointer where a `device`
//     one is expected is a compile error, as in Metal. Compiled with -fsyntax-only: C++
//     cannot call member functions on objects in another address space, so bfloat16_t (a
//     class here) must not be instantiated in this mode; half is a scalar (__fp16) and is.
//   otherwise: the address-space words expand to nothing and the kernel is built to run.
#pragma once

#include <stdint.h>
#include <stddef.h>

#include "emu_api.h"

#ifdef EMU_STRICT
#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#else
#define device
#define constant
#define threadgroup
#endif
#define thread  // Metal's default address space for locals and parameters

// ---- scalar types
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;  // 64-bit, as Metal's

// half: Apple GPUs have native half; here a storage type that converts to and from float
// (round to nearest even), enough for kernels that do all arithmetic in float.
typedef __fp16 half;
typedef half float16_t;  // MLX's name (get_type_string(float16))

// bfloat16_t: Metal 3.1's bfloat (MLX: typedef bfloat bfloat16_t). Round to nearest even.
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  template <typename U, typename = decltype(float(U()))>
  bfloat16_t(U v) : bits(from_float(float(v))) {}
  operator float() const { return __builtin_bit_cast(float, uint32_t(bits) << 16); }
  static uint16_t from_float(float f) {
    uint32_t u = __builtin_bit_cast(uint32_t, f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      return uint16_t((u >> 16) | 0x40u);  // NaN stays a (quiet) NaN
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
  }
};

// ---- vector types (clang extended vectors: .x .y .z .w, 16-byte float4/uint4 as Metal's)
#define EMU_VEC(T, N) typedef T T##N __attribute__((ext_vector_type(N)))
EMU_VEC(float, 2);
EMU_VEC(float, 3);
EMU_VEC(float, 4);
EMU_VEC(uint, 2);
EMU_VEC(uint, 3);
EMU_VEC(uint, 4);
EMU_VEC(int, 2);
EMU_VEC(int, 3);
EMU_VEC(int, 4);
EMU_VEC(ushort, 2);
EMU_VEC(ushort, 4);
EMU_VEC(half, 2);
EMU_VEC(half, 4);
#undef EMU_VEC

namespace metal {

// ---- reinterpretation
template <typename T, typename U>
inline T as_type(const U u) {
  static_assert(sizeof(T) == sizeof(U), "as_type: sizes differ");
  return __builtin_bit_cast(T, u);
}

// ---- math (fast-math variants are the same functions here)
inline float exp(float x) { return __builtin_expf(x); }
inline float exp2(float x) { return __builtin_exp2f(x); }
inline float log(float x) { return __builtin_logf(x); }
inline float sqrt(float x) { return __builtin_sqrtf(x); }
inline float rsqrt(float x) { return 1.0f / __builtin_sqrtf(x); }
inline float cos(float x) { return __builtin_cosf(x); }
inline float sin(float x) { return __builtin_sinf(x); }
inline float abs(float x) { return __builtin_fabsf(x); }
inline float fabs(float x) { return __builtin_fabsf(x); }
inline float max(float a, float b) { return __builtin_fmaxf(a, b); }
inline float min(float a, float b) { return __builtin_fminf(a, b); }
inline float fmax(float a, float b) { return __builtin_fmaxf(a, b); }
inline float fmin(float a, float b) { return __builtin_fminf(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline uint max(uint a, uint b) { return a > b ? a : b; }
inline uint min(uint a, uint b) { return a < b ? a : b; }
inline uint popcount(uint v) { return uint(__builtin_popcount(v)); }
namespace fast {
inline float exp(float x) { return __builtin_expf(x); }
inline float exp2(float x) { return __builtin_exp2f(x); }
inline float rsqrt(float x) { return 1.0f / __builtin_sqrtf(x); }
}  // namespace fast
namespace precise {
inline float exp(float x) { return __builtin_expf(x); }
inline float exp2(float x) { return __builtin_exp2f(x); }
inline float rsqrt(float x) { return 1.0f / __builtin_sqrtf(x); }
}  // namespace precise

// ---- synchronisation
enum mem_flags : uint { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(uint(a) | uint(b)); }
enum memory_order : int { memory_order_relaxed = 0, memory_order_seq_cst = 5 };
enum thread_scope : int { thread_scope_thread, thread_scope_simdgroup, thread_scope_threadgroup,
                          thread_scope_device };

// All threads of the threadgroup meet; their memory writes (both address spaces: every
// emulated thread shares one CPU memory) are visible to each other afterwards.
inline void threadgroup_barrier(mem_flags) {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  emu_threadgroup_barrier();
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

inline void atomic_thread_fence(mem_flags, memory_order, thread_scope = thread_scope_device) {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

template <typename T>
struct _atomic {
  T value;
};
typedef _atomic<uint> atomic_uint;
typedef _atomic<int> atomic_int;

#define EMU_PLAIN(p) ((uint*)(uintptr_t)(p))
inline uint atomic_fetch_add_explicit(device atomic_uint* obj, uint v, memory_order) {
  return __atomic_fetch_add(EMU_PLAIN(obj), v, __ATOMIC_SEQ_CST);
}
inline uint atomic_load_explicit(device atomic_uint* obj, memory_order) {
  return __atomic_load_n(EMU_PLAIN(obj), __ATOMIC_SEQ_CST);
}
inline void atomic_store_explicit(device atomic_uint* obj, uint v, memory_order) {
  __atomic_store_n(EMU_PLAIN(obj), v, __ATOMIC_SEQ_CST);
}
#undef EMU_PLAIN

// ---- SIMD-group functions over the 32 lanes of an Apple GPU SIMD group. Lanes that have
// returned from the kernel are inactive: they add nothing to sums and vote false.
enum { EMU_OP_SUM = 1, EMU_OP_MAX, EMU_OP_SHUFFLE, EMU_OP_SHUFFLE_XOR, EMU_OP_BALLOT };

template <typename T>
inline uint64_t _emu_bits(T v) {
  uint64_t out = 0;
  __builtin_memcpy(&out, &v, sizeof(T));
  return out;
}
template <typename T>
inline T _emu_from_bits(uint64_t u) {
  T v;
  __builtin_memcpy(&v, &u, sizeof(T));
  return v;
}

template <typename T>
inline T simd_sum(T v) {
  uint64_t all[32];
  uint32_t active;
  emu_simd_exchange(_emu_bits(v), EMU_OP_SUM, all, &active);
  T s[32];
  for (int i = 0; i < 32; i++) {
    s[i] = (active >> i) & 1u ? _emu_from_bits<T>(all[i]) : T(0);
  }
  // Butterfly order: every lane ends with the same (bitwise) total.
  for (int m = 16; m > 0; m >>= 1) {
    T t[32];
    for (int i = 0; i < 32; i++) t[i] = s[i] + s[i ^ m];
    for (int i = 0; i < 32; i++) s[i] = t[i];
  }
  return s[0];
}

template <typename T>
inline T simd_max(T v) {
  uint64_t all[32];
  uint32_t active;
  emu_simd_exchange(_emu_bits(v), EMU_OP_MAX, all, &active);
  T best = v;
  for (int i = 0; i < 32; i++) {
    if ((active >> i) & 1u) best = max(best, _emu_from_bits<T>(all[i]));
  }
  return best;
}

template <typename T>
inline T simd_shuffle(T v, ushort src) {
  uint64_t all[32];
  uint32_t active;
  emu_simd_exchange(_emu_bits(v), EMU_OP_SHUFFLE, all, &active);
  return _emu_from_bits<T>(all[src & 31u]);  // an inactive lane's value is undefined
}

template <typename T>
inline T simd_shuffle_xor(T v, ushort mask) {
  uint64_t all[32];
  uint32_t active;
  emu_simd_exchange(_emu_bits(v), EMU_OP_SHUFFLE_XOR, all, &active);
  return _emu_from_bits<T>(all[(emu_lane() ^ mask) & 31u]);
}

struct simd_vote {
  uint64_t v;
  explicit operator uint64_t() const { return v; }
  explicit operator bool() const { return v != 0; }
  bool any() const { return v != 0; }
};

inline simd_vote simd_ballot(bool p) {
  uint64_t all[32];
  uint32_t active;
  emu_simd_exchange(p ? 1u : 0u, EMU_OP_BALLOT, all, &active);
  uint64_t mask = 0;
  for (int i = 0; i < 32; i++) {
    if (((active >> i) & 1u) && all[i]) mask |= uint64_t(1) << i;
  }
  return simd_vote{mask};
}

}  // namespace metal

using namespace metal;
