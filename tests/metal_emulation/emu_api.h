// Plain-C interface between an emulated Metal kernel (compiled with metal_shim.h) and the
// CPU executor (runtime.cpp). No Metal vocabulary here: runtime.cpp uses std::thread.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Every Metal kernel attribute MLX's metal_kernel can add to a signature, for one thread.
typedef struct EmuAttrs {
  uint32_t dispatch_quadgroups_per_threadgroup;
  uint32_t dispatch_simdgroups_per_threadgroup;
  uint32_t dispatch_threads_per_threadgroup[3];
  uint32_t grid_origin[3];
  uint32_t grid_size[3];
  uint32_t quadgroup_index_in_threadgroup;
  uint32_t quadgroups_per_threadgroup;
  uint32_t simdgroup_index_in_threadgroup;
  uint32_t simdgroups_per_threadgroup;
  uint32_t thread_execution_width;
  uint32_t thread_index_in_quadgroup;
  uint32_t thread_index_in_simdgroup;
  uint32_t thread_index_in_threadgroup;
  uint32_t thread_position_in_grid[3];
  uint32_t thread_position_in_threadgroup[3];
  uint32_t threadgroup_position_in_grid[3];
  uint32_t threadgroups_per_grid[3];
  uint32_t threads_per_grid[3];
  uint32_t threads_per_simdgroup;
  uint32_t threads_per_threadgroup[3];
} EmuAttrs;

// Defined by the generated kernel translation unit: runs the kernel for one thread.
void emu_entry(void* const* buffers, const EmuAttrs* attrs);

// Provided by runtime.cpp.
// SIMD-group exchange: every active lane of the caller's SIMD group passes `value` (raw
// bits); each gets all 32 lanes' values and the mask of lanes still running. `op` names
// the operation: lanes meeting at different operations abort the run (divergence).
void emu_simd_exchange(uint64_t value, int op, uint64_t* all, uint32_t* active);
// The calling thread's lane in its SIMD group.
uint32_t emu_lane(void);
// A threadgroup variable of the kernel (its static copy, see emulate.py): filled with 0xff
// bytes before every threadgroup after the first, as threadgroup memory starts undefined.
void emu_register_shared(uintptr_t address, uint64_t nbytes);
// threadgroup_barrier: every running thread of the threadgroup waits for the others.
void emu_threadgroup_barrier(void);

#ifdef __cplusplus
}
#endif
