// The q8_0 and q4_0 block products (see llama/block_quant.py for the scheme): activations rounded to int8 in
// blocks of 32 with a float32 scale each, each block's product with the weights summed in 32-bit integers,
// then multiplied by the two blocks' scales and added up in float32.
//
// Compiled once per instruction set, with the flags that name it (llama/block_kernels.py): AVX2 multiplies
// with vpmaddubsw, AVX-512 VNNI with vpdpbusd; the registered operators' namespace is the variant's name, so
// that both can be loaded in one process. Both multiply an unsigned by a signed byte, so each product w * a is
// taken as |w| * (a with the sign of w).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>

#ifndef VARIANT
#error "compile with -DVARIANT=<the operators' namespace>"
#endif

namespace {

constexpr int64_t kBlock = 32;

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

// One row of activations, `blocks` blocks of 32 floats, as int8 blocks and their scales: the scale is the
// block's largest magnitude over 127 (at least FLT_MIN, so that a block of zeros divides to zeros), and each
// value is divided by it and rounded to the nearest integer, ties to even: as llama/block_quant.py writes it.
void quantize_row(const float* x, int64_t blocks, int8_t* q, float* scales) {
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < blocks; ++b) {
    __m256 part[4];
    __m256 largest = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      part[i] = _mm256_loadu_ps(x + b * kBlock + 8 * i);
      largest = _mm256_max_ps(largest, _mm256_andnot_ps(sign_bit, part[i]));
    }
    const float scale = std::max(max_lanes(largest) / 127.0f, FLT_MIN);
    scales[b] = scale;
    const __m256 divisor = _mm256_set1_ps(scale);
    __m256i ints[4];
    for (int i = 0; i < 4; ++i) {
      const __m256 rounded = _mm256_round_ps(_mm256_div_ps(part[i], divisor), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      ints[i] = _mm256_cvtps_epi32(rounded);
    }
    // The packs work within 128-bit lanes: groups of four values come out in the order 0 2 4 6 1 3 5 7.
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(ints[0], ints[1]), _mm256_packs_epi32(ints[2], ints[3]));
    const __m256i ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kBlock), ordered);
  }
}

// The products of 32 signed bytes w and a, summed in groups of four: eight int32 lanes that add up to the
// block's integer product.
inline __m256i block_dot(__m256i w, __m256i a) {
  const __m256i magnitude = _mm256_sign_epi8(w, w);
  const __m256i signed_a = _mm256_sign_epi8(a, w);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), magnitude, signed_a);
#else
  // Pairs in int16 (at most 2 * 127 * 127 = 32258, no saturation), then pairs of pairs in int32.
  return _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, signed_a), _mm256_set1_epi16(1));
#endif
}

// q8_0's 32 weights of block b: int8 as stored.
struct Q8Row {
  const int8_t* weight;
  __m256i block(int64_t b) const {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(weight + b * kBlock));
  }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  __m512i pair(int64_t b) const { return _mm512_loadu_si512(weight + b * kBlock); }
#endif
};

// q4_0's 32 weights of block b: 16 bytes, value j in the low four bits of byte j and value j + 16 in the high
// four bits, each stored as q + 8 for q in [-8, 7].
struct Q4Row {
  const uint8_t* weight;
  __m256i block(int64_t b) const {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(weight + b * kBlock / 2));
    const __m256i nibbles = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(15));
    return _mm256_sub_epi8(nibbles, _mm256_set1_epi8(8));
  }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  // Blocks b and b + 1: the low four bits of both, then the high four bits of both, put back in block order.
  __m512i pair(int64_t b) const {
    const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(weight + b * kBlock / 2));
    const __m512i split = _mm512_inserti64x4(_mm512_castsi256_si512(packed), _mm256_srli_epi16(packed, 4), 1);
    const __m512i nibbles = _mm512_and_si512(split, _mm512_set1_epi8(15));
    return _mm512_sub_epi8(_mm512_shuffle_i64x2(nibbles, nibbles, _MM_SHUFFLE(3, 1, 2, 0)), _mm512_set1_epi8(8));
  }
#endif
};

// The products of eight blocks' weight scales (float16) and activation scales.
inline __m256 eight_scales(const uint16_t* weight_scales, const float* scales) {
  const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(weight_scales));
  return _mm256_mul_ps(_mm256_cvtph_ps(halves), _mm256_loadu_ps(scales));
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// Two blocks at once: the products of 64 signed bytes summed in groups of four, 16 int32 lanes (block 0's
// eight, then block 1's).
inline __m512i pair_dot(__m512i w, __m512i a) {
  const __m512i signed_a = _mm512_mask_sub_epi8(a, _mm512_movepi8_mask(w), _mm512_setzero_si512(), a);
  return _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(w), signed_a);
}

