// lowbit._core.Model and lowbit._core.Sampler: the C++ runtime for Python (eval releases the GIL).
#include "bindings.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cstring>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "lowbit/model.h"
#include "lowbit/sampler.h"

namespace {

using lowbit::Model;
using lowbit::Sampler;
using IntArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

std::vector<int32_t> to_vector(const IntArray& a) {
    if (a.ndim() != 1) throw lowbit::Error("token ids must be a 1-D sequence of integers");
    return std::vector<int32_t>(a.data(), a.data() + a.size());
}

py::dict config_dict(const lowbit::ModelConfig& c) {
    py::dict d;
    d["architecture"] = c.architecture;
    d["name"] = c.name;
    d["n_vocab"] = c.n_vocab;
    d["n_ctx_train"] = c.n_ctx_train;
    d["n_embd"] = c.n_embd;
    d["n_layer"] = c.n_layer;
    d["n_ff"] = c.n_ff;
    d["n_head"] = c.n_head;
    d["n_head_kv"] = c.n_head_kv;
    d["head_dim"] = c.head_dim;
    d["n_rot"] = c.n_rot;
    d["rope_freq_base"] = c.rope_freq_base;
    d["rope_freq_scale"] = c.rope_freq_scale;
    d["rms_eps"] = c.rms_eps;
    d["tied_embeddings"] = c.tied_embeddings;
    d["sliding_window"] = c.sliding_window;
    d["attn_scale"] = c.attn_scale;
    return d;
}

// {key: plain value} for the entries whose key starts with prefix.
py::dict metadata_dict(const std::vector<std::pair<std::string, lowbit::GGUFValue>>& kv, const std::string& prefix) {
    py::dict out;
    for (const auto& [key, value] : kv) {
        if (key.compare(0, prefix.size(), prefix) == 0) out[py::str(key)] = gguf_value_to_py(value);
    }
    return out;
}

}  // namespace

