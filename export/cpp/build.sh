#!/usr/bin/env bash
# Builds a C++ example against the libtorch that ships inside the torch wheel (torch/include
# and torch/lib): no separate libtorch download.
#   export/cpp/build.sh [PYTHON] [OUTPUT] [SOURCE]
# SOURCE: generate.cpp (the default: TorchScript's generate) or aoti_generate.cpp (an
# AOTInductor package's forward and decode programs).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${1:-python3}"
output="${2:-$here/gptfn_generate}"
source="$here/${3:-generate.cpp}"
torch_dir="$("$python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
abi="$("$python" -c 'import torch; print(int(torch.compiled_with_cxx11_abi()))')"
cxx="${CXX:-g++}"
"$cxx" -std=c++17 -O2 -D_GLIBCXX_USE_CXX11_ABI="$abi" "$source" -o "$output" \
  -I"$torch_dir/include" -I"$torch_dir/include/torch/csrc/api/include" \
  -L"$torch_dir/lib" -Wl,-rpath,"$torch_dir/lib" -ltorch -ltorch_cpu -lc10 -ldl
echo "$output"
