// Private to the core: the keys and values of the CPU blocks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "weights.h"

namespace lowbit {

// K and V of the CPU blocks, fp32 or fp16, one ring of rows per block: position p lives in row
// p % capacity(slot). A block that attends to every position holds n_ctx rows; a sliding-window block
// holds only what a chunk of n_batch tokens can reach (window + n_batch - 1 rows, at most n_ctx), so its
// memory stays fixed however long the context grows.
class KvCache {
public:
    // capacity: rows per slot (CPU block), each >= 1.
    KvCache(const std::vector<int>& capacity, int64_t kv_dim, bool f16);
    bool f16() const { return elem_bytes_ == 2; }
    size_t elem_bytes() const { return elem_bytes_; }
    size_t row_bytes() const { return row_bytes_; }
    int capacity(int slot) const { return capacity_[slot]; }
    const uint8_t* k(int slot) const { return k_.data() + offset_[slot]; }
    const uint8_t* v(int slot) const { return v_.data() + offset_[slot]; }
    // Positions pos0 .. pos0+n-1 of slot = k, v (n, kv_dim) fp32; n <= capacity(slot).
    void store(int slot, int pos0, int n, const float* k, const float* v);
    uint64_t bytes() const { return k_.size() + v_.size(); }
    int n_slots() const { return static_cast<int>(capacity_.size()); }
    // The stored rows of positions pos0 .. pos0+n-1 of slot, as they are (row_bytes each), in position order
    // (saved state); n <= capacity(slot).
    void copy_out(int slot, int pos0, int n, uint8_t* k, uint8_t* v) const;
    void copy_in(int slot, int pos0, int n, const uint8_t* k, const uint8_t* v);

private:
    void store_rows(uint8_t* dst, const float* src, int n);
    template <class Fn>
    void each_run(int slot, int pos0, int n, Fn fn) const;

    OwnedBuffer k_, v_;
    std::vector<int> capacity_;
    std::vector<size_t> offset_;  // bytes from the start of k_ / v_ to each slot's first row
    int64_t kv_dim_;
    size_t elem_bytes_;
    size_t row_bytes_;
};

}  // namespace lowbit
