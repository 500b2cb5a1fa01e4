// Martlet's native CPU kernels: the element-wise passes of a LoRA training step, fused (see train/native.py).
//
// Each kernel reads its inputs once and writes its outputs once, in parallel over torch's intra-op threads,
// with loops written so the compiler vectorizes them (built with -O3 -march=native for the machine it runs on).
// bf16 values are handled as their 16-bit patterns; arithmetic is in fp32 and every result torch would round
// to bf16 is rounded here at the same place (round to nearest even), so the outputs match torch's bit for bit
// except where a sum is accumulated in a different order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#if defined(__AVX512F__) || defined(__FMA__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

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

// ---- LoRA adapters ----------------------------------------------------------------------------------------
// An adapter of rank r (8-64) on a linear layer: xa = drop(x) A^T (tokens x r), then out += xa B^T. oneDNN runs
// products this thin at a few percent of its speed (a fixed cost per call, the input read once per product),
// and a dropout takes passes of its own over x, forward and backward. Here each op is one pass over the rows:
// a row is read once (the dropout mask applied on the way), and rows go in groups of 4 against the factors in
// groups of 4, so each vector load feeds several fused multiply-adds. The factor matrices and the thin results
// are fp32. Sums over rows (the factors' gradients) are accumulated per thread and added in order: a given
// thread count gives the same bits every time.
constexpr int kLanes = 16, kRows = 4, kCols = 4, kPad = 2 * kLanes;  // rows padded to whole mask groups
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef uint32_t vu __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef uint16_t vh __attribute__((vector_size(kLanes * sizeof(uint16_t))));

template <typename V, typename S> ALWAYS_INLINE V vread(const S* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename V, typename S> ALWAYS_INLINE void vwrite(S* p, V v) { std::memcpy(p, &v, sizeof v); }
template <typename To, typename From> ALWAYS_INLINE To vbits(From v) {
  To t;
  std::memcpy(&t, &v, sizeof t);
  return t;
}

// The register-blocked products (the LoRA adapters' dots and outer products, the attention's) run on `va`: the
// 16-lane vf with AVX-512; elsewhere 8 lanes, one AVX2 register (blocks of 16-lane vectors were kept on the stack
// there: the attention's products ran at 14 GFLOP/s, the adapters' 3-5x slower than torch's)
#if defined(__AVX512F__)
constexpr int kVecLanes = kLanes, kBlockCols = 4;
typedef vf va;
ALWAYS_INLINE va vafma(va a, va b, va c) { return _mm512_fmadd_ps(a, b, c); }
#else
constexpr int kVecLanes = 8, kBlockCols = 2;  // 4 rows x 2 factors: 8 accumulators + 4 rows of AVX2's 16 registers
typedef float va __attribute__((vector_size(kVecLanes * sizeof(float))));
ALWAYS_INLINE va vafma(va a, va b, va c) {  // rounded once per lane
#if defined(__FMA__)
  return _mm256_fmadd_ps(a, b, c);
#else
  va r;
  for (int l = 0; l < kVecLanes; ++l) r[l] = __builtin_fmaf(a[l], b[l], c[l]);
  return r;
#endif
}
#endif
ALWAYS_INLINE vf vsplat(float s) {
#if defined(__AVX512F__)
  return _mm512_set1_ps(s);
#else
  vf v;
  for (int l = 0; l < kLanes; ++l) v[l] = s;
  return v;
#endif
}
ALWAYS_INLINE vf vfma(vf a, vf b, vf c) {  // a * b + c rounded once per lane (the build turns off contraction)
#if defined(__AVX512F__)
  return _mm512_fmadd_ps(a, b, c);
#else  // in va halves (a loop over the 16 lanes compiled to scalar calls)
  vf r;
  for (int h = 0; h < kLanes; h += kVecLanes) {
    va x = vafma(vread<va>(reinterpret_cast<const float*>(&a) + h), vread<va>(reinterpret_cast<const float*>(&b) + h),
                 vread<va>(reinterpret_cast<const float*>(&c) + h));
    vwrite(reinterpret_cast<float*>(&r) + h, x);
  }
  return r;
#endif
}
template <typename V> ALWAYS_INLINE float vsum(V v) {  // the lanes' sum, of a vf or a va
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64) return _mm512_reduce_add_ps(v);
#endif
  float s = 0.f;
  for (size_t l = 0; l < sizeof(V) / sizeof(float); ++l) s += v[l];
  return s;
}

// 16 elements of T as fp32, and back (bf16: rounded to nearest even, NaN kept)
template <typename T> ALWAYS_INLINE vf vload_as(const T* p) {
  if constexpr (std::is_same_v<T, bf16>) {
#if defined(__AVX512F__)  // one widening load (the generic form compiles to two halves)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
#else
    return vbits<vf>(__builtin_convertvector(vread<vh>(p), vu) << 16);
#endif
  } else {
    return vread<vf>(p);
  }
}
template <typename T> ALWAYS_INLINE void vstore_as(T* p, vf v) {
  if constexpr (std::is_same_v<T, bf16>) {
#if defined(__AVX512BF16__)  // one instruction; subnormal values (below 1.2e-38) go to zero
    vwrite(p, _mm512_cvtneps_pbh(v));
#else
    vu u = vbits<vu>(v);
    vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    vu nan = vbits<vu>((u & 0x7fffffffu) > 0x7f800000u);  // all ones where NaN
    vwrite(p, __builtin_convertvector((rounded & ~nan) | (0x7fc0u & nan), vh));
#endif
  } else {
    vwrite(p, v);
  }
}

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// The dropout mask comes from a counter-based stream: any thread computes any part of it, and the backward pass
// recomputes it from the seed instead of keeping it. Word w of the stream is a 32-bit hash of w keyed by the seed
// (Wellons' lowbias32 with the key mixed in); row `row`'s elements 32 g + v and 32 g + 16 + v (v < 16) are kept
// when the low and the high 16 bits of word (row * ceil(k / 32) + g) * 16 + v are >= threshold: keep
// probability 1 - threshold / 65536. Whole vectors of 16 words at a time; keep bits all ones (kept) or zero.
ALWAYS_INLINE void keep_bits(uint64_t seed, uint32_t threshold, uint32_t word, vu& low, vu& high) {
  constexpr uint32_t kGolden = 0x9E3779B9u;  // (word + v) * kGolden, one multiply fewer
  const vu steps = vu{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15} * kGolden;
  vu h = (word * kGolden + uint32_t(seed)) + steps;
  h ^= h >> 16;
  h *= 0x21f0aaadu;
  h ^= (h >> 15) ^ uint32_t(seed >> 32);
  h *= 0x735a2d97u;
  h ^= h >> 15;
  low = vbits<vu>((h & 0xffffu) >= threshold);
  high = vbits<vu>((h >> 16) >= threshold);
}

// columns [c0, c0 + width) of row `row` of an input (src: the row's k elements) as fp32 in dst, zero past k;
// with a threshold > 0 the dropped elements are zeroed and `keep` (if given) gets the keep bits. `groups`:
// mask groups per row (ceil(k / 32)); c0 and width are multiples of 32.
template <typename T>
ALWAYS_INLINE void load_segment(const T* src, int64_t k, int64_t c0, int64_t width, int64_t row, int64_t groups,
                                uint64_t seed, uint32_t threshold, float* __restrict dst, uint32_t* __restrict keep) {
  int64_t valid = std::clamp<int64_t>(k - c0, 0, width), full = valid / kLanes * kLanes;
  for (int64_t i = 0; i < full; i += kLanes) vwrite(dst + i, vload_as(src + c0 + i));
  for (int64_t i = full; i < valid; ++i) dst[i] = load(src + c0, i);
  for (int64_t i = valid; i < width; ++i) dst[i] = 0.f;
  if (threshold == 0) return;
  for (int64_t g = 0; g < width / kPad; ++g) {
    vu low, high;
    keep_bits(seed, threshold, uint32_t((row * groups + c0 / kPad + g) * kLanes), low, high);
    float* d = dst + g * kPad;
    if (keep != nullptr) {
      vwrite(keep + g * kPad, low);
      vwrite(keep + g * kPad + kLanes, high);
    }
    vwrite(d, vread<vu>(d) & low);
    vwrite(d + kLanes, vread<vu>(d + kLanes) & high);
  }
}

// scale * m (a factor matrix, any float dtype), or its transpose, as fp32 rows of `width` elements zero-padded
std::vector<float> factor(const at::Tensor& m, int64_t width, double scale, bool transpose) {
  auto src = (transpose ? m.t() : m).to(at::kFloat);
  int64_t rows = src.size(0), cols = src.size(1), s0 = src.stride(0), s1 = src.stride(1);
  const float* in = src.data_ptr<float>();
  std::vector<float> out(rows * width, 0.f);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) out[i * width + j] = float(scale) * in[i * s0 + j * s1];
  return out;
}

// A tile is a few columns of a few rows: the rows' segments (`width` floats apart), the matching columns of
// the factor matrices (`ld` floats apart) and of the sums, all in the L1 cache.
constexpr int64_t kTile = 256;

