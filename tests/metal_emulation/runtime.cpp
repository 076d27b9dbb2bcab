// CPU executor for one emulated Metal kernel launch (linked with a kernel built from
// metal_shim.h; see emulate.py).
//
//   runtime MANIFEST
//
// MANIFEST (text):
//   grid GX GY GZ          total threads, as mx.fast.metal_kernel's `grid`
//   group TX TY TZ         threads per threadgroup
//   seed S                 0: threadgroups in grid order; else a shuffled order
//   timeout T              seconds before the run is abandoned (a deadlock)
//   buffer NBYTES IN OUT   one line per kernel buffer, in signature order; IN is a file of
//                          NBYTES bytes or "-" (filled with 0xff: an unwritten output reads
//                          as NaN), OUT is where to write the buffer afterwards or "-"
//
// One OS thread per GPU thread of a threadgroup: the threads run every threadgroup of the
// grid in turn (the kernels here never wait on other threadgroups; the split kernels' last
// threadgroup to take a ticket does the merge, whichever order they run in). Threadgroup
// barriers are real barriers; SIMD-group functions exchange values among the 32 lanes of a
// SIMD group through shared slots between two barriers of those lanes. A thread that returns
// from the kernel leaves its threadgroup's and SIMD group's barriers (arrive_and_drop).
// Exit status: 0 ok; 3 divergent SIMD op or barrier; 4 a buffer written out of bounds;
// 2 bad manifest; killed by SIGALRM on timeout.
#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include "emu_api.h"

namespace {

constexpr int kLanes = 32;
constexpr size_t kGuard = 256;  // bytes of canary after each buffer
constexpr unsigned char kCanary = 0xa5;

struct SimdGroup {
  std::optional<std::barrier<>> bar;
  uint64_t value[kLanes];
  int op[kLanes];
  uint64_t count[kLanes];
  std::atomic<bool> running[kLanes];
  int lanes = 0;
};

struct Launch {
  uint32_t grid[3], group[3];
  int threads = 0;
  int n_simd = 0;
  std::vector<std::array<uint32_t, 3>> order;
  std::optional<std::barrier<>> tg_bar;
  std::vector<uint64_t> tg_count;
  std::vector<std::atomic<bool>>* tg_running = nullptr;
  std::vector<std::unique_ptr<SimdGroup>> simd;
  std::vector<void*> buffers;
};

Launch L;

std::mutex shared_mutex;
std::vector<std::pair<unsigned char*, size_t>> shared_regions;

struct ThreadCtx {
  int tid = 0;
  int lane = 0;
  int simd = 0;
};
thread_local ThreadCtx ctx;

void fail(int code, const char* what) {
  std::fprintf(stderr, "emulator: %s\n", what);
  std::fflush(stderr);
  std::_Exit(code);
}

void reset_group() {
  for (auto& [p, n] : shared_regions) std::memset(p, 0xff, n);
  L.tg_bar.emplace(L.threads);
  for (int t = 0; t < L.threads; t++) {
    L.tg_count[t] = 0;
    (*L.tg_running)[t].store(true);
  }
  for (auto& s : L.simd) {
    s->bar.emplace(s->lanes);
    for (int i = 0; i < kLanes; i++) {
      s->count[i] = 0;
      s->op[i] = 0;
      s->running[i].store(i < s->lanes);
    }
  }
}

struct Reset {
  void operator()() noexcept { reset_group(); }
};

void worker(int tid, std::barrier<Reset>* between) {
  ctx.tid = tid;
  ctx.lane = tid % kLanes;
  ctx.simd = tid / kLanes;
  const uint32_t tx = L.group[0], ty = L.group[1], tz = L.group[2];
  const uint32_t nt = tx * ty * tz;
  EmuAttrs a;
  std::memset(&a, 0, sizeof(a));
  const uint32_t lx = tid % tx, ly = (tid / tx) % ty, lz = tid / (tx * ty);
  for (const auto& g : L.order) {
    a.dispatch_quadgroups_per_threadgroup = (nt + 3) / 4;
    a.dispatch_simdgroups_per_threadgroup = (nt + kLanes - 1) / kLanes;
    for (int d = 0; d < 3; d++) {
      a.dispatch_threads_per_threadgroup[d] = L.group[d];
      a.grid_origin[d] = 0;
      a.grid_size[d] = L.grid[d];
      a.threadgroup_position_in_grid[d] = g[d];
      a.threadgroups_per_grid[d] = L.grid[d] / L.group[d];
      a.threads_per_grid[d] = L.grid[d];
      a.threads_per_threadgroup[d] = L.group[d];
    }
    a.thread_position_in_threadgroup[0] = lx;
    a.thread_position_in_threadgroup[1] = ly;
    a.thread_position_in_threadgroup[2] = lz;
    for (int d = 0; d < 3; d++) {
      a.thread_position_in_grid[d] = g[d] * L.group[d] + a.thread_position_in_threadgroup[d];
    }
    a.quadgroup_index_in_threadgroup = tid / 4;
    a.quadgroups_per_threadgroup = (nt + 3) / 4;
    a.simdgroup_index_in_threadgroup = tid / kLanes;
    a.simdgroups_per_threadgroup = (nt + kLanes - 1) / kLanes;
    a.thread_execution_width = kLanes;
    a.thread_index_in_quadgroup = tid % 4;
    a.thread_index_in_simdgroup = tid % kLanes;
    a.thread_index_in_threadgroup = tid;
    a.threads_per_simdgroup = kLanes;

    emu_entry(L.buffers.data(), &a);

    // Returned: leave this threadgroup's barriers.
    SimdGroup& s = *L.simd[ctx.simd];
    s.running[ctx.lane].store(false);
    (*L.tg_running)[tid].store(false);
    s.bar->arrive_and_drop();
    L.tg_bar->arrive_and_drop();
    between->arrive_and_wait();  // all done with this threadgroup; Reset readies the next
  }
}

}  // namespace

