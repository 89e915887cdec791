// The KV cache of the CPU blocks: a ring of rows per block (see kv_cache.h).
#include "kv_cache.h"

#include <algorithm>
#include <cstring>

#include "lowbit/types.h"

namespace lowbit {

KvCache::KvCache(const std::vector<int>& capacity, int64_t kv_dim, bool f16)
    : capacity_(capacity), kv_dim_(kv_dim), elem_bytes_(f16 ? 2 : 4),
      row_bytes_(static_cast<size_t>(kv_dim) * elem_bytes_) {
    size_t rows = 0;
    for (int cap : capacity_) {
        offset_.push_back(rows * row_bytes_);
        rows += static_cast<size_t>(cap);
    }
    k_ = OwnedBuffer(rows * row_bytes_, OwnedBuffer::kCache);
    v_ = OwnedBuffer(rows * row_bytes_, OwnedBuffer::kCache);
}

void KvCache::store_rows(uint8_t* dst, const float* src, int n) {
    if (f16()) {
        uint16_t* h = reinterpret_cast<uint16_t*>(dst);
        for (int64_t e = 0; e < n * kv_dim_; ++e) h[e] = fp32_to_fp16(src[e]);
    } else {
        std::memcpy(dst, src, n * row_bytes_);
    }
}

// fn(done, at, run) for the runs of rows that positions pos0 .. pos0+n-1 of slot occupy: at most two, up to
// the end of the ring and then from its start; `at` is the run's first byte in k_ / v_.
template <class Fn>
void KvCache::each_run(int slot, int pos0, int n, Fn fn) const {
    const int cap = capacity_[slot];
    for (int done = 0; done < n;) {
        const int row = (pos0 + done) % cap;
        const int run = std::min(n - done, cap - row);
        fn(done, offset_[slot] + static_cast<size_t>(row) * row_bytes_, run);
        done += run;
    }
}

void KvCache::copy_out(int slot, int pos0, int n, uint8_t* k, uint8_t* v) const {
    each_run(slot, pos0, n, [&](int done, size_t at, int run) {
        std::memcpy(k + done * row_bytes_, k_.data() + at, run * row_bytes_);
        std::memcpy(v + done * row_bytes_, v_.data() + at, run * row_bytes_);
    });
}

void KvCache::copy_in(int slot, int pos0, int n, const uint8_t* k, const uint8_t* v) {
    each_run(slot, pos0, n, [&](int done, size_t at, int run) {
        std::memcpy(k_.data() + at, k + done * row_bytes_, run * row_bytes_);
        std::memcpy(v_.data() + at, v + done * row_bytes_, run * row_bytes_);
    });
}

void KvCache::store(int slot, int pos0, int n, const float* k, const float* v) {
    each_run(slot, pos0, n, [&](int done, size_t at, int run) {
        store_rows(k_.data() + at, k + done * kv_dim_, run);
        store_rows(v_.data() + at, v + done * kv_dim_, run);
    });
}

}  // namespace lowbit
