// Loads a gptfn AOTInductor package (`python -m export aoti`) with libtorch and decodes
// greedily: the package's forward program fills the KV cache with the prompt, its decode
// program makes one token per call. No Python involved.
//
//   gptfn_aoti_generate [--kernels LIB] [--time] PACKAGE.pt2 MAX_NEW_TOKENS ID [ID ...]
//
// Prints the full sequence (prompt + new tokens) as space-separated ids. A package built on
// the CPU calls gptfn's kernels (its metadata says gptfn.kernels=1): --kernels names their
// library, which this program loads first (`python -c "from gptfn.kernels import load;
// print(load())"` prints its path; give a path: a bare name is looked up on the library
// path, as dlopen does). It runs CPU packages. --time generates twice (the first a warm-up) and prints
// the second's prefill milliseconds and milliseconds per decode step on stderr.
//
// The package keeps its weights outside the programs (data/weights/, one torch.save'd
// tensor per file, and a weights_config.json per program naming each constant's file,
// shape, stride and offset): they are read once and handed to both programs.
#include <dlfcn.h>

#include <ATen/ATen.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/serialize.h>

#include <cctype>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <iostream>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

using Loader = torch::inductor::AOTIModelPackageLoader;

// weights_config.json: {"NAME": ["FILE", [SHAPE...], [STRIDE...], OFFSET], ...}. A reader
// for exactly that (strings without escapes, integers), not for JSON at large.
struct ConstantPlace {
  std::string file;
  std::vector<int64_t> shape, stride;
  int64_t offset = 0;
};

class ConfigReader {
 public:
  explicit ConfigReader(std::string text) : s_(std::move(text)) {}

  std::map<std::string, ConstantPlace> read() {
    std::map<std::string, ConstantPlace> out;
    expect('{');
    if (peek() == '}') return ++i_, out;
    do {
      std::string name = string();
      expect(':');
      expect('[');
      ConstantPlace place;
      place.file = string();
      expect(',');
      place.shape = ints();
      expect(',');
      place.stride = ints();
      expect(',');
      place.offset = integer();
      expect(']');
      out[name] = place;
    } while (next_is(','));
    expect('}');
    return out;
  }

 private:
  char peek() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
    if (i_ >= s_.size()) throw std::runtime_error("weights_config.json ends early");
    return s_[i_];
  }
  void expect(char c) {
    if (peek() != c) throw std::runtime_error(std::string("weights_config.json: expected ") + c);
    ++i_;
  }
  bool next_is(char c) { return peek() == c ? (++i_, true) : false; }
  std::string string() {  // torch's names and file names: no escapes
    expect('"');
    size_t end = s_.find('"', i_);
    if (end == std::string::npos) throw std::runtime_error("weights_config.json: open string");
    if (s_.find('\\', i_) < end) throw std::runtime_error("weights_config.json: an escape");
    std::string out = s_.substr(i_, end - i_);
    i_ = end + 1;
    return out;
  }
  int64_t integer() {
    peek();
    size_t used = 0;
    int64_t v = 0;
    try {
      v = std::stoll(s_.substr(i_, 24), &used);
    } catch (const std::logic_error&) {  // invalid_argument, out_of_range
      throw std::runtime_error("weights_config.json: expected an integer");
    }
    i_ += used;
    return v;
  }
  std::vector<int64_t> ints() {
    std::vector<int64_t> out;
    expect('[');
    if (next_is(']')) return out;
    do out.push_back(integer()); while (next_is(','));
    expect(']');
    return out;
  }

  std::string s_;
  size_t i_ = 0;
};

std::vector<char> record(caffe2::serialize::PyTorchStreamReader& archive,
                         const std::string& name) {
  auto [data, size] = archive.getRecord(name);
  const char* p = static_cast<const char*>(data.get());
  return std::vector<char>(p, p + size);
}