// out[i * r + j] += <rows[i], mat[j]> over the tile, for the RB rows and every factor j
template <int RB, int JB>
ALWAYS_INLINE void dots_block(const float* rows, int64_t width, const float* mat, int64_t ld, int64_t j0, int64_t r,
                              float* out) {
  va acc[RB][JB] = {};
  for (int64_t c = 0; c < width; c += kVecLanes) {
    va xs[RB];
    for (int i = 0; i < RB; ++i) xs[i] = vread<va>(rows + i * width + c);
    for (int j = 0; j < JB; ++j) {
      va m = vread<va>(mat + (j0 + j) * ld + c);
      for (int i = 0; i < RB; ++i) acc[i][j] = vafma(xs[i], m, acc[i][j]);
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int j = 0; j < JB; ++j) out[i * r + j0 + j] += vsum(acc[i][j]);
}

template <int RB>
void dots(const float* rows, int64_t width, const float* mat, int64_t ld, int64_t r, float* out) {
  int64_t j = 0;
  for (; j + kBlockCols <= r; j += kBlockCols) dots_block<RB, kBlockCols>(rows, width, mat, ld, j, r, out);
  for (; j < r; ++j) dots_block<RB, 1>(rows, width, mat, ld, j, r, out);
}

// acc[j] += sum over the RB rows of coef[i * r + j] * rows[i] over the tile, for every factor j
template <int RB, int JB>
ALWAYS_INLINE void outer_block(const float* rows, int64_t width, const float* coef, int64_t j0, int64_t r, float* acc,
                               int64_t ld) {
  va cs[RB][JB];
  for (int i = 0; i < RB; ++i)
    for (int j = 0; j < JB; ++j) cs[i][j] = va{} + coef[i * r + j0 + j];
  for (int64_t c = 0; c < width; c += kVecLanes) {
    va xs[RB];
    for (int i = 0; i < RB; ++i) xs[i] = vread<va>(rows + i * width + c);
    for (int j = 0; j < JB; ++j) {
      float* a = acc + (j0 + j) * ld + c;
      va s = vread<va>(a);
      for (int i = 0; i < RB; ++i) s = vafma(cs[i][j], xs[i], s);
      vwrite(a, s);
    }
  }
}

template <int RB>
void outer_add(const float* rows, int64_t width, const float* coef, int64_t r, float* acc, int64_t ld) {
  int64_t j = 0;
  for (; j + kBlockCols <= r; j += kBlockCols) outer_block<RB, kBlockCols>(rows, width, coef, j, r, acc, ld);
  for (; j < r; ++j) outer_block<RB, 1>(rows, width, coef, j, r, acc, ld);
}

// out[i][c] += sum_j coef[i * r + j] * mat[j][c] for the RB rows of out (`n` elements apart) and the columns
// c < count of the tile, only where `keep` (RB rows of keep bits, `width` apart) keeps the element if given
template <typename T, int RB>
ALWAYS_INLINE void lowrank_add(T* out, int64_t n, int64_t count, const float* coef, const float* mat, int64_t ld,
                               int64_t r, const uint32_t* keep, int64_t width) {
  constexpr int H = kLanes / kVecLanes;  // va a vf
  for (int64_t c = 0; c < count; c += kLanes) {
    vf s[RB] = {};
    if constexpr (H == 1) {  // AVX-512: vf itself (through va parts and a copy it ran 15-20% slower there)
      for (int64_t j = 0; j < r; ++j) {
        vf m = vread<vf>(mat + j * ld + c);
        for (int i = 0; i < RB; ++i) s[i] = vfma(vsplat(coef[i * r + j]), m, s[i]);
      }
    } else {  // in va halves, each summed in the same order
      va parts[RB][H] = {};
      for (int64_t j = 0; j < r; ++j) {
        for (int h = 0; h < H; ++h) {
          va m = vread<va>(mat + j * ld + c + h * kVecLanes);
          for (int i = 0; i < RB; ++i) parts[i][h] = vafma(va{} + coef[i * r + j], m, parts[i][h]);
        }
      }
      for (int i = 0; i < RB; ++i) std::memcpy(&s[i], parts[i], sizeof(vf));
    }
    for (int i = 0; i < RB; ++i) {
      if (keep != nullptr) s[i] = vbits<vf>(vbits<vu>(s[i]) & vread<vu>(keep + i * width + c));
      T* o = out + i * n + c;
      if (c + kLanes <= count) {
        vstore_as(o, vload_as(o) + s[i]);
      } else {
        float sum[kLanes];
        vwrite(sum, s[i]);
        for (int64_t l = 0; l < count - c; ++l) store(o, l, load(o, l) + sum[l]);
      }
    }
  }
}

// fn(rows, keep, count, m, c0, width) over the rows [begin, end) of x (k columns) tile by tile: columns in tiles
// of kTile (outer), rows in groups of kRows (inner, count <= 4 from row m), each row's segment loaded (and
// masked) into `rows` and, if `with_keep`, its keep bits into `keep` (else null)
template <typename T, typename Fn>
void over_tiles(const T* x, int64_t k, int64_t begin, int64_t end, uint64_t seed, uint32_t threshold, bool with_keep,
                Fn fn) {
  int64_t kb = round_up(k, kPad);
  with_keep = with_keep && threshold > 0;
  alignas(64) float rows[kRows * kTile];
  alignas(64) uint32_t keep[kRows * kTile];
  int64_t tiles = (kb + kTile - 1) / kTile, tile = round_up((kb + tiles - 1) / tiles, kPad);  // even tiles
  for (int64_t c0 = 0; c0 < kb; c0 += tile) {
    int64_t width = std::min(tile, kb - c0);
    for (int64_t m = begin; m < end; m += kRows) {
      int64_t count = std::min<int64_t>(kRows, end - m);
      for (int64_t i = 0; i < count; ++i)
        load_segment(x + (m + i) * k, k, c0, width, m + i, kb / kPad, seed, threshold, rows + i * width,
                     with_keep ? keep + i * width : nullptr);
      fn(rows, with_keep ? keep : nullptr, count, m, c0, width);
    }
  }
}

// fn<RB>(offset) for each row (RB = 1) or the whole group (RB = 4, offset 0)
template <typename Fn> ALWAYS_INLINE void by_rows(int64_t count, Fn fn) {
  if (count == kRows) fn.template operator()<kRows>(0);
  else for (int64_t i = 0; i < count; ++i) fn.template operator()<1>(i);
}

// sum over the rows [0, n) of per-row terms in an r x width matrix: accumulate(acc, begin, end) adds the rows
// [begin, end) into a zeroed acc, one range per thread, and the partial sums are added in order
template <typename Fn> std::vector<float> sum_over_rows(int64_t n, int64_t r, int64_t width, Fn accumulate) {
  int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n + kRows - 1) / kRows));
  int64_t per = round_up((n + parts - 1) / parts, kRows), size = r * width;
  std::vector<float> partials(parts * size, 0.f);
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) accumulate(partials.data() + p * size, std::min(n, p * per), std::min(n, (p + 1) * per));
  });
  for (int64_t p = 1; p < parts; ++p) {
    const float* part = partials.data() + p * size;
#pragma omp simd
    for (int64_t i = 0; i < size; ++i) partials[i] += part[i];
  }
  partials.resize(size);
  return partials;
}

void check_factor(const at::Tensor& m, int64_t rows, int64_t cols, const char* name) {
  TORCH_CHECK(m.dim() == 2 && m.size(0) == rows && m.size(1) == cols && at::isFloatingType(m.scalar_type()),
              "martlet native: ", name, " must be a float matrix of ", rows, " x ", cols);
}

// xa or dyb: the fp32 (tokens x r) result of the op named for the same rows
void check_thin(const at::Tensor& t, int64_t tokens, int64_t r, const char* name, const char* from) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == tokens * r, "martlet native: ", name,
              " must be ", from, "'s result for these rows");
}

// the keep mask of a (rows x k) input, as lora_down applies it (for tests and for callers that need it whole)
at::Tensor dropout_mask(int64_t rows, int64_t k, int64_t seed, int64_t threshold) {
  int64_t kb = round_up(k, kPad);
  auto mask = at::empty({rows, k}, at::TensorOptions().dtype(at::kBool));
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    std::vector<float> ones(k, 1.f), row(kb);
    for (int64_t i = b; i < e; ++i) {
      load_segment<float>(ones.data(), k, 0, kb, i, kb / kPad, uint64_t(seed), uint32_t(threshold), row.data(), nullptr);
      bool* out = mask.data_ptr<bool>() + i * k;
      for (int64_t j = 0; j < k; ++j) out[j] = row[j] != 0.f;
    }
  });
  return mask;
}

#if defined(__AVX512BF16__)
// ---- the same four LoRA ops on bf16 activations with AVX512-BF16 dot products ----------------------------------
// `vdpbf16ps` multiplies 32 bf16 pairs and adds each pair's two products to one of 16 fp32 sums: twice the
// multiply-adds of an fp32 FMA per instruction, and no widening of the inputs. The factors (scale folded in) and
// the thin results are rounded to bf16 where they enter a product, as torch's bf16 products under autocast do;
// every sum stays fp32. A reduction runs along pairs of neighbours: of a row (dot products with the factors), of the
// rank (a row's r coefficients against the factors' columns, the factor stored as column pairs) or of two rows (the
// factors' gradients, two rows interleaved).

// 16 bf16 values (their bits) as fp32, and 16 fp32 values rounded to bf16 and back (one vcvtneps2bf16: subnormal
// values go to zero)
ALWAYS_INLINE __m512 widen_bf16(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
ALWAYS_INLINE __m512 vround_bf16(__m512 v) { return widen_bf16((__m256i)_mm512_cvtneps_pbh(v)); }

// lanes [0, n) of 16
ALWAYS_INLINE __mmask16 lanes_below(int64_t n) {
  return n >= kLanes ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u);
}
// 16 bf16 values as fp32 (zero outside m), and stored from fp32 (only the lanes in m): masked loads and stores only
// for a partial vector, since a masked store costs far more than a plain one (AMD Zen 4: the LoRA up-projection on
// cold data took 3.4x as long with masked stores throughout)
ALWAYS_INLINE __m512 load_bf16(const bf16* p, __mmask16 m) {
  return widen_bf16(m == 0xffff ? _mm256_loadu_si256((const __m256i*)p) : _mm256_maskz_loadu_epi16(m, p));
}
ALWAYS_INLINE void store_bf16(bf16* p, __mmask16 m, __m512 v) {
  __m256i bits = (__m256i)_mm512_cvtneps_pbh(v);
  if (m == 0xffff) _mm256_storeu_si256((__m256i*)p, bits);
  else _mm256_mask_storeu_epi16(p, m, bits);
}

// the factor rows of `factor`, bf16
std::vector<bf16> rounded(const std::vector<float>& mat) {
  std::vector<bf16> out(mat.size());
  for (size_t i = 0; i < mat.size(); ++i) out[i] = to_bf16(mat[i]);
  return out;
}

// mat (r rows of `width`, fp32) as ceil(r / 2) rows of `width` bf16 pairs: (mat[2p][c], mat[2p + 1][c]), zero past r
std::vector<uint32_t> column_pairs(const std::vector<float>& mat, int64_t r, int64_t width) {
  std::vector<uint32_t> out(((r + 1) / 2) * width, 0u);
  for (int64_t p = 0; p < (r + 1) / 2; ++p)
    for (int64_t c = 0; c < width; ++c)
      out[p * width + c] = uint32_t(to_bf16(mat[2 * p * width + c])) |
                           (2 * p + 1 < r ? uint32_t(to_bf16(mat[(2 * p + 1) * width + c])) << 16 : 0u);
  return out;
}

ALWAYS_INLINE uint32_t pair(float low, float high) { return uint32_t(to_bf16(low)) | uint32_t(to_bf16(high)) << 16; }

// bit v: element 32 g + v of row `row` exists (< k) and is kept by the dropout (as load_segment keeps it)
ALWAYS_INLINE __mmask32 kept32(int64_t k, int64_t row, int64_t groups, int64_t g, uint64_t seed, uint32_t threshold) {
  int64_t valid = k - g * kPad;
  __mmask32 mask = valid >= kPad ? ~__mmask32(0) : __mmask32((1u << valid) - 1u);
  if (threshold == 0) return mask;
  vu low, high;
  keep_bits(seed, threshold, uint32_t((row * groups + g) * kLanes), low, high);
  __m512i l = vbits<__m512i>(low), h = vbits<__m512i>(high);
  return mask & (__mmask32(_mm512_test_epi32_mask(l, l)) | __mmask32(_mm512_test_epi32_mask(h, h)) << 16);
}

// out[i * r + j] = <rows[i], mat[j]> for the RB rows (`kb` bf16 apart, zero padded) and every factor j
template <int RB>
ALWAYS_INLINE void dots_bf16(const bf16* rows, int64_t kb, const bf16* mat, int64_t r, float* out) {
  auto block = [&]<int JB>(int64_t j0) {
    __m512 acc[RB][JB];
    for (int i = 0; i < RB; ++i)
      for (int j = 0; j < JB; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < kb; c += kPad) {
      __m512bh xs[RB];
      for (int i = 0; i < RB; ++i) xs[i] = (__m512bh)_mm512_loadu_si512(rows + i * kb + c);
      for (int j = 0; j < JB; ++j) {
        __m512bh m = (__m512bh)_mm512_loadu_si512(mat + (j0 + j) * kb + c);
        for (int i = 0; i < RB; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xs[i], m);
      }
    }
    for (int i = 0; i < RB; ++i)
      for (int j = 0; j < JB; ++j) out[i * r + j0 + j] = _mm512_reduce_add_ps(acc[i][j]);
  };
  int64_t j = 0;
  for (; j + kCols <= r; j += kCols) block.template operator()<kCols>(j);
  for (; j < r; ++j) block.template operator()<1>(j);
}

// out[t][j] = <drop(x[t]), mat[j]> for the rows [begin, end) of x (k columns), mat: r rows of kb bf16
void rows_dot_bf16(const bf16* x, int64_t k, int64_t begin, int64_t end, const bf16* mat, int64_t r, uint64_t seed,
                   uint32_t threshold, float* out) {
  int64_t kb = round_up(k, kPad), groups = kb / kPad;
  std::vector<bf16> rows(kRows * kb);
  for (int64_t m = begin; m < end; m += kRows) {
    int64_t count = std::min<int64_t>(kRows, end - m);
    for (int64_t i = 0; i < count; ++i)
      for (int64_t g = 0; g < groups; ++g)
        _mm512_storeu_si512(rows.data() + i * kb + g * kPad,
                            _mm512_maskz_loadu_epi16(kept32(k, m + i, groups, g, seed, threshold),
                                                     x + (m + i) * k + g * kPad));
    by_rows(count, [&]<int RB>(int64_t i) { dots_bf16<RB>(rows.data() + i * kb, kb, mat, r, out + (m + i) * r); });
  }
}

