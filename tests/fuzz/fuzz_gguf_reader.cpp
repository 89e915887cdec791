// libFuzzer harness for the GGUF reader: each input is written to a file in /dev/shm, opened with
// GGUFReader, and everything the reader exposes is walked and checked (tests/fuzz/gguf_walk.h).
#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "gguf_walk.h"
#include "lowbit/gguf.h"

namespace {

std::string g_path;        // the input file, rewritten for every input
std::string g_copy_path;   // the writer's round-trip copy
bool g_round_trip = true;  // LOWBIT_FUZZ_ROUND_TRIP=0 turns the writer round trip off
gguf_walk::WalkOptions g_walk;

std::string shm_dir() {
    const char* d = std::getenv("LOWBIT_FUZZ_DIR");
    if (d && *d) return d;
    return access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
}

void write_file(const std::string& path, const uint8_t* data, size_t size) {
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        std::perror("fuzz_gguf_reader: open");
        std::abort();
    }
    size_t done = 0;
    while (done < size) {
        ssize_t w = ::write(fd, data + done, size - done);
        if (w <= 0) {
            std::perror("fuzz_gguf_reader: write");
            std::abort();
        }
        done += static_cast<size_t>(w);
    }
    ::close(fd);
}

void cleanup() {
    ::unlink(g_path.c_str());
    ::unlink(g_copy_path.c_str());
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
    const std::string dir = shm_dir();
    const std::string pid = std::to_string(::getpid());
    g_path = dir + "/lowbit-fuzz-" + pid + ".gguf";
    g_copy_path = dir + "/lowbit-fuzz-" + pid + "-copy.gguf";
    const char* rt = std::getenv("LOWBIT_FUZZ_ROUND_TRIP");
    g_round_trip = !(rt && std::string(rt) == "0");
    std::atexit(cleanup);
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    write_file(g_path, data, size);
    try {
        lowbit::GGUFReader r(g_path);
        volatile uint64_t sink = gguf_walk::walk(r, data, size, g_walk);
        (void)sink;
        if (g_round_trip) gguf_walk::round_trip(r, g_copy_path);
    } catch (const lowbit::Error&) {
        // A refusal with a message is the expected outcome for most inputs.
    } catch (const gguf_walk::Violation& v) {
        std::fprintf(stderr, "fuzz_gguf_reader: reader promise broken: %s\n", v.what.c_str());
        std::abort();
    }
    return 0;
}