// half <-> float for clang's __fp16 (the library calls it emits; libgcc on x86 lacks them).
extern "C" float __gnu_h2f_ieee(unsigned short h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do {
      e++;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    bits = sign | uint32_t(112 - e) << 23 | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even, as Metal's float -> half conversion.
extern "C" unsigned short __gnu_f2h_ieee(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN
  if (abs >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to infinity
  if (abs < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    if (abs < 0x33000000u) return uint16_t(sign);  // below half the smallest subnormal
    const uint32_t man = (abs & 0x7fffffu) | 0x800000u;
    const int shift = 126 - int(abs >> 23);  // 14 + (113 - exp) - 1 ... in [14, 24]
    uint32_t v = man >> shift;
    const uint32_t rest = man & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (v & 1u))) v++;
    return uint16_t(sign | v);
  }
  uint32_t v = ((abs >> 23) - 112u) << 10 | ((abs >> 13) & 0x3ffu);
  const uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (v & 1u))) v++;
  return uint16_t(sign | v);
}

extern "C" void emu_register_shared(uintptr_t address, uint64_t nbytes) {
  std::lock_guard<std::mutex> lock(shared_mutex);
  auto* p = reinterpret_cast<unsigned char*>(address);
  for (auto& r : shared_regions) {
    if (r.first == p) return;
  }
  shared_regions.emplace_back(p, size_t(nbytes));
}

extern "C" uint32_t emu_lane(void) { return uint32_t(ctx.lane); }

extern "C" void emu_simd_exchange(uint64_t value, int op, uint64_t* all, uint32_t* active) {
  SimdGroup& s = *L.simd[ctx.simd];
  const int me = ctx.lane;
  s.value[me] = value;
  s.op[me] = op;
  s.count[me]++;
  s.bar->arrive_and_wait();
  uint32_t mask = 0;
  for (int i = 0; i < kLanes; i++) {
    if (s.running[i].load()) {
      mask |= 1u << i;
      if (s.op[i] != op || s.count[i] != s.count[me]) {
        char msg[160];
        std::snprintf(msg, sizeof msg,
                      "divergent SIMD op: lane %d at op %d (#%llu), lane %d at op %d (#%llu)", me,
                      op, (unsigned long long)s.count[me], i, s.op[i],
                      (unsigned long long)s.count[i]);
        fail(3, msg);
      }
    }
    all[i] = s.value[i];
  }
  *active = mask;
  s.bar->arrive_and_wait();  // nobody overwrites a slot before every lane has read it
}