// out[t][c] += sum_j coef[t][j] mat[j][c] for the rows [begin, end) of out (n columns), where the dropout keeps
// (t, c) if a threshold is given; pairs: `column_pairs` of mat (width nb); the sums rounded to bf16 once
void lowrank_add_bf16(bf16* out, int64_t n, int64_t begin, int64_t end, const float* coef, int64_t r,
                      const uint32_t* pairs, int64_t nb, uint64_t seed, uint32_t threshold) {
  int64_t pr = (r + 1) / 2, groups = nb / kPad;
  std::vector<uint32_t> xp(kRows * pr);
  for (int64_t m = begin; m < end; m += kRows) {
    int64_t count = std::min<int64_t>(kRows, end - m);
    for (int64_t i = 0; i < count; ++i)
      for (int64_t p = 0; p < pr; ++p) {
        const float* row = coef + (m + i) * r;
        xp[i * pr + p] = pair(row[2 * p], 2 * p + 1 < r ? row[2 * p + 1] : 0.f);
      }
    by_rows(count, [&]<int RB>(int64_t i0) {
      for (int64_t g = 0; g < groups; ++g) {
        __mmask32 keep[RB];
        for (int i = 0; i < RB; ++i) keep[i] = kept32(n, m + i0 + i, groups, g, seed, threshold);
        for (int half = 0; half < 2; ++half) {
          int64_t c = g * kPad + half * kLanes;
          if (c >= n) break;
          __m512 acc[RB];
          for (int i = 0; i < RB; ++i) acc[i] = _mm512_setzero_ps();
          for (int64_t p = 0; p < pr; ++p) {
            __m512bh b = (__m512bh)_mm512_loadu_si512(pairs + p * nb + c);
            for (int i = 0; i < RB; ++i)
              acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(int(xp[(i0 + i) * pr + p])), b);
          }
          __mmask16 valid = lanes_below(n - c);
          for (int i = 0; i < RB; ++i) {
            bf16* o = out + (m + i0 + i) * n + c;
            __m512 old = load_bf16(o, valid);
            store_bf16(o, valid, _mm512_mask_add_ps(old, __mmask16(keep[i] >> (half * kLanes)), old, acc[i]));
          }
        }
      }
    });
  }
}

// acc[j][c] += sum_t coef[t][j] drop(x)[t][c] over the rows [begin, end) of x (k columns); acc: r rows of kb fp32.
// Two rows at a time against the pair of their coefficients. A block of rows is first packed, row by row (x read
// in order: it is usually cold by the backward pass, and reading it a 64-byte segment per row and column group was
// slower than the fp32 code), each two rows interleaved and masked, laid out column group by column group; then each
// column group's 32 sums of up to 8 factors stay in registers while the block's packed pairs stream by.
void outer_rows_bf16(const bf16* x, int64_t k, int64_t begin, int64_t end, const float* coef, int64_t r,
                     uint64_t seed, uint32_t threshold, float* acc, int64_t kb) {
  constexpr int64_t kBlockPairs = 64;  // 128 rows a block: the packed block stays in the L2 cache
  int64_t groups = kb / kPad;
  auto widen = [](__m256i h) { return _mm512_cvtepu16_epi32(h); };
  std::vector<__m512i> packed(groups * kBlockPairs * 2);
  std::vector<uint32_t> cp(kBlockPairs * r);
  for (int64_t b0 = begin; b0 < end; b0 += 2 * kBlockPairs) {
    int64_t b1 = std::min(end, b0 + 2 * kBlockPairs), pairs = (b1 - b0 + 1) / 2;
    for (int64_t q = 0; q < pairs; ++q) {
      int64_t t = b0 + 2 * q;
      bool second = t + 1 < b1;
      for (int64_t j = 0; j < r; ++j) cp[q * r + j] = pair(coef[t * r + j], second ? coef[(t + 1) * r + j] : 0.f);
      for (int64_t g = 0; g < groups; ++g) {
        __m512i a = _mm512_maskz_loadu_epi16(kept32(k, t, groups, g, seed, threshold), x + t * k + g * kPad);
        __m512i b = second ? _mm512_maskz_loadu_epi16(kept32(k, t + 1, groups, g, seed, threshold),
                                                      x + (t + 1) * k + g * kPad)
                           : _mm512_setzero_si512();
        for (int h = 0; h < 2; ++h)
          packed[(g * kBlockPairs + q) * 2 + h] = _mm512_or_si512(
              widen(h ? _mm512_extracti64x4_epi64(a, 1) : _mm512_castsi512_si256(a)),
              _mm512_slli_epi32(widen(h ? _mm512_extracti64x4_epi64(b, 1) : _mm512_castsi512_si256(b)), 16));
      }
    }
    auto block = [&]<int JB>(int64_t j0) {
      for (int64_t g = 0; g < groups; ++g) {
        __m512 sum[2][JB];
        for (int h = 0; h < 2; ++h)
          for (int j = 0; j < JB; ++j) sum[h][j] = _mm512_loadu_ps(acc + (j0 + j) * kb + g * kPad + h * kLanes);
        const __m512i* v = packed.data() + g * kBlockPairs * 2;
        for (int64_t q = 0; q < pairs; ++q) {
          __m512bh v0 = (__m512bh)v[2 * q], v1 = (__m512bh)v[2 * q + 1];
          for (int j = 0; j < JB; ++j) {
            __m512bh c = (__m512bh)_mm512_set1_epi32(int(cp[q * r + j0 + j]));
            sum[0][j] = _mm512_dpbf16_ps(sum[0][j], v0, c);
            sum[1][j] = _mm512_dpbf16_ps(sum[1][j], v1, c);
          }
        }
        for (int h = 0; h < 2; ++h)
          for (int j = 0; j < JB; ++j) _mm512_storeu_ps(acc + (j0 + j) * kb + g * kPad + h * kLanes, sum[h][j]);
      }
    };
    int64_t j = 0;
    for (; j + 8 <= r; j += 8) block.template operator()<8>(j);
    for (; j < r; ++j) block.template operator()<1>(j);
  }
}
#endif

// xa = scale * drop(x) a^T: x (tokens x k), a (r x k); xa fp32
at::Tensor lora_down(const at::Tensor& x, const at::Tensor& a, double scale, int64_t seed, int64_t threshold) {
  check(x, "x");
  int64_t k = x.size(-1), tokens = x.numel() / k, r = a.size(0), kb = round_up(k, kPad);
  check_factor(a, r, k, "a");
  auto mat = factor(a, kb, scale, false);
  auto xa = at::zeros({tokens, r}, x.options().dtype(at::kFloat));
#if defined(__AVX512BF16__)
  if (x.scalar_type() == at::kBFloat16) {
    auto mat16 = rounded(mat);
    at::parallel_for(0, (tokens + kRows - 1) / kRows, 4, [&](int64_t b, int64_t e) {
      rows_dot_bf16(ptr<bf16>(x), k, b * kRows, std::min(tokens, e * kRows), mat16.data(), r, uint64_t(seed),
                    uint32_t(threshold), xa.data_ptr<float>());
    });
    return xa;
  }
#endif
  dispatch(x, [&](auto type) {
    using T = typename decltype(type)::type;
    at::parallel_for(0, (tokens + kRows - 1) / kRows, 4, [&](int64_t b, int64_t e) {
      over_tiles(ptr<T>(x), k, b * kRows, std::min(tokens, e * kRows), uint64_t(seed), uint32_t(threshold), false,
                 [&](const float* rows, const uint32_t*, int64_t count, int64_t m, int64_t c0, int64_t width) {
                   float* out = xa.data_ptr<float>() + m * r;
                   by_rows(count, [&]<int RB>(int64_t i) {
                     dots<RB>(rows + i * width, width, mat.data() + c0, kb, r, out + i * r);
                   });
                 });
    });
  });
  return xa;
}

// out += scale * xa b^T in place: out (tokens x n), xa (tokens x r) fp32, b (n x r)
at::Tensor lora_up_(at::Tensor out, const at::Tensor& xa, const at::Tensor& b, double scale) {
  check(out, "out");
  int64_t n = out.size(-1), tokens = out.numel() / n, r = b.size(1), nb = round_up(n, kPad);
  check_factor(b, n, r, "b");
  check_thin(xa, tokens, r, "xa", "lora_down");
  auto mat = factor(b, nb, scale, true);
#if defined(__AVX512BF16__)
  if (out.scalar_type() == at::kBFloat16) {
    auto pairs = column_pairs(mat, r, nb);
    at::parallel_for(0, (tokens + kRows - 1) / kRows, 4, [&](int64_t begin, int64_t end) {
      lowrank_add_bf16(ptr<bf16>(out), n, begin * kRows, std::min(tokens, end * kRows), xa.data_ptr<float>(), r,
                       pairs.data(), nb, 0, 0);
    });
    return out;
  }
#endif
  dispatch(out, [&](auto type) {
    using T = typename decltype(type)::type;
    at::parallel_for(0, (tokens + kRows - 1) / kRows, 4, [&](int64_t begin, int64_t end) {
      for (int64_t c0 = 0; c0 < n; c0 += kTile) {
        for (int64_t g = begin; g < end; ++g) {
          int64_t m = g * kRows;
          T* o = ptr<T>(out) + m * n + c0;
          const float* coef = xa.data_ptr<float>() + m * r;
          by_rows(std::min<int64_t>(kRows, tokens - m), [&]<int RB>(int64_t i) {
            lowrank_add<T, RB>(o + i * n, n, std::min(kTile, n - c0), coef + i * r, mat.data() + c0, nb, r, nullptr, 0);
          });
        }
      }
    });
  });
  return out;
}

// the backward pass of lora_up_: dyb = scale * dy b (tokens x r) and the gradient of b, scale * dy^T xa (n x r),
// both fp32
std::tuple<at::Tensor, at::Tensor> lora_up_backward(const at::Tensor& dy, const at::Tensor& xa, const at::Tensor& b,
                                                    double scale) {
  check(dy, "dy");
  int64_t n = dy.size(-1), tokens = dy.numel() / n, r = b.size(1), nb = round_up(n, kPad);
  check_factor(b, n, r, "b");
  check_thin(xa, tokens, r, "xa", "lora_down");
  auto mat = factor(b, nb, scale, true);
  auto dyb = at::zeros({tokens, r}, xa.options());
  std::vector<float> sum;
#if defined(__AVX512BF16__)
  if (dy.scalar_type() == at::kBFloat16) {
    auto mat16 = rounded(mat);
    at::parallel_for(0, (tokens + kRows - 1) / kRows, 4, [&](int64_t b, int64_t e) {
      rows_dot_bf16(ptr<bf16>(dy), n, b * kRows, std::min(tokens, e * kRows), mat16.data(), r, 0, 0,
                    dyb.data_ptr<float>());
    });
    sum = sum_over_rows(tokens, r, nb, [&](float* acc, int64_t begin, int64_t end) {
      outer_rows_bf16(ptr<bf16>(dy), n, begin, end, xa.data_ptr<float>(), r, 0, 0, acc, nb);
    });
  } else
#endif
  dispatch(dy, [&](auto type) {
    using T = typename decltype(type)::type;
    sum = sum_over_rows(tokens, r, nb, [&](float* acc, int64_t begin, int64_t end) {
      over_tiles(ptr<T>(dy), n, begin, end, 0, 0, false,
                 [&](const float* rows, const uint32_t*, int64_t count, int64_t m, int64_t c0, int64_t width) {
                   float* out = dyb.data_ptr<float>() + m * r;
                   const float* coef = xa.data_ptr<float>() + m * r;
                   by_rows(count, [&]<int RB>(int64_t i) {
                     dots<RB>(rows + i * width, width, mat.data() + c0, nb, r, out + i * r);
                     outer_add<RB>(rows + i * width, width, coef + i * r, r, acc + c0, nb);
                   });
                 });
    });
  });
  auto grad = at::empty({n, r}, xa.options());
  float* g = grad.data_ptr<float>();
  for (int64_t c = 0; c < n; ++c)
    for (int64_t j = 0; j < r; ++j) g[c * r + j] = float(scale) * sum[j * nb + c];
  return {dyb, grad};
}

