// Weight-only matrix products for few rows: the op gptfn::rowmul.
//
// y = x @ W * scale + bias, with x fp32 (M rows) and W stored as fp32, bf16, fp16 or int8
// (int8 with one fp32 scale per output channel, values in [-127, 127] as gptfn.formats
// requires: the integer loops' sign trick cannot negate -128; x then meets it quantized to
// int8 per block of 32 values, as llama.cpp's q8_0 does). W is GPT-2's Conv1D layout [in, out], or
// with `transposed` the embedding layout [out, in] (the tied head: logits = x @ wte.T).
// int4 (gptfn.formats: uint8 (in/2, out), two inputs a byte, q + 8 per nibble, one fp16
// scale per output and group of 32 inputs) meets x quantized the same way as int8 does.
// Accumulation is fp32 (int8, int4: int32 within a block of 32, then fp32). Decoding one token is
// a chain of such products: each reads every weight once and does two flops per weight, so
// its speed is bound by the speed at which the weights stream from memory, and a narrower
// format is read faster, as long as widening it costs less than reading it: hence the
// cheap bf16 widening and the integer int8 products below.
//
// [in, out]: the threads split `in` into contiguous runs of rows, so each thread streams
// whole rows in memory order into its own fp32 partial sums (out values per row of x, in
// L1/L2), eight rows of W per pass (bf16 short rows: one, see `short_rows`); the partials
// are added at the end.
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
#include <cmath>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
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

// ---------------------------------------------------------------- int8 activations
// int8 weights meet activations quantized to int8 too, symmetric, one fp32 scale per block
// of kQBlock consecutive features of a row of x (llama.cpp's q8_0 activations), on every
// route: the AVX2 loops sum the int8 products in int32 (maddubs: u8 x s8 pairs to int16;
// madd: int16 pairs to int32) and scale each block's sum once, a few integer ops per 32
// weights instead of widening each weight to fp32; the portable loops and BLAS (past
// kMaxRows rows) take x quantized and widened back, the same values.
constexpr int64_t kQBlock = 32;

// q (n) = round(x / d), d = max |x| / 127 per block of kQBlock (0 for a block of zeros).
// A block holding a NaN or an infinity gets d = NaN and q = 0, so that the products it
// enters are NaN, as the unquantized product's would be.
void quantize_blocks(const float* x, int64_t n, int8_t* q, float* d) {
  for (int64_t c0 = 0, k = 0; c0 < n; c0 += kQBlock, ++k) {
    const int64_t c1 = std::min(n, c0 + kQBlock);
    float amax = 0.f;
    bool finite = true;
    for (int64_t c = c0; c < c1; ++c) {
      finite = finite && std::isfinite(x[c]);
      amax = std::max(amax, std::abs(x[c]));
    }
    if (!finite) {
      d[k] = std::numeric_limits<float>::quiet_NaN();
      std::fill(q + c0, q + c1, static_cast<int8_t>(0));
      continue;
    }
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    d[k] = amax / 127.f;
    for (int64_t c = c0; c < c1; ++c) q[c] = static_cast<int8_t>(std::nearbyint(x[c] * inv));
  }
}

// x (m, n) quantized per block and widened back to fp32: the activations int8 weights meet.
at::Tensor quantized_activations(const at::Tensor& x2) {
  const int64_t m = x2.size(0), n = x2.size(1), blocks = (n + kQBlock - 1) / kQBlock;
  at::Tensor out = at::empty_like(x2);
  std::vector<int8_t> q(static_cast<size_t>(n));
  std::vector<float> d(static_cast<size_t>(blocks));
  const float* xp = x2.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t b = 0; b < m; ++b) {
    quantize_blocks(xp + b * n, n, q.data(), d.data());
    for (int64_t c = 0; c < n; ++c) op[b * n + c] = d[c / kQBlock] * static_cast<float>(q[c]);
  }
  return out;
}

#ifdef GPTFN_X86
// ---------------------------------------------------------------- AVX2 loops
#define GPTFN_AVX2 __attribute__((target("avx2,fma,f16c")))

// Software prefetch, rows of w ahead, where it measured faster (README, "Weight formats"):
// the loops that widen or multiply in integers do enough work per byte that with the
// hardware prefetcher alone the memory sat idle part of the time. The plain fp32 loops
// stream at the memory's speed without it.
constexpr int64_t kAheadDots = 16;  // [out, in] loops: rows of w (outputs) ahead
constexpr int64_t kAheadRows = 16;  // int8 and one-row bf16 [in, out] loops: rows (inputs)

GPTFN_AVX2 inline void prefetch(const void* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
}

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

// Whether the bf16 rows loop reads one row of w a pass instead of eight. Eight rows a pass
// share the partial sums' loads and stores, which pays for long rows; for short rows
// (GPT-2's 768-wide projections) one row at a time, read straight through, measured faster
// (README, "Weight formats"). fp32 measured best with eight rows at both lengths.
inline bool short_rows(int64_t n_out) { return n_out < 1536; }

