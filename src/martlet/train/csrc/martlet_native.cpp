// Martlet's native CPU kernels: the element-wise passes of a LoRA training step, fused (see train/native.py).
//
// Each kernel reads its inputs once and writes its outputs once, in parallel over torch's intra-op threads,
// with loops written so the compiler vectorizes them (built with -O3 -march=native for the machine it runs on).
// bf16 values are handled as their 16-bit patterns; arithmetic is in fp32 and every result torch would round
// to bf16 is rounded here at the same place (round to nearest even), so the outputs match torch's bit for bit
// except where a sum is accumulated in a different order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

// the helpers below sit in the hot loops: inlined there or the loops are not vectorized
#define ALWAYS_INLINE inline __attribute__((always_inline))

namespace {

using bf16 = uint16_t;  // a bf16 value's bit pattern

ALWAYS_INLINE float to_float(bf16 b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

ALWAYS_INLINE bf16 to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? bf16(0x7fc0) : bf16(rounded);
}

template <typename T> ALWAYS_INLINE float load(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, bf16>) return to_float(p[i]); else return p[i];
}
template <typename T> ALWAYS_INLINE void store(T* p, int64_t i, float v) {
  if constexpr (std::is_same_v<T, bf16>) p[i] = to_bf16(v); else p[i] = v;
}
template <typename T> ALWAYS_INLINE float round_as(float v) {  // v as it would be stored in T
  if constexpr (std::is_same_v<T, bf16>) return to_float(to_bf16(v)); else return v;
}

constexpr int64_t kGrain = 1 << 14;  // elements per task: tensors of a few hundred rows split over the threads

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "martlet native: ", name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat,
              "martlet native: ", name, " must be bf16 or fp32, not ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "martlet native: ", name, " must be contiguous");
}

void check_like(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes(), "martlet native: ", what,
              " must have the same shape and dtype");
}

template <typename T> struct Type { using type = T; };

// fn(Type<bf16>) or fn(Type<float>), by the tensor's dtype
template <typename Fn> void dispatch(const at::Tensor& t, Fn fn) {
  if (t.scalar_type() == at::kBFloat16) fn(Type<bf16>{}); else fn(Type<float>{});
}

template <typename T> T* ptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