// the backward pass of lora_down: the gradient of a, scale * dyb^T drop(x) (r x k, fp32); with grad_x given,
// grad_x += scale * drop(dyb a) in place, the mask recomputed from the seed
at::Tensor lora_down_backward(const at::Tensor& x, const at::Tensor& a, const at::Tensor& dyb, double scale,
                              int64_t seed, int64_t threshold, const std::optional<at::Tensor>& grad_x) {
  check(x, "x");
  int64_t k = x.size(-1), tokens = x.numel() / k, r = a.size(0), kb = round_up(k, kPad);
  check_factor(a, r, k, "a");
  check_thin(dyb, tokens, r, "dyb", "lora_up_backward");
  if (grad_x) {
    check(*grad_x, "grad_x");
    check_like(x, *grad_x, "x and grad_x");
  }
  auto mat = factor(a, kb, scale, false);
  std::vector<float> sum;
#if defined(__AVX512BF16__)
  if (x.scalar_type() == at::kBFloat16) {
    sum = sum_over_rows(tokens, r, kb, [&](float* acc, int64_t begin, int64_t end) {
      outer_rows_bf16(ptr<bf16>(x), k, begin, end, dyb.data_ptr<float>(), r, uint64_t(seed), uint32_t(threshold),
                      acc, kb);
    });
    if (grad_x) {
      auto pairs = column_pairs(mat, r, kb);
      at::parallel_for(0, (tokens + kRows - 1) / kRows, 4, [&](int64_t b, int64_t e) {
        lowrank_add_bf16(ptr<bf16>(*grad_x), k, b * kRows, std::min(tokens, e * kRows), dyb.data_ptr<float>(), r,
                         pairs.data(), kb, uint64_t(seed), uint32_t(threshold));
      });
    }
  } else
#endif
  dispatch(x, [&](auto type) {
    using T = typename decltype(type)::type;
    sum = sum_over_rows(tokens, r, kb, [&](float* acc, int64_t begin, int64_t end) {
      over_tiles(ptr<T>(x), k, begin, end, uint64_t(seed), uint32_t(threshold), grad_x.has_value(),
                 [&](const float* rows, const uint32_t* keep, int64_t count, int64_t m, int64_t c0, int64_t width) {
                   const float* coef = dyb.data_ptr<float>() + m * r;
                   T* gx = grad_x ? ptr<T>(*grad_x) + m * k + c0 : nullptr;
                   by_rows(count, [&]<int RB>(int64_t i) {
                     outer_add<RB>(rows + i * width, width, coef + i * r, r, acc + c0, kb);
                     if (gx)
                       lowrank_add<T, RB>(gx + i * k, k, std::min(width, k - c0), coef + i * r, mat.data() + c0, kb,
                                          r, keep ? keep + i * width : nullptr, width);
                   });
                 });
    });
  });
  auto grad = at::empty({r, k}, dyb.options());
  float* g = grad.data_ptr<float>();
  for (int64_t j = 0; j < r; ++j)
    for (int64_t c = 0; c < k; ++c) g[j * k + c] = float(scale) * sum[j * kb + c];
  return grad;
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

// exp_approx on the lanes of a vector: the same operations in the same order, so the same values
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));
ALWAYS_INLINE vf vexp(vf x) {
  x = x < -86.6f ? vsplat(-86.6f) : (x > 88.f ? vsplat(88.f) : x);  // a NaN stays, as in the scalar form
  const float round_magic = 12582912.f;
  vf k = (x * 1.44269504f + round_magic) - round_magic;
  vf r = x - k * 0.693359375f + k * 2.12194440e-4f;
  vf p = vsplat(1.3981999507e-3f);
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  return p * vbits<vf>((__builtin_convertvector(k, vi) + 127) << 23);
}

// SwiGLU on bf16 with AVX512-BF16 runs 16 lanes at a time with the hardware's rounding (the generic loops round
// in integer operations, which cost more than the arithmetic); returns where the scalar tail starts
template <typename T>
ALWAYS_INLINE int64_t swiglu_vectors(const T* g, const T* u, T* y, int64_t begin, int64_t end) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, bf16>) {
    for (; begin + kLanes <= end; begin += kLanes) {
      vf gv = vload_as(g + begin);
      vstore_as(y + begin, vround_bf16(gv / (1.f + vexp(-gv))) * vload_as(u + begin));
    }
  }
#endif
  return begin;
}

template <typename T>
ALWAYS_INLINE int64_t swiglu_backward_vectors(const T* dy, const T* g, const T* u, T* dg, T* du, int64_t begin,
                                              int64_t end) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, bf16>) {
    for (; begin + kLanes <= end; begin += kLanes) {
      vf gv = vload_as(g + begin), d = vload_as(dy + begin);
      vf sig = 1.f / (1.f + vexp(-gv));
      vstore_as(du + begin, d * vround_bf16(gv * sig));
      vstore_as(dg + begin, vround_bf16(d * vload_as(u + begin)) * sig * (1.f + gv * (1.f - sig)));
    }
  }
#endif
  return begin;
}

template <typename T>
void swiglu_range(const T* __restrict g, const T* __restrict u, T* __restrict y, int64_t begin, int64_t end) {
  begin = swiglu_vectors(g, u, y, begin, end);
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    float gv = load(g, i);
    store(y, i, round_as<T>(gv / (1.f + exp_approx(-gv))) * load(u, i));
  }
}

template <typename T>
void swiglu_backward_range(const T* __restrict dy, const T* __restrict g, const T* __restrict u, T* __restrict dg,
                           T* __restrict du, int64_t begin, int64_t end) {
  begin = swiglu_backward_vectors(dy, g, u, dg, du, begin, end);
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

// logits (rows, vocabulary) and one int64 target in [0, vocabulary) a row
void check_targets(const at::Tensor& logits, const at::Tensor& target) {
  check(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && target.dim() == 1 && target.size(0) == logits.size(0) &&
              target.scalar_type() == at::kLong && target.is_contiguous(),
              "martlet native: logits (rows, vocabulary) and int64 targets (rows) expected");
  if (logits.size(0) > 0) {
    auto [low, high] = target.aminmax();
    TORCH_CHECK(low.item<int64_t>() >= 0 && high.item<int64_t>() < logits.size(1),
                "martlet native: a target is outside [0, ", logits.size(1), ")");
  }
}

at::Tensor cross_entropy_grad_(at::Tensor logits, const at::Tensor& target) {
  check_targets(logits, target);
  int64_t rows = logits.size(0), vocab = logits.size(1);
  auto loss = at::empty({rows}, logits.options().dtype(at::kFloat));
  dispatch(logits, [&](auto type) {
    using T = typename decltype(type)::type;
    at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
      cross_entropy_rows<T>(ptr<T>(logits), target.data_ptr<int64_t>(), loss.data_ptr<float>(), b, e, vocab);
    });
  });
  return loss;
}

// ---- token scores (preference training) ----------------------------------------------------------------------
// For each row of logits z (divided by `temperature` in fp32 first, as trl's head does: GRPO's sampling temperature)
// and its target t: log p(t) = z_t - max - log sum exp(z - max), the entropy log S - sum e (z - max) / S
// (e = exp(z - max), S = sum e), the mean logit, and whether t is the (first) arg max; with `grad`, the row becomes
// (softmax - one-hot) / temperature in place (d(-log p(t)) / d logits). trl computes these fields of its fused LM
// head in a dozen passes over the logits; here in three.
template <typename T, bool Scaled>
void token_score_rows(T* __restrict logits, const int64_t* __restrict target, float* __restrict logp,
                      float* __restrict entropy, float* __restrict mean, bool* __restrict top1, int64_t begin,
                      int64_t end, int64_t vocab, bool grad, float temperature) {
  auto at = [&](const T* row, int64_t i) { return Scaled ? load(row, i) / temperature : load(row, i); };
  for (int64_t r = begin; r < end; ++r) {
    T* row = logits + r * vocab;
    float top = -INFINITY, total = 0.f;
#pragma omp simd reduction(max : top) reduction(+ : total)
    for (int64_t i = 0; i < vocab; ++i) {
      float v = at(row, i);
      top = std::max(top, v);
      total += v;
    }
    float sum = 0.f, weighted = 0.f;
#pragma omp simd reduction(+ : sum, weighted)
    for (int64_t i = 0; i < vocab; ++i) {
      float d = at(row, i) - top, e = exp_approx(d);
      sum += e;
      weighted += e * d;
    }
    float log_sum = std::log(sum), inverse = 1.f / sum;
    int64_t t = target[r];
    float at_t = at(row, t);
    logp[r] = at_t - top - log_sum;
    entropy[r] = log_sum - weighted * inverse;
    mean[r] = total / float(vocab);
    bool first = at_t == top;
    for (int64_t i = 0; first && i < t; ++i) first = at(row, i) != top;
    top1[r] = first;
    if (grad) {
#pragma omp simd
      for (int64_t i = 0; i < vocab; ++i) {
        float g = exp_approx(at(row, i) - top) * inverse - (i == t ? 1.f : 0.f);
        store(row, i, Scaled ? g / temperature : g);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_scores_(at::Tensor logits, const at::Tensor& target,
                                                                         bool grad, double temperature) {
  check_targets(logits, target);
  TORCH_CHECK(temperature > 0, "martlet.token_scores_: temperature must be positive, got ", temperature);
  int64_t rows = logits.size(0), vocab = logits.size(1);
  auto floats = logits.options().dtype(at::kFloat);
  auto logp = at::empty({rows}, floats), entropy = at::empty({rows}, floats), mean = at::empty({rows}, floats);
  auto top1 = at::empty({rows}, logits.options().dtype(at::kBool));
  float t = float(temperature);
  dispatch(logits, [&](auto type) {
    using T = typename decltype(type)::type;
    at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
      auto run = t == 1.f ? token_score_rows<T, false> : token_score_rows<T, true>;
      run(ptr<T>(logits), target.data_ptr<int64_t>(), logp.data_ptr<float>(), entropy.data_ptr<float>(),
          mean.data_ptr<float>(), top1.data_ptr<bool>(), b, e, vocab, grad, t);
    });
  });
  return {logp, entropy, mean, top1};
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
#if defined(__AVX512BF16__)
// bf16 rows with AVX512-BF16: 16 keys at a time, the row's ragged end under a mask (the rows are short and their
// visible lengths all differ, so the generic loops spent much of their time in scalar remainders), the hardware's
// rounding (`load_bf16`, `store_bf16` above)

void causal_softmax_rows_bf16(const bf16* scores, bf16* probs, int64_t begin, int64_t end, int64_t length,
                              float scale) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t r = begin; r < end; ++r) {
    const bf16* in = scores + r * length;
    bf16* out = probs + r * length;
    int64_t visible = r % length + 1;
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < visible; j += kLanes) {
      __mmask16 m = lanes_below(visible - j);
      top = _mm512_mask_max_ps(top, m, top, _mm512_mul_ps(load_bf16(in + j, m), s));
    }
    __m512 peak = _mm512_set1_ps(_mm512_reduce_max_ps(top)), sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < visible; j += kLanes) {
      __mmask16 m = lanes_below(visible - j);
      __m512 e = vexp(_mm512_sub_ps(_mm512_mul_ps(load_bf16(in + j, m), s), peak));
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
    }
    __m512 inverse = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
    for (int64_t j = 0; j < length; j += kLanes) {
      __mmask16 m = lanes_below(visible - j), all = lanes_below(length - j);
      __m512 e = j < visible ? vexp(_mm512_sub_ps(_mm512_mul_ps(load_bf16(in + j, m), s), peak))
                             : _mm512_setzero_ps();
      store_bf16(out + j, all, _mm512_maskz_mul_ps(m, e, inverse));  // zero past the query's position
    }
  }
}

