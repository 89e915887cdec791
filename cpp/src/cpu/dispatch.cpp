// Run-time choice of the CPU kernel table: cpuid + OS register-state checks, LOWBIT_ISA override, set_isa.
#include <atomic>
#include <cstddef>
#include <memory>
#include <utility>
#include <vector>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "cpu/kernels_internal.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

#ifndef LOWBIT_ISAS_BUILT
#define LOWBIT_ISAS_BUILT "generic"
#endif

namespace lowbit {
namespace cpu {

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::Generic: return "generic";
        case Isa::AVX2: return "avx2";
        case Isa::AVX512: return "avx512";
        case Isa::NEON: return "neon";
    }
    return "unknown";
}

bool parse_isa(const char* name, Isa* out) {
    for (Isa isa : {Isa::Generic, Isa::AVX2, Isa::AVX512, Isa::NEON}) {
        if (std::strcmp(name, isa_name(isa)) == 0) {
            *out = isa;
            return true;
        }
    }
    return false;
}

namespace {

#if defined(__x86_64__) || defined(_M_X64)
// XCR0: which register states the OS saves on a context switch. The CPU may support AVX-512 while the
// OS (or hypervisor) leaves the ZMM state off, and then the instructions fault.
uint64_t read_xcr0() {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return 0;  // OSXSAVE
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (static_cast<uint64_t>(hi) << 32) | lo;
}

bool cpu_has_f16c() {
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
}

bool os_saves_avx() { return (read_xcr0() & 0x6) == 0x6; }           // SSE + AVX state
bool os_saves_avx512() { return (read_xcr0() & 0xe6) == 0xe6; }      // + opmask, ZMM0-15 high, ZMM16-31
#endif

bool can_run(Isa isa, bool* variant) {
    *variant = false;
    switch (isa) {
        case Isa::Generic: return true;
        case Isa::AVX2:
#if defined(LOWBIT_HAVE_AVX2) && (defined(__x86_64__) || defined(_M_X64))
            __builtin_cpu_init();
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c() &&
                   __builtin_cpu_supports("bmi2") && os_saves_avx();
#else
            return false;
#endif
        case Isa::AVX512:
#if defined(LOWBIT_HAVE_AVX512) && (defined(__x86_64__) || defined(_M_X64))
            __builtin_cpu_init();
            *variant = __builtin_cpu_supports("avx512vnni");
            return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                   __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c() &&
                   __builtin_cpu_supports("bmi2") && os_saves_avx() && os_saves_avx512();
#else
            return false;
#endif
        case Isa::NEON:
#if defined(LOWBIT_HAVE_NEON) && defined(__aarch64__)
#if defined(__linux__)
            *variant = (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#endif
            return true;  // Advanced SIMD is mandatory on AArch64.
#else
            return false;
#endif
    }
    return false;
}

// A table as compiled in its ISA's file.
const Kernels* raw_table_for(Isa isa) {
    bool variant = false;
    if (!can_run(isa, &variant)) return nullptr;
    switch (isa) {
        case Isa::Generic: return generic_kernels();
#ifdef LOWBIT_HAVE_AVX2
        case Isa::AVX2: return avx2_kernels();
#endif
#ifdef LOWBIT_HAVE_AVX512
        case Isa::AVX512: return variant ? avx512vnni_kernels() : avx512_kernels();
#endif
#ifdef LOWBIT_HAVE_NEON
        case Isa::NEON: return variant ? neondot_kernels() : neon_kernels();
#endif
        default: return nullptr;
    }
}

// A table with the generic entries filled in where its ISA has no kernel for a type (TypeOps' rule), and the
// name of the ISA each entry came from.
struct MergedTable {
    Kernels k;
    const char* dot_isa[kNumQTypes];
    const char* quantize_isa[kNumQTypes];
};

MergedTable merge(const Kernels& own, const Kernels& generic) {
    MergedTable m{own, {}, {}};
    if (!m.k.gelu_mul) m.k.gelu_mul = generic.gelu_mul;
    if (!m.k.weighted_rows) m.k.weighted_rows = generic.weighted_rows;
    if (!m.k.attn_scores) m.k.attn_scores = generic.attn_scores;
    for (int i = 0; i < kNumQTypes; ++i) {
        TypeOps& o = m.k.ops[i];
        m.dot_isa[i] = o.dot ? own.name : "generic";
        if (!o.dot) o.dot = generic.ops[i].dot;
        if (!o.dot) m.dot_isa[i] = "none";
        m.quantize_isa[i] = o.quantize_row ? own.name : "generic";
        if (!o.quantize_row && generic.ops[i].quantize_row) o.quantize_row = generic.ops[i].quantize_row;
    }
    return m;
}

const MergedTable* merged_for(const Kernels* raw) {
    if (raw == nullptr) return nullptr;
    // One merged copy per compiled table (at most a handful), built on first use and kept.
    static std::mutex mu;
    static std::vector<std::pair<const Kernels*, std::unique_ptr<MergedTable>>> cache;
    std::lock_guard<std::mutex> lock(mu);
    for (auto& e : cache)
        if (e.first == raw) return e.second.get();
    cache.emplace_back(raw, std::make_unique<MergedTable>(merge(*raw, *generic_kernels())));
    return cache.back().second.get();
}

const MergedTable* merged_table_for(Isa isa) { return merged_for(raw_table_for(isa)); }

const Kernels* table_for(Isa isa) {
    const MergedTable* m = merged_table_for(isa);
    return m ? &m->k : nullptr;
}

const MergedTable& merged_of(const Kernels& k);

const Kernels* best_available() {
    for (Isa isa : {Isa::AVX512, Isa::AVX2, Isa::NEON}) {
        if (const Kernels* k = table_for(isa)) return k;
    }
    return table_for(Isa::Generic);
}

// The merged table that holds k (k is always one of them: kernels() hands out merged tables only).
const MergedTable& merged_of(const Kernels& k) {
    static_assert(offsetof(MergedTable, k) == 0, "MergedTable must start with its Kernels");
    return *reinterpret_cast<const MergedTable*>(&k);
}

int checked_index(QType t) {
    const int i = qtype_index(t);
    if (i < 0) {
        throw Error("tensor type id " + std::to_string(static_cast<uint32_t>(t)) +
                    " is not one lowbit computes with (lowbit/qtypes.def lists them)");
    }
    return i;
}

// The table chosen from LOWBIT_ISA (read once) or the CPU; set_isa replaces it.
std::atomic<const Kernels*> g_active{nullptr};
std::once_flag g_default_once;
const Kernels* g_default = nullptr;
std::string g_default_error;

void resolve_default() {
    const char* env = std::getenv("LOWBIT_ISA");
    if (env == nullptr || *env == '\0') {
        g_default = best_available();
        return;
    }
    Isa isa;
    if (!parse_isa(env, &isa)) {
        g_default_error = std::string("LOWBIT_ISA=") + env +
                          " is not an ISA name; use one of generic, avx2, avx512, neon (or unset it)";
        return;
    }
    g_default = table_for(isa);
    if (g_default == nullptr) {
        g_default_error = std::string("LOWBIT_ISA=") + env + " names an ISA this build or CPU cannot run (built: " +
                          LOWBIT_ISAS_BUILT + "); unset LOWBIT_ISA or pick another";
    }
}

}  // namespace

const Kernels* kernels_for(Isa isa) { return table_for(isa); }

const Kernels& kernels() {
    const Kernels* k = g_active.load(std::memory_order_acquire);
    if (k != nullptr) return *k;
    std::call_once(g_default_once, resolve_default);
    if (g_default == nullptr) throw Error(g_default_error);
    return *g_default;
}

void set_isa(Isa isa) {
    const Kernels* k = table_for(isa);
    if (k == nullptr) {
        throw Error(std::string("ISA ") + isa_name(isa) + " is not available here (built: " + LOWBIT_ISAS_BUILT +
                    "; the CPU or OS may lack it)");
    }
    g_active.store(k, std::memory_order_release);
}

void reset_isa() { g_active.store(nullptr, std::memory_order_release); }

const char* compiled_isas() { return LOWBIT_ISAS_BUILT; }

const TypeOps& type_ops(QType t) { return kernels().ops[checked_index(t)]; }

const char* dot_isa(QType t) { return merged_of(kernels()).dot_isa[checked_index(t)]; }

const char* quantize_isa(QType t) { return merged_of(kernels()).quantize_isa[checked_index(t)]; }

}  // namespace cpu
}  // namespace lowbit