template <int R, typename W>
GPTFN_AVX2 void rows_pass(const float* x, int64_t m, int64_t n_in, const W* w, int64_t n_out,
                          int64_t i, float* acc) {
  const int64_t o8 = n_out - n_out % 8;
  for (int64_t b = 0; b < m; ++b) {
    const float* xb = x + b * n_in + i;
    __m256 xs[R];
    for (int r = 0; r < R; ++r) xs[r] = _mm256_set1_ps(xb[r]);
    float* a = acc + b * n_out;
    for (int64_t o = 0; o < o8; o += 8) {
      __m256 s = _mm256_loadu_ps(a + o);
      for (int r = 0; r < R; ++r) s = _mm256_fmadd_ps(xs[r], load8(w + (i + r) * n_out + o), s);
      _mm256_storeu_ps(a + o, s);
    }
    for (int64_t o = o8; o < n_out; ++o)
      for (int r = 0; r < R; ++r) a[o] += xb[r] * to_float(w[(i + r) * n_out + o]);
  }
}

template <typename W>
GPTFN_AVX2 void rows_avx2(const float* x, int64_t m, int64_t n_in, const W* w, int64_t n_out,
                          int64_t r0, int64_t r1, float* acc) {
  int64_t i = r0;
  for (; i + 8 <= r1; i += 8) rows_pass<8>(x, m, n_in, w, n_out, i, acc);
  for (; i < r1; ++i) rows_pass<1>(x, m, n_in, w, n_out, i, acc);
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

// bf16 is the top half of an fp32: of 16 bf16 loaded as 8 32-bit lanes, a shift left by
// 16 gives the even-indexed values as fp32 and a mask the odd-indexed ones. Two cheap ops
// per 16 weights instead of a widening load per 8, at the price of an order: each block of
// 16 is handled as its 8 even values, then its 8 odd ones ("split" order). The rows loop
// keeps its sums in that order and `unsplit` restores it; the dots loop splits x instead.
GPTFN_AVX2 inline void load16_split(const c10::BFloat16* p, __m256& even, __m256& odd) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xFFFF0000u)));
}

// y[o + 2j] = s[o + j], y[o + 2j + 1] = s[o + 8 + j] for each block of 16 below n16: split
// order back to natural order, in place. (`split` is the inverse.)
inline void unsplit(float* y, int64_t n16) {
  float t[16];
  for (int64_t o = 0; o < n16; o += 16) {
    std::memcpy(t, y + o, sizeof t);
    for (int j = 0; j < 8; ++j) {
      y[o + 2 * j] = t[j];
      y[o + 2 * j + 1] = t[8 + j];
    }
  }
}

inline void split(const float* x, int64_t n16, float* out) {
  for (int64_t c = 0; c < n16; c += 16)
    for (int j = 0; j < 8; ++j) {
      out[c + j] = x[c + 2 * j];
      out[c + 8 + j] = x[c + 2 * j + 1];
    }
}

// acc (m, out) += x[:, r0:r1] @ w[r0:r1, :], the first n_out - n_out % 16 sums of each row
// of acc in split order, the rest in natural order. R rows of w per pass.
template <int R>
GPTFN_AVX2 void rows_bf16_pass(const float* x, int64_t m, int64_t n_in, const c10::BFloat16* w,
                               int64_t n_out, int64_t i, float* acc) {
  const int64_t o16 = n_out - n_out % 16;
  for (int64_t b = 0; b < m; ++b) {
    const float* xb = x + b * n_in + i;
    __m256 xs[R];
    for (int r = 0; r < R; ++r) xs[r] = _mm256_set1_ps(xb[r]);
    float* a = acc + b * n_out;
    const bool ahead = R == 1 && i + kAheadRows < n_in;  // one row a pass: short rows
    for (int64_t o = 0; o < o16; o += 16) {
      if (ahead) prefetch(w + (i + kAheadRows) * n_out + o);
      __m256 se = _mm256_loadu_ps(a + o), so = _mm256_loadu_ps(a + o + 8);
      for (int r = 0; r < R; ++r) {
        __m256 e, d;
        load16_split(w + (i + r) * n_out + o, e, d);
        se = _mm256_fmadd_ps(xs[r], e, se);
        so = _mm256_fmadd_ps(xs[r], d, so);
      }
      _mm256_storeu_ps(a + o, se);
      _mm256_storeu_ps(a + o + 8, so);
    }
    for (int64_t o = o16; o < n_out; ++o)
      for (int r = 0; r < R; ++r) a[o] += xb[r] * to_float(w[(i + r) * n_out + o]);
  }
}

// Several rows of x (a batched decode step): each 16 weights are loaded and split once
// for G <= 4 rows of x, whose 2G sums stay in registers, instead of once per row; R rows
// of w, the 16 outputs at o, in split order. From kBatchRows rows of x on it measured
// faster than a row at a time (README, "Weight formats"); fp32, with nothing to widen,
// did not gain.
constexpr int64_t kBatchRows = 4;