void causal_softmax_backward_rows_bf16(const bf16* grad, const bf16* probs, bf16* out, int64_t begin, int64_t end,
                                       int64_t length, float scale) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t r = begin; r < end; ++r) {
    const bf16* g = grad + r * length;
    const bf16* p = probs + r * length;
    bf16* o = out + r * length;
    int64_t visible = r % length + 1;
    __m512 dot = _mm512_setzero_ps();
    for (int64_t j = 0; j < visible; j += kLanes) {
      __mmask16 m = lanes_below(visible - j);
      dot = _mm512_add_ps(dot, _mm512_mul_ps(load_bf16(g + j, m), load_bf16(p + j, m)));
    }
    __m512 d = _mm512_set1_ps(_mm512_reduce_add_ps(dot));
    for (int64_t j = 0; j < length; j += kLanes) {
      __mmask16 m = lanes_below(visible - j), all = lanes_below(length - j);
      __m512 v = _mm512_mul_ps(_mm512_mul_ps(s, load_bf16(p + j, m)), _mm512_sub_ps(load_bf16(g + j, m), d));
      store_bf16(o + j, all, _mm512_maskz_mov_ps(m, v));
    }
  }
}
#endif

template <typename T>
void causal_softmax_rows(const T* __restrict scores, T* __restrict probs, int64_t begin, int64_t end, int64_t length,
                         float scale) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, bf16>) return causal_softmax_rows_bf16(scores, probs, begin, end, length, scale);
#endif
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
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, bf16>)
    return causal_softmax_backward_rows_bf16(grad, probs, out, begin, end, length, scale);
#endif
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

// ---- the attention of a padding-free row's samples, fused ------------------------------------------------------
// Each sample attends to its own tokens, after a shared prefix of its trunk's when it has one (see
// varlen_attention.py); `samples` holds (start, length, prefix_start, prefix) a sample, in row order. One task per
// sample and key/value head: the queries of the heads that share that key/value head (row i * groups + h: query i,
// head h of the group), the sample's keys (prefix first) and values copied out, and then: the scores Q K^T only up to
// each block of rows' last visible key (causality), the softmax (fp32), out = P V, and each query row's logsumexp.
// The backward pass computes P again from the logsumexp, as flash attention does (no heads x length² probabilities
// kept between the passes): dP = dO V^T, dS = scale P (dP - rowsum(dO * O)), dQ = dS K, dK = dS^T Q, dV = P^T dO.
// The products run over blocks of kAttnRows rows x 2 vectors of columns, every sum in fp32: on fp32 rows (and bf16
// rows without AVX512-BF16) fp32 multiply-adds; on bf16 rows with AVX512-BF16, vdpbf16ps on pairs of bf16 values
// (the inputs as they are; P and dS rounded to bf16 where they enter a product, as flash attention's bf16 kernels
// do): 1.4-1.8x the fp32 pass's speed. Tasks go to the threads from a shared counter, the largest first. A shared
// prefix's keys get gradients from several samples: each sample's share is kept apart and added after the parallel
// pass, in row order, so the result does not depend on the threads.
#if defined(__AVX512F__)
constexpr int kAttnRows = 6;  // 12 accumulators + 2 loaded vectors of 32 registers
#else
constexpr int kAttnRows = 4;  // 8 accumulators + 2 loaded vectors of AVX2's 16
#endif
constexpr int64_t kAttnCols = 2 * kLanes;  // the scores' rows are padded to a multiple of this

// C[r][0, n) = sum over p in [k0, k1) of A(r, p) * B[p][0, n) for RB rows, A(r, p) = A[r * ra + p * pa]; n a
// multiple of kVecLanes, each sum in order of p; columns in blocks of V vectors. E = float: fp32 multiply-adds;
// E = uint32_t (AVX512-BF16 only): each element a pair of bf16 values along p (the low half first), one vdpbf16ps
// per pair: twice the multiply-adds an instruction
template <typename E, int RB, int V>
ALWAYS_INLINE void attn_gemm_columns(const E* A, int64_t ra, int64_t pa, const E* B, int64_t ldb, float* C,
                                     int64_t ldc, int64_t j, int64_t k0, int64_t k1) {
  va acc[RB][V];
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < V; ++c) acc[r][c] = va{};
  for (int64_t p = k0; p < k1; ++p) {
    if constexpr (std::is_same_v<E, float>) {
      va b[V];
      for (int c = 0; c < V; ++c) b[c] = vread<va>(B + p * ldb + j + c * kVecLanes);
      for (int r = 0; r < RB; ++r) {
        va a = va{} + A[r * ra + p * pa];
        for (int c = 0; c < V; ++c) acc[r][c] = vafma(a, b[c], acc[r][c]);
      }
    } else {
#if defined(__AVX512BF16__)
      __m512bh b[V];
      for (int c = 0; c < V; ++c) b[c] = (__m512bh)_mm512_loadu_si512(B + p * ldb + j + c * kVecLanes);
      for (int r = 0; r < RB; ++r) {
        __m512bh a = (__m512bh)_mm512_set1_epi32(int(A[r * ra + p * pa]));
        for (int c = 0; c < V; ++c) acc[r][c] = (va)_mm512_dpbf16_ps((__m512)acc[r][c], a, b[c]);
      }
#endif
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < V; ++c) vwrite(C + r * ldc + j + c * kVecLanes, acc[r][c]);
}

template <typename E, int RB>
ALWAYS_INLINE void attn_gemm_rows(const E* A, int64_t ra, int64_t pa, const E* B, int64_t ldb, float* C,
                                  int64_t ldc, int64_t n, int64_t k0, int64_t k1) {
  int64_t j = 0;
  for (; j + 2 * kVecLanes <= n; j += 2 * kVecLanes) attn_gemm_columns<E, RB, 2>(A, ra, pa, B, ldb, C, ldc, j, k0, k1);
  if (j < n) attn_gemm_columns<E, RB, 1>(A, ra, pa, B, ldb, C, ldc, j, k0, k1);
}

template <typename E, int RB = kAttnRows>
ALWAYS_INLINE void attn_gemm_block(int64_t rows, const E* A, int64_t ra, int64_t pa, const E* B, int64_t ldb,
                                   float* C, int64_t ldc, int64_t n, int64_t k0, int64_t k1) {
  if constexpr (RB > 1) {
    if (rows < RB) return attn_gemm_block<E, RB - 1>(rows, A, ra, pa, B, ldb, C, ldc, n, k0, k1);
  }
  attn_gemm_rows<E, RB>(A, ra, pa, B, ldb, C, ldc, n, k0, k1);
}

// the rows [0, m) of C = A B in blocks of kAttnRows; range(r0, rows) gives the block's columns n and inner [k0, k1)
// (in values: pairs run from the pair holding k0 to the one holding k1 - 1, whose other half must add nothing)
template <typename E, typename Range>
void attn_gemm(int64_t m, const E* A, int64_t ra, int64_t pa, const E* B, int64_t ldb, float* C, int64_t ldc,
               Range range) {
  for (int64_t r0 = 0; r0 < m; r0 += kAttnRows) {
    int64_t rows = std::min<int64_t>(kAttnRows, m - r0);
    auto [n, k0, k1] = range(r0, rows);
    if constexpr (!std::is_same_v<E, float>) k0 /= 2, k1 = (k1 + 1) / 2;
    attn_gemm_block<E>(rows, A + r0 * ra, ra, pa, B, ldb, C + r0 * ldc, ldc, n, k0, k1);
  }
}

struct AttnShape {
  int64_t heads, kv_heads, groups, dim;
  float scale;
};

// one task's sample and key/value head, and its fp32 buffers (one a thread and call, reused from task to task)
struct AttnTask {
  int64_t index, start, length, prefix_start, prefix, head, keys, rows, width;  // keys: prefix + length, rows: groups * length
  std::vector<float>* arena;
  std::vector<uint32_t>* pairs;  // the bf16 operands of the AVX512-BF16 products

  AttnTask(int64_t index, const int64_t* sample, int64_t head, const AttnShape& s, std::vector<float>* arena,
           std::vector<uint32_t>* pairs)
      : index(index), start(sample[0]), length(sample[1]), prefix_start(sample[2]), prefix(sample[3]), head(head),
        keys(sample[3] + sample[1]), rows(s.groups * sample[1]), width(round_up(sample[3] + sample[1], kAttnCols)),
        arena(arena), pairs(pairs) {}
  // the task's buffers: n values from a 64-byte boundary (each vector of 16 in one cache line)
  template <typename E> static E* aligned(std::vector<E>* arena, int64_t n) {
    arena->resize(n + 64 / sizeof(E));
    auto address = reinterpret_cast<std::uintptr_t>(arena->data());
    return arena->data() + (-address % 64) / sizeof(E);
  }
  float* floats(int64_t n) const { return aligned(arena, n); }
  uint32_t* words(int64_t n) const { return aligned(pairs, n); }
  int64_t key_token(int64_t j) const { return j < prefix ? prefix_start + j : start + j - prefix; }
  int64_t visible(int64_t r, int64_t groups) const { return prefix + r / groups + 1; }  // keys row r sees
  // the (token * heads + head) row of query row r
  int64_t query_row(int64_t r, const AttnShape& s) const {
    return (start + r / s.groups) * s.heads + head * s.groups + r % s.groups;
  }
};

// a lane-wise max
ALWAYS_INLINE vf vmax(vf a, vf b) { return a > b ? a : b; }
ALWAYS_INLINE vi lanes_before(int64_t n) {  // all ones in the lanes below n
  vi iota;
  for (int l = 0; l < kLanes; ++l) iota[l] = l;
  return iota < int32_t(n);
}

// row = f(row) on its first `visible` entries, 0 on the rest up to `width` (a multiple of kLanes), one vector at
// a time; returns the sum of the new values
template <typename Fn> ALWAYS_INLINE float attn_row_map(float* row, int64_t visible, int64_t width, Fn f) {
  vf sum = vsplat(0.f);
  for (int64_t j = 0; j < width; j += kLanes) {
    vf x = j < visible ? f(vread<vf>(row + j), j) : vsplat(0.f);
    if (j + kLanes > visible) x = lanes_before(visible - j) ? x : vsplat(0.f);
    vwrite(row + j, x);
    sum += x;
  }
  return vsum(sum);
}

// rows of src (T x dim, row(i) gives the source row of i) as fp32, into dst (count x dim); with `transpose`,
// dst is dim x ld instead, the columns past count zero
template <typename T, typename Row>
void attn_load(const T* src, int64_t count, int64_t dim, Row row, float* dst, bool transpose = false, int64_t ld = 0) {
  for (int64_t i = 0; i < count; ++i) {
    const T* from = src + row(i) * dim;
    if (!transpose) {
      for (int64_t d = 0; d < dim; d += kLanes) vwrite(dst + i * dim + d, vload_as(from + d));
    } else {
      for (int64_t d = 0; d < dim; ++d) dst[d * ld + i] = load(from, d);
    }
  }
  if (transpose)
    for (int64_t d = 0; d < dim; ++d) std::fill(dst + d * ld + count, dst + (d + 1) * ld, 0.f);
}

// E per value: fp32 values, or bf16 pairs along the sum (two values an element; see attn_gemm_columns)
template <typename E> constexpr int64_t kPer = std::is_same_v<E, float> ? 1 : 2;

// scores of the task's query rows q (rows x dim) against its keys kt (dim x width), into s (rows x width)
template <typename E>
void attn_scores(const AttnTask& t, const AttnShape& sh, const E* q, const E* kt, float* s) {
  attn_gemm(t.rows, q, sh.dim / kPer<E>, 1, kt, t.width, s, t.width, [&](int64_t r0, int64_t n) {
    return std::tuple<int64_t, int64_t, int64_t>{round_up(t.visible(r0 + n - 1, sh.groups), kLanes), 0, sh.dim};
  });
}

