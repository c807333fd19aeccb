// Weight-only matrix products for few rows: the op gptfn::rowmul.
//
// y = x @ W * scale + bias, with x fp32 (M rows) and W stored as fp32, bf16, fp16 or int8
// (int8 with one fp32 scale per output channel). W is GPT-2's Conv1D layout [in, out], or
// with `transposed` the embedding layout [out, in] (the tied head: logits = x @ wte.T).
// Accumulation is fp32. Decoding one token is a chain of such products: each reads every
// weight once and does two flops per weight, so its speed is the speed at which the weights
// stream from memory, and a narrower format is read faster.
//
// [in, out]: the threads split `in` into contiguous runs of rows, so each thread streams
// whole rows in memory order into its own fp32 partial sums (out values per row of x, in
// L1/L2), four rows of W per pass; the partials are added at the end.
// [out, in]: the threads split `out`; each output is a dot product over a contiguous row,
// four rows at a time so that four independent accumulators hide the FMA latency.
// Rows of x beyond kMaxRows go to a dequantized copy and BLAS: there the product is
// compute-bound and the copy's cost is shared by all the rows.
//
// The AVX2 + FMA + F16C loops are compiled for that target and chosen at run time from
// the CPU's flags; other CPUs take the portable loops.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define GPTFN_X86 1
#endif

namespace {

constexpr int64_t kMaxRows = 8;

// ---------------------------------------------------------------- portable loops
inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }
inline float to_float(int8_t v) { return static_cast<float>(v); }

template <typename W>
void rows_portable(const float* x, int64_t m, int64_t n_in, const W* w, int64_t n_out,
                   int64_t r0, int64_t r1, float* acc) {
  // acc (m, out) += x[:, r0:r1] @ w[r0:r1, :]
  for (int64_t i = r0; i < r1; ++i) {
    const W* wr = w + i * n_out;
    for (int64_t b = 0; b < m; ++b) {
      const float xv = x[b * n_in + i];
      float* a = acc + b * n_out;
      for (int64_t o = 0; o < n_out; ++o) a[o] += xv * to_float(wr[o]);
    }
  }
}

template <typename W>
void dots_portable(const float* x, int64_t m, int64_t n_in, const W* w, int64_t v0,
                   int64_t v1, float* y, int64_t n_out) {
  // y[b, v] = dot(x[b], w[v]) for v in [v0, v1)
  for (int64_t v = v0; v < v1; ++v) {
    const W* wr = w + v * n_in;
    for (int64_t b = 0; b < m; ++b) {
      const float* xb = x + b * n_in;
      float s = 0.f;
      for (int64_t c = 0; c < n_in; ++c) s += xb[c] * to_float(wr[c]);
      y[b * n_out + v] = s;
    }
  }
}

#ifdef GPTFN_X86
// ---------------------------------------------------------------- AVX2 loops
#define GPTFN_AVX2 __attribute__((target("avx2,fma,f16c")))

GPTFN_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
GPTFN_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
GPTFN_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
GPTFN_AVX2 inline __m256 load8(const int8_t* p) {
  __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
}

GPTFN_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <typename W>
GPTFN_AVX2 void rows_avx2(const float* x, int64_t m, int64_t n_in, const W* w, int64_t n_out,
                          int64_t r0, int64_t r1, float* acc) {
  const int64_t o8 = n_out - n_out % 8;
  int64_t i = r0;
  for (; i + 4 <= r1; i += 4) {
    const W* w0 = w + i * n_out;
    const W* w1 = w0 + n_out;
    const W* w2 = w1 + n_out;
    const W* w3 = w2 + n_out;
    for (int64_t b = 0; b < m; ++b) {
      const float* xb = x + b * n_in + i;
      const __m256 x0 = _mm256_set1_ps(xb[0]), x1 = _mm256_set1_ps(xb[1]);
      const __m256 x2 = _mm256_set1_ps(xb[2]), x3 = _mm256_set1_ps(xb[3]);
      float* a = acc + b * n_out;
      for (int64_t o = 0; o < o8; o += 8) {
        __m256 s = _mm256_mul_ps(x0, load8(w0 + o));
        s = _mm256_fmadd_ps(x1, load8(w1 + o), s);
        s = _mm256_fmadd_ps(x2, load8(w2 + o), s);
        s = _mm256_fmadd_ps(x3, load8(w3 + o), s);
        _mm256_storeu_ps(a + o, _mm256_add_ps(_mm256_loadu_ps(a + o), s));
      }
      for (int64_t o = o8; o < n_out; ++o)
        a[o] += xb[0] * to_float(w0[o]) + xb[1] * to_float(w1[o]) + xb[2] * to_float(w2[o]) +
                xb[3] * to_float(w3[o]);
    }
  }
  if (i < r1) rows_portable(x, m, n_in, w, n_out, i, r1, acc);
}

