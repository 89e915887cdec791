// The CUDA backend's host-side interface. Present in every build; in a build without CUDA
// (LOWBIT_HAVE_CUDA undefined) only compiled() is meaningful and it returns false.
#pragma once

#include <cstddef>
#include <string>

#include "lowbit/types.h"

namespace lowbit {
namespace cuda {

constexpr bool compiled() {
#ifdef LOWBIT_HAVE_CUDA
    return true;
#else
    return false;
#endif
}

struct DeviceInfo {
    std::string name;
    size_t total_memory = 0;
    size_t free_memory = 0;
    int compute_major = 0;
    int compute_minor = 0;
};

#ifdef LOWBIT_HAVE_CUDA
// Number of usable devices; 0 (and the driver's reason in *error) when there is no driver or GPU.
int device_count(std::string* error);
DeviceInfo device_info(int device);
#endif

}  // namespace cuda
}  // namespace lowbit