template <int G, int R>
GPTFN_AVX2 inline void slab_bf16(const float* x, int64_t n_in, const c10::BFloat16* w,
                                 int64_t n_out, int64_t i, int64_t o, float* acc) {
  __m256 se[G], so[G];
  for (int b = 0; b < G; ++b) {
    se[b] = _mm256_loadu_ps(acc + b * n_out + o);
    so[b] = _mm256_loadu_ps(acc + b * n_out + o + 8);
  }
  for (int r = 0; r < R; ++r) {
    __m256 e, d;
    load16_split(w + (i + r) * n_out + o, e, d);
    for (int b = 0; b < G; ++b) {
      const __m256 xv = _mm256_broadcast_ss(x + b * n_in + i + r);
      se[b] = _mm256_fmadd_ps(xv, e, se[b]);
      so[b] = _mm256_fmadd_ps(xv, d, so[b]);
    }
  }
  for (int b = 0; b < G; ++b) {
    _mm256_storeu_ps(acc + b * n_out + o, se[b]);
    _mm256_storeu_ps(acc + b * n_out + o + 8, so[b]);
  }
}

// rows_bf16_pass for m >= kBatchRows rows of x: the same sums in the same order, the
// outputs 16 at a time, four rows of x at a time.
template <int R>
GPTFN_AVX2 void rows_bf16_batch_pass(const float* x, int64_t m, int64_t n_in,
                                     const c10::BFloat16* w, int64_t n_out, int64_t i,
                                     float* acc) {
  const int64_t o16 = n_out - n_out % 16;
  for (int64_t o = 0; o < o16; o += 16) {
    int64_t b = 0;
    for (; b + 4 <= m; b += 4)
      slab_bf16<4, R>(x + b * n_in, n_in, w, n_out, i, o, acc + b * n_out);
    const float* xb = x + b * n_in;
    float* ab = acc + b * n_out;
    switch (m - b) {
      case 3: slab_bf16<3, R>(xb, n_in, w, n_out, i, o, ab); break;
      case 2: slab_bf16<2, R>(xb, n_in, w, n_out, i, o, ab); break;
      case 1: slab_bf16<1, R>(xb, n_in, w, n_out, i, o, ab); break;
      default: break;
    }
  }
  for (int64_t b = 0; b < m; ++b)
    for (int64_t o = o16; o < n_out; ++o)
      for (int r = 0; r < R; ++r)
        acc[b * n_out + o] += x[b * n_in + i + r] * to_float(w[(i + r) * n_out + o]);
}

GPTFN_AVX2 void rows_bf16_avx2(const float* x, int64_t m, int64_t n_in, const c10::BFloat16* w,
                               int64_t n_out, int64_t r0, int64_t r1, float* acc) {
  int64_t i = r0;
  if (m >= kBatchRows) {
    for (; i + 8 <= r1; i += 8) rows_bf16_batch_pass<8>(x, m, n_in, w, n_out, i, acc);
    for (; i < r1; ++i) rows_bf16_batch_pass<1>(x, m, n_in, w, n_out, i, acc);
    return;
  }
  if (!short_rows(n_out))
    for (; i + 8 <= r1; i += 8) rows_bf16_pass<8>(x, m, n_in, w, n_out, i, acc);
  for (; i < r1; ++i) rows_bf16_pass<1>(x, m, n_in, w, n_out, i, acc);
}

// y[b, v] = dot(x[b], w[v]) for v in [v0, v1), with xs = x in split order per row.
GPTFN_AVX2 void dots_bf16_avx2(const float* xs, const float* x, int64_t m, int64_t n_in,
                               const c10::BFloat16* w, int64_t v0, int64_t v1, float* y,
                               int64_t n_out) {
  const int64_t c16 = n_in - n_in % 16;
  for (int64_t v = v0; v < v1; v += 4) {
    const int rows = static_cast<int>(std::min<int64_t>(4, v1 - v));
    for (int64_t b = 0; b < m; ++b) {
      const float* xsb = xs + b * n_in;
      const float* xb = x + b * n_in;
      __m256 s[4][2];
      for (int r = 0; r < 4; ++r) s[r][0] = s[r][1] = _mm256_setzero_ps();
      if (rows == 4) {
        const bool ahead = v + kAheadDots + 4 <= n_out;
        for (int64_t c = 0; c < c16; c += 16) {
          if (ahead)
            for (int r = 0; r < 4; ++r) prefetch(w + (v + kAheadDots + r) * n_in + c);
          const __m256 xe = _mm256_loadu_ps(xsb + c), xo = _mm256_loadu_ps(xsb + c + 8);
          for (int r = 0; r < 4; ++r) {
            __m256 e, d;
            load16_split(w + (v + r) * n_in + c, e, d);
            s[r][0] = _mm256_fmadd_ps(xe, e, s[r][0]);
            s[r][1] = _mm256_fmadd_ps(xo, d, s[r][1]);
          }
        }
      } else {
        for (int r = 0; r < rows; ++r)
          for (int64_t c = 0; c < c16; c += 16) {
            __m256 e, d;
            load16_split(w + (v + r) * n_in + c, e, d);
            s[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xsb + c), e, s[r][0]);
            s[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xsb + c + 8), d, s[r][1]);
          }
      }
      for (int r = 0; r < rows; ++r) {
        float t = hsum(_mm256_add_ps(s[r][0], s[r][1]));
        for (int64_t c = c16; c < n_in; ++c) t += xb[c] * to_float(w[(v + r) * n_in + c]);
        y[b * n_out + v + r] = t;
      }
    }
  }
}

