// Runs the project's CUDA kernels on the CPU, so that their logic (indexing, tails, the warp
// collectives, the tensor-core fragment layout, launch geometry) is tested where no GPU is.
//
// Include this first, then the kernel headers (csrc/cuda/*_kernels.cuh): it provides what nvcc
// would (__global__, __shared__, threadIdx, __syncthreads, __shfl_xor_sync, the float intrinsics,
// mma.m16n8k16) and `launch`, which runs a whole grid before it returns. The real cuda_bf16.h and
// cuda_fp16.h supply the 16-bit types and their host conversions.
//
// Execution model: the blocks of a grid run one after another; the threads of a block are
// coroutines (ucontext) on this thread, switched only at __syncthreads and at warp collectives,
// which complete when every live thread of the block (or lane of the warp) has arrived. So
// `__shared__` variables are function statics (one block at a time), and a barrier that some
// threads never reach, or a full-warp collective after some lanes exited, is reported as an error
// instead of hanging. Memory is plain host memory: the tests put guard pages after each buffer.
//
// Races: between two switch points a thread runs alone, so a race shows as a dependence on the
// order the scheduler picks. `schedule()` sets it: in order, or reversed (the threads of each
// block, and the blocks of each grid, in reverse), which flips the order of every pair of threads
// that meet between barriers, and of every pair of blocks; a kernel whose results differ between
// the two reads shared memory another thread writes without a barrier between them (or writes it
// twice), or depends on another block of its grid. And shared memory is filled with 0xff bytes (NaN
// in every float type) before each block, so a read of shared memory that no thread of the block
// wrote finds NaN, not the previous block's values.
// Not modelled: timing, the hardware's exact rounding inside mma (the products are exact; they
// and the accumulator are summed in double, then rounded once to float), and races in which a
// thread spins on another's writes (no kernel here does).
#pragma once

