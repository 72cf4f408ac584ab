// MoE token dispatch and combine: the CUDA path of minillm/moe.py (same semantics as its PyTorch
// reference, held to it by tests/test_moe_kernels.py). Loaded by minillm/moe_kernels.py through
// CuPy's RawModule; every kernel has an fp32 and a bf16 entry point (extern "C" below).
//
// Layout: a routing plan has N entries (token, expert, slot, weight). The expert buffer is
// (E, C, d): row r = expert * C + slot. Tensors are contiguous and row-major.
//
// 1. moe_slots: the slot of every entry, given the entries in priority order. One block per
//    expert scans all entries in order with a block-wide prefix sum of "is mine": deterministic,
//    no atomics, O(E * N) reads (a few microseconds at N = 131,072, E = 64). Also writes the
//    inverse map row -> token (-1 for padding) that dispatch reads.
// 2. moe_dispatch: one block per buffer row copies its token's d values (16-byte vectors when
//    aligned) or writes zeros for padding. Backward of combine w.r.t. the expert outputs is the same kernel
//    with a weight per row.
// 3. moe_combine: one block per output token sums its entries' rows times their weights (16-byte
//    vector loads, fp32 accumulation), reading the entries through a CSR index (entries sorted by
//    token, offsets per token): deterministic, no atomics. Backward of dispatch w.r.t. the tokens is the same kernel with weights 1.
// 4. moe_weight_grad: one block per entry, the dot product of its expert output row and its token's
//    output gradient (the gradient of the combine weight).

#include <cuda_bf16.h>

namespace {

constexpr int kThreads = 256;

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

// Copy (or scale) one row of d elements, with 16-byte vectors when the caller says the rows are
// 16-byte aligned (`vec`: d is a multiple of the vector width and the base pointers are aligned).
template <typename T>
__device__ __forceinline__ void copy_row(T* __restrict__ dst, const T* __restrict__ src, int d,
                                         float scale, bool scaled, bool vec) {
  constexpr int kVec = 16 / sizeof(T);
  if (!scaled && vec) {
    const uint4* s = reinterpret_cast<const uint4*>(src);
    uint4* t = reinterpret_cast<uint4*>(dst);
    for (int i = threadIdx.x; i < d / kVec; i += blockDim.x) t[i] = s[i];
  } else {
    for (int i = threadIdx.x; i < d; i += blockDim.x)
      dst[i] = from_float<T>(scaled ? scale * to_float(src[i]) : to_float(src[i]));
  }
}

template <typename T>
__device__ __forceinline__ void zero_row(T* __restrict__ dst, int d) {
  for (int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = from_float<T>(0.f);
}

// y_row = sum_j weight[j] * out[rows[j]], j in [begin, end): fp32 accumulation in entry order.
template <typename T>
__device__ __forceinline__ void combine_row(T* __restrict__ y_row, const T* __restrict__ out,
                                            const long long* __restrict__ rows,
                                            const float* __restrict__ weight, long long begin,
                                            long long end, int d, bool vec) {
  constexpr int kVec = 16 / sizeof(T);
  if (vec) {
    for (int v = threadIdx.x; v < d / kVec; v += blockDim.x) {
      float acc[kVec];
#pragma unroll
      for (int u = 0; u < kVec; ++u) acc[u] = 0.f;
      for (long long j = begin; j < end; ++j) {
        const uint4 raw = reinterpret_cast<const uint4*>(out + rows[j] * d)[v];
        const T* elems = reinterpret_cast<const T*>(&raw);
        const float w = weight[j];
#pragma unroll
        for (int u = 0; u < kVec; ++u) acc[u] += w * to_float(elems[u]);
      }
      uint4 packed;
      T* res = reinterpret_cast<T*>(&packed);
#pragma unroll
      for (int u = 0; u < kVec; ++u) res[u] = from_float<T>(acc[u]);
      reinterpret_cast<uint4*>(y_row)[v] = packed;
    }
  } else {
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
      float acc = 0.f;
      for (long long j = begin; j < end; ++j) acc += weight[j] * to_float(out[rows[j] * d + i]);
      y_row[i] = from_float<T>(acc);
    }
  }
}

}  // namespace