template <typename W>
GPTFN_AVX2 void dots_avx2(const float* x, int64_t m, int64_t n_in, const W* w, int64_t v0,
                          int64_t v1, float* y, int64_t n_out) {
  const int64_t c8 = n_in - n_in % 8;
  int64_t v = v0;
  for (; v + 4 <= v1; v += 4) {
    const W* w0 = w + v * n_in;
    const W* w1 = w0 + n_in;
    const W* w2 = w1 + n_in;
    const W* w3 = w2 + n_in;
    for (int64_t b = 0; b < m; ++b) {
      const float* xb = x + b * n_in;
      __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
      for (int64_t c = 0; c < c8; c += 8) {
        const __m256 xv = _mm256_loadu_ps(xb + c);
        s0 = _mm256_fmadd_ps(xv, load8(w0 + c), s0);
        s1 = _mm256_fmadd_ps(xv, load8(w1 + c), s1);
        s2 = _mm256_fmadd_ps(xv, load8(w2 + c), s2);
        s3 = _mm256_fmadd_ps(xv, load8(w3 + c), s3);
      }
      float t0 = hsum(s0), t1 = hsum(s1), t2 = hsum(s2), t3 = hsum(s3);
      for (int64_t c = c8; c < n_in; ++c) {
        t0 += xb[c] * to_float(w0[c]);
        t1 += xb[c] * to_float(w1[c]);
        t2 += xb[c] * to_float(w2[c]);
        t3 += xb[c] * to_float(w3[c]);
      }
      float* yb = y + b * n_out + v;
      yb[0] = t0;
      yb[1] = t1;
      yb[2] = t2;
      yb[3] = t3;
    }
  }
  if (v < v1) dots_portable(x, m, n_in, w, v, v1, y, n_out);
}

bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}
#endif

template <typename W>
void rows(const float* x, int64_t m, int64_t n_in, const W* w, int64_t n_out, int64_t r0,
          int64_t r1, float* acc) {
#ifdef GPTFN_X86
  if (has_avx2()) return rows_avx2(x, m, n_in, w, n_out, r0, r1, acc);
#endif
  rows_portable(x, m, n_in, w, n_out, r0, r1, acc);
}

template <typename W>
void dots(const float* x, int64_t m, int64_t n_in, const W* w, int64_t v0, int64_t v1,
          float* y, int64_t n_out) {
#ifdef GPTFN_X86
  if (has_avx2()) return dots_avx2(x, m, n_in, w, v0, v1, y, n_out);
#endif
  dots_portable(x, m, n_in, w, v0, v1, y, n_out);
}

// y (m, out) = x (m, in) @ w (in, out): threads take contiguous runs of rows of w.
template <typename W>
void product_rows(const float* x, int64_t m, int64_t n_in, const W* w, int64_t n_out, float* y) {
  // at least 64 rows per run, so that small matrices are not split for nothing
  const int64_t runs = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_in / 64));
  const int64_t per = (n_in + runs - 1) / runs;
  std::vector<float> partial(static_cast<size_t>(runs - 1) * m * n_out, 0.f);
  std::fill(y, y + m * n_out, 0.f);
  at::parallel_for(0, runs, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      float* acc = r == 0 ? y : partial.data() + (r - 1) * m * n_out;
      rows(x, m, n_in, w, n_out, r * per, std::min(n_in, (r + 1) * per), acc);
    }
  });
  for (int64_t r = 1; r < runs; ++r) {
    const float* p = partial.data() + (r - 1) * m * n_out;
    for (int64_t k = 0; k < m * n_out; ++k) y[k] += p[k];
  }
}