void bind_model(py::module_& m) {
    py::tuple eot(std::size(lowbit::kEndOfTurnTexts));
    for (size_t i = 0; i < std::size(lowbit::kEndOfTurnTexts); ++i) eot[i] = py::str(lowbit::kEndOfTurnTexts[i]);
    m.attr("END_OF_TURN_TEXTS") = eot;
    py::class_<Model>(m, "Model", "A loaded LLaMA-family GGUF model with its KV cache (see lowbit.Model).")
        .def(py::init([](const std::string& path, int n_ctx, int n_threads, int n_batch, int n_gpu_layers,
                         bool kv_f16, int n_seq) {
                 lowbit::ModelParams p;
                 p.n_seq = n_seq;
                 p.n_ctx = n_ctx;
                 p.n_threads = n_threads;
                 p.n_batch = n_batch;
                 p.n_gpu_layers = n_gpu_layers;
                 p.kv_f16 = kv_f16;
                 py::gil_scoped_release release;
                 return Model::load(path, p);
             }),
             py::arg("path"), py::arg("n_ctx") = 0, py::arg("n_threads") = 0, py::arg("n_batch") = 512,
             py::arg("n_gpu_layers") = 0, py::arg("kv_f16") = false, py::arg("n_seq") = 1)
        .def(
            "eval",
            [](Model& self, const IntArray& tokens, bool all_logits) {
                std::vector<int32_t> ids = to_vector(tokens);
                const int n_vocab = self.config().n_vocab;
                py::array_t<float> out = all_logits
                    ? py::array_t<float>({static_cast<py::ssize_t>(ids.size()), static_cast<py::ssize_t>(n_vocab)})
                    : py::array_t<float>({static_cast<py::ssize_t>(n_vocab)});
                float* dst = out.mutable_data();
                {
                    py::gil_scoped_release release;
                    self.eval(ids.data(), static_cast<int>(ids.size()), dst, all_logits);
                }
                return out;
            },
            py::arg("tokens"), py::arg("all_logits") = false,
            "Evaluate tokens after the cached ones; returns the last token's logits (n_vocab,) or all (n, n_vocab).")
        .def(
            "eval_hidden",
            [](Model& self, const IntArray& tokens, int seq) {
                std::vector<int32_t> ids = to_vector(tokens);
                py::array_t<float> out({static_cast<py::ssize_t>(ids.size()),
                                        static_cast<py::ssize_t>(self.config().n_embd)});
                float* dst = out.mutable_data();
                {
                    py::gil_scoped_release release;
                    self.eval_hidden(ids.data(), static_cast<int>(ids.size()), dst, seq);
                }
                return out;
            },
            py::arg("tokens"), py::arg("seq") = 0,
            "Evaluate tokens after a sequence's cached ones; returns their final hidden states (n, n_embd), the "
            "output of the last norm.")
        .def(
            "set_activation_tap",
            [](Model& self, py::object fn) {
                if (fn.is_none()) {
                    self.set_activation_tap(nullptr);
                    return;
                }
                // The callable is kept alive by the lambda; every call takes the GIL (evals release it) and hands
                // Python a copy of the rows, which live in the model's scratch only until the next op.
                auto keep = std::make_shared<py::object>(std::move(fn));
                self.set_activation_tap([keep](int layer, int site, const float* rows, int n, int dim) {
                    py::gil_scoped_acquire gil;
                    py::array_t<float> a({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(dim)});
                    std::memcpy(a.mutable_data(), rows, sizeof(float) * static_cast<size_t>(n) * dim);
                    (*keep)(layer, site, a);
                });
            },
            py::arg("tap"),
            "Call tap(layer, site, rows) with the activations each CPU block's matrices read (site 0: input of "
            "wq/wk/wv, 1: of wo, 2: of w_gate/w_up, 3: of w_down; rows (n, dim) float32, a copy) during every "
            "eval until set_activation_tap(None). Used by calibration.")
        .def(
            "eval_batch",
            [](Model& self, const std::vector<std::pair<int, IntArray>>& inputs) {
                std::vector<std::vector<int32_t>> ids;
                std::vector<lowbit::SeqTokens> ins;
                ids.reserve(inputs.size());
                for (const auto& [seq, toks] : inputs) ids.push_back(to_vector(toks));
                for (size_t k = 0; k < inputs.size(); ++k) {
                    ins.push_back({inputs[k].first, ids[k].data(), static_cast<int>(ids[k].size())});
                }
                py::array_t<float> out({static_cast<py::ssize_t>(inputs.size()),
                                        static_cast<py::ssize_t>(self.config().n_vocab)});
                float* dst = out.mutable_data();
                {
                    py::gil_scoped_release release;
                    self.eval_batch(ins, dst);
                }
                return out;
            },
            py::arg("inputs"),
            "[(seq, tokens), ...]: each sequence's tokens after its cached ones, all in one pass; returns the last "
            "token's logits of each input (n_inputs, n_vocab).")
        .def("truncate", &Model::truncate, py::arg("n_keep"), py::arg("seq") = 0,
             "Drop a sequence's cached positions >= n_keep.")
        .def("reusable_prefix", &Model::reusable_prefix, py::arg("n_keep"), py::arg("seq") = 0,
             "n_keep if truncate(n_keep, seq) can keep that many cached positions, else 0 (sliding-window blocks "
             "keep only their last window + n_batch - 1 positions).")
        .def("seq_tokens", [](const Model& self, int seq) {
            const auto& t = self.tokens(seq);
            return py::array_t<int32_t>(static_cast<py::ssize_t>(t.size()), t.data());
        }, py::arg("seq"), "The tokens in a sequence's cache.")
        .def("state", [](const Model& self, int seq) {
            std::vector<uint8_t> v;
            {
                py::gil_scoped_release release;
                v = self.state(seq);
            }
            return py::bytes(reinterpret_cast<const char*>(v.data()), v.size());
        }, py::arg("seq") = 0, "A sequence's KV cache as bytes (Model.save_state writes them with the tokens).")
        .def("set_state", [](Model& self, const IntArray& tokens, const py::bytes& data, int seq) {
            char* buf = nullptr;
            Py_ssize_t len = 0;
            if (PyBytes_AsStringAndSize(data.ptr(), &buf, &len) != 0) throw py::error_already_set();
            std::vector<int32_t> t = to_vector(tokens);
            py::gil_scoped_release release;
            self.set_state(seq, t, reinterpret_cast<const uint8_t*>(buf), static_cast<size_t>(len));
        }, py::arg("tokens"), py::arg("data"), py::arg("seq") = 0,
             "Put back a sequence's cache saved by state() (same file and KV type; checked).")
        .def_property_readonly("n_seq", &Model::n_seq)
        .def_property_readonly("n_past", [](const Model& self) { return self.n_past(); })
        .def_property_readonly("n_ctx", &Model::n_ctx)
        .def_property_readonly("n_vocab", [](const Model& self) { return self.config().n_vocab; })
        .def_property_readonly("n_threads", [](const Model& self) { return self.params().n_threads; })
        .def_property_readonly("path", &Model::path)
        .def_property_readonly("tokens", [](const Model& self) {
            const auto& t = self.tokens(0);
            return py::array_t<int32_t>(static_cast<py::ssize_t>(t.size()), t.data());
        })
        .def_property_readonly("config", [](const Model& self) { return config_dict(self.config()); })
        .def("metadata", [](const Model& self, const std::string& prefix) {
            return metadata_dict(self.reader().metadata(), prefix);
        }, py::arg("prefix") = "",
             "The file's metadata keys that start with prefix, as plain values (read at load; the file is not read again).")
        .def("take_metadata", [](Model& self, const std::string& prefix) {
            std::vector<std::pair<std::string, lowbit::GGUFValue>> taken;
            {
                py::gil_scoped_release nogil;  // waits for a running eval
                taken = self.take_metadata(prefix);
            }
            return metadata_dict(taken, "");
        }, py::arg("prefix"),
             "As metadata(prefix), moving the values out of the core: they are gone from metadata() afterwards.")
        .def_property_readonly("eog_ids", [](const Model& self) { return self.config().eog_ids; },
                               "Token ids that end a generation (eos/eot/eom and end-of-turn control tokens).")
        .def("memory_footprint", [](const Model& self) {
            lowbit::MemoryFootprint f = self.memory_footprint();
            py::dict d;
            d["weights_mapped"] = f.weights_mapped;
            d["weights_owned"] = f.weights_owned;
            d["kv_cpu"] = f.kv_cpu;
            d["scratch_cpu"] = f.scratch_cpu;
            d["weights_gpu"] = f.weights_gpu;
            d["kv_gpu"] = f.kv_gpu;
            d["scratch_gpu"] = f.scratch_gpu;
            return d;
        });

    py::class_<Sampler>(m, "Sampler", "Seedable sampler: penalties -> top_k -> top_p -> min_p -> temperature -> draw.")
        .def(py::init([](float temperature, int top_k, float top_p, float min_p, float repeat_penalty,
                         int repeat_last_n, uint64_t seed) {
                 lowbit::SamplerParams p;
                 p.temperature = temperature;
                 p.top_k = top_k;
                 p.top_p = top_p;
                 p.min_p = min_p;
                 p.repeat_penalty = repeat_penalty;
                 p.repeat_last_n = repeat_last_n;
                 p.seed = seed;
                 return std::make_unique<Sampler>(p);
             }),
             py::arg("temperature") = 0.8f, py::arg("top_k") = 40, py::arg("top_p") = 0.95f,
             py::arg("min_p") = 0.05f, py::arg("repeat_penalty") = 1.0f, py::arg("repeat_last_n") = 64,
             py::arg("seed") = 0)
        .def(
            "sample",
            [](Sampler& self, const FloatArray& logits, const IntArray& history) {
                if (logits.ndim() != 1) throw lowbit::Error("logits must be 1-D (n_vocab,)");
                std::vector<int32_t> h = to_vector(history);
                py::gil_scoped_release release;  // a 262k-entry vocabulary: let the server's other threads run
                return self.sample(logits.data(), static_cast<int>(logits.size()), h.data(), static_cast<int>(h.size()));
            },
            py::arg("logits"), py::arg("history") = IntArray(0))
        .def(
            "candidates",
            [](Sampler& self, const FloatArray& logits, const IntArray& history) {
                if (logits.ndim() != 1) throw lowbit::Error("logits must be 1-D (n_vocab,)");
                std::vector<int32_t> h = to_vector(history);
                self.prepare(logits.data(), static_cast<int>(logits.size()), h.data(), static_cast<int>(h.size()));
                const auto& c = self.candidates();
                py::array_t<float> l(static_cast<py::ssize_t>(c.size()));
                py::array_t<int32_t> ids(static_cast<py::ssize_t>(c.size()));
                for (size_t i = 0; i < c.size(); ++i) {
                    l.mutable_data()[i] = c[i].first;
                    ids.mutable_data()[i] = c[i].second;
                }
                return py::make_tuple(ids, l);
            },
            py::arg("logits"), py::arg("history") = IntArray(0),
            "The surviving (ids, logits) after every filtering stage and temperature, for tests.")
        .def("reseed", &Sampler::reseed, py::arg("seed"));
}
