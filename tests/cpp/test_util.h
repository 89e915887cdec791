// Small helpers shared by the C++ tests.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <unistd.h>

// A fresh directory under $TMPDIR (or /tmp) named PREFIX-XXXXXX; empty string if it cannot be made.
inline std::string make_temp_dir(const char* prefix) {
    const char* tmpdir = std::getenv("TMPDIR");
    std::string t = std::string(tmpdir && *tmpdir ? tmpdir : "/tmp") + "/" + prefix + "-XXXXXX";
    std::vector<char> buf(t.begin(), t.end());
    buf.push_back('\0');
    if (!mkdtemp(buf.data())) {
        std::perror("mkdtemp");
        return std::string();
    }
    return buf.data();
}