extern "C" void emu_threadgroup_barrier(void) {
  const int me = ctx.tid;
  L.tg_count[me]++;
  L.tg_bar->arrive_and_wait();
  for (int t = 0; t < L.threads; t++) {
    if ((*L.tg_running)[t].load() && L.tg_count[t] != L.tg_count[me]) {
      fail(3, "threads of one threadgroup at different barriers");
    }
  }
  L.tg_bar->arrive_and_wait();
}

int main(int argc, char** argv) {
  if (argc != 2) fail(2, "usage: runtime MANIFEST");
  std::ifstream in(argv[1]);
  if (!in) fail(2, "cannot read manifest");
  std::string key;
  unsigned seed = 0, timeout = 60;
  struct Buf {
    size_t nbytes;
    std::string in, out;
    unsigned char* data;
  };
  std::vector<Buf> bufs;
  while (in >> key) {
    if (key == "grid") {
      in >> L.grid[0] >> L.grid[1] >> L.grid[2];
    } else if (key == "group") {
      in >> L.group[0] >> L.group[1] >> L.group[2];
    } else if (key == "seed") {
      in >> seed;
    } else if (key == "timeout") {
      in >> timeout;
    } else if (key == "buffer") {
      Buf b;
      in >> b.nbytes >> b.in >> b.out;
      bufs.push_back(b);
    } else {
      fail(2, "bad manifest key");
    }
  }
  alarm(timeout);
  for (int d = 0; d < 3; d++) {
    if (L.group[d] == 0 || L.grid[d] % L.group[d] != 0) {
      fail(2, "grid must be a multiple of the threadgroup (non-uniform groups not emulated)");
    }
  }
  for (auto& b : bufs) {
    const size_t size = ((b.nbytes + 63) / 64) * 64 + kGuard;
    b.data = static_cast<unsigned char*>(std::aligned_alloc(64, size));
    std::memset(b.data, 0xff, size);
    std::memset(b.data + b.nbytes, kCanary, size - b.nbytes);
    if (b.in != "-") {
      FILE* f = std::fopen(b.in.c_str(), "rb");
      if (!f || std::fread(b.data, 1, b.nbytes, f) != b.nbytes) fail(2, "cannot read input");
      std::fclose(f);
    }
    L.buffers.push_back(b.data);
  }
  for (uint32_t z = 0; z < L.grid[2] / L.group[2]; z++)
    for (uint32_t y = 0; y < L.grid[1] / L.group[1]; y++)
      for (uint32_t x = 0; x < L.grid[0] / L.group[0]; x++) L.order.push_back({x, y, z});
  if (seed != 0) {
    std::mt19937 rng(seed);
    std::shuffle(L.order.begin(), L.order.end(), rng);
  }
  L.threads = int(L.group[0] * L.group[1] * L.group[2]);
  L.n_simd = (L.threads + kLanes - 1) / kLanes;
  L.tg_count.assign(L.threads, 0);
  std::vector<std::atomic<bool>> running(L.threads);
  L.tg_running = &running;
  for (int i = 0; i < L.n_simd; i++) {
    auto s = std::make_unique<SimdGroup>();
    s->lanes = std::min(kLanes, L.threads - kLanes * i);
    L.simd.push_back(std::move(s));
  }
  reset_group();
  std::barrier<Reset> between(L.threads);
  std::vector<std::thread> pool;
  for (int t = 0; t < L.threads; t++) pool.emplace_back(worker, t, &between);
  for (auto& t : pool) t.join();

  for (auto& b : bufs) {
    const size_t size = ((b.nbytes + 63) / 64) * 64 + kGuard;
    for (size_t i = b.nbytes; i < size; i++) {
      if (b.data[i] != kCanary) fail(4, "a kernel wrote past the end of a buffer");
    }
    if (b.out != "-") {
      FILE* f = std::fopen(b.out.c_str(), "wb");
      if (!f || std::fwrite(b.data, 1, b.nbytes, f) != b.nbytes) fail(2, "cannot write output");
      std::fclose(f);
    }
  }
  return 0;
}
