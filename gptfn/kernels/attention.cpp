// Attention of a few new tokens over a static KV cache under a boolean mask: the op
// gptfn::cached_attention, what F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
// computes (default scale 1/sqrt(hs), no dropout) for fp32 tensors on the CPU.
//
// A decode step attends one token per row over the whole static cache, most of it masked
// until the cache fills. Torch's fused CPU kernel multiplies every slot, masked or not, in
// small per-head GEMMs; here each (row, head, token) streams the keys and values of its
// allowed slots only, once, with an online softmax (running max, rescaled sums), so the
// work is the bytes of the filled cache. A (row, head, token) with no allowed slot gets
// zeros (a decode step always allows the token's own slot, so it does not happen there).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define GPTFN_X86 1
#endif

namespace {

#ifdef GPTFN_X86
#define GPTFN_AVX2 __attribute__((target("avx2,fma")))

GPTFN_AVX2 float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 s = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c), s);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  float t = _mm_cvtss_f32(h);
  for (; c < n; ++c) t += a[c] * b[c];
  return t;
}

// acc = acc * keep + p * v
GPTFN_AVX2 void update_avx2(float* acc, float keep, float p, const float* v, int64_t n) {
  const __m256 k8 = _mm256_set1_ps(keep), p8 = _mm256_set1_ps(p);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8)
    _mm256_storeu_ps(acc + c, _mm256_fmadd_ps(p8, _mm256_loadu_ps(v + c),
                                              _mm256_mul_ps(k8, _mm256_loadu_ps(acc + c))));
  for (; c < n; ++c) acc[c] = acc[c] * keep + p * v[c];
}

bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

float dot(const float* a, const float* b, int64_t n) {
#ifdef GPTFN_X86
  if (has_avx2()) return dot_avx2(a, b, n);
#endif
  float t = 0.f;
  for (int64_t c = 0; c < n; ++c) t += a[c] * b[c];
  return t;
}

void update(float* acc, float keep, float p, const float* v, int64_t n) {
#ifdef GPTFN_X86
  if (has_avx2()) return update_avx2(acc, keep, p, v, n);
#endif
  for (int64_t c = 0; c < n; ++c) acc[c] = acc[c] * keep + p * v[c];
}

at::Tensor cached_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& mask) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() &&
                  mask.device().is_cpu(),
              "gptfn::cached_attention runs on the CPU");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                  v.scalar_type() == at::kFloat,
              "gptfn::cached_attention takes fp32 q, k, v");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "gptfn::cached_attention takes a bool mask");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 4,
              "gptfn::cached_attention takes 4-d q, k, v (B, nh, T, hs) and mask (B, 1, T, S)");
  const int64_t B = q.size(0), nh = q.size(1), T = q.size(2), hs = q.size(3), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(1) == nh && v.size(1) == nh &&
                  v.size(2) == S && k.size(3) == hs && v.size(3) == hs,
              "gptfn::cached_attention: k and v must be (B, nh, S, hs) for q ", q.sizes());
  TORCH_CHECK((mask.size(0) == B || mask.size(0) == 1) && mask.size(1) == 1 &&
                  mask.size(2) == T && mask.size(3) == S,
              "gptfn::cached_attention: the mask must be (B or 1, 1, T, S), got ", mask.sizes());
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const at::Tensor mc = mask.contiguous();
  at::Tensor y = at::empty({B, nh, T, hs}, q.options());
  const float* qp = qc.data_ptr<float>();
  const float* kp = kc.data_ptr<float>();
  const float* vp = vc.data_ptr<float>();
  const bool* mp = mc.data_ptr<bool>();
  float* yp = y.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(hs));
  const int64_t mask_rows = mask.size(0);
  at::parallel_for(0, B * nh * T, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(static_cast<size_t>(hs));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (nh * T), h = (task / T) % nh, t = task % T;
      const float* qv = qp + task * hs;
      const float* keys = kp + (b * nh + h) * S * hs;
      const float* values = vp + (b * nh + h) * S * hs;
      const bool* allowed = mp + ((mask_rows == 1 ? 0 : b) * T + t) * S;
      float top = -std::numeric_limits<float>::infinity(), total = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t s = 0; s < S; ++s) {
        if (!allowed[s]) continue;
        const float score = dot(qv, keys + s * hs, hs) * scale;
        if (score > top) {  // a new maximum: rescale what was summed under the old one
          const float keep = std::exp(top - score);
          total *= keep;
          top = score;
          update(acc.data(), keep, 1.f, values + s * hs, hs);
          total += 1.f;
        } else {
          const float p = std::exp(score - top);
          update(acc.data(), 1.f, p, values + s * hs, hs);
          total += p;
        }
      }
      float* out = yp + task * hs;
      const float inv = total > 0.f ? 1.f / total : 0.f;
      for (int64_t c = 0; c < hs; ++c) out[c] = acc[c] * inv;
    }
  });
  return y;
}

at::Tensor cached_attention_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& mask) {
  return at::empty_symint(q.sym_sizes(), q.options());  // symbolic, as rowmul_meta's
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gptfn, m) {
  m.def("cached_attention(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptfn, CPU, m) { m.impl("cached_attention", cached_attention); }

TORCH_LIBRARY_IMPL(gptfn, Meta, m) { m.impl("cached_attention", cached_attention_meta); }