#define QLORA_CUDA_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <driver_types.h>
#include <ucontext.h>
#include <vector_types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// host_defines.h maps these to attributes that g++ ignores or warns about; here they mean:
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static  // one block runs at a time: a function static is its shared memory
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace qlora::emu {

inline constexpr int kWarpSize = 32;
inline constexpr size_t kStackBytes = 256 * 1024;

// The order in which threads run between barriers, and blocks run in a grid (see the top).
enum class Schedule { kInOrder, kReversed };
inline Schedule& schedule() {
  static Schedule s = Schedule::kInOrder;
  return s;
}

enum class State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Thread {
  uint3 index{};
  int warp = 0, lane = 0;
  State state = State::kReady;
  unsigned collectives = 0;  // warp collectives this thread has entered in this block
  ucontext_t context{};
  char* stack = nullptr;
};

// Per warp: the values lanes exchange in a collective (a shuffle: one 64-bit value per lane; an
// mma: 4 + 2 registers per lane), twice: the lanes' n-th collective uses set n % 2. A lane that
// has read its values and goes on to the next collective writes the other set, and cannot reach
// the one after (this set again) before every lane has arrived at the next, that is, has read
// this one: one wait per collective suffices.
struct WarpSlots {
  struct Exchange {
    uint64_t value[kWarpSize];
    uint32_t mma[kWarpSize][6];
  } set[2];
};

struct Block {
  std::string kernel;
  dim3 grid_dim{}, block_dim{}, block_idx{};
  std::vector<Thread> threads;
  std::vector<WarpSlots> warps;
  ucontext_t scheduler{};
  Thread* current = nullptr;
  std::function<void()> body;
};

inline Block*& running() {
  static Block* block = nullptr;
  return block;
}

[[noreturn]] inline void fail(const char* what) {
  const Block* b = running();
  if (b != nullptr && b->current != nullptr) {
    std::fprintf(stderr, "cuda emulator: %s in %s, block (%u,%u,%u), thread (%u,%u,%u)\n", what,
                 b->kernel.c_str(), b->block_idx.x, b->block_idx.y, b->block_idx.z,
                 b->current->index.x, b->current->index.y, b->current->index.z);
  } else {
    std::fprintf(stderr, "cuda emulator: %s\n", what);
  }
  std::abort();
}

inline Thread& current_thread() {
  Block* b = running();
  if (b == nullptr || b->current == nullptr) fail("a device function called outside a kernel");
  return *b->current;
}

// The `__shared__` variables: the function statics of the kernels (functions of qlora::cuda named
// *_kernel), found in the executable's symbol table (/proc/self/exe, with the load address from
// dl_iterate_phdr), since g++ puts no template's statics in a section of our choosing. Empty if
// the executable is stripped: the test checks that it is not.
struct SharedVariable {
  void* address;
  size_t bytes;
};

inline std::vector<SharedVariable> find_shared_variables() {
  std::vector<SharedVariable> found;
  FILE* f = std::fopen("/proc/self/exe", "rb");
  if (f == nullptr) return found;
  std::vector<char> image;
  char chunk[1 << 16];
  for (size_t n; (n = std::fread(chunk, 1, sizeof chunk, f)) > 0;) {
    image.insert(image.end(), chunk, chunk + n);
  }
  std::fclose(f);
  if (image.size() < sizeof(Elf64_Ehdr) || std::memcmp(image.data(), ELFMAG, SELFMAG) != 0 ||
      image[EI_CLASS] != ELFCLASS64) {
    return found;
  }
  uintptr_t load = 0;
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* out) {
        *static_cast<uintptr_t*>(out) = info->dlpi_addr;  // the first object is the executable
        return 1;
      },
      &load);
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(image.data());
  const auto* sh = reinterpret_cast<const Elf64_Shdr*>(image.data() + eh->e_shoff);
  for (int i = 0; i < eh->e_shnum; ++i) {
    if (sh[i].sh_type != SHT_SYMTAB) continue;
    const char* strings = image.data() + sh[sh[i].sh_link].sh_offset;
    const auto* sym = reinterpret_cast<const Elf64_Sym*>(image.data() + sh[i].sh_offset);
    for (size_t j = 0; j < sh[i].sh_size / sizeof(Elf64_Sym); ++j) {
      const char* mangled = strings + sym[j].st_name;
      if (ELF64_ST_TYPE(sym[j].st_info) != STT_OBJECT || sym[j].st_size == 0 ||
          std::strncmp(mangled, "_ZZN5qlora4cuda", 15) != 0) {  // a static local of qlora::cuda
        continue;
      }
      int status = 0;
      char* demangled = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
      if (status != 0 || demangled == nullptr) continue;
      const std::string name = demangled;  // "void qlora::cuda::f_kernel<...>(...)::variable"
      std::free(demangled);
      const std::string function = name.substr(0, name.find('('));
      if (function.find("_kernel") == std::string::npos) continue;
      found.push_back({reinterpret_cast<void*>(load + sym[j].st_value),
                       static_cast<size_t>(sym[j].st_size)});
    }
  }
  return found;
}

inline const std::vector<SharedVariable>& shared_variables() {
  static const std::vector<SharedVariable> variables = find_shared_variables();
  return variables;
}

// The exchange set of thread t's next warp collective (see WarpSlots).
inline WarpSlots::Exchange& exchange_of(Thread& t) {
  return running()->warps[t.warp].set[t.collectives++ % 2];
}

// Gives control back to the scheduler until the barrier this thread waits at completes.
inline void wait_at(State barrier) {
  Block& b = *running();
  Thread& t = *b.current;
  t.state = barrier;
  swapcontext(&t.context, &b.scheduler);
}

inline void syncthreads() { wait_at(State::kAtBlockBarrier); }

inline void sync_warp(unsigned mask) {
  if (mask != 0xffffffffu) fail("a warp collective with a partial mask (not emulated)");
  wait_at(State::kAtWarpBarrier);
}

inline void thread_entry() {
  Block& b = *running();
  b.body();
  b.current->state = State::kDone;
  swapcontext(&b.current->context, &b.scheduler);
}

