// lowbit._core: the pybind11 module over the C++ core. Every lowbit::Error becomes lowbit.LowbitError.
#include "bindings.h"

#include <string>

#include "lowbit/kernels.h"
#include "lowbit/types.h"

py::handle g_lowbit_error;

namespace {

py::dict build_info() {
    py::dict info;
    py::list compiled;
    std::string isas = lowbit::cpu::compiled_isas();
    size_t start = 0;
    while (start <= isas.size()) {
        size_t comma = isas.find(',', start);
        if (comma == std::string::npos) comma = isas.size();
        if (comma > start) compiled.append(isas.substr(start, comma - start));
        start = comma + 1;
    }
    info["cpu_isas_compiled"] = compiled;
    py::list runnable;
    for (auto isa : {lowbit::cpu::Isa::Generic, lowbit::cpu::Isa::AVX2, lowbit::cpu::Isa::AVX512,
                     lowbit::cpu::Isa::NEON}) {
        if (lowbit::cpu::kernels_for(isa)) runnable.append(lowbit::cpu::isa_name(isa));
    }
    info["cpu_isas_runnable"] = runnable;
    try {
        info["cpu_isa_active"] = lowbit::cpu::kernels().name;
    } catch (const lowbit::Error& e) {
        info["cpu_isa_active"] = py::none();
        info["cpu_isa_error"] = e.what();
    }
#ifdef LOWBIT_HAVE_CUDA
    info["cuda_compiled"] = true;
#else
    info["cuda_compiled"] = false;
#endif
#ifdef NDEBUG
    info["build_type"] = "release";
#else
    info["build_type"] = "debug";
#endif
    return info;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "lowbit C++ core";
    // ValueError base: every lowbit error is about bad input (a file, a type, an argument).
    g_lowbit_error = py::register_exception<lowbit::Error>(m, "LowbitError", PyExc_ValueError);
    m.def("build_info", &build_info, "Which CPU ISAs were compiled and can run here, and whether CUDA is in the build.");
    bind_quants(m);
    bind_gguf(m);
    bind_kernels(m);
    bind_model(m);
    bind_cuda(m);
}
