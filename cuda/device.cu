// CUDA device queries: how many GPUs the runtime sees, their names and memory.
#include <cuda_runtime.h>

#include <string>

#include "lowbit/cuda.h"

namespace lowbit {
namespace cuda {

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