// Eight blocks, two at a time, added to `sums`.
template <typename Row>
inline void eight_blocks(Row row, int64_t b, const int8_t* q, __m256 scales, __m512 sums[2]) {
  const __m512 wide = _mm512_castps256_ps512(scales);
  for (int pair = 0; pair < 4; ++pair) {
    const __m512i a = _mm512_loadu_si512(q + (b + 2 * pair) * kBlock);
    const __m512i integers = pair_dot(row.pair(b + 2 * pair), a);
    const __m512i lanes = _mm512_set_epi32(2 * pair + 1, 2 * pair + 1, 2 * pair + 1, 2 * pair + 1, 2 * pair + 1,
                                           2 * pair + 1, 2 * pair + 1, 2 * pair + 1, 2 * pair, 2 * pair, 2 * pair,
                                           2 * pair, 2 * pair, 2 * pair, 2 * pair, 2 * pair);
    sums[pair & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(integers), _mm512_permutexvar_ps(lanes, wide), sums[pair & 1]);
  }
}
#endif

// One output: the row of weights times one row of quantized activations, block by block (eight at a time, their
// scales converted together), each block's integers scaled by its two scales and added up in float32.
template <typename Row>
float row_product(Row row, const uint16_t* weight_scales, const int8_t* q, const float* scales, int64_t blocks) {
  __m256 sums[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};  // two chains, to overlap their latency
  int64_t b = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  __m512 wide_sums[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  for (; b + 8 <= blocks; b += 8) {
    eight_blocks(row, b, q, eight_scales(weight_scales + b, scales + b), wide_sums);
  }
  const __m512 wide = _mm512_add_ps(wide_sums[0], wide_sums[1]);
  sums[0] = _mm256_add_ps(_mm512_castps512_ps256(wide), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(wide), 1)));
#else
  for (; b + 8 <= blocks; b += 8) {
    const __m256 eight = eight_scales(weight_scales + b, scales + b);
    for (int k = 0; k < 8; ++k) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + (b + k) * kBlock));
      const __m256 scale = _mm256_permutevar8x32_ps(eight, _mm256_set1_epi32(k));
      sums[k & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(row.block(b + k), a)), scale, sums[k & 1]);
    }
  }
#endif
  for (; b < blocks; ++b) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * kBlock));
    const __m256 scale = _mm256_set1_ps(_cvtsh_ss(weight_scales[b]) * scales[b]);
    sums[b & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(row.block(b), a)), scale, sums[b & 1]);
  }
  return sum_lanes(_mm256_add_ps(sums[0], sums[1]));
}

template <typename Row, typename Weight>
at::Tensor block_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, int64_t block_bytes) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be a 2-D float32 tensor");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.dim() == 2, "scales must be a 2-D float16 tensor");
  const int64_t rows = x.size(0), in_features = x.size(1), out_features = weight.size(0);
  const int64_t blocks = in_features / kBlock;
  TORCH_CHECK(in_features % kBlock == 0, "the input width must be a multiple of 32");
  TORCH_CHECK(weight.size(1) == block_bytes * blocks && scales.size(0) == out_features && scales.size(1) == blocks,
              "weight and scales do not match the input width");
  const at::Tensor input = x.contiguous(), w = weight.contiguous(), w_scales = scales.contiguous();
  at::Tensor q = at::empty({rows, in_features}, x.options().dtype(at::kChar));
  at::Tensor q_scales = at::empty({rows, blocks}, x.options());
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      quantize_row(input.data_ptr<float>() + m * in_features, blocks, q.data_ptr<int8_t>() + m * in_features,
                   q_scales.data_ptr<float>() + m * blocks);
    }
  });
  at::Tensor out = at::empty({rows, out_features}, x.options());
  const Weight* w_data = w.data_ptr<Weight>();
  const uint16_t* s_data = reinterpret_cast<const uint16_t*>(w_scales.data_ptr<at::Half>());  // F16C converts them
  float* out_data = out.data_ptr<float>();
  const int8_t* q_data = q.data_ptr<int8_t>();
  const float* q_scale_data = q_scales.data_ptr<float>();
  at::parallel_for(0, out_features, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const Row row{w_data + n * block_bytes * blocks};
      for (int64_t m = 0; m < rows; ++m) {
        out_data[m * out_features + n] = row_product(row, s_data + n * blocks, q_data + m * in_features,
                                                     q_scale_data + m * blocks, blocks);
      }
    }
  });
  return out;
}

at::Tensor q8_0_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  TORCH_CHECK(weight.scalar_type() == at::kChar, "q8_0 weights are int8");
  return block_linear<Q8Row, int8_t>(x, weight, scales, kBlock);
}

at::Tensor q4_0_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  TORCH_CHECK(weight.scalar_type() == at::kByte, "q4_0 weights are uint8, two to a byte");
  return block_linear<Q4Row, uint8_t>(x, weight, scales, kBlock / 2);
}

}  // namespace

// TORCH_LIBRARY pastes its first argument into names: the indirection expands VARIANT first.
#define REGISTER_OPERATORS(ns)                                                       \
  TORCH_LIBRARY(ns, library) {                                                       \
    library.def("q8_0_linear(Tensor x, Tensor weight, Tensor scales) -> Tensor");    \
    library.def("q4_0_linear(Tensor x, Tensor weight, Tensor scales) -> Tensor");    \
  }                                                                                  \
  TORCH_LIBRARY_IMPL(ns, CPU, library) {                                             \
    library.impl("q8_0_linear", &q8_0_linear);                                       \
    library.impl("q4_0_linear", &q4_0_linear);                                       \
  }
#define EXPAND_AND_REGISTER(ns) REGISTER_OPERATORS(ns)
EXPAND_AND_REGISTER(VARIANT)
