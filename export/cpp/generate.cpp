// Loads a gptfn TorchScript artifact with libtorch and generates tokens from given ids.
//
//   gptfn_generate MODEL.pt MAX_NEW_TOKENS ID [ID ...]
//
// Prints the full sequence (prompt + new tokens) as space-separated ids: greedy decoding
// (temperature 0, no top-k), the artifact's own generate method, no Python involved.
#include <torch/script.h>

#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt MAX_NEW_TOKENS ID [ID ...]\n";
    return 2;
  }
  torch::jit::script::Module module;
  try {
    module = torch::jit::load(argv[1]);
  } catch (const c10::Error& e) {
    std::cerr << "cannot load " << argv[1] << ": " << e.what_without_backtrace() << "\n";
    return 1;
  }
  const int64_t max_new_tokens = std::atoll(argv[2]);
  std::vector<int64_t> ids;
  for (int i = 3; i < argc; ++i) ids.push_back(std::atoll(argv[i]));
  torch::NoGradGuard no_grad;
  auto idx = torch::tensor(ids, torch::kLong).view({1, -1});
  std::vector<torch::jit::IValue> args{idx, max_new_tokens, 0.0, static_cast<int64_t>(0),
                                       static_cast<int64_t>(0)};
  at::Tensor out;
  try {
    out = module.get_method("generate")(args).toTensor();
  } catch (const c10::Error& e) {
    std::cerr << "generate failed: " << e.what_without_backtrace() << "\n";
    return 1;
  }
  auto row = out[0];
  for (int64_t i = 0; i < row.size(0); ++i) {
    std::cout << (i ? " " : "") << row[i].item<int64_t>();
  }
  std::cout << "\n";
  return 0;
}
