// The q8_0 and q4_0 block products (see llama/block_quant.py for the scheme): activations rounded to int8 in
// blocks of 32 with a float32 scale each, each block's product with the weights summed in 32-bit integers, then
// multiplied by the two blocks' scales and added up in float32.
//
// Compiled once per instruction set, with the flags that name it (llama/block_kernels.py): AVX2 multiplies bytes
// with vpmaddubsw, AVX-512 VNNI with vpdpbusd, 32 or 64 at a time; the registered operators' namespace is the
// build's name, so that several builds can be loaded in one process. Both instructions multiply an unsigned byte
// by a signed one: q8_0 takes each product w * a as |w| * (a with the sign of w); q4_0 multiplies its stored
// 0..15 as they are, and each block's sum starts from -8 times the sum of its activations, which the rounding of
// the activations computes once per row.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <cstring>

#ifndef VARIANT
#error "compile with -DVARIANT=<the operators' namespace>"
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define WIDE 1  // blocks two at a time, in 512-bit registers
#else
#define WIDE 0
#endif

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kStep = 8;  // blocks whose scales are converted together
constexpr int kLanes = 8;  // int32 sums per block, each of four products

inline float sum_lanes(__m256 v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}

inline float max_lanes(__m256 v) {
  __m128 half = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_max_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_max_ss(half, _mm_movehdup_ps(half)));
}

inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// One block of 32 activations rounded: its scale is the largest magnitude over 127 (at least FLT_MIN, so that a
// block of zeros divides to zeros), and each value is divided by it and rounded to the nearest integer, ties to
// even, as llama/block_quant.py writes it.
void quantize_block(const float* x, int8_t* q, float* scale) {
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  __m256 part[4];
  __m256 largest = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    part[i] = _mm256_loadu_ps(x + 8 * i);
    largest = _mm256_max_ps(largest, _mm256_andnot_ps(sign_bit, part[i]));
  }
  *scale = std::max(max_lanes(largest) / 127.0f, FLT_MIN);
  const __m256 divisor = _mm256_set1_ps(*scale);
  __m256i ints[4];
  for (int i = 0; i < 4; ++i) {
    ints[i] = _mm256_cvtps_epi32(
        _mm256_round_ps(_mm256_div_ps(part[i], divisor), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // The packs work within 128-bit lanes: groups of four values come out in the order 0 2 4 6 1 3 5 7.
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(ints[0], ints[1]), _mm256_packs_epi32(ints[2], ints[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

// A row of activations, rounded block by block. For q4_0 (`offsets` given), also each block's starting sums:
// -8 times the sum of each group of four activations (the stored weights are q + 8). In the wide build, each
// pair of blocks in the first `blocks / 8 * 8` is then laid out as q4_0's weights unpack: the first 16 values of
// both blocks, then the last 16 of both (and the offsets with them).
void quantize_row(const float* x, int64_t blocks, int8_t* q, float* scales, int32_t* offsets) {
  for (int64_t b = 0; b < blocks; ++b) {
    quantize_block(x + b * kBlock, q + b * kBlock, scales + b);
    if (offsets != nullptr) {
      const __m256i a = load256(q + b * kBlock);
      const __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(8), a), _mm256_set1_epi16(1));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(offsets + b * kLanes), _mm256_sub_epi32(_mm256_setzero_si256(), sums));
    }
  }
#if WIDE
  if (offsets == nullptr) return;
  for (int64_t b = 0; b + 1 < blocks / kStep * kStep; b += 2) {
    int8_t values[2 * kBlock];
    int32_t sums[2 * kLanes];
    std::memcpy(values, q + b * kBlock, sizeof(values));
    std::memcpy(sums, offsets + b * kLanes, sizeof(sums));
    for (int half = 0; half < 2; ++half) {      // values 0-15, then 16-31
      for (int block = 0; block < 2; ++block) {  // of block b, then of block b + 1
        const int part = 2 * half + block;
        std::memcpy(q + b * kBlock + 16 * part, values + block * kBlock + 16 * half, 16);
        std::memcpy(offsets + b * kLanes + 4 * part, sums + block * kLanes + 4 * half, 4 * sizeof(int32_t));
      }
    }
  }
#endif
}

// The eight products of eight blocks' weight scales (float16) and activation scales.
inline __m256 eight_scales(const uint16_t* weight_scales, const float* scales) {
  const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(weight_scales));
  return _mm256_mul_ps(_mm256_cvtph_ps(halves), _mm256_loadu_ps(scales));
}

// The products of a block's 32 weights and 32 activations, summed in eight int32 lanes of four.
inline __m256i sum_products(__m256i unsigned_bytes, __m256i signed_bytes, __m256i start) {
#if WIDE
  return _mm256_dpbusd_epi32(start, unsigned_bytes, signed_bytes);
#else
  // Pairs in int16 (at most 2 * 127 * 127 = 32258: no saturation), then pairs of pairs in int32.
  const __m256i pairs = _mm256_maddubs_epi16(unsigned_bytes, signed_bytes);
  return _mm256_add_epi32(start, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

struct Q8 {
  using Weight = int8_t;
  static constexpr int64_t kBytes = kBlock;  // per block
  static constexpr bool kOffsets = false;
  static __m256i block(const Weight* w, int64_t b, __m256i a, const int32_t*) {
    const __m256i weights = load256(w + b * kBlock);
    return sum_products(_mm256_sign_epi8(weights, weights), _mm256_sign_epi8(a, weights), _mm256_setzero_si256());
  }
#if WIDE
  static __m512i pair(const Weight* w, int64_t b, __m512i a, const int32_t*) {
    const __m512i weights = _mm512_loadu_si512(w + b * kBlock);
    const __m512i signed_a = _mm512_mask_sub_epi8(a, _mm512_movepi8_mask(weights), _mm512_setzero_si512(), a);
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(weights), signed_a);
  }
  // Which block each of a pair's 16 sums belongs to: eight of the first, eight of the second.
  static __m512i owners(int first) {
    return _mm512_set_epi32(first + 1, first + 1, first + 1, first + 1, first + 1, first + 1, first + 1, first + 1,
                            first, first, first, first, first, first, first, first);
  }
#endif
};

// q4_0's 16 bytes per block: value j in the low four bits of byte j, value j + 16 in the high four bits.
struct Q4 {
  using Weight = uint8_t;
  static constexpr int64_t kBytes = kBlock / 2;
  static constexpr bool kOffsets = true;
  static __m256i block(const Weight* w, int64_t b, __m256i a, const int32_t* offsets) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b * kBytes));
    const __m256i nibbles = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(15));
    return sum_products(nibbles, a, load256(offsets + b * kLanes));
  }
