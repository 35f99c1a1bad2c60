// ParallelFor: the work-sharing scheme of jaxllm's C++ CPU kernels (jaxllm/ffi_build.py builds
// them with this directory on the include path).
//
// fn(i) runs once for every i in [0, n). Indices are claimed one at a time from a shared counter
// by the calling thread and by helper tasks on XLA's intra-op pool. The caller never waits for a
// task to *start* (the pool's threads may all be busy, e.g. running other devices' steps, which
// would deadlock), only for indices a running thread has claimed to finish. The state is
// shared-owned, so a task that starts after the call returned finds no index left and calls
// nothing: fn must hold by value whatever it reads (raw pointers into the call's buffers are
// fine, they are only dereferenced while the call runs).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jaxllm {

template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, Fn fn) {
  struct Shared {
    explicit Shared(Fn f) : fn(std::move(f)) {}
    Fn fn;
    std::atomic<int64_t> next{0}, done{0};
  };
  auto shared = std::make_shared<Shared>(std::move(fn));
  auto run = [n](Shared& sh) {
    for (int64_t i; (i = sh.next.fetch_add(1)) < n;) {
      sh.fn(i);
      sh.done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), n));
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([shared, run] { run(*shared); });
  run(*shared);
  while (shared->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace jaxllm