// Both programs' constants, each file read once: the programs share the tensors.
void load_weights(const std::string& path, std::vector<Loader*> programs,
                  const std::vector<std::string>& names) {
  caffe2::serialize::PyTorchStreamReader archive(path);
  std::unordered_map<std::string, at::Tensor> files;
  for (size_t p = 0; p < programs.size(); ++p) {
    std::vector<char> config =
        record(archive, "data/aotinductor/" + names[p] + "/weights_config.json");
    auto places = ConfigReader(std::string(config.begin(), config.end())).read();
    std::unordered_map<std::string, at::Tensor> constants;
    for (const auto& [name, place] : places) {
      auto found = files.find(place.file);
      if (found == files.end()) {
        auto tensor = torch::pickle_load(record(archive, "data/weights/" + place.file)).toTensor();
        found = files.emplace(place.file, tensor).first;
      }
      constants[name] = found->second.as_strided(place.shape, place.stride, place.offset);
    }
    // user_managed: the program uses these tensors as they are (no copy per program)
    programs[p]->load_constants(constants, /*use_inactive=*/false,
                                /*check_full_update=*/true, /*user_managed=*/true);
  }
}

int64_t meta_int(std::unordered_map<std::string, std::string>& meta, const std::string& key) {
  auto it = meta.find(key);
  if (it == meta.end()) throw std::runtime_error("not a gptfn package: no metadata " + key);
  return std::stoll(it->second);
}

// A whole decimal number in [lo, hi], or false (no silent 0 for "abc", no "5x" read as 5).
bool parse_int(const char* text, int64_t lo, int64_t hi, int64_t* out) {
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || v < lo || v > hi) return false;
  *out = v;
  return true;
}