// Runs every thread of block `b` to its end.
inline void run_block(Block& b) {
  const int nthreads = static_cast<int>(b.threads.size());
  for (int i = 0; i < nthreads; ++i) {
    Thread& t = b.threads[i];
    t.state = State::kReady;
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = t.stack;
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = nullptr;
    makecontext(&t.context, thread_entry, 0);
  }
  for (const SharedVariable& v : shared_variables()) std::memset(v.address, 0xff, v.bytes);
  for (Thread& t : b.threads) t.collectives = 0;
  const bool reversed = schedule() == Schedule::kReversed;
  for (;;) {
    bool ran = false;
    for (int i = 0; i < nthreads; ++i) {
      Thread& t = b.threads[reversed ? nthreads - 1 - i : i];
      if (t.state != State::kReady) continue;
      b.current = &t;
      swapcontext(&b.scheduler, &t.context);
      b.current = nullptr;
      ran = true;
    }
    // Every thread is done or waiting: release the barriers that are complete.
    int done = 0, at_block = 0;
    for (const Thread& t : b.threads) {
      done += t.state == State::kDone;
      at_block += t.state == State::kAtBlockBarrier;
    }
    if (done == nthreads) return;
    bool released = false;
    if (at_block + done == nthreads) {
      for (Thread& t : b.threads) {
        if (t.state == State::kAtBlockBarrier) t.state = State::kReady;
      }
      released = true;
    }
    for (int w0 = 0; w0 < nthreads; w0 += kWarpSize) {
      const int w1 = std::min(nthreads, w0 + kWarpSize);
      int waiting = 0, exited = 0;
      for (int i = w0; i < w1; ++i) {
        waiting += b.threads[i].state == State::kAtWarpBarrier;
        exited += b.threads[i].state == State::kDone;
      }
      if (waiting == 0) continue;
      if (waiting + exited != w1 - w0) continue;  // other lanes still at a block barrier
      if (exited > 0 || w1 - w0 < kWarpSize) {
        b.current = &b.threads[w0];
        fail("a full-warp collective with lanes that exited or do not exist");
      }
      for (int i = w0; i < w1; ++i) b.threads[i].state = State::kReady;
      released = true;
    }
    if (!ran && !released) {
      for (Thread& t : b.threads) {
        if (t.state != State::kDone) b.current = &t;
      }
      fail("deadlock: threads wait at different barriers (a divergent barrier or collective)");
    }
  }
}

// Stacks for `nthreads` threads, one buffer for every launch of every kernel, grown when a launch
// needs more (a new 256 MB per launch of 1024 threads would be mapped and faulted in each time).
inline char* thread_stacks(int64_t nthreads) {
  static std::unique_ptr<char[]> stacks;
  static int64_t capacity = 0;
  if (capacity < nthreads) {
    stacks.reset(new char[nthreads * kStackBytes]);
    capacity = nthreads;
  }
  return stacks.get();
}

// The kernel's name with its template arguments, from the executable's symbols (the test links
// with -rdynamic), for error reports.
inline std::string function_name(void* fn) {
  Dl_info info{};
  if (dladdr(fn, &info) == 0 || info.dli_sname == nullptr) return "a kernel (no symbol found)";
  int status = 0;
  char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  std::string name = status == 0 && demangled != nullptr ? demangled : info.dli_sname;
  std::free(demangled);
  return name;
}

// Runs kernel(args...) over the grid, block after block; returns when all are done.
template <typename... P, typename... A>
void launch_grid(void (*kernel)(P...), dim3 grid, dim3 block, A&&... args) {
  const std::string name = function_name(reinterpret_cast<void*>(kernel));
  static_assert(sizeof...(P) == sizeof...(A), "launch: one argument per kernel parameter");
  const int64_t nthreads = static_cast<int64_t>(block.x) * block.y * block.z;
  if (nthreads < 1 || nthreads > 1024 || grid.x < 1 || grid.y < 1 || grid.z < 1 ||
      grid.y > 65535 || grid.z > 65535) {
    std::fprintf(stderr, "cuda emulator: %s launched with grid (%u,%u,%u), block (%u,%u,%u)\n",
                 name.c_str(), grid.x, grid.y, grid.z, block.x, block.y, block.z);
    std::abort();
  }
  std::tuple<P...> values(std::forward<A>(args)...);  // as launchers.h converts them
  Block b;
  b.kernel = name;
  b.grid_dim = grid;
  b.block_dim = block;
  b.threads.resize(nthreads);
  b.warps.resize((nthreads + kWarpSize - 1) / kWarpSize);
  char* const stacks = thread_stacks(nthreads);
  for (int64_t i = 0; i < nthreads; ++i) {
    Thread& t = b.threads[i];
    t.index = {static_cast<unsigned>(i % block.x), static_cast<unsigned>(i / block.x % block.y),
               static_cast<unsigned>(i / (static_cast<int64_t>(block.x) * block.y))};
    t.warp = static_cast<int>(i / kWarpSize);
    t.lane = static_cast<int>(i % kWarpSize);
    t.stack = stacks + i * kStackBytes;
  }
  b.body = [&] { std::apply(kernel, values); };
  running() = &b;
  const int64_t nblocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  for (int64_t j = 0; j < nblocks; ++j) {
    const int64_t i = schedule() == Schedule::kReversed ? nblocks - 1 - j : j;
    b.block_idx = {static_cast<unsigned>(i % grid.x), static_cast<unsigned>(i / grid.x % grid.y),
                   static_cast<unsigned>(i / (static_cast<int64_t>(grid.x) * grid.y))};
    run_block(b);
  }
  running() = nullptr;
}