// ---- LoRA dropout -----------------------------------------------------------------------------------------
// The keep decisions come from a counter-based stream: word w is SplitMix64's output for counter w from `seed`,
// so any thread computes any word, and the backward pass recomputes the mask instead of keeping it. Elements
// go in blocks of 64: element 16 j + v of block b is kept when 16-bit lane j of word 16 b + v is >= threshold
// (keep probability 1 - threshold / 65536). That layout keeps every load and store contiguous.
ALWAYS_INLINE uint64_t stream_word(uint64_t seed, uint64_t w) {
  uint64_t z = seed + (w + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

constexpr int64_t kBlock = 64, kWords = 16;

// fn(i, keep) for the elements i = 0..63 of block b, keep being all-ones bits (kept) or zero
template <typename B, typename Fn>
ALWAYS_INLINE void over_block(uint64_t seed, uint32_t threshold, int64_t b, Fn fn) {
  uint64_t words[kWords];
#pragma omp simd
  for (int64_t v = 0; v < kWords; ++v) words[v] = stream_word(seed, b * kWords + v);
  for (int64_t j = 0; j < 4; ++j) {
#pragma omp simd
    for (int64_t v = 0; v < kWords; ++v)
      fn(j * kWords + v, ((words[v] >> (16 * j)) & 0xffffu) >= threshold ? B(~B(0)) : B(0));
  }
}

template <typename B> ALWAYS_INLINE float bits_to_float(B bits) {
  if constexpr (sizeof(B) == 2) return to_float(bits);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// block(b, in, out) for every block b in parallel, `in` and `out` pointing at its first element; the last,
// partial block runs on copies padded to 64 elements.
template <typename B, typename Block>
void over_blocks(const B* in, B* out, int64_t n, Block block) {
  int64_t full = n / kBlock;
  at::parallel_for(0, full, kGrain / kBlock, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) block(b, in + b * kBlock, out + b * kBlock);
  });
  int64_t rest = n - full * kBlock;
  if (rest == 0) return;
  B tail_in[kBlock] = {}, tail_out[kBlock] = {};
  std::memcpy(tail_in, in + full * kBlock, rest * sizeof(B));
  std::memcpy(tail_out, out + full * kBlock, rest * sizeof(B));
  block(full, tail_in, tail_out);
  std::memcpy(out + full * kBlock, tail_out, rest * sizeof(B));
}

// x with the dropped elements zeroed
at::Tensor dropout_keep(const at::Tensor& x, int64_t seed, int64_t threshold) {
  check(x, "x");
  auto out = at::empty_like(x);
  dispatch(x, [&](auto type) {
    using T = typename decltype(type)::type;
    using B = std::conditional_t<sizeof(T) == 2, uint16_t, uint32_t>;
    over_blocks<B>(ptr<B>(x), ptr<B>(out), x.numel(), [&](int64_t b, const B* in, B* dst) {
      over_block<B>(uint64_t(seed), uint32_t(threshold), b, [&](int64_t i, B keep) { dst[i] = in[i] & keep; });
    });
  });
  return out;
}

// out += g at the kept elements (the dropout's backward pass, added into the base layer's input gradient)
at::Tensor dropout_keep_add_(at::Tensor out, const at::Tensor& g, int64_t seed, int64_t threshold) {
  check(out, "out");
  check(g, "g");
  check_like(out, g, "out and g");
  dispatch(out, [&](auto type) {
    using T = typename decltype(type)::type;
    using B = std::conditional_t<sizeof(T) == 2, uint16_t, uint32_t>;
    over_blocks<B>(ptr<B>(g), ptr<B>(out), out.numel(), [&](int64_t b, const B* in, B* dst) {
      T* acc = reinterpret_cast<T*>(dst);
      over_block<B>(uint64_t(seed), uint32_t(threshold), b, [&](int64_t i, B keep) {
        store(acc, i, load(acc, i) + bits_to_float<B>(B(in[i] & keep)));
      });
    });
  });
  return out;
}

// ---- RMSNorm (llama's): y = weight * T(x * rsqrt(mean(x^2) + eps)), the statistics in fp32 -----------------
template <typename T>
void rms_rows(const T* __restrict x, const T* __restrict w, T* __restrict y, float* __restrict rstd, int64_t begin,
              int64_t end, int64_t h, float eps) {
  for (int64_t r = begin; r < end; ++r) {
    const T* xr = x + r * h;
    T* yr = y + r * h;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < h; ++i) ss += load(xr, i) * load(xr, i);
    float s = 1.f / std::sqrt(ss / float(h) + eps);
    rstd[r] = s;
#pragma omp simd
    for (int64_t i = 0; i < h; ++i) store(yr, i, load(w, i) * round_as<T>(load(xr, i) * s));
  }
}

template <typename T>
void rms_backward_rows(const T* __restrict dy, const T* __restrict x, const T* __restrict w, const float* __restrict rstd,
                       T* __restrict dx, int64_t begin, int64_t end, int64_t h) {
  for (int64_t r = begin; r < end; ++r) {
    const T* dyr = dy + r * h;
    const T* xr = x + r * h;
    T* dxr = dx + r * h;
    float s = rstd[r], dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < h; ++i) dot += load(dyr, i) * load(w, i) * load(xr, i);
    float c = dot * s * s / float(h);
#pragma omp simd
    for (int64_t i = 0; i < h; ++i) store(dxr, i, s * (load(dyr, i) * load(w, i) - load(xr, i) * c));
  }
}

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check(x, "x");
  check(weight, "weight");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && x.size(-1) == weight.numel(),
              "martlet native: x and weight must have one dtype and hidden size");
  int64_t h = weight.numel(), rows = x.numel() / h;
  auto y = at::empty_like(x);
  auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  dispatch(x, [&](auto type) {
    using T = typename decltype(type)::type;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / h), [&](int64_t b, int64_t e) {
      rms_rows<T>(ptr<T>(x), ptr<T>(weight), ptr<T>(y), rstd.data_ptr<float>(), b, e, h, float(eps));
    });
  });
  return {y, rstd};
}