// The order the int8 rows loop leaves each block of 32 sums in: position j holds output
// kPerm32[j] (what unpacklo/hi of bytes, then of int16 pairs, produce per 128-bit lane).
constexpr int kPerm32[32] = {0,  1,  2,  3,  16, 17, 18, 19, 4,  5,  6,  7,  20, 21, 22, 23,
                             8,  9,  10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};

inline void unpermute32(float* y, int64_t n32) {
  float t[32];
  for (int64_t o = 0; o < n32; o += 32) {
    std::memcpy(t, y + o, sizeof t);
    for (int j = 0; j < 32; ++j) y[o + kPerm32[j]] = t[j];
  }
}

// Four rows of int8 w against four quantized activations q[0..3]: `sums` gives the int32
// sums over the four rows for 32 outputs, in kPerm32 order (four vectors of eight).
struct Quad {
  __m256i s01, s23, a01, a23;
  GPTFN_AVX2 explicit Quad(const int8_t* q) {
    const uint8_t q0 = static_cast<uint8_t>(q[0]), q1 = static_cast<uint8_t>(q[1]);
    const uint8_t q2 = static_cast<uint8_t>(q[2]), q3 = static_cast<uint8_t>(q[3]);
    s01 = _mm256_set1_epi16(static_cast<int16_t>(q0 | (q1 << 8)));
    s23 = _mm256_set1_epi16(static_cast<int16_t>(q2 | (q3 << 8)));
    a01 = _mm256_abs_epi8(s01);
    a23 = _mm256_abs_epi8(s23);
  }
  GPTFN_AVX2 inline void sums(const int8_t* w0, int64_t n_out, __m256i ones, __m256i* p) const {
    const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0));
    const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + n_out));
    const __m256i v2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + 2 * n_out));
    const __m256i v3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + 3 * n_out));
    // int16 sums of two rows' products per output, outputs in byte-unpack order
    const __m256i lo01 =
        _mm256_maddubs_epi16(a01, _mm256_sign_epi8(_mm256_unpacklo_epi8(v0, v1), s01));
    const __m256i hi01 =
        _mm256_maddubs_epi16(a01, _mm256_sign_epi8(_mm256_unpackhi_epi8(v0, v1), s01));
    const __m256i lo23 =
        _mm256_maddubs_epi16(a23, _mm256_sign_epi8(_mm256_unpacklo_epi8(v2, v3), s23));
    const __m256i hi23 =
        _mm256_maddubs_epi16(a23, _mm256_sign_epi8(_mm256_unpackhi_epi8(v2, v3), s23));
    // int32 sums of the four rows
    p[0] = _mm256_madd_epi16(_mm256_unpacklo_epi16(lo01, lo23), ones);
    p[1] = _mm256_madd_epi16(_mm256_unpackhi_epi16(lo01, lo23), ones);
    p[2] = _mm256_madd_epi16(_mm256_unpacklo_epi16(hi01, hi23), ones);
    p[3] = _mm256_madd_epi16(_mm256_unpackhi_epi16(hi01, hi23), ones);
  }
};

