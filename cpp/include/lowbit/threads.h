// A persistent thread pool for the kernels: workers spin briefly, then sleep, between jobs, so a decode
// step pays no thread creation and little wake-up latency.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace lowbit {

class ThreadPool {
public:
    // n_threads <= 0: all hardware threads.
    explicit ThreadPool(int n_threads = 0);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return n_threads_; }

    // Run fn(ith, nth) once on every thread (the caller is thread 0) and return when all are done.
    // An exception thrown by any fn is rethrown here (the first one wins).
    void run(const std::function<void(int ith, int nth)>& fn);

    // Split [0, n) into contiguous ranges of at least `grain` items, one or more per thread.
    void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t begin, int64_t end)>& fn);

    static int hardware_threads();

private:
    void worker(int ith);

    int n_threads_;
    std::vector<std::thread> workers_;
    const std::function<void(int, int)>* job_ = nullptr;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int> pending_{0};
    std::atomic<bool> stop_{false};
    std::mutex mutex_;
    std::condition_variable wake_;
    std::mutex run_mutex_;  // one job at a time per pool
    std::exception_ptr error_;
    std::mutex error_mutex_;
};

// A process-wide pool of n_threads threads (<= 0: all hardware threads), created on first use and kept
// for the life of the process: quantize()/dequantize() and the bindings' kernel entry points share them.
ThreadPool& shared_thread_pool(int n_threads);

}  // namespace lowbit