// y (m, out) = x (m, in) @ w.T, w (out, in): threads take runs of outputs.
template <typename W>
void product_dots(const float* x, int64_t m, int64_t n_in, const W* w, int64_t n_out, float* y) {
  at::parallel_for(0, n_out, 256, [&](int64_t b, int64_t e) {
    dots(x, m, n_in, w, b, e, y, n_out);
  });
}

template <typename W>
void product(const float* x, int64_t m, int64_t n_in, const W* w, int64_t n_out,
             bool transposed, float* y) {
  if (transposed)
    product_dots(x, m, n_in, w, n_out, y);
  else
    product_rows(x, m, n_in, w, n_out, y);
}

at::Tensor dequantized(const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                       bool transposed) {
  at::Tensor w = weight.to(at::kFloat);
  if (scale.has_value()) w = transposed ? w * scale->unsqueeze(1) : w * *scale;
  return transposed ? w.t() : w;  // (in, out)
}

at::Tensor rowmul(const at::Tensor& x, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& bias,
                  bool transposed) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(),
              "gptfn::rowmul runs on the CPU; got x on ", x.device(), " and weight on ",
              weight.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "gptfn::rowmul takes fp32 activations, got ",
              x.scalar_type());
  TORCH_CHECK(weight.dim() == 2, "gptfn::rowmul takes a 2-d weight, got ", weight.dim(), "-d");
  const auto st = weight.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kChar,
              "gptfn::rowmul takes fp32, bf16, fp16 or int8 weights, got ", st);
  TORCH_CHECK((st == at::kChar) == scale.has_value(),
              "gptfn::rowmul: int8 weights need a scale, and only they take one");
  const int64_t n_in = transposed ? weight.size(1) : weight.size(0);
  const int64_t n_out = transposed ? weight.size(0) : weight.size(1);
  TORCH_CHECK(x.size(-1) == n_in, "gptfn::rowmul: x has ", x.size(-1),
              " features, the weight takes ", n_in);
  if (scale.has_value())
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->numel() == n_out,
                "gptfn::rowmul: the scale must be ", n_out, " fp32 values");
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == n_out,
                "gptfn::rowmul: the bias must be ", n_out, " fp32 values");

  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = n_out;
  const int64_t m = n_in == 0 ? 0 : x.numel() / n_in;
  if (m > kMaxRows) {
    at::Tensor w = dequantized(weight, scale, transposed);
    at::Tensor x2 = x.reshape({m, n_in});
    at::Tensor y = bias.has_value() ? at::addmm(*bias, x2, w) : at::mm(x2, w);
    return y.view(shape);
  }
  at::Tensor xc = x.contiguous();
  at::Tensor wc = weight.contiguous();
  at::Tensor y = at::empty({m, n_out}, x.options());
  if (m > 0) {
    const float* xp = xc.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    switch (st) {
      case at::kFloat:
        product(xp, m, n_in, wc.data_ptr<float>(), n_out, transposed, yp);
        break;
      case at::kBFloat16:
        product(xp, m, n_in, wc.data_ptr<c10::BFloat16>(), n_out, transposed, yp);
        break;
      case at::kHalf:
        product(xp, m, n_in, wc.data_ptr<c10::Half>(), n_out, transposed, yp);
        break;
      default:
        product(xp, m, n_in, wc.data_ptr<int8_t>(), n_out, transposed, yp);
    }
    if (scale.has_value()) y.mul_(scale->contiguous());
    if (bias.has_value()) y.add_(bias->contiguous());
  }
  return y.view(shape);
}

at::Tensor rowmul_meta(const at::Tensor& x, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& scale,
                       const c10::optional<at::Tensor>& bias, bool transposed) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = transposed ? weight.size(0) : weight.size(1);
  return at::empty(shape, x.options());
}

}  // namespace

TORCH_LIBRARY(gptfn, m) {
  m.def("rowmul(Tensor x, Tensor weight, Tensor? scale, Tensor? bias, bool transposed) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptfn, CPU, m) { m.impl("rowmul", rowmul); }

TORCH_LIBRARY_IMPL(gptfn, Meta, m) { m.impl("rowmul", rowmul_meta); }