#if WIDE
  static __m512i pair(const Weight* w, int64_t b, __m512i a, const int32_t* offsets) {
    const __m256i packed = load256(w + b * kBytes);
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(packed), _mm256_srli_epi16(packed, 4), 1);
    return _mm512_dpbusd_epi32(_mm512_loadu_si512(offsets + b * kLanes), _mm512_and_si512(both, _mm512_set1_epi8(15)), a);
  }
  // The pair's sums in the activations' pair layout: four of the first block, four of the second, and again.
  static __m512i owners(int first) {
    return _mm512_set_epi32(first + 1, first + 1, first + 1, first + 1, first, first, first, first,
                            first + 1, first + 1, first + 1, first + 1, first, first, first, first);
  }
#endif
};

// One output: the weights of a row times one row of rounded activations, eight blocks at a time (their scales
// converted together), each block's integer sums scaled by its two scales and added up in float32.
template <typename Scheme>
float row_product(const typename Scheme::Weight* w, const uint16_t* weight_scales, const int8_t* q,
                  const float* scales, const int32_t* offsets, int64_t blocks) {
  __m256 sums[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};  // two chains, to overlap their latency
  int64_t b = 0;
#if WIDE
  __m512 wide_sums[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  for (; b + kStep <= blocks; b += kStep) {
    const __m512 eight = _mm512_castps256_ps512(eight_scales(weight_scales + b, scales + b));
    for (int pair = 0; pair < 4; ++pair) {
      const __m512i a = _mm512_loadu_si512(q + (b + 2 * pair) * kBlock);
      const __m512i integers = Scheme::pair(w, b + 2 * pair, a, offsets);
      const __m512 scale = _mm512_permutexvar_ps(Scheme::owners(2 * pair), eight);
      wide_sums[pair & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(integers), scale, wide_sums[pair & 1]);
    }
  }
  const __m512 wide = _mm512_add_ps(wide_sums[0], wide_sums[1]);
  sums[0] = _mm256_add_ps(_mm512_castps512_ps256(wide), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(wide), 1)));
#else
  for (; b + kStep <= blocks; b += kStep) {
    const __m256 eight = eight_scales(weight_scales + b, scales + b);
    for (int k = 0; k < kStep; ++k) {
      const __m256i integers = Scheme::block(w, b + k, load256(q + (b + k) * kBlock), offsets);
      const __m256 scale = _mm256_permutevar8x32_ps(eight, _mm256_set1_epi32(k));
      sums[k & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(integers), scale, sums[k & 1]);
    }
  }