// the gradient with respect to x (the weight's, when it trains, is computed by the caller)
at::Tensor rms_norm_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rstd) {
  check(grad, "grad");
  check(x, "x");
  check_like(grad, x, "grad and x");
  int64_t h = weight.numel(), rows = x.numel() / h;
  auto dx = at::empty_like(x);
  dispatch(x, [&](auto type) {
    using T = typename decltype(type)::type;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / h), [&](int64_t b, int64_t e) {
      rms_backward_rows<T>(ptr<T>(grad), ptr<T>(x), ptr<T>(weight), rstd.data_ptr<float>(), ptr<T>(dx), b, e, h);
    });
  });
  return dx;
}

// ---- SwiGLU: y = T(silu(gate)) * up ------------------------------------------------------------------------
ALWAYS_INLINE float exp_approx(float x) {  // e^x within 2 ulp: Cody-Waite reduction and a degree-6 polynomial, vectorizable
  x = x < -86.6f ? -86.6f : (x > 88.f ? 88.f : x);  // >= 2^-125: no subnormal results (slow on x86)
  const float round_magic = 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  float k = (x * 1.44269504f + round_magic) - round_magic;
  float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  int32_t bits = (int32_t(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

template <typename T>
void swiglu_range(const T* __restrict g, const T* __restrict u, T* __restrict y, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    float gv = load(g, i);
    store(y, i, round_as<T>(gv / (1.f + exp_approx(-gv))) * load(u, i));
  }
}

template <typename T>
void swiglu_backward_range(const T* __restrict dy, const T* __restrict g, const T* __restrict u, T* __restrict dg,
                           T* __restrict du, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    float gv = load(g, i), d = load(dy, i);
    float sig = 1.f / (1.f + exp_approx(-gv));
    store(du, i, d * round_as<T>(gv * sig));
    store(dg, i, round_as<T>(d * load(u, i)) * sig * (1.f + gv * (1.f - sig)));
  }
}

at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up) {
  check(gate, "gate");
  check(up, "up");
  check_like(gate, up, "gate and up");
  auto y = at::empty_like(gate);
  dispatch(gate, [&](auto type) {
    using T = typename decltype(type)::type;
    at::parallel_for(0, gate.numel(), kGrain, [&](int64_t b, int64_t e) {
      swiglu_range<T>(ptr<T>(gate), ptr<T>(up), ptr<T>(y), b, e);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up) {
  check(grad, "grad");
  check_like(grad, gate, "grad and gate");
  check_like(gate, up, "gate and up");
  auto dg = at::empty_like(gate), du = at::empty_like(up);
  dispatch(gate, [&](auto type) {
    using T = typename decltype(type)::type;
    at::parallel_for(0, gate.numel(), kGrain, [&](int64_t b, int64_t e) {
      swiglu_backward_range<T>(ptr<T>(grad), ptr<T>(gate), ptr<T>(up), ptr<T>(dg), ptr<T>(du), b, e);
    });
  });
  return {dg, du};
}

// ---- cross-entropy of a chunk of logits, with its gradient -------------------------------------------------
// For each row: loss = logsumexp(row) - row[target] (fp32), and the row is overwritten with its gradient,
// softmax(row) - one_hot(target), rounded to the row's dtype: what log_softmax in fp32, gather, exp and the
// cast back compute in five passes, in three (max, sum of exponentials, write).
template <typename T>
void cross_entropy_rows(T* __restrict logits, const int64_t* __restrict target, float* __restrict loss, int64_t begin,
                        int64_t end, int64_t vocab) {
  for (int64_t r = begin; r < end; ++r) {
    T* row = logits + r * vocab;
    float top = -INFINITY;
#pragma omp simd reduction(max : top)
    for (int64_t i = 0; i < vocab; ++i) top = std::max(top, load(row, i));
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < vocab; ++i) sum += exp_approx(load(row, i) - top);
    float log_sum = std::log(sum), inverse = 1.f / sum;
    int64_t t = target[r];
    loss[r] = log_sum + top - load(row, t);
#pragma omp simd
    for (int64_t i = 0; i < vocab; ++i) store(row, i, exp_approx(load(row, i) - top) * inverse - (i == t ? 1.f : 0.f));
  }
}

at::Tensor cross_entropy_grad_(at::Tensor logits, const at::Tensor& target) {
  check(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && target.dim() == 1 && target.size(0) == logits.size(0) &&
              target.scalar_type() == at::kLong && target.is_contiguous(),
              "martlet native: logits (rows, vocabulary) and int64 targets (rows) expected");
  int64_t rows = logits.size(0), vocab = logits.size(1);
  if (rows > 0) {
    auto [low, high] = target.aminmax();
    TORCH_CHECK(low.item<int64_t>() >= 0 && high.item<int64_t>() < vocab, "martlet native: a target is outside [0, ",
                vocab, ")");
  }
  auto loss = at::empty({rows}, logits.options().dtype(at::kFloat));
  dispatch(logits, [&](auto type) {
    using T = typename decltype(type)::type;
    at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
      cross_entropy_rows<T>(ptr<T>(logits), target.data_ptr<int64_t>(), loss.data_ptr<float>(), b, e, vocab);
    });
  });
  return loss;
}

// ---- rotary position embedding (llama's rotate-half form) --------------------------------------------------
// x: (batch, length, heads, dim) contiguous, cos and sin: (batch or 1, length, dim). Forward, for each head:
// out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1); each product rounded, then the sum, as torch
// does. Backward (the transpose): grad = g * cos + (g2 * sin2, -(g1 * sin1)).
template <typename T>
void rotary_rows(const T* __restrict x, const T* __restrict cos, const T* __restrict sin, T* __restrict out,
                 int64_t begin, int64_t end, int64_t heads, int64_t dim, int64_t angle_rows, bool backward) {
  int64_t half = dim / 2;
  for (int64_t r = begin; r < end; ++r) {  // r: a (batch, position) pair
    const T* c = cos + (r % angle_rows) * dim;  // cos and sin may have batch 1 for all the batch
    const T* s = sin + (r % angle_rows) * dim;
    for (int64_t h = 0; h < heads; ++h) {
      const T* xr = x + (r * heads + h) * dim;
      T* o = out + (r * heads + h) * dim;
      if (!backward) {
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          float x1 = load(xr, i), x2 = load(xr, i + half);
          store(o, i, round_as<T>(x1 * load(c, i)) + round_as<T>(-x2 * load(s, i)));
          store(o, i + half, round_as<T>(x2 * load(c, i + half)) + round_as<T>(x1 * load(s, i + half)));
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          float g1 = load(xr, i), g2 = load(xr, i + half);
          store(o, i, round_as<T>(g1 * load(c, i)) + round_as<T>(g2 * load(s, i + half)));
          store(o, i + half, round_as<T>(g2 * load(c, i + half)) - round_as<T>(g1 * load(s, i)));
        }
      }
    }
  }
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  check(x, "x");
  check(cos, "cos");
  check(sin, "sin");
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 3 && cos.sizes() == sin.sizes() && x.scalar_type() == cos.scalar_type() &&
              cos.scalar_type() == sin.scalar_type() && (cos.size(0) == x.size(0) || cos.size(0) == 1) &&
              x.size(1) == cos.size(1) &&
              x.size(3) == cos.size(2) && x.size(3) % 2 == 0,
              "martlet native: x (batch, length, heads, dim) and cos, sin (batch or 1, length, dim) of one dtype expected");
  auto out = at::empty_like(x);
  int64_t rows = x.size(0) * x.size(1), heads = x.size(2), dim = x.size(3);
  dispatch(x, [&](auto type) {
    using T = typename decltype(type)::type;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / (heads * dim)), [&](int64_t b, int64_t e) {
      rotary_rows<T>(ptr<T>(x), ptr<T>(cos), ptr<T>(sin), ptr<T>(out), b, e, heads, dim, cos.size(0) * cos.size(1),
                     backward);
    });
  });
  return out;
}