// acc (m, out) += dequantized x[:, r0:r1] @ w[r0:r1, :] (w int8 [in, out]); r0 and r1 on
// block boundaries (or r1 = n_in). The first n_out - n_out % 32 sums of a row of acc are in
// kPerm32 order; the rest, natural order.
GPTFN_AVX2 void rows_q8_avx2(const int8_t* xq, const float* xd, int64_t m, int64_t n_in,
                             const int8_t* w, int64_t n_out, int64_t r0, int64_t r1,
                             float* acc) {
  const int64_t o32 = n_out - n_out % 32;
  const int64_t blocks = (n_in + kQBlock - 1) / kQBlock;
  const __m256i ones = _mm256_set1_epi16(1);
  std::vector<int32_t> isum(static_cast<size_t>(o32));
  for (int64_t b = 0; b < m; ++b) {
    const int8_t* qb = xq + b * n_in;
    const float* db = xd + b * blocks;
    float* a = acc + b * n_out;
    for (int64_t k0 = r0; k0 < r1; k0 += kQBlock) {
      const int64_t k1 = std::min(r1, k0 + kQBlock);
      std::fill(isum.begin(), isum.end(), 0);
      int64_t i = k0;
      for (; i + 8 <= k1; i += 8) {  // eight rows a pass: half the int32 sums' traffic
        const Quad qa(qb + i), qc(qb + i + 4);
        const int8_t* w0 = w + i * n_out;
        const bool ahead = i + kAheadRows + 8 <= n_in;
        for (int64_t o = 0; o < o32; o += 32) {
          if (ahead)
            for (int j = 0; j < 8; ++j) prefetch(w0 + (kAheadRows + j) * n_out + o);
          __m256i p[4], r[4];
          qa.sums(w0 + o, n_out, ones, p);
          qc.sums(w0 + 4 * n_out + o, n_out, ones, r);
          __m256i* s = reinterpret_cast<__m256i*>(isum.data() + o);
          for (int j = 0; j < 4; ++j)
            _mm256_storeu_si256(s + j, _mm256_add_epi32(_mm256_loadu_si256(s + j),
                                                         _mm256_add_epi32(p[j], r[j])));
        }
      }
      for (; i + 4 <= k1; i += 4) {
        const Quad qa(qb + i);
        const int8_t* w0 = w + i * n_out;
        for (int64_t o = 0; o < o32; o += 32) {
          __m256i p[4];
          qa.sums(w0 + o, n_out, ones, p);
          __m256i* s = reinterpret_cast<__m256i*>(isum.data() + o);
          for (int j = 0; j < 4; ++j)
            _mm256_storeu_si256(s + j, _mm256_add_epi32(_mm256_loadu_si256(s + j), p[j]));
        }
      }
      for (; i < k1; ++i)  // rows past the last four of the block: the same sums, one row
        for (int64_t o = 0; o < o32; o += 32)
          for (int j = 0; j < 32; ++j)
            isum[o + j] += static_cast<int32_t>(qb[i]) * w[i * n_out + o + kPerm32[j]];
      const __m256 scale = _mm256_set1_ps(db[k0 / kQBlock]);
      for (int64_t o = 0; o < o32; o += 8) {
        const __m256 s = _mm256_cvtepi32_ps(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(isum.data() + o)));
        _mm256_storeu_ps(a + o, _mm256_fmadd_ps(scale, s, _mm256_loadu_ps(a + o)));
      }
    }
    for (int64_t i = r0; i < r1; ++i) {  // outputs past the last 32: natural order
      const float xi = db[i / kQBlock] * static_cast<float>(qb[i]);  // the quantized x
      for (int64_t o = o32; o < n_out; ++o) a[o] += xi * static_cast<float>(w[i * n_out + o]);
    }
  }
}

// y[b, v] = sum over blocks of d_b,k * dot(xq[b] block k, w[v] block k), v in [v0, v1).
GPTFN_AVX2 void dots_q8_avx2(const int8_t* xq, const float* xd, int64_t m, int64_t n_in,
                             const int8_t* w, int64_t v0, int64_t v1, float* y, int64_t n_out) {
  const int64_t c32 = n_in - n_in % kQBlock;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t v = v0; v < v1; v += 4) {
    const int rows = static_cast<int>(std::min<int64_t>(4, v1 - v));
    for (int64_t b = 0; b < m; ++b) {
      const int8_t* qb = xq + b * n_in;
      const float* db = xd + b * ((n_in + kQBlock - 1) / kQBlock);
      __m256 s[4];
      for (int r = 0; r < 4; ++r) s[r] = _mm256_setzero_ps();
      const bool ahead = v + kAheadDots + 4 <= n_out;
      for (int64_t c = 0; c < c32; c += kQBlock) {
        if (ahead)
          for (int r = 0; r < 4; ++r) prefetch(w + (v + kAheadDots + r) * n_in + c);
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + c));
        const __m256i ax = _mm256_abs_epi8(xv);
        const __m256 d = _mm256_set1_ps(db[c / kQBlock]);
        for (int r = 0; r < rows; ++r) {
          const __m256i wv =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (v + r) * n_in + c));
          const __m256i p = _mm256_madd_epi16(
              _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv, xv)), ones);  // 8 int32
          s[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), s[r]);
        }
      }
      for (int r = 0; r < rows; ++r) {
        float t = hsum(s[r]);
        if (c32 < n_in) {  // the last, partial block
          int32_t it = 0;
          for (int64_t c = c32; c < n_in; ++c)
            it += static_cast<int32_t>(qb[c]) * w[(v + r) * n_in + c];
          t += db[c32 / kQBlock] * static_cast<float>(it);
        }
        y[b * n_out + v + r] = t;
      }
    }
  }
}