int usage(const char* argv0) {
  std::cerr << "usage: " << argv0
            << " [--kernels LIB] [--time] PACKAGE.pt2 MAX_NEW_TOKENS ID [ID ...]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string kernels;
  bool timed = false;
  int a = 1;
  for (; a < argc && std::string(argv[a]).rfind("--", 0) == 0; ++a) {
    std::string flag = argv[a];
    if (flag == "--time") {
      timed = true;
    } else if (flag == "--kernels" && a + 1 < argc) {
      kernels = argv[++a];
    } else {
      return usage(argv[0]);
    }
  }
  if (argc - a < 3) return usage(argv[0]);
  const std::string path = argv[a];
  int64_t max_new_tokens = 0;
  if (!parse_int(argv[a + 1], 1, INT_MAX, &max_new_tokens)) {
    std::cerr << "MAX_NEW_TOKENS must be a whole number >= 1, got " << argv[a + 1] << "\n";
    return 2;
  }
  std::vector<int64_t> ids;
  for (int i = a + 2; i < argc; ++i) {
    int64_t id = 0;
    if (!parse_int(argv[i], 0, INT_MAX, &id)) {
      std::cerr << "token ids must be whole numbers >= 0, got " << argv[i] << "\n";
      return 2;
    }
    ids.push_back(id);
  }

  std::unordered_map<std::string, std::string> meta;
  std::unique_ptr<Loader> forward, decode;
  int64_t layers = 0, heads = 0, head_dim = 0, max_seq_len = 0, vocab_size = 0;
  at::ScalarType dtype = at::kFloat;
  try {
    meta = Loader::load_metadata_from_package(path, "forward");
    layers = meta_int(meta, "gptfn.num_layers");
    heads = meta_int(meta, "gptfn.num_heads");
    head_dim = meta_int(meta, "gptfn.head_dim");
    max_seq_len = meta_int(meta, "gptfn.max_seq_len");
    vocab_size = meta_int(meta, "gptfn.vocab_size");
    if (meta["AOTI_DEVICE_KEY"] != "cpu") {
      std::cerr << "this runner runs CPU packages; " << path << " is for "
                << meta["AOTI_DEVICE_KEY"] << "\n";
      return 2;
    }
    const std::string dt = meta["gptfn.dtype"];
    dtype = dt == "bfloat16" ? at::kBFloat16 : dt == "float16" ? at::kHalf : at::kFloat;
    if (meta["gptfn.kernels"] == "1") {
      if (kernels.empty()) {
        std::cerr << "this package calls gptfn's kernels: pass --kernels LIB (python -c "
                     "\"from gptfn.kernels import load; print(load())\")\n";
        return 2;
      }
      // RTLD_GLOBAL: the library registers its ops with the dispatcher as it loads
      if (!dlopen(kernels.c_str(), RTLD_NOW | RTLD_GLOBAL)) {
        std::cerr << "cannot load the kernels " << kernels << ": " << dlerror() << "\n";
        return 1;
      }
    }
    forward = std::make_unique<Loader>(path, "forward");
    decode = std::make_unique<Loader>(path, "decode");
    load_weights(path, {forward.get(), decode.get()}, {"forward", "decode"});
  } catch (const c10::Error& e) {
    std::cerr << "cannot load " << path << ": " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "cannot load " << path << ": " << e.what() << "\n";
    return 1;
  }
  const int64_t t = static_cast<int64_t>(ids.size());
  if (t == 0 || max_new_tokens > max_seq_len - t) {
    std::cerr << "need a prompt and 1 <= MAX_NEW_TOKENS with prompt + new tokens <= "
              << max_seq_len << " (the package's max_seq_len)\n";
    return 2;
  }
  for (int64_t id : ids) {
    if (id >= vocab_size) {
      std::cerr << "token id " << id << " is outside the vocabulary [0, " << vocab_size << ")\n";
      return 2;
    }
  }
  c10::InferenceMode no_grad;
  auto cache = [&] {
    std::vector<at::Tensor> layers_cache;
    for (int64_t i = 0; i < layers; ++i) {
      layers_cache.push_back(at::zeros({1, heads, max_seq_len, head_dim}, at::dtype(dtype)));
    }
    return layers_cache;
  };
  std::chrono::steady_clock::time_point prefilled, finished;
  double prefill_ms = 0;
  auto generate = [&] {
    std::vector<at::Tensor> keys = cache(), values = cache();
    auto inputs = [&](const at::Tensor& first, const at::Tensor* pos) {
      std::vector<at::Tensor> in{first};
      in.insert(in.end(), keys.begin(), keys.end());
      in.insert(in.end(), values.begin(), values.end());
      if (pos) in.push_back(*pos);
      return in;
    };
    std::vector<int64_t> out = ids;
    auto prompt = at::tensor(ids, at::kLong).view({1, t});
    const auto start = std::chrono::steady_clock::now();
    at::Tensor logits = forward->run(inputs(prompt, nullptr))[0].select(1, t - 1);  // (1, V)
    prefilled = std::chrono::steady_clock::now();
    prefill_ms = std::chrono::duration<double, std::milli>(prefilled - start).count();
    for (int64_t step = 0; step < max_new_tokens; ++step) {
      int64_t token = logits.argmax(-1).item<int64_t>();
      out.push_back(token);
      if (step + 1 == max_new_tokens) break;
      auto next = at::full({1, 1}, token, at::kLong);
      auto pos = at::full({1}, t + step, at::kLong);
      logits = decode->run(inputs(next, &pos))[0];  // (1, V); the caches written in place
    }
    finished = std::chrono::steady_clock::now();
    return out;
  };
  std::vector<int64_t> out;
  try {
    if (timed) generate();  // a warm-up: first calls pay one-time costs, not per-token ones
    out = generate();
  } catch (const c10::Error& e) {
    std::cerr << "generate failed: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "generate failed: " << e.what() << "\n";
    return 1;
  }
  for (size_t i = 0; i < out.size(); ++i) std::cout << (i ? " " : "") << out[i];
  std::cout << "\n";
  if (timed) {
    // the decode steps alone: the steps after the first new token
    const double decode_ms =
        std::chrono::duration<double, std::milli>(finished - prefilled).count();
    std::cerr << "prefill_ms " << prefill_ms << "\n";
    if (max_new_tokens > 1) {
      std::cerr << "decode_ms_per_token " << decode_ms / (max_new_tokens - 1) << "\n";
    }
  }
  return 0;
}