#endif
  for (; b < blocks; ++b) {
    const __m256i integers = Scheme::block(w, b, load256(q + b * kBlock), offsets);
    const __m256 scale = _mm256_set1_ps(_cvtsh_ss(weight_scales[b]) * scales[b]);
    sums[b & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(integers), scale, sums[b & 1]);
  }
  return sum_lanes(_mm256_add_ps(sums[0], sums[1]));
}

template <typename Scheme>
at::Tensor block_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be a 2-D float32 tensor");
  TORCH_CHECK(weight_scales.scalar_type() == at::kHalf && weight_scales.dim() == 2, "scales must be 2-D float16");
  const int64_t rows = x.size(0), in_features = x.size(1), out_features = weight.size(0);
  const int64_t blocks = in_features / kBlock;
  TORCH_CHECK(in_features % kBlock == 0, "the input width must be a multiple of 32");
  TORCH_CHECK(weight.size(1) == Scheme::kBytes * blocks && weight_scales.size(0) == out_features &&
                  weight_scales.size(1) == blocks,
              "weight and scales do not match the input width");
  const at::Tensor input = x.contiguous(), w = weight.contiguous(), w_scales = weight_scales.contiguous();
  const at::Tensor q = at::empty({rows, in_features}, x.options().dtype(at::kChar));
  const at::Tensor scales = at::empty({rows, blocks}, x.options());
  const at::Tensor offsets = at::empty({Scheme::kOffsets ? rows : 0, blocks * kLanes}, x.options().dtype(at::kInt));
  const float* x_data = input.data_ptr<float>();
  int8_t* q_data = q.data_ptr<int8_t>();
  float* scale_data = scales.data_ptr<float>();
  int32_t* offset_data = Scheme::kOffsets ? offsets.data_ptr<int32_t>() : nullptr;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      quantize_row(x_data + m * in_features, blocks, q_data + m * in_features, scale_data + m * blocks,
                   offset_data == nullptr ? nullptr : offset_data + m * blocks * kLanes);
    }
  });
  const at::Tensor out = at::empty({rows, out_features}, x.options());
  const auto* w_data = w.data_ptr<typename Scheme::Weight>();
  const auto* w_scale_data = reinterpret_cast<const uint16_t*>(w_scales.data_ptr<at::Half>());  // F16C converts them
  float* out_data = out.data_ptr<float>();
  // A few weight rows at a time against every row of activations: the weights stay in the nearest cache while
  // each row of activations is read once per few weight rows, not once per weight row.
  constexpr int64_t kWeightRows = 8;
  at::parallel_for(0, out_features, 16, [&](int64_t begin, int64_t end) {
    for (int64_t first = begin; first < end; first += kWeightRows) {
      const int64_t last = std::min(end, first + kWeightRows);
      for (int64_t m = 0; m < rows; ++m) {
        for (int64_t n = first; n < last; ++n) {
          out_data[m * out_features + n] = row_product<Scheme>(
              w_data + n * Scheme::kBytes * blocks, w_scale_data + n * blocks, q_data + m * in_features,
              scale_data + m * blocks, offset_data == nullptr ? nullptr : offset_data + m * blocks * kLanes, blocks);
        }
      }
    }
  });
  return out;
}

at::Tensor q8_0_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  TORCH_CHECK(weight.scalar_type() == at::kChar, "q8_0 weights are int8");
  return block_linear<Q8>(x, weight, scales);
}

at::Tensor q4_0_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  TORCH_CHECK(weight.scalar_type() == at::kByte, "q4_0 weights are uint8, two to a byte");
  return block_linear<Q4>(x, weight, scales);
}

}  // namespace

// TORCH_LIBRARY pastes its first argument into names: the indirection expands VARIANT first.
#define REGISTER_OPERATORS(ns)                                                    \
  TORCH_LIBRARY(ns, library) {                                                    \
    library.def("q8_0_linear(Tensor x, Tensor weight, Tensor scales) -> Tensor"); \
    library.def("q4_0_linear(Tensor x, Tensor weight, Tensor scales) -> Tensor"); \
  }                                                                               \
  TORCH_LIBRARY_IMPL(ns, CPU, library) {                                          \
    library.impl("q8_0_linear", &q8_0_linear);                                    \
    library.impl("q4_0_linear", &q4_0_linear);                                    \
  }
#define EXPAND_AND_REGISTER(ns) REGISTER_OPERATORS(ns)
EXPAND_AND_REGISTER(VARIANT)