extern "C" {

// order[N]: entry ids in priority order. expert[N]: expert of each entry. token[N]: token of each
// entry. Outputs: slot[N] (-1 when beyond capacity), row_token[E * C] (-1 for padding; must be
// filled with -1 by the caller), count[E] (entries routed to each expert, before capacity).
__global__ void moe_slots(const long long* __restrict__ order, const long long* __restrict__ expert,
                          const long long* __restrict__ token, long long* __restrict__ slot,
                          long long* __restrict__ row_token, long long* __restrict__ count, int n,
                          int capacity) {
  const int e = blockIdx.x;
  __shared__ int warp_sums[kThreads / 32];
  __shared__ int running;
  if (threadIdx.x == 0) running = 0;
  __syncthreads();
  for (int base = 0; base < n; base += blockDim.x) {
    const int i = base + threadIdx.x;
    const long long entry = i < n ? order[i] : -1;
    const int mine = (entry >= 0 && expert[entry] == e) ? 1 : 0;
    // block-wide inclusive scan of `mine`: warp shuffles, then the warp totals
    int x = mine;
    for (int off = 1; off < 32; off <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, x, off);
      if ((threadIdx.x & 31) >= off) x += y;
    }
    if ((threadIdx.x & 31) == 31) warp_sums[threadIdx.x >> 5] = x;
    __syncthreads();
    int before = 0;
    for (int w = 0; w < (threadIdx.x >> 5); ++w) before += warp_sums[w];
    const int rank = running + before + x - 1;  // this entry's position among expert e's entries
    if (mine) {
      const bool kept = rank < capacity;
      slot[entry] = kept ? rank : -1;
      if (kept) row_token[(long long)e * capacity + rank] = token[entry];
    }
    __syncthreads();
    if (threadIdx.x == blockDim.x - 1) running += before + x;
    __syncthreads();
  }
  if (threadIdx.x == 0) count[e] = running;
}

// row_token[E * C]: the token copied into each buffer row (-1: padding, zeros). With `scaled`,
// row r is multiplied by row_scale[r] (the backward of combine); otherwise row_scale is unused.
#define MINILLM_DISPATCH(NAME, T)                                                                \
  __global__ void NAME(const T* __restrict__ x, const long long* __restrict__ row_token,         \
                       const float* __restrict__ row_scale, T* __restrict__ buf, int d,           \
                       int scaled, int vec) {                                                    \
    const long long r = blockIdx.x;                                                              \
    const long long t = row_token[r];                                                            \
    if (t < 0) {                                                                                 \
      zero_row<T>(buf + r * d, d);                                                               \
    } else {                                                                                     \
      copy_row<T>(buf + r * d, x + t * d, d, scaled ? row_scale[r] : 1.f, scaled != 0, vec != 0); \
    }                                                                                            \
  }
MINILLM_DISPATCH(moe_dispatch_f32, float)
MINILLM_DISPATCH(moe_dispatch_bf16, __nv_bfloat16)

// rows[M]: buffer row of each entry, sorted by token; weight[M]; offsets[T + 1] (CSR).
#define MINILLM_COMBINE(NAME, T)                                                                 \
  __global__ void NAME(const T* __restrict__ out, const long long* __restrict__ rows,           \
                       const float* __restrict__ weight, const long long* __restrict__ offsets,  \
                       T* __restrict__ y, int d, int vec) {                                      \
    const long long t = blockIdx.x;                                                              \
    combine_row<T>(y + t * d, out, rows, weight, offsets[t], offsets[t + 1], d, vec != 0);       \
  }
MINILLM_COMBINE(moe_combine_f32, float)
MINILLM_COMBINE(moe_combine_bf16, __nv_bfloat16)

// grad_weight[j] = <out[rows[j]], grad_y[tokens[j]]>
#define MINILLM_WEIGHT_GRAD(NAME, T)                                                             \
  __global__ void NAME(const T* __restrict__ out, const T* __restrict__ grad_y,                 \
                       const long long* __restrict__ rows, const long long* __restrict__ tokens, \
                       float* __restrict__ grad_weight, int d) {                                 \
    __shared__ float partial[kThreads];                                                          \
    const long long j = blockIdx.x;                                                              \
    float acc = 0.f;                                                                             \
    for (int i = threadIdx.x; i < d; i += blockDim.x)                                            \
      acc += to_float(out[rows[j] * d + i]) * to_float(grad_y[tokens[j] * d + i]);               \
    partial[threadIdx.x] = acc;                                                                  \
    __syncthreads();                                                                             \
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {                                               \
      if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];                     \
      __syncthreads();                                                                           \
    }                                                                                            \
    if (threadIdx.x == 0) grad_weight[j] = partial[0];                                           \
  }
MINILLM_WEIGHT_GRAD(moe_weight_grad_f32, float)
MINILLM_WEIGHT_GRAD(moe_weight_grad_bf16, __nv_bfloat16)

}  // extern "C"