// ---- causal softmax of attention scores ----------------------------------------------------------------------
// scores: (..., rows, length), row r holding the scores of query position r % length (the query heads that share
// a key/value head stacked) against every key. probs = softmax(scale * scores) over the keys up to the query's
// position, 0 beyond it, computed in fp32 and rounded to the scores' dtype; the backward pass:
// grad_scores = scale * probs * (grad - sum(grad * probs)).
template <typename T>
void causal_softmax_rows(const T* __restrict scores, T* __restrict probs, int64_t begin, int64_t end, int64_t length,
                         float scale) {
  for (int64_t r = begin; r < end; ++r) {
    const T* in = scores + r * length;
    T* out = probs + r * length;
    int64_t visible = r % length + 1;
    float top = -INFINITY;
#pragma omp simd reduction(max : top)
    for (int64_t j = 0; j < visible; ++j) top = std::max(top, load(in, j) * scale);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < visible; ++j) sum += exp_approx(load(in, j) * scale - top);
    float inverse = 1.f / sum;
#pragma omp simd
    for (int64_t j = 0; j < visible; ++j) store(out, j, exp_approx(load(in, j) * scale - top) * inverse);
    for (int64_t j = visible; j < length; ++j) out[j] = T(0);
  }
}

template <typename T>
void causal_softmax_backward_rows(const T* __restrict grad, const T* __restrict probs, T* __restrict out, int64_t begin,
                                  int64_t end, int64_t length, float scale) {
  for (int64_t r = begin; r < end; ++r) {
    const T* g = grad + r * length;
    const T* p = probs + r * length;
    T* o = out + r * length;
    int64_t visible = r % length + 1;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < visible; ++j) dot += load(g, j) * load(p, j);
#pragma omp simd
    for (int64_t j = 0; j < visible; ++j) store(o, j, scale * load(p, j) * (load(g, j) - dot));
    for (int64_t j = visible; j < length; ++j) o[j] = T(0);
  }
}