// x (rows x width) times the task's values or keys (keys x dim), each block of rows over the keys it sees
template <typename E>
void attn_times_keys(const AttnTask& t, const AttnShape& sh, const E* x, const E* m, float* out) {
  attn_gemm(t.rows, x, t.width / kPer<E>, 1, m, sh.dim, out, sh.dim, [&](int64_t r0, int64_t n) {
    return std::tuple<int64_t, int64_t, int64_t>{sh.dim, 0, t.visible(r0 + n - 1, sh.groups)};
  });
}

// x^T (keys x rows, x being rows x width) times m (rows x dim): each key over the query rows that see it (pairs: x
// holds pairs of rows, each row of width elements the pairs of two rows' values)
template <typename E>
void attn_transposed_times(const AttnTask& t, const AttnShape& sh, const E* x, const E* m, float* out) {
  attn_gemm(t.keys, x, 1, t.width, m, sh.dim, out, sh.dim, [&](int64_t j0, int64_t) {
    return std::tuple<int64_t, int64_t, int64_t>{sh.dim, std::max<int64_t>(0, j0 - t.prefix) * sh.groups, t.rows};
  });
}

// the tasks (sample, key/value head) in parallel, the largest first: fn(task)
template <typename Fn>
void attn_tasks(const int64_t* samples, int64_t count, const AttnShape& sh, Fn fn) {
  std::vector<std::pair<int64_t, int64_t>> order;  // (cost, task)
  for (int64_t i = 0; i < count * sh.kv_heads; ++i) {
    const int64_t* s = samples + 4 * (i / sh.kv_heads);
    order.emplace_back(-s[1] * (s[1] + s[3]), i);
  }
  std::stable_sort(order.begin(), order.end());
  std::atomic<int64_t> next{0};
  int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), order.size()));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::vector<float> arena;  // this call's (kept no longer: a long sample's would stay with the thread)
    std::vector<uint32_t> pairs;
    for (int64_t i; (i = next.fetch_add(1)) < int64_t(order.size());) {
      int64_t task = order[i].second;
      fn(AttnTask(task / sh.kv_heads, samples + 4 * (task / sh.kv_heads), task % sh.kv_heads, sh, &arena, &pairs));
    }
  });
}

void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& samples,
                     int64_t heads) {
  check(q, "q");
  check(k, "k");
  check(v, "v");
  check_like(k, v, "k and v");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.dim() == 2 && k.dim() == 2 && q.size(1) == k.size(1) &&
                  q.size(1) % kLanes == 0, "martlet.attention: q (T * heads, dim) and k, v (T * kv_heads, dim) of "
              "one dtype expected, dim a multiple of ", kLanes);
  TORCH_CHECK(samples.scalar_type() == at::kLong && samples.dim() == 2 && samples.size(1) == 4 && samples.is_contiguous(),
              "martlet.attention: samples must be a contiguous (count, 4) int64 tensor");
  TORCH_CHECK(heads > 0 && q.size(0) % heads == 0, "martlet.attention: q rows not a multiple of heads");
  int64_t tokens = q.size(0) / heads;
  TORCH_CHECK(k.size(0) % std::max<int64_t>(1, tokens) == 0 && tokens > 0, "martlet.attention: k rows do not match q");
  int64_t kv = k.size(0) / tokens;
  TORCH_CHECK(kv > 0 && heads % kv == 0, "martlet.attention: heads must be a multiple of the key/value heads");
  const int64_t* s = samples.data_ptr<int64_t>();
  int64_t end = 0;
  for (int64_t i = 0; i < samples.size(0); ++i, s += 4) {
    TORCH_CHECK(s[0] == end && s[1] > 0 && s[3] >= 0 && s[2] >= 0 && s[2] + s[3] <= tokens,
                "martlet.attention: sample ", i, " (", s[0], ", ", s[1], ", ", s[2], ", ", s[3], ") does not follow "
                "the one before it or reads past the row");
    end += s[1];
  }
  TORCH_CHECK(end == tokens, "martlet.attention: the samples hold ", end, " tokens, the row ", tokens);
}

#if defined(__AVX512BF16__)
// ---- the bf16 operands of the attention's products on AVX512-BF16: pairs of bf16 values along a product's sum ----
// out[i] = (a[i], b[i]) for i < count (a multiple of 16): two bf16 rows interleaved, b zero when null
ALWAYS_INLINE void attn_interleave(const bf16* a, const bf16* b, int64_t count, uint32_t* out) {
  for (int64_t i = 0; i < count; i += kLanes) {
    __m512i low = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(a + i)));
    __m512i high = b ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(b + i))) : _mm512_setzero_si512();
    _mm512_storeu_si512(out + i, _mm512_or_si512(low, _mm512_slli_epi32(high, 16)));
  }
}
// the same of two fp32 rows, each value rounded to bf16 (b zero when null)
ALWAYS_INLINE void attn_interleave(const float* a, const float* b, int64_t count, uint32_t* out) {
  auto bits = [](const float* p) { return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(p))); };
  for (int64_t i = 0; i < count; i += kLanes) {
    __m512i high = b ? bits(b + i) : _mm512_setzero_si512();
    _mm512_storeu_si512(out + i, _mm512_or_si512(bits(a + i), _mm512_slli_epi32(high, 16)));
  }
}
// an fp32 row (count a multiple of 32) rounded to bf16: count / 2 pairs along it
ALWAYS_INLINE void attn_row_as_pairs(const float* a, int64_t count, uint32_t* out) {
  for (int64_t i = 0; i < count; i += 2 * kLanes)
    _mm512_storeu_si512(out + i / 2, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(a + i + kLanes),
                                                                  _mm512_loadu_ps(a + i)));
}
// rows row(0..count) of src (dim bf16 values each) as pairs along them: (count x dim / 2); with `ld`, transposed:
// (dim / 2 x ld), zero past count
template <typename Row>
void attn_pairs_along(const bf16* src, int64_t count, int64_t dim, Row row, uint32_t* dst, int64_t ld = 0) {
  for (int64_t i = 0; i < count; ++i) {
    const bf16* from = src + row(i) * dim;
    if (!ld) {
      std::memcpy(dst + i * dim / 2, from, dim * sizeof(bf16));
    } else {
      for (int64_t p = 0; p < dim / 2; ++p) dst[p * ld + i] = uint32_t(from[2 * p]) | uint32_t(from[2 * p + 1]) << 16;
    }
  }
  if (ld)
    for (int64_t p = 0; p < dim / 2; ++p) std::fill(dst + p * ld + count, dst + (p + 1) * ld, 0u);
}
// rows row(0..count) of src as pairs across them: row m of dst (ceil(count / 2) x dim) pairs rows 2m and 2m + 1
template <typename Row>
void attn_pairs_across(const bf16* src, int64_t count, int64_t dim, Row row, uint32_t* dst) {
  for (int64_t m = 0; 2 * m < count; ++m)
    attn_interleave(src + row(2 * m) * dim, 2 * m + 1 < count ? src + row(2 * m + 1) * dim : nullptr, dim, dst + m * dim);
}
// the R rows of x (R x width fp32) as pairs across them, (ceil(R / 2) x width)
void attn_pairs_across(const float* x, int64_t R, int64_t width, uint32_t* dst) {
  for (int64_t m = 0; 2 * m < R; ++m)
    attn_interleave(x + 2 * m * width, 2 * m + 1 < R ? x + (2 * m + 1) * width : nullptr, width, dst + m * width);
}
template <typename T> constexpr bool kPairs = std::is_same_v<T, bf16>;  // bf16 rows: products on bf16 pairs
#else
template <typename T> constexpr bool kPairs = false;
#endif

// the score rows S (R x width) turned into probabilities in place (0 past each row's visible keys), and each row's
// logsumexp into lse
void attn_softmax(const AttnTask& t, const AttnShape& sh, float* S, float* lse) {
  for (int64_t r = 0; r < t.rows; ++r) {
    float* s = S + r * t.width;
    int64_t visible = t.visible(r, sh.groups);
    vf most = vsplat(-INFINITY);
    for (int64_t j = 0; j < visible; j += kLanes) {
      vf x = vread<vf>(s + j);
      most = vmax(most, j + kLanes > visible ? (lanes_before(visible - j) ? x : vsplat(-INFINITY)) : x);
    }
    float top = -INFINITY;
    for (int l = 0; l < kLanes; ++l) top = std::max(top, most[l]);
    top *= sh.scale;
    const vf scale = vsplat(sh.scale), shift = vsplat(top);
    float sum = attn_row_map(s, visible, t.width, [&](vf x, int64_t) { return vexp(x * scale - shift); });
    const vf inverse = vsplat(1.f / sum);
    for (int64_t j = 0; j < visible; j += kLanes) vwrite(s + j, vread<vf>(s + j) * inverse);
    lse[t.query_row(r, sh)] = top + std::log(sum);
  }
}

// the task's query rows of x (R x dim fp32) stored into to's rows
template <typename T> void attn_store_rows(const AttnTask& t, const AttnShape& sh, const float* x, T* to) {
  for (int64_t r = 0; r < t.rows; ++r) {
    T* row = to + t.query_row(r, sh) * sh.dim;
    for (int64_t d = 0; d < sh.dim; d += kLanes) vstore_as(row + d, vread<vf>(x + r * sh.dim + d));
  }
}

// one task's forward pass: its rows of out and lse
template <typename T>
void attention_task(const AttnTask& t, const AttnShape& sh, const T* q, const T* k, const T* v, T* out, float* lse) {
  int64_t R = t.rows, W = t.width, N = t.keys, dim = sh.dim;
  auto query = [&](int64_t r) { return t.query_row(r, sh); };
  auto key = [&](int64_t j) { return t.key_token(j) * sh.kv_heads + t.head; };
  float *S = t.floats(R * W + R * dim + (kPairs<T> ? 0 : R * dim + dim * W + N * dim)), *O = S + R * W;
#if defined(__AVX512BF16__)
  if constexpr (kPairs<T>) {  // bf16 products (pairs), the softmax in fp32
    int64_t half = (N + 1) / 2;
    uint32_t *Q = t.words(R * dim / 2 + dim / 2 * W + half * dim + R * W / 2);
    uint32_t *Kt = Q + R * dim / 2, *V = Kt + dim / 2 * W, *P = V + half * dim;
    attn_pairs_along(q, R, dim, query, Q);
    attn_pairs_along(k, N, dim, key, Kt, W);
    attn_pairs_across(v, N, dim, key, V);
    attn_scores(t, sh, Q, Kt, S);
    attn_softmax(t, sh, S, lse);
    for (int64_t r = 0; r < R; ++r) attn_row_as_pairs(S + r * W, W, P + r * W / 2);
    attn_times_keys(t, sh, P, V, O);
    return attn_store_rows(t, sh, O, out);
  }
#endif
  float *Q = O + R * dim, *Kt = Q + R * dim, *V = Kt + dim * W;
  attn_load(q, R, dim, query, Q);
  attn_load(k, N, dim, key, Kt, true, W);
  attn_load(v, N, dim, key, V);
  attn_scores(t, sh, Q, Kt, S);
  attn_softmax(t, sh, S, lse);
  attn_times_keys(t, sh, S, V, O);
  attn_store_rows(t, sh, O, out);
}

std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& samples, int64_t heads, double scale) {
  check_attention(q, k, v, samples, heads);
  TORCH_CHECK(scale > 0, "martlet.attention: the scale must be positive");
  int64_t tokens = q.size(0) / heads, kv = k.size(0) / tokens, dim = q.size(1);
  const AttnShape sh{heads, kv, heads / kv, dim, float(scale)};
  auto out = at::empty_like(q);
  auto lse = at::empty({q.size(0)}, q.options().dtype(at::kFloat));
  dispatch(q, [&](auto type) {
    using T = typename decltype(type)::type;
    attn_tasks(samples.data_ptr<int64_t>(), samples.size(0), sh, [&](const AttnTask& t) {
      attention_task(t, sh, ptr<T>(q), ptr<T>(k), ptr<T>(v), ptr<T>(out), lse.data_ptr<float>());
    });
  });
  return {out, lse};
}

