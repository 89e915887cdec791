// CUDA device queries (how many GPUs the runtime sees, their names and memory) and error reporting.
#include <cuda_runtime.h>

#include <string>

#include "common.cuh"
#include "lowbit/cuda.h"

namespace lowbit {
namespace cuda {

void throw_cuda(cudaError_t err, const char* what, const char* file, int line) {
    cudaGetLastError();  // clear a non-sticky error so the next call starts clean
    std::string msg = std::string("CUDA error: ") + cudaGetErrorString(err) + " in " + what + " (" + file + ":" +
                      std::to_string(line) + ")";
    if (err == cudaErrorMemoryAllocation) {
        msg += "; the GPU is out of memory: offload fewer layers (n_gpu_layers), or use a smaller n_ctx or n_batch";
    } else if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
        msg += "; no usable GPU: run with n_gpu_layers=0 or install/upgrade the NVIDIA driver";
    } else if (err == cudaErrorNoKernelImageForDevice) {
        msg += "; this build has no kernels for this GPU's architecture: rebuild with "
               "CMAKE_CUDA_ARCHITECTURES including it";
    }
    throw Error(msg);
}

int device_count(std::string* error) {
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
        if (error) *error = cudaGetErrorString(err);
        cudaGetLastError();  // clear the sticky error so later calls start clean
        return 0;
    }
    return n;
}

DeviceInfo device_info(int device) {
    DeviceInfo info;
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
        cudaGetLastError();
        throw Error("CUDA: cannot query device " + std::to_string(device));
    }
    info.name = prop.name;
    info.total_memory = prop.totalGlobalMem;
    info.compute_major = prop.major;
    info.compute_minor = prop.minor;
    size_t free_b = 0, total_b = 0;
    int prev = 0;
    cudaGetDevice(&prev);
    if (cudaSetDevice(device) == cudaSuccess && cudaMemGetInfo(&free_b, &total_b) == cudaSuccess) {
        info.free_memory = free_b;
    } else {
        cudaGetLastError();
    }
    cudaSetDevice(prev);
    return info;
}

}  // namespace cuda
}  // namespace lowbit