// acc (m, out) += dequantized x[:, r0:r1] @ w[r0:r1, :] for int4 w (packed (in/2, out),
// scales fp16 (in/32, out)); r0, r1 on block boundaries. Each nibble u = q + 8 is unsigned,
// so maddubs takes the bytes as they are (no sign trick): it sums u * x over the block, and
// the block's sum of x times 8 is taken off once per output. Eight byte rows (16 inputs) a
// pass sum in int16 (at most 16 * 15 * 127 in magnitude: no overflow); the int16 sums come
// out of the byte unpacks in two halves whose lanes widen straight to natural order.
GPTFN_AVX2 void rows_q4_avx2(const int8_t* xq, const float* xd, const int32_t* xsum, int64_t m,
                             int64_t n_in, const uint8_t* w, const c10::Half* scale,
                             int64_t n_out, int64_t r0, int64_t r1, float* acc) {
  const int64_t o32 = n_out - n_out % 32;
  const int64_t blocks = n_in / kQBlock;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  std::vector<int32_t> isum(static_cast<size_t>(n_out));
  for (int64_t b = 0; b < m; ++b) {
    const int8_t* qb = xq + b * n_in;
    float* a = acc + b * n_out;
    for (int64_t k0 = r0; k0 < r1; k0 += kQBlock) {
      std::fill(isum.begin(), isum.end(), 0);
      for (int64_t h = k0; h < k0 + kQBlock; h += 16) {
        __m256i s[8];  // the pair (x[2j], x[2j + 1]) of each byte row, in every int16 lane
        for (int j = 0; j < 8; ++j) {
          const uint8_t lo = static_cast<uint8_t>(qb[h + 2 * j]);
          const uint8_t hi = static_cast<uint8_t>(qb[h + 2 * j + 1]);
          s[j] = _mm256_set1_epi16(static_cast<int16_t>(lo | (hi << 8)));
        }
        const uint8_t* w0 = w + (h / 2) * n_out;
        const bool ahead = h / 2 + kAheadRows + 8 <= n_in / 2;
        for (int64_t o = 0; o < o32; o += 32) {
          if (ahead && o % 64 == 0)  // one prefetch per 64-byte line
            for (int j = 0; j < 8; ++j) prefetch(w0 + (kAheadRows + j) * n_out + o);
          __m256i lo16 = _mm256_setzero_si256(), hi16 = _mm256_setzero_si256();
          for (int j = 0; j < 8; ++j) {
            const __m256i v =
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + j * n_out + o));
            const __m256i even = _mm256_and_si256(v, low4);  // inputs 2j, 32 outputs
            const __m256i odd = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);  // 2j + 1
            // outputs 0-7 | 16-23 (unpacklo), 8-15 | 24-31 (unpackhi), in int16
            const __m256i lo = _mm256_maddubs_epi16(_mm256_unpacklo_epi8(even, odd), s[j]);
            const __m256i hi = _mm256_maddubs_epi16(_mm256_unpackhi_epi8(even, odd), s[j]);
            lo16 = _mm256_add_epi16(lo16, lo);
            hi16 = _mm256_add_epi16(hi16, hi);
          }
          __m256i* p = reinterpret_cast<__m256i*>(isum.data() + o);
          const __m256i part[4] = {_mm256_cvtepi16_epi32(_mm256_castsi256_si128(lo16)),
                                   _mm256_cvtepi16_epi32(_mm256_castsi256_si128(hi16)),
                                   _mm256_cvtepi16_epi32(_mm256_extracti128_si256(lo16, 1)),
                                   _mm256_cvtepi16_epi32(_mm256_extracti128_si256(hi16, 1))};
          for (int j = 0; j < 4; ++j)
            _mm256_storeu_si256(p + j, _mm256_add_epi32(_mm256_loadu_si256(p + j), part[j]));
        }
      }
      const int64_t g = k0 / kQBlock;
      const int32_t offset = 8 * xsum[b * blocks + g];
      const float d = xd[b * blocks + g];
      const c10::Half* sg = scale + g * n_out;
      const __m256 dv = _mm256_set1_ps(d);
      const __m256i ov = _mm256_set1_epi32(offset);
      for (int64_t o = 0; o < o32; o += 8) {
        const __m256 ws =
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sg + o)));
        const __m256 v = _mm256_cvtepi32_ps(_mm256_sub_epi32(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(isum.data() + o)), ov));
        _mm256_storeu_ps(a + o, _mm256_fmadd_ps(_mm256_mul_ps(dv, ws), v, _mm256_loadu_ps(a + o)));
      }
      for (int64_t o = o32; o < n_out; ++o) {  // outputs past the last 32
        int32_t t = 0;
        for (int64_t i = k0; i < k0 + kQBlock; ++i) {
          const uint8_t byte = w[(i / 2) * n_out + o];
          t += static_cast<int32_t>(qb[i]) * ((i % 2 ? byte >> 4 : byte & 15));
        }
        a[o] += d * static_cast<float>(sg[o]) * static_cast<float>(t - offset);
      }
    }
  }
}

bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}
#endif

// Whether int8 products run in the AVX2 integer loops (which quantize x from fp32).
bool integer_loops() {
#ifdef GPTFN_X86
  return has_avx2();
#else
  return false;
#endif
}

// Whether the rows loop leaves its sums in split order (bf16 on AVX2).
template <typename W>
bool rows_split() {
#ifdef GPTFN_X86
  return std::is_same<W, c10::BFloat16>::value && has_avx2();
#else
  return false;
#endif
}