// P again from the scores in P and the logsumexp, and dS = scale P (dP - rowsum(dO * O)) from dP in dS, in place
template <typename T>
void attn_probs_and_grads(const AttnTask& t, const AttnShape& sh, const T* grad, const T* out, const float* lse,
                          float* P, float* dS) {
  for (int64_t r = 0; r < t.rows; ++r) {
    int64_t query = t.query_row(r, sh), row = query * sh.dim;
    vf acc = vsplat(0.f);
    for (int64_t d = 0; d < sh.dim; d += kLanes) acc = vfma(vload_as(grad + row + d), vload_as(out + row + d), acc);
    float *p = P + r * t.width, *ds = dS + r * t.width;
    const vf scale = vsplat(sh.scale), shift = vsplat(lse[query]), dr = vsplat(vsum(acc));
    int64_t visible = t.visible(r, sh.groups);
    attn_row_map(p, visible, t.width, [&](vf x, int64_t) { return vexp(x * scale - shift); });
    attn_row_map(ds, visible, t.width, [&](vf x, int64_t j) { return scale * vread<vf>(p + j) * (x - dr); });
  }
}

// one task's backward pass: its rows of dq; returns its keys' and values' gradients (N x dim fp32 each, in the
// task's arena)
template <typename T>
std::pair<const float*, const float*> attention_backward_task(const AttnTask& t, const AttnShape& sh, const T* grad,
                                                              const T* q, const T* k, const T* v, const T* out,
                                                              const float* lse, T* dq) {
  int64_t R = t.rows, W = t.width, N = t.keys, dim = sh.dim;
  auto query = [&](int64_t r) { return t.query_row(r, sh); };
  auto key = [&](int64_t j) { return t.key_token(j) * sh.kv_heads + t.head; };
  // P, dS, dQ, dK, dV, and the fp32 products' copies of Q, dO, K^T, V^T, K
  float *P = t.floats(2 * R * W + R * dim + 2 * N * dim + (kPairs<T> ? 0 : 2 * R * dim + 2 * dim * W + N * dim));
  float *dS = P + R * W, *dQ = dS + R * W, *dK = dQ + R * dim, *dV = dK + N * dim;
#if defined(__AVX512BF16__)
  if constexpr (kPairs<T>) {  // bf16 products (pairs): dS and P rounded to bf16 where they enter one
    int64_t half_n = (N + 1) / 2, half_r = (R + 1) / 2;
    uint32_t *Q = t.words(R * dim + dim * W + half_n * dim + 2 * half_r * dim + R * W / 2 + 2 * half_r * W);
    uint32_t *dO = Q + R * dim / 2, *Kt = dO + R * dim / 2, *Vt = Kt + dim / 2 * W;
    uint32_t *K = Vt + dim / 2 * W, *Qr = K + half_n * dim, *dOr = Qr + half_r * dim, *dSp = dOr + half_r * dim;
    uint32_t *dSr = dSp + R * W / 2, *Pr = dSr + half_r * W;
    attn_pairs_along(q, R, dim, query, Q);
    attn_pairs_along(grad, R, dim, query, dO);
    attn_pairs_along(k, N, dim, key, Kt, W);
    attn_pairs_along(v, N, dim, key, Vt, W);
    attn_pairs_across(k, N, dim, key, K);
    attn_pairs_across(q, R, dim, query, Qr);
    attn_pairs_across(grad, R, dim, query, dOr);
    attn_scores(t, sh, Q, Kt, P);
    attn_scores(t, sh, dO, Vt, dS);  // dP = dO V^T, over the same keys
    attn_probs_and_grads(t, sh, grad, out, lse, P, dS);
    for (int64_t r = 0; r < R; ++r) attn_row_as_pairs(dS + r * W, W, dSp + r * W / 2);
    attn_times_keys(t, sh, dSp, K, dQ);
    attn_pairs_across(dS, R, W, dSr);
    attn_pairs_across(P, R, W, Pr);
    attn_transposed_times(t, sh, dSr, Qr, dK);
    attn_transposed_times(t, sh, Pr, dOr, dV);
    attn_store_rows(t, sh, dQ, dq);
    return {dK, dV};
  }
#endif
  float *Q = dV + N * dim, *dO = Q + R * dim, *Kt = dO + R * dim, *Vt = Kt + dim * W, *K = Vt + dim * W;
  attn_load(q, R, dim, query, Q);
  attn_load(grad, R, dim, query, dO);
  attn_load(k, N, dim, key, Kt, true, W);
  attn_load(v, N, dim, key, Vt, true, W);
  attn_load(k, N, dim, key, K);
  attn_scores(t, sh, Q, Kt, P);
  attn_scores(t, sh, dO, Vt, dS);  // dP = dO V^T, over the same keys
  attn_probs_and_grads(t, sh, grad, out, lse, P, dS);
  attn_times_keys(t, sh, dS, K, dQ);
  attn_transposed_times(t, sh, dS, Q, dK);
  attn_transposed_times(t, sh, P, dO, dV);
  attn_store_rows(t, sh, dQ, dq);
  return {dK, dV};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& grad, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& samples, const at::Tensor& out,
                                                                  const at::Tensor& lse, int64_t heads, double scale) {
  check_attention(q, k, v, samples, heads);
  check(grad, "grad");
  check_like(grad, q, "grad and q");
  check_like(out, q, "out and q");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == q.size(0),
              "martlet.attention_backward: lse must hold one fp32 value a query row");
  int64_t tokens = q.size(0) / heads, kv = k.size(0) / tokens, dim = q.size(1), count = samples.size(0);
  const AttnShape sh{heads, kv, heads / kv, dim, float(scale)};
  const int64_t* smp = samples.data_ptr<int64_t>();
  auto dq = at::empty_like(q);
  bool wide = q.scalar_type() == at::kFloat;  // fp32: the key/value gradients are summed in place
  auto dk32 = wide ? at::empty_like(k) : at::empty(k.sizes(), k.options().dtype(at::kFloat));
  auto dv32 = wide ? at::empty_like(v) : at::empty(v.sizes(), v.options().dtype(at::kFloat));
  // each sample's share of its prefix's key/value gradients, (prefix, kv heads, dim) from offset[i]
  std::vector<int64_t> offset(count + 1, 0);
  for (int64_t i = 0; i < count; ++i) offset[i + 1] = offset[i] + smp[4 * i + 3] * kv * dim;
  std::vector<float> shared_k(offset[count]), shared_v(offset[count]);
  float *dk_ptr = dk32.data_ptr<float>(), *dv_ptr = dv32.data_ptr<float>();
  dispatch(q, [&](auto type) {
    using T = typename decltype(type)::type;
    attn_tasks(smp, count, sh, [&](const AttnTask& t) {
      auto [dK, dV] = attention_backward_task(t, sh, ptr<T>(grad), ptr<T>(q), ptr<T>(k), ptr<T>(v), ptr<T>(out),
                                              lse.data_ptr<float>(), ptr<T>(dq));
      int64_t N = t.keys;
      for (int64_t j = 0; j < N; ++j) {  // a sample's own keys are its alone; a prefix's are added up below
        bool own = j >= t.prefix;
        int64_t place = own ? (t.key_token(j) * kv + t.head) * dim : offset[t.index] + (j * kv + t.head) * dim;
        std::memcpy((own ? dk_ptr : shared_k.data()) + place, dK + j * dim, dim * sizeof(float));
        std::memcpy((own ? dv_ptr : shared_v.data()) + place, dV + j * dim, dim * sizeof(float));
      }
    });
  });
  for (int64_t i = 0; i < count; ++i) {  // the prefixes' shares, in row order
    const int64_t* s = smp + 4 * i;
    for (int64_t e = 0; e < s[3] * kv * dim; ++e) {
      int64_t place = s[2] * kv * dim + e;  // row (prefix_start + j) * kv + head
      dk_ptr[place] += shared_k[offset[i] + e];
      dv_ptr[place] += shared_v[offset[i] + e];
    }
  }
  if (wide) return {dq, dk32, dv32};
  return {dq, dk32.to(k.scalar_type()), dv32.to(v.scalar_type())};
}

// ---- row gather with zero rows (the attention buckets' gradients) ----------------------------------------------
// out[i] = src[index[i]], a zero row where index[i] == rows (one past the end): what `torch.cat([src, zero row])
// .index_select(0, index)` gives, without copying src first. Rows of any dtype, moved as bytes.
at::Tensor gather_rows(const at::Tensor& src, const at::Tensor& index) {
  TORCH_CHECK(src.device().is_cpu() && src.is_contiguous() && src.dim() == 2, "martlet.gather_rows: src must be a "
              "contiguous 2-d CPU tensor");
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 1 && index.is_contiguous(),
              "martlet.gather_rows: index must be a contiguous 1-d int64 tensor");
  int64_t rows = src.size(0), count = index.size(0), bytes = src.size(1) * src.element_size();
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i)
    TORCH_CHECK(idx[i] >= 0 && idx[i] <= rows, "martlet.gather_rows: index ", idx[i], " outside [0, ", rows, "]");
  auto out = at::empty({count, src.size(1)}, src.options());
  const char* from = static_cast<const char*>(src.data_ptr());
  char* to = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, count, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, src.size(1))), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (idx[i] == rows) std::memset(to + i * bytes, 0, bytes);
      else std::memcpy(to + i * bytes, from + idx[i] * bytes, bytes);
    }
  });
  return out;
}

// whether the LoRA ops on bf16 inputs run on AVX512-BF16 dot products (factors and thin results rounded to bf16)
bool bf16_dot() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

}  // namespace

// ---- a fused LoRA layer on packed weights, its autograd node in C++ ----------------------------------------
// y = x W^T + bias + scaling * drop(x) (keep_scale a)^T b^T, W packed for oneDNN (`w` for x W^T, `w_t` for dy W,
// train/packed.py): what kernels.LoraLinear runs on the native kernels, without its Python in either pass.
namespace {

at::Tensor packed_product(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x.contiguous(), w, bias, std::string("none"), c10::List<std::optional<at::Scalar>>(),
                          std::optional<std::string>("")};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// x W^T + bias + s * dropout(x) A^T B^T for 2-D x on a packed W: (out, x A^T). Both LoRA nodes below run it.
std::pair<at::Tensor, at::Tensor> lora_forward(const at::Tensor& x, const at::Tensor& w,
                                               const std::optional<at::Tensor>& bias, const at::Tensor& a,
                                               const at::Tensor& b, double scaling, double keep_scale, int64_t seed,
                                               int64_t threshold) {
  at::Tensor out = packed_product(x, w, bias);
  at::Tensor xa = lora_down(x, a, keep_scale, seed, threshold);
  lora_up_(out, xa, b, scaling);
  return {out, xa};
}

// Its backward from the output's gradient dy: (x's gradient when asked, A's, B's), x's on the packed W^T.
std::tuple<std::optional<at::Tensor>, at::Tensor, at::Tensor> lora_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& xa, const at::Tensor& w_t, const at::Tensor& a,
    const at::Tensor& b, double scaling, double keep_scale, int64_t seed, int64_t threshold, bool input_grad) {
  std::optional<at::Tensor> grad_x;
  if (input_grad) grad_x = packed_product(dy, w_t, std::nullopt);
  auto [dyb, grad_b] = lora_up_backward(dy, xa, b, scaling);
  at::Tensor grad_a = lora_down_backward(x, a, dyb, keep_scale, seed, threshold, grad_x);
  return {grad_x, grad_a, grad_b};
}

