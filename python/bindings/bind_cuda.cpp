// CUDA availability for Python: whether the build has the backend and which devices the runtime sees.
#include "bindings.h"

#include "lowbit/cuda.h"

void bind_cuda(py::module_& m) {
    m.def("cuda_info", []() {
        py::dict info;
        info["compiled"] = lowbit::cuda::compiled();
        py::list devices;
#ifdef LOWBIT_HAVE_CUDA
        std::string error;
        int n = lowbit::cuda::device_count(&error);
        for (int d = 0; d < n; ++d) {
            auto di = lowbit::cuda::device_info(d);
            py::dict dev;
            dev["index"] = d;
            dev["name"] = di.name;
            dev["total_memory"] = di.total_memory;
            dev["free_memory"] = di.free_memory;
            dev["compute_capability"] = py::make_tuple(di.compute_major, di.compute_minor);
            devices.append(dev);
        }
        info["error"] = n == 0 ? py::cast(error.empty() ? "no CUDA device found" : error) : py::none();
#else
        info["error"] = "this lowbit build has no CUDA backend (rebuild with LOWBIT_CUDA=ON and nvcc on PATH)";
#endif
        info["devices"] = devices;
        return info;
    }, "CUDA backend: compiled in?, devices visible to the runtime, and why none when none.");
}
