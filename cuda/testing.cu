// Kernel-level entry points for tests and benchmarks: host buffers in, one kernel path, host buffers out.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common.cuh"

namespace lowbit {
namespace cuda {
namespace testing {
namespace {

// A device buffer freed on scope exit (also when a check throws).
struct DeviceBuffer {
    void* ptr = nullptr;
    explicit DeviceBuffer(size_t bytes) {
        if (bytes > 0) LB_CUDA(cudaMalloc(&ptr, bytes));
    }
    ~DeviceBuffer() {
        if (ptr) cudaFree(ptr);
    }
    DeviceBuffer(DeviceBuffer&& other) noexcept : ptr(other.ptr) { other.ptr = nullptr; }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    template <typename T>
    T* as() const {
        return static_cast<T*>(ptr);
    }
};

DeviceBuffer upload(const void* src, size_t bytes) {
    DeviceBuffer b(bytes);
    if (bytes > 0) LB_CUDA(cudaMemcpy(b.ptr, src, bytes, cudaMemcpyHostToDevice));
    return b;
}

void download(void* dst, const DeviceBuffer& b, size_t bytes) {
    LB_CUDA(cudaDeviceSynchronize());
    if (bytes > 0) LB_CUDA(cudaMemcpy(dst, b.ptr, bytes, cudaMemcpyDeviceToHost));
}

size_t flat_bytes(QType t, int64_t n) {
    if (t == QType::NF4_DQ) throw Error("CUDA dequantize: NF4_DQ has no device layout; expand it to NF4 first");
    return device_row_bytes(t, n);
}

}  // namespace

void dequantize(QType t, const void* src, int64_t n, float* dst) {
    if (n <= 0) return;
    DeviceBuffer s = upload(src, flat_bytes(t, n));
    DeviceBuffer d(static_cast<size_t>(n) * 4);
    launch_dequantize(t, s.ptr, n, d.as<float>(), nullptr);
    download(dst, d, static_cast<size_t>(n) * 4);
}

void dequantize_f16(QType t, const void* src, int64_t n, uint16_t* dst) {
    if (n <= 0) return;
    DeviceBuffer s = upload(src, flat_bytes(t, n));
    DeviceBuffer d(static_cast<size_t>(n) * 2);
    launch_dequantize_f16(t, s.ptr, n, d.as<__half>(), nullptr);
    download(dst, d, static_cast<size_t>(n) * 2);
}

void quantize_act(const float* x, int64_t n_tok, int64_t k, block_q8_act* dst) {
    const size_t n = static_cast<size_t>(n_tok * k);
    if (n == 0) return;
    if (k % 32 != 0) throw Error("CUDA quantize_act: row length " + std::to_string(k) + " is not a multiple of 32");
    DeviceBuffer xs = upload(x, n * 4);
    DeviceBuffer ys(n / 32 * sizeof(block_q8_act));
    launch_quantize_act(xs.as<float>(), n_tok, k, ys.as<block_q8_act>(), nullptr);
    download(dst, ys, n / 32 * sizeof(block_q8_act));
}

void matmul(const Matrix& w, const float* x, int64_t n_tok, float* y, MatmulPath path) {
    if (n_tok <= 0) return;
    std::vector<block_nf4> expanded;
    DevMatrix dm;
    const void* src = device_layout(w, expanded, &dm.type);
    dm.n_rows = w.n_rows;
    dm.n_cols = w.n_cols;
    dm.row_bytes = device_row_bytes(dm.type, w.n_cols);
    DeviceBuffer wd = upload(src, static_cast<size_t>(w.n_rows) * dm.row_bytes);
    dm.data = wd.as<uint8_t>();
    DeviceBuffer xd = upload(x, static_cast<size_t>(n_tok * w.n_cols) * 4);
    DeviceBuffer yd(static_cast<size_t>(n_tok * w.n_rows) * 4);
    switch (path) {
        case MatmulPath::MatvecInt8: {
            if (!matvec_int8_supported(dm.type)) {
                throw Error("CUDA matmul: MatvecInt8 supports quantized weights only (F32/F16/BF16 use MatvecFloat)");
            }
            const int64_t nb = w.n_cols / 32;
            DeviceBuffer act(static_cast<size_t>(n_tok * nb) * sizeof(block_q8_act));
            launch_quantize_act(xd.as<float>(), n_tok, w.n_cols, act.as<block_q8_act>(), nullptr);
            for (int64_t t = 0; t < n_tok; ++t) {
                launch_matvec_int8(dm, act.as<block_q8_act>() + t * nb, yd.as<float>() + t * w.n_rows, false, nullptr);
            }
            download(y, yd, static_cast<size_t>(n_tok * w.n_rows) * 4);
            return;
        }
        case MatmulPath::MatvecFloat:
            for (int64_t t = 0; t < n_tok; ++t) {
                launch_matvec_f32(dm, xd.as<float>() + t * w.n_cols, yd.as<float>() + t * w.n_rows, false, nullptr);
            }
            break;
        case MatmulPath::Gemm:
            launch_gemm(dm, xd.as<float>(), n_tok, yd.as<float>(), false, nullptr);
            break;
    }
    download(y, yd, static_cast<size_t>(n_tok * w.n_rows) * 4);
}

void rmsnorm(const float* x, const float* weight, int64_t n_rows, int64_t n, float eps, float* y) {
    const size_t bytes = static_cast<size_t>(n_rows * n) * 4;
    if (bytes == 0) return;
    DeviceBuffer xd = upload(x, bytes);
    DeviceBuffer wd = upload(weight, static_cast<size_t>(n) * 4);
    DeviceBuffer yd(bytes);
    launch_rmsnorm(xd.as<float>(), wd.as<float>(), n_rows, n, eps, yd.as<float>(), nullptr);
    download(y, yd, bytes);
}

void head_norm(float* x, const float* weight, int64_t n_rows, int n, float eps) {
    const size_t bytes = static_cast<size_t>(n_rows) * n * 4;
    if (bytes == 0) return;
    DeviceBuffer xd = upload(x, bytes);
    DeviceBuffer wd = upload(weight, static_cast<size_t>(n) * 4);
    launch_head_norm(xd.as<float>(), wd.as<float>(), n_rows, n, eps, nullptr);
    download(x, xd, bytes);
}

void rope(float* x, int n_tok, int n_heads, int head_dim, int rope_dim, int pos0, const float* inv_freq,
          RopeMode mode, float mscale) {
    const size_t bytes = static_cast<size_t>(n_tok) * n_heads * head_dim * 4;
    if (bytes == 0) return;
    if (rope_dim <= 0 || rope_dim % 2 != 0 || rope_dim > head_dim) {
        throw Error("CUDA rope: rope_dim must be even and in 2..head_dim");
    }
    DeviceBuffer fd = upload(inv_freq, static_cast<size_t>(rope_dim / 2) * 4);
    DeviceBuffer cs(static_cast<size_t>(n_tok) * rope_dim * 4);
    DeviceBuffer xd = upload(x, bytes);
    launch_rope_table(fd.as<float>(), n_tok, rope_dim, pos0, mscale, cs.as<float>(), nullptr);
    launch_rope(xd.as<float>(), n_tok, n_heads, head_dim, rope_dim, mode, cs.as<float>(), nullptr);
    download(x, xd, bytes);
}

void attention(const float* q, const float* k, const float* v, int n_tok, int n_past, int n_head, int n_head_kv,
               int head_dim, int window, float scale, float* out) {
    if (n_tok <= 0) return;
    const int n_kv = n_past + n_tok;
    const int kv_dim = n_head_kv * head_dim;
    const size_t q_bytes = static_cast<size_t>(n_tok) * n_head * head_dim * 4;
    const size_t kv_bytes = static_cast<size_t>(n_kv) * kv_dim * 4;
    DeviceBuffer qd = upload(q, q_bytes);
    DeviceBuffer kd = upload(k, kv_bytes);
    DeviceBuffer vd = upload(v, kv_bytes);
    DeviceBuffer kc(static_cast<size_t>(n_kv) * kv_dim * 2);
    DeviceBuffer vc(static_cast<size_t>(n_kv) * kv_dim * 2);
    DeviceBuffer od(q_bytes);
    launch_store_kv(kd.as<float>(), vd.as<float>(), n_kv, kv_dim, 0, kc.as<__half>(), vc.as<__half>(), nullptr);
    launch_attention(qd.as<float>(), kc.as<__half>(), vc.as<__half>(), n_tok, n_past, n_head, n_head_kv, head_dim,
                     window, scale, od.as<float>(), nullptr);
    download(out, od, q_bytes);
}

void gated_act(GatedAct act, const float* gate, const float* up, int64_t n, float* out) {
    if (n <= 0) return;
    DeviceBuffer gd = upload(gate, static_cast<size_t>(n) * 4);
    DeviceBuffer ud = upload(up, static_cast<size_t>(n) * 4);
    DeviceBuffer od(static_cast<size_t>(n) * 4);
    launch_gated_act(act, gd.as<float>(), ud.as<float>(), n, od.as<float>(), nullptr);
    download(out, od, static_cast<size_t>(n) * 4);
}

double copy_bandwidth(size_t bytes, int reps) {
    if (bytes == 0 || reps <= 0) throw Error("copy_bandwidth: bytes and reps must be positive");
    DeviceBuffer a(bytes);
    DeviceBuffer b(bytes);
    LB_CUDA(cudaMemset(a.ptr, 1, bytes));
    LB_CUDA(cudaMemcpy(b.ptr, a.ptr, bytes, cudaMemcpyDeviceToDevice));  // warm-up
    cudaEvent_t start, stop;
    LB_CUDA(cudaEventCreate(&start));
    LB_CUDA(cudaEventCreate(&stop));
    std::vector<double> seconds;
    for (int r = 0; r < reps; ++r) {
        cudaEventRecord(start);
        cudaMemcpy(b.ptr, a.ptr, bytes, cudaMemcpyDeviceToDevice);
        cudaEventRecord(stop);
        cudaEventSynchronize(stop);
        float ms = 0.0f;
        cudaEventElapsedTime(&ms, start, stop);
        seconds.push_back(ms * 1e-3);
    }
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    LB_CUDA(cudaGetLastError());
    std::sort(seconds.begin(), seconds.end());
    const double median = seconds[seconds.size() / 2];
    // A device-to-device copy reads and writes every byte once.
    return 2.0 * static_cast<double>(bytes) / median;
}

}  // namespace testing
}  // namespace cuda
}  // namespace lowbit