struct LoraLinearNode : public torch::autograd::Function<LoraLinearNode> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const at::Tensor& w_t, const std::optional<at::Tensor>& bias, const at::Tensor& a,
                            const at::Tensor& b, double scaling, double keep_scale, int64_t seed, int64_t threshold) {
    at::Tensor x2 = x.reshape({-1, x.size(-1)});
    auto [out, xa] = lora_forward(x2, w, bias, a, b, scaling, keep_scale, seed, threshold);
    ctx->save_for_backward({x2, xa, w_t, a, b});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["keep_scale"] = keep_scale;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["threshold"] = threshold;
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = out.size(-1);
    return out.view(shape);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &xa = saved[1], &w_t = saved[2], &a = saved[3], &b = saved[4];
    at::Tensor dy = grads[0].reshape({-1, grads[0].size(-1)}).to(x.scalar_type()).contiguous();
    auto [grad_x, grad_a, grad_b] = lora_backward(
        dy, x, xa, w_t, a, b, ctx->saved_data["scaling"].toDouble(), ctx->saved_data["keep_scale"].toDouble(),
        ctx->saved_data["seed"].toInt(), ctx->saved_data["threshold"].toInt(), ctx->needs_input_grad(0));
    std::vector<int64_t> shape = grads[0].sizes().vec();  // x's: the output's, k columns
    shape.back() = x.size(-1);
    at::Tensor gx = grad_x ? grad_x->view(shape) : at::Tensor();
    return {gx, at::Tensor(), at::Tensor(), at::Tensor(), grad_a, grad_b, at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_t,
                       const std::optional<at::Tensor>& bias, const at::Tensor& a, const at::Tensor& b, double scaling,
                       double keep_scale, int64_t seed, int64_t threshold) {
  return LoraLinearNode::apply(x, w, w_t, bias, a, b, scaling, keep_scale, seed, threshold);
}

// ---- a llama decoder layer of a LoRA model as one autograd node (train/fused_layer.py) ----------------------
// y = x2 + down(swiglu(gate(n2), up(n2))), n2 = norm2(x2), x2 = x + o(attention(rotary(q(n1)), rotary(k(n1)),
// v(n1))), n1 = norm1(x), for a padding-free row x (tokens, hidden). Each projection as `martlet::lora_linear`
// computes it, the gradients summed in the order autograd sums them: the bits of the layer's own modules.
struct LayerArgs {
  at::Tensor cos, sin, samples, norm1, norm2;
  double eps1, eps2, scale;
  std::vector<at::Tensor> weights, weights_t;
  std::vector<std::optional<at::Tensor>> biases;
  std::vector<double> scalings, keep_scales;
  std::vector<int64_t> seeds, thresholds;
  int64_t heads, kv_heads;
};

struct DecoderLayerNode : public torch::autograd::Function<DecoderLayerNode> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, at::TensorList factors,
                            const LayerArgs* layer) {
    const LayerArgs& l = *layer;
    const int64_t tokens = x.size(0), dim = l.cos.size(-1);
    auto project = [&](int i, const at::Tensor& in) {  // (empty factors: a frozen projection without an adapter)
      if (factors[2 * i].numel() == 0) {
        return std::make_pair(packed_product(in, l.weights[i], l.biases[i]), factors[2 * i]);
      }
      return lora_forward(in, l.weights[i], l.biases[i], factors[2 * i], factors[2 * i + 1], l.scalings[i],
                          l.keep_scales[i], l.seeds[i], l.thresholds[i]);
    };
    auto [n1, rstd1] = rms_norm(x, l.norm1, l.eps1);
    auto [q0, xq] = project(0, n1);
    auto [k0, xk] = project(1, n1);
    auto [v0, xv] = project(2, n1);
    at::Tensor q = rotary(q0.view({1, tokens, l.heads, dim}), l.cos, l.sin, false).view({-1, dim});
    at::Tensor k = rotary(k0.view({1, tokens, l.kv_heads, dim}), l.cos, l.sin, false).view({-1, dim});
    at::Tensor v = v0.view({-1, dim});
    auto [attended, lse] = attention(q, k, v, l.samples, l.heads, l.scale);
    attended = attended.view({tokens, l.heads * dim});
    auto [o, xo] = project(3, attended);
    at::Tensor x2 = x + o;
    auto [n2, rstd2] = rms_norm(x2, l.norm2, l.eps2);
    auto [gate, xg] = project(4, n2);
    auto [up, xu] = project(5, n2);
    at::Tensor act = swiglu(gate, up);
    auto [down, xd] = project(6, act);
    std::vector<at::Tensor> saved{x, rstd1, n1, q, k, v, attended, lse, x2, rstd2, n2, gate, up, act,
                                  xq, xk, xv, xo, xg, xu, xd};
    saved.insert(saved.end(), factors.begin(), factors.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["inputs"] = std::vector<at::Tensor>{l.cos, l.sin, l.samples, l.norm1, l.norm2};
    ctx->saved_data["weights_t"] = l.weights_t;
    ctx->saved_data["scalings"] = l.scalings;
    ctx->saved_data["keep_scales"] = l.keep_scales;
    ctx->saved_data["seeds"] = l.seeds;
    ctx->saved_data["thresholds"] = l.thresholds;
    ctx->saved_data["shape"] = std::vector<int64_t>{l.heads, l.kv_heads};
    ctx->saved_data["scale"] = l.scale;
    return x2 + down;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &rstd1 = s[1], &n1 = s[2], &q = s[3], &k = s[4], &v = s[5], &attended = s[6];
    const at::Tensor &lse = s[7], &x2 = s[8], &rstd2 = s[9], &n2 = s[10], &gate = s[11], &up = s[12], &act = s[13];
    const at::Tensor* downs = &s[14];  // x A^T of q, k, v, o, gate, up, down
    const at::Tensor* factors = &s[21];
    auto inputs = ctx->saved_data["inputs"].toTensorVector();
    const at::Tensor &cos = inputs[0], &sin = inputs[1], &samples = inputs[2];
    auto weights_t = ctx->saved_data["weights_t"].toTensorVector();
    auto scalings = ctx->saved_data["scalings"].toDoubleVector();
    auto keep_scales = ctx->saved_data["keep_scales"].toDoubleVector();
    auto seeds = ctx->saved_data["seeds"].toIntVector(), thresholds = ctx->saved_data["thresholds"].toIntVector();
    auto shape = ctx->saved_data["shape"].toIntVector();
    const double scale = ctx->saved_data["scale"].toDouble();
    const int64_t tokens = x.size(0), heads = shape[0], kv_heads = shape[1], dim = cos.size(-1);
    torch::autograd::variable_list out(1 + 14 + 1);  // x, the factors, the layer's other arguments (none)
    auto back = [&](int i, const at::Tensor& dy, const at::Tensor& in, bool input_grad) {
      if (factors[2 * i].numel() == 0) {
        return input_grad ? packed_product(dy, weights_t[i], std::nullopt) : at::Tensor();
      }
      auto [grad_x, grad_a, grad_b] = lora_backward(dy, in, downs[i], weights_t[i], factors[2 * i],
                                                    factors[2 * i + 1], scalings[i], keep_scales[i], seeds[i],
                                                    thresholds[i], input_grad);
      out[1 + 2 * i] = grad_a;
      out[2 + 2 * i] = grad_b;
      return grad_x ? *grad_x : at::Tensor();
    };
    at::Tensor dy = grads[0].to(x.scalar_type()).contiguous();
    auto [d_gate, d_up] = swiglu_backward(back(6, dy, act, true), gate, up);
    at::Tensor dn2 = back(5, d_up, n2, true);  // autograd's order: a later node's gradient first, the next added
    dn2 = dn2 + back(4, d_gate, n2, true);
    at::Tensor dx2 = dy + rms_norm_backward(dn2, x2, inputs[4], rstd2);
    auto [dq, dk, dv] = attention_backward(back(3, dx2, attended, true).view({-1, dim}), q, k, v, samples,
                                           attended.view({-1, dim}), lse, heads, scale);
    dq = rotary(dq.view({1, tokens, heads, dim}), cos, sin, true).view({tokens, -1});
    dk = rotary(dk.view({1, tokens, kv_heads, dim}), cos, sin, true).view({tokens, -1});
    const bool need = ctx->needs_input_grad(0);  // the first layer's input (frozen embeddings) needs none
    at::Tensor dn1 = back(2, dv.view({tokens, -1}), n1, need);
    at::Tensor more = back(1, dk, n1, need);
    if (need) dn1 = dn1 + more;
    more = back(0, dq, n1, need);
    if (need) out[0] = dx2 + rms_norm_backward(dn1 + more, x, inputs[3], rstd1);
    return out;
  }
};

at::Tensor decoder_layer(const at::Tensor& x, at::TensorList factors, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& samples, const at::Tensor& norm1, const at::Tensor& norm2, double eps1,
                         double eps2, at::TensorList weights, at::TensorList weights_t,
                         const c10::List<std::optional<at::Tensor>>& biases, at::ArrayRef<double> scalings,
                         at::ArrayRef<double> keep_scales, at::IntArrayRef seeds, at::IntArrayRef thresholds,
                         int64_t heads, int64_t kv_heads, double scale) {
  TORCH_CHECK(factors.size() == 14 && weights.size() == 7 && weights_t.size() == 7 && biases.size() == 7 &&
                  scalings.size() == 7 && keep_scales.size() == 7 && seeds.size() == 7 && thresholds.size() == 7,
              "decoder_layer: seven projections (q, k, v, o, gate, up, down)");
  LayerArgs layer{cos, sin, samples, norm1, norm2, eps1, eps2, scale, weights.vec(), weights_t.vec(), {},
                  scalings.vec(), keep_scales.vec(), seeds.vec(), thresholds.vec(), heads, kv_heads};
  for (const auto& bias : biases) layer.biases.push_back(bias);
  return DecoderLayerNode::apply(x, factors, &layer);
}

}  // namespace

TORCH_LIBRARY(martlet, m) {
  m.def("lora_linear(Tensor x, Tensor w, Tensor w_t, Tensor? bias, Tensor a, Tensor b, float scaling, "
        "float keep_scale, int seed, int threshold) -> Tensor", &lora_linear);
  m.def("decoder_layer(Tensor x, Tensor[] factors, Tensor cos, Tensor sin, Tensor samples, Tensor norm1, "
        "Tensor norm2, float eps1, float eps2, Tensor[] weights, Tensor[] weights_t, Tensor?[] biases, "
        "float[] scalings, float[] keep_scales, int[] seeds, int[] thresholds, int heads, int kv_heads, "
        "float scale) -> Tensor", &decoder_layer);
  m.def("bf16_dot() -> bool", &bf16_dot);
  m.def("gather_rows(Tensor src, Tensor index) -> Tensor", &gather_rows);
  m.def("dropout_mask(int rows, int k, int seed, int threshold) -> Tensor", &dropout_mask);
  m.def("lora_down(Tensor x, Tensor a, float scale, int seed, int threshold) -> Tensor", &lora_down);
  m.def("lora_up_(Tensor(a!) out, Tensor xa, Tensor b, float scale) -> Tensor(a!)", &lora_up_);
  m.def("lora_up_backward(Tensor dy, Tensor xa, Tensor b, float scale) -> (Tensor, Tensor)", &lora_up_backward);
  m.def("lora_down_backward(Tensor x, Tensor a, Tensor dyb, float scale, int seed, int threshold, "
        "Tensor(a!)? grad_x) -> Tensor", &lora_down_backward);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)", &rms_norm);
  m.def("rms_norm_backward(Tensor grad, Tensor x, Tensor weight, Tensor rstd) -> Tensor", &rms_norm_backward);
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor", &swiglu);
  m.def("swiglu_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)", &swiglu_backward);
  m.def("cross_entropy_grad_(Tensor(a!) logits, Tensor target) -> Tensor", &cross_entropy_grad_);
  m.def("token_scores_(Tensor(a!) logits, Tensor target, bool grad, float temperature=1.0) -> "
        "(Tensor, Tensor, Tensor, Tensor)",
        &token_scores_);
  m.def("rotary(Tensor x, Tensor cos, Tensor sin, bool backward) -> Tensor", &rotary);
  m.def("causal_softmax(Tensor scores, float scale) -> Tensor", &causal_softmax);
  m.def("causal_softmax_backward(Tensor grad, Tensor probs, float scale) -> Tensor", &causal_softmax_backward);
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor samples, int heads, float scale) -> (Tensor, Tensor)",
        &attention);
  m.def("attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor samples, Tensor out, Tensor lse, "
        "int heads, float scale) -> (Tensor, Tensor, Tensor)",
        &attention_backward);
}