template <typename T>
T shfl_xor(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  Thread& t = current_thread();
  WarpSlots::Exchange& e = exchange_of(t);
  std::memcpy(&e.value[t.lane], &v, sizeof v);
  sync_warp(mask);
  T r;
  std::memcpy(&r, &e.value[(t.lane ^ lane_mask) % kWarpSize], sizeof r);
  return r;
}

inline float half_bits_to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: D (16 x 8) += A (16 x 16) B (16 x 8) for the
// whole warp, with the PTX ISA's fragment layout: lane = 4 g + t; A's registers hold (row, cols)
// (g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..2t+9), (g+8, 2t+8..); B's two hold (rows 2t..2t+1, col g)
// and (rows 2t+8..2t+9, col g); D's four are (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1). In each
// register the lower-indexed element is the low 16 bits.
template <typename T>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  constexpr bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  static_assert(bf16 || std::is_same_v<T, __half>);
  Thread& me = current_thread();
  WarpSlots::Exchange& w = exchange_of(me);
  std::memcpy(w.mma[me.lane], a, sizeof a);
  w.mma[me.lane][4] = b0;
  w.mma[me.lane][5] = b1;
  sync_warp(0xffffffffu);
  float A[16][16], B[16][8];
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const int g = lane / 4, t = lane % 4;
    const uint32_t* r = w.mma[lane];
    const int a_row[4] = {g, g + 8, g, g + 8}, a_col[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
    for (int i = 0; i < 4; ++i) {
      A[a_row[i]][a_col[i]] = half_bits_to_float(static_cast<uint16_t>(r[i]), bf16);
      A[a_row[i]][a_col[i] + 1] = half_bits_to_float(static_cast<uint16_t>(r[i] >> 16), bf16);
    }
    for (int i = 0; i < 2; ++i) {
      const int k = 2 * t + 8 * i;
      B[k][g] = half_bits_to_float(static_cast<uint16_t>(r[4 + i]), bf16);
      B[k + 1][g] = half_bits_to_float(static_cast<uint16_t>(r[4 + i] >> 16), bf16);
    }
  }
  const int g = me.lane / 4, t = me.lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
    double s = d[i];
    for (int k = 0; k < 16; ++k) s += static_cast<double>(A[row][k]) * B[k][col];
    d[i] = static_cast<float>(s);
  }
}

}  // namespace qlora::emu

// ---- what the kernels call -------------------------------------------------------------------

#define threadIdx (::qlora::emu::current_thread().index)
#define blockIdx (::qlora::emu::running()->block_idx)
#define blockDim (::qlora::emu::running()->block_dim)
#define gridDim (::qlora::emu::running()->grid_dim)

inline void __syncthreads() { qlora::emu::syncthreads(); }
[[noreturn]] inline void __trap() { qlora::emu::fail("__trap()"); }
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return qlora::emu::shfl_xor(mask, v, lane_mask);
}
template <typename T>
T __ldg(const T* p) {
  return *p;
}
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
// One IEEE rounding each (the tests are compiled with -ffp-contract=off, so no FMA is formed).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
using std::max;
using std::min;

namespace qlora::cuda {

template <typename T>
void emulated_mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::mma_m16n8k16<T>(d, a, b0, b1);
}

// What the kernel headers launch through (launchers.h on a GPU): runs the grid now; `stream` is
// ignored (everything is in order).
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t /*stream*/, A&&... args) {
  emu::launch_grid(kernel, grid, block, std::forward<A>(args)...);
}

}  // namespace qlora::cuda
