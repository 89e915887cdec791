// ThreadPool: persistent workers woken by a generation counter (spin first, then a condition variable).
#include "lowbit/threads.h"

#include <map>
#include <memory>

#include <algorithm>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#elif defined(__aarch64__)
static inline void cpu_relax() { asm volatile("yield" ::: "memory"); }
#else
static inline void cpu_relax() {}
#endif

namespace lowbit {

namespace {
// About 50-100 microseconds of spinning before a worker sleeps: long enough to bridge the gap
// between the matmuls of one decode step, short enough not to burn a core while the caller is idle.
constexpr int kSpinIterations = 20000;
// After this many pause-spins a waiter yields its time slice instead: when the machine has fewer free
// cores than pool threads, the thread being waited for may be descheduled, and spinning would burn
// the slice it needs (a decode step has hundreds of such waits).
constexpr int kSpinBeforeYield = 2000;

inline void backoff(int spin) {
    if (spin < kSpinBeforeYield) {
        cpu_relax();
    } else {
        std::this_thread::yield();
    }
}
}  // namespace

int ThreadPool::hardware_threads() {
    unsigned n = std::thread::hardware_concurrency();
    return n == 0 ? 1 : static_cast<int>(n);
}

ThreadPool::ThreadPool(int n_threads) {
    n_threads_ = n_threads > 0 ? n_threads : hardware_threads();
    workers_.reserve(n_threads_ - 1);
    for (int i = 1; i < n_threads_; ++i) workers_.emplace_back(&ThreadPool::worker, this, i);
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_.store(true);
        generation_.fetch_add(1);
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
}

void ThreadPool::worker(int ith) {
    uint64_t seen = 0;
    for (;;) {
        uint64_t gen = generation_.load(std::memory_order_acquire);
        for (int spin = 0; gen == seen && spin < kSpinIterations; ++spin) {
            backoff(spin);
            gen = generation_.load(std::memory_order_acquire);
        }
        if (gen == seen) {
            std::unique_lock<std::mutex> lock(mutex_);
            wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
            gen = generation_.load(std::memory_order_acquire);
        }
        seen = gen;
        if (stop_.load()) return;
        try {
            (*job_)(ith, n_threads_);
        } catch (...) {
            std::lock_guard<std::mutex> lock(error_mutex_);
            if (!error_) error_ = std::current_exception();
        }
        pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
}

void ThreadPool::run(const std::function<void(int, int)>& fn) {
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    if (n_threads_ == 1) {
        fn(0, 1);
        return;
    }
    error_ = nullptr;
    job_ = &fn;
    pending_.store(n_threads_ - 1, std::memory_order_release);
    {
        std::lock_guard<std::mutex> lock(mutex_);
        generation_.fetch_add(1, std::memory_order_acq_rel);
    }
    wake_.notify_all();
    try {
        fn(0, n_threads_);
    } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex_);
        if (!error_) error_ = std::current_exception();
    }
    for (int spin = 0; pending_.load(std::memory_order_acquire) != 0; ++spin) backoff(spin);
    job_ = nullptr;
    if (error_) {
        std::exception_ptr e = error_;
        error_ = nullptr;
        std::rethrow_exception(e);
    }
}

void ThreadPool::parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    if (n <= 0) return;
    grain = std::max<int64_t>(grain, 1);
    int64_t max_chunks = (n + grain - 1) / grain;
    if (n_threads_ == 1 || max_chunks == 1) {
        fn(0, n);
        return;
    }
    run([&](int ith, int nth) {
        int64_t chunks = std::min<int64_t>(nth, max_chunks);
        if (ith >= chunks) return;
        int64_t per = n / chunks, rem = n % chunks;
        int64_t begin = ith * per + std::min<int64_t>(ith, rem);
        int64_t end = begin + per + (ith < rem ? 1 : 0);
        fn(begin, end);
    });
}

ThreadPool& shared_thread_pool(int n_threads) {
    static std::mutex mu;
    static std::map<int, std::unique_ptr<ThreadPool>> pools;
    if (n_threads <= 0) n_threads = ThreadPool::hardware_threads();
    std::lock_guard<std::mutex> lock(mu);
    std::unique_ptr<ThreadPool>& p = pools[n_threads];
    if (!p) p = std::make_unique<ThreadPool>(n_threads);
    return *p;
}

}  // namespace lowbit
