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

// Eight blocks' weight scales (float16), converted to float32.
inline __m256 eight_weight_scales(const uint16_t* weight_scales) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(weight_scales)));
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

// Each scheme's weights are prepared once per block (or pair of blocks) and multiplied with several rows of
// activations: `prepare` loads them, `product` multiplies one row's bytes by them.
struct Q8 {
  using Weight = int8_t;
  static constexpr int64_t kBytes = kBlock;  // per block
  static constexpr bool kOffsets = false;
  struct Block { __m256i magnitudes, signs; };
  static Block prepare(const Weight* w, int64_t b) {
    const __m256i weights = load256(w + b * kBlock);
    return {_mm256_sign_epi8(weights, weights), weights};
  }
  static __m256i product(const Block& weights, __m256i a, const int32_t*, int64_t) {
    return sum_products(weights.magnitudes, _mm256_sign_epi8(a, weights.signs), _mm256_setzero_si256());
  }
#if WIDE
  struct Pair { __m512i magnitudes; __mmask64 negative; };
  static Pair prepare_pair(const Weight* w, int64_t b) {
    const __m512i weights = _mm512_loadu_si512(w + b * kBlock);
    return {_mm512_abs_epi8(weights), _mm512_movepi8_mask(weights)};
  }
  static __m512i pair_product(const Pair& weights, __m512i a, const int32_t*, int64_t) {
    const __m512i signed_a = _mm512_mask_sub_epi8(a, weights.negative, _mm512_setzero_si512(), a);
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), weights.magnitudes, signed_a);
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
  using Block = __m256i;  // the 32 values, unpacked
  static Block prepare(const Weight* w, int64_t b) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b * kBytes));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(15));
  }
  static __m256i product(const Block& nibbles, __m256i a, const int32_t* offsets, int64_t b) {
    return sum_products(nibbles, a, load256(offsets + b * kLanes));
  }
#if WIDE
  using Pair = __m512i;
  static Pair prepare_pair(const Weight* w, int64_t b) {
    const __m256i packed = load256(w + b * kBytes);
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(packed), _mm256_srli_epi16(packed, 4), 1);
    return _mm512_and_si512(both, _mm512_set1_epi8(15));
  }
  static __m512i pair_product(const Pair& nibbles, __m512i a, const int32_t* offsets, int64_t b) {
    return _mm512_dpbusd_epi32(_mm512_loadu_si512(offsets + b * kLanes), nibbles, a);
  }
  // The pair's sums in the activations' pair layout: four of the first block, four of the second, and again.
  static __m512i owners(int first) {
    return _mm512_set_epi32(first + 1, first + 1, first + 1, first + 1, first, first, first, first,
                            first + 1, first + 1, first + 1, first + 1, first, first, first, first);
  }
#endif
};

// Rows rows of activations against one row of weights: `Rows` outputs. Eight blocks at a time (their scales
// converted together), each block's integer sums scaled by its two scales and added up in float32. The weights are
// loaded and prepared once for all the rows: a prompt, or a batch of rows decoding together, reuses them from
// registers, and the rows' independent sums keep the CPU's units busy.
template <typename Scheme, int Rows>
void row_products(const typename Scheme::Weight* w, const uint16_t* weight_scales, const int8_t* const* q,
                  const float* const* scales, const int32_t* const* offsets, int64_t blocks, float* const* out) {
  __m256 sums[Rows][2];  // two chains per row, to overlap their latency
  for (int r = 0; r < Rows; ++r) sums[r][0] = sums[r][1] = _mm256_setzero_ps();
  int64_t b = 0;
#if WIDE
  __m512 wide_sums[Rows][2];
  for (int r = 0; r < Rows; ++r) wide_sums[r][0] = wide_sums[r][1] = _mm512_setzero_ps();
  for (; b + kStep <= blocks; b += kStep) {
    const __m256 halves = eight_weight_scales(weight_scales + b);
    __m512 eight[Rows];
    for (int r = 0; r < Rows; ++r) eight[r] = _mm512_castps256_ps512(_mm256_mul_ps(halves, _mm256_loadu_ps(scales[r] + b)));
    for (int pair = 0; pair < 4; ++pair) {
      const auto weights = Scheme::prepare_pair(w, b + 2 * pair);
      const __m512i owners = Scheme::owners(2 * pair);
      for (int r = 0; r < Rows; ++r) {
        const __m512i a = _mm512_loadu_si512(q[r] + (b + 2 * pair) * kBlock);
        const __m512i integers = Scheme::pair_product(weights, a, offsets[r], b + 2 * pair);
        const __m512 scale = _mm512_permutexvar_ps(owners, eight[r]);
        wide_sums[r][pair & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(integers), scale, wide_sums[r][pair & 1]);
      }
    }
  }
  for (int r = 0; r < Rows; ++r) {
    const __m512 wide = _mm512_add_ps(wide_sums[r][0], wide_sums[r][1]);
    sums[r][0] = _mm256_add_ps(_mm512_castps512_ps256(wide),
                               _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(wide), 1)));
  }