at::Tensor causal_softmax(const at::Tensor& scores, double scale) {
  check(scores, "scores");
  TORCH_CHECK(scores.dim() >= 2 && scores.size(-2) % std::max<int64_t>(1, scores.size(-1)) == 0,
              "martlet native: scores (..., k * length, length) expected");
  auto probs = at::empty_like(scores);
  int64_t length = scores.size(-1), rows = length ? scores.numel() / length : 0;
  dispatch(scores, [&](auto type) {
    using T = typename decltype(type)::type;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, length)), [&](int64_t b, int64_t e) {
      causal_softmax_rows<T>(ptr<T>(scores), ptr<T>(probs), b, e, length, float(scale));
    });
  });
  return probs;
}

at::Tensor causal_softmax_backward(const at::Tensor& grad, const at::Tensor& probs, double scale) {
  check(grad, "grad");
  check(probs, "probs");
  check_like(grad, probs, "grad and probs");
  auto out = at::empty_like(grad);
  int64_t length = probs.size(-1), rows = length ? probs.numel() / length : 0;
  dispatch(probs, [&](auto type) {
    using T = typename decltype(type)::type;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, length)), [&](int64_t b, int64_t e) {
      causal_softmax_backward_rows<T>(ptr<T>(grad), ptr<T>(probs), ptr<T>(out), b, e, length, float(scale));
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(martlet, m) {
  m.def("dropout_keep(Tensor x, int seed, int threshold) -> Tensor", &dropout_keep);
  m.def("dropout_keep_add_(Tensor(a!) out, Tensor g, int seed, int threshold) -> Tensor(a!)", &dropout_keep_add_);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)", &rms_norm);
  m.def("rms_norm_backward(Tensor grad, Tensor x, Tensor weight, Tensor rstd) -> Tensor", &rms_norm_backward);
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor", &swiglu);
  m.def("swiglu_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)", &swiglu_backward);
  m.def("cross_entropy_grad_(Tensor(a!) logits, Tensor target) -> Tensor", &cross_entropy_grad_);
  m.def("rotary(Tensor x, Tensor cos, Tensor sin, bool backward) -> Tensor", &rotary);
  m.def("causal_softmax(Tensor scores, float scale) -> Tensor", &causal_softmax);
  m.def("causal_softmax_backward(Tensor grad, Tensor probs, float scale) -> Tensor", &causal_softmax_backward);
}