template <typename W>
void rows(const float* x, int64_t m, int64_t n_in, const W* w, int64_t n_out, int64_t r0,
          int64_t r1, float* acc) {
#ifdef GPTFN_X86
  if constexpr (std::is_same<W, c10::BFloat16>::value) {
    if (has_avx2()) return rows_bf16_avx2(x, m, n_in, w, n_out, r0, r1, acc);
  }
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

// y (m, out) = the sum of run(r0, r1, acc) over contiguous runs of rows [r0, r1) of w, one
// run per thread, each run a multiple of `align` rows; each run adds into its own acc.
template <typename Run>
void over_row_runs(int64_t m, int64_t n_in, int64_t n_out, int64_t align, float* y,
                   const Run& run) {
  // at least 64 rows per run, so that small matrices are not split for nothing
  const int64_t runs = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_in / 64));
  const int64_t per = ((n_in + runs - 1) / runs + align - 1) / align * align;
  std::vector<float> partial(static_cast<size_t>(runs - 1) * m * n_out, 0.f);
  std::fill(y, y + m * n_out, 0.f);
  at::parallel_for(0, runs, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      float* acc = r == 0 ? y : partial.data() + (r - 1) * m * n_out;
      const int64_t r0 = std::min(n_in, r * per), r1 = std::min(n_in, (r + 1) * per);
      if (r0 < r1) run(r0, r1, acc);
    }
  });
  for (int64_t r = 1; r < runs; ++r) {
    const float* p = partial.data() + (r - 1) * m * n_out;
    for (int64_t k = 0; k < m * n_out; ++k) y[k] += p[k];
  }
}

#ifdef GPTFN_X86
// x (m, n_in) quantized per block for the int8 loops: values (m, n_in), scales (m, blocks).
struct QuantizedRows {
  std::vector<int8_t> q;
  std::vector<float> d;
  QuantizedRows(const float* x, int64_t m, int64_t n_in)
      : q(static_cast<size_t>(m * n_in)),
        d(static_cast<size_t>(m * ((n_in + kQBlock - 1) / kQBlock))) {
    const int64_t blocks = (n_in + kQBlock - 1) / kQBlock;
    for (int64_t b = 0; b < m; ++b)
      quantize_blocks(x + b * n_in, n_in, q.data() + b * n_in, d.data() + b * blocks);
  }
};
#endif

// y (m, out) = x (m, in) @ w (in, out): threads take contiguous runs of rows of w.
template <typename W>
void product_rows(const float* x, int64_t m, int64_t n_in, const W* w, int64_t n_out, float* y) {
#ifdef GPTFN_X86
  if constexpr (std::is_same<W, int8_t>::value) {
    if (has_avx2()) {
      const QuantizedRows xq(x, m, n_in);
      over_row_runs(m, n_in, n_out, kQBlock, y, [&](int64_t r0, int64_t r1, float* acc) {
        rows_q8_avx2(xq.q.data(), xq.d.data(), m, n_in, w, n_out, r0, r1, acc);
      });
      for (int64_t b = 0; b < m; ++b) unpermute32(y + b * n_out, n_out - n_out % 32);
      return;
    }
  }
#endif
  over_row_runs(m, n_in, n_out, 1, y, [&](int64_t r0, int64_t r1, float* acc) {
    rows(x, m, n_in, w, n_out, r0, r1, acc);
  });
  if (rows_split<W>())
    for (int64_t b = 0; b < m; ++b) unsplit(y + b * n_out, n_out - n_out % 16);
}

#ifdef GPTFN_X86
// y (m, out) = x (m, in) @ int4 w (in/2, out) with its scales, in the AVX2 loop.
void product_q4(const float* x, int64_t m, int64_t n_in, const uint8_t* w,
                const c10::Half* scale, int64_t n_out, float* y) {
  const QuantizedRows xq(x, m, n_in);
  const int64_t blocks = n_in / kQBlock;
  std::vector<int32_t> xsum(static_cast<size_t>(m * blocks));
  for (int64_t k = 0; k < m * blocks; ++k)
    for (int64_t c = 0; c < kQBlock; ++c) xsum[k] += xq.q[k * kQBlock + c];
  over_row_runs(m, n_in, n_out, kQBlock, y, [&](int64_t r0, int64_t r1, float* acc) {
    rows_q4_avx2(xq.q.data(), xq.d.data(), xsum.data(), m, n_in, w, scale, n_out, r0, r1,
                 acc);
  });
}
#endif