#else
  for (; b + kStep <= blocks; b += kStep) {
    const __m256 halves = eight_weight_scales(weight_scales + b);
    __m256 eight[Rows];
    for (int r = 0; r < Rows; ++r) eight[r] = _mm256_mul_ps(halves, _mm256_loadu_ps(scales[r] + b));
    for (int k = 0; k < kStep; ++k) {
      const auto weights = Scheme::prepare(w, b + k);
      for (int r = 0; r < Rows; ++r) {
        const __m256i integers = Scheme::product(weights, load256(q[r] + (b + k) * kBlock), offsets[r], b + k);
        const __m256 scale = _mm256_permutevar8x32_ps(eight[r], _mm256_set1_epi32(k));
        sums[r][k & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(integers), scale, sums[r][k & 1]);
      }
    }
  }
#endif
  for (; b < blocks; ++b) {
    const auto weights = Scheme::prepare(w, b);
    for (int r = 0; r < Rows; ++r) {
      const __m256i integers = Scheme::product(weights, load256(q[r] + b * kBlock), offsets[r], b);
      const __m256 scale = _mm256_set1_ps(_cvtsh_ss(weight_scales[b]) * scales[r][b]);
      sums[r][b & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(integers), scale, sums[r][b & 1]);
    }
  }
  for (int r = 0; r < Rows; ++r) *out[r] = sum_lanes(_mm256_add_ps(sums[r][0], sums[r][1]));
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
  // A few weight rows at a time against every row of activations, four rows at a time: the weights stay in the
  // nearest cache while each row of activations is read once per few weight rows, not once per weight row.
  constexpr int64_t kWeightRows = 8;
  constexpr int kRows = 4;
  at::parallel_for(0, out_features, 16, [&](int64_t begin, int64_t end) {
    for (int64_t first = begin; first < end; first += kWeightRows) {
      const int64_t last = std::min(end, first + kWeightRows);
      for (int64_t m = 0; m < rows; m += kRows) {
        const int count = static_cast<int>(std::min<int64_t>(kRows, rows - m));
        const int8_t* q_rows[kRows];
        const float* scale_rows[kRows];
        const int32_t* offset_rows[kRows];
        for (int r = 0; r < count; ++r) {
          q_rows[r] = q_data + (m + r) * in_features;
          scale_rows[r] = scale_data + (m + r) * blocks;
          offset_rows[r] = offset_data == nullptr ? nullptr : offset_data + (m + r) * blocks * kLanes;
        }
        for (int64_t n = first; n < last; ++n) {
          const auto* weights = w_data + n * Scheme::kBytes * blocks;
          const uint16_t* weight_scales = w_scale_data + n * blocks;
          float* outputs[kRows];
          for (int r = 0; r < count; ++r) outputs[r] = out_data + (m + r) * out_features + n;
          if (count == kRows) {
            row_products<Scheme, kRows>(weights, weight_scales, q_rows, scale_rows, offset_rows, blocks, outputs);
          } else {
            for (int r = 0; r < count; ++r) {
              row_products<Scheme, 1>(weights, weight_scales, q_rows + r, scale_rows + r, offset_rows + r, blocks,
                                      outputs + r);
            }
          }
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