// y (m, out) = x (m, in) @ w.T, w (out, in): threads take runs of outputs.
template <typename W>
void product_dots(const float* x, int64_t m, int64_t n_in, const W* w, int64_t n_out, float* y) {
#ifdef GPTFN_X86
  if constexpr (std::is_same<W, int8_t>::value) {
    if (has_avx2()) {
      const QuantizedRows xq(x, m, n_in);
      at::parallel_for(0, n_out, 256, [&](int64_t b, int64_t e) {
        dots_q8_avx2(xq.q.data(), xq.d.data(), m, n_in, w, b, e, y, n_out);
      });
      return;
    }
  }
  if constexpr (std::is_same<W, c10::BFloat16>::value) {
    if (has_avx2()) {
      std::vector<float> xs(static_cast<size_t>(m * n_in));
      for (int64_t b = 0; b < m; ++b) split(x + b * n_in, n_in - n_in % 16, xs.data() + b * n_in);
      at::parallel_for(0, n_out, 256, [&](int64_t b, int64_t e) {
        dots_bf16_avx2(xs.data(), x, m, n_in, w, b, e, y, n_out);
      });
      return;
    }
  }
#endif
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
  if (weight.scalar_type() == at::kByte) {  // int4, as gptfn.functional.unpack_int4
    const int64_t n_out = weight.size(1);
    at::Tensor q = at::stack({weight.bitwise_and(15), weight.bitwise_right_shift(4)}, 1)
                       .reshape({-1, n_out}).to(at::kFloat).sub(8);  // (in, out)
    return q.view({scale->size(0), -1, n_out})
        .mul(scale->to(at::kFloat).unsqueeze(1))
        .view({q.size(0), n_out});
  }
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
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kChar ||
                  st == at::kByte,
              "gptfn::rowmul takes fp32, bf16, fp16, int8 or int4 (uint8) weights, got ", st);
  const bool int4 = st == at::kByte;
  TORCH_CHECK((st == at::kChar || int4) == scale.has_value(),
              "gptfn::rowmul: int8 and int4 weights need a scale, and only they take one");
  TORCH_CHECK(!(int4 && transposed), "gptfn::rowmul: int4 weights are [in/2, out], not transposed");
  const int64_t n_in = transposed ? weight.size(1) : int4 ? 2 * weight.size(0) : weight.size(0);
  const int64_t n_out = transposed ? weight.size(0) : weight.size(1);
  TORCH_CHECK(x.size(-1) == n_in, "gptfn::rowmul: x has ", x.size(-1),
              " features, the weight takes ", n_in);
  if (int4) {
    TORCH_CHECK(n_in % kQBlock == 0 && scale->scalar_type() == at::kHalf && scale->dim() == 2 &&
                    scale->size(0) == n_in / kQBlock && scale->size(1) == n_out,
                "gptfn::rowmul: an int4 weight takes inputs in groups of ", kQBlock,
                " and fp16 scales of shape [", n_in / kQBlock, ", ", n_out, "]");
  } else if (scale.has_value()) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->numel() == n_out,
                "gptfn::rowmul: the scale must be ", n_out, " fp32 values");
  }
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == n_out,
                "gptfn::rowmul: the bias must be ", n_out, " fp32 values");

  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = n_out;
  if (n_in == 0) {  // an empty sum: the bias, or zeros
    at::Tensor y = at::zeros(shape, x.options());
    return bias.has_value() ? y + *bias : y;
  }
  const int64_t m = x.numel() / n_in;
  at::Tensor xc = x.reshape({m, n_in}).contiguous();
  // int8, int4: the integer loops quantize x themselves; every other route takes it quantized
  const bool in_integers = m <= kMaxRows && integer_loops();
  if ((st == at::kChar || int4) && m > 0 && !in_integers) {
    xc = quantized_activations(xc);
  }
  if (m > kMaxRows || (int4 && !in_integers)) {
    at::Tensor w = dequantized(weight, scale, transposed);
    at::Tensor y = bias.has_value() ? at::addmm(*bias, xc, w) : at::mm(xc, w);
    return y.view(shape);
  }
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
#ifdef GPTFN_X86
      case at::kByte:  // the integer loops (the other routes took the dequantized copy)
      {
        const at::Tensor groups = scale->contiguous();
        product_q4(xp, m, n_in, wc.data_ptr<uint8_t>(), groups.data_ptr<c10::Half>(), n_out, yp);
        break;
      }
#endif
      default:
        product(xp, m, n_in, wc.data_ptr<int8_t>(), n_out, transposed, yp);
    }
    // scale and bias in one pass here: two ATen calls each cost more than the pass
    // (int4's group scales were applied inside its loop)
    at::Tensor sc = scale.has_value() && !int4 ? scale->contiguous() : at::Tensor();
    at::Tensor bi = bias.has_value() ? bias->contiguous() : at::Tensor();
    const float* sp = sc.defined() ? sc.data_ptr<float>() : nullptr;
    const float* bp = bi.defined() ? bi.data_ptr<float>() : nullptr;
    if (sp || bp)
      for (int64_t b = 0; b < m; ++b) {
        float* yb = yp + b * n_out;
        if (sp && bp)
          for (int64_t o = 0; o < n_out; ++o) yb[o] = yb[o] * sp[o] + bp[o];
        else if (sp)
          for (int64_t o = 0; o < n_out; ++o) yb[o] *= sp[o];
        else
          for (int64_t o = 0; o < n_out; ++o) yb[o] += bp[o];
      }
  }
  return y.view(shape);
}

at::Tensor rowmul_meta(const at::Tensor& x, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& scale,
                       const c10::optional<at::Tensor>& bias, bool transposed) {
  // symbolic sizes: a graph with dynamic shapes (torch.export's Dim) must not be
  // specialized to its example's sizes by asking for concrete ones here
  c10::SymDimVector shape(x.sym_sizes().begin(), x.sym_sizes().end());
  shape.back() = transposed ? weight.sym_size(0) : weight.sym_size(1);
  return at::empty_symint(shape, x.options());
}

}  // namespace

TORCH_LIBRARY(gptfn, m) {
  m.def("rowmul(Tensor x, Tensor weight, Tensor? scale, Tensor? bias, bool transposed) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptfn, CPU, m) { m.impl("rowmul", rowmul); }

TORCH_LIBRARY_IMPL(gptfn, Meta, m) { m.impl("rowmul", rowmul_meta); }
