// Torch-free instantiation of every device kernel, for `nvcc -c` compile checks on machines
// without a GPU or a CUDA build of torch (tests/test_cuda_compile.py).
#include "oscar/decode.cuh"
#include "oscar/quant.cuh"

namespace oscar {

#define OSCAR_INSTANTIATE(T, D, BITS)                                         \
  template __global__ void quantize_pages_kernel<T, D, BITS>(QuantizeArgs);   \
  template __global__ void decode_split_kernel<T, D, BITS>(DecodeArgs);       \
  template __global__ void dequantize_pages_kernel<D, BITS>(                  \
      const uint8_t*, int64_t, const int32_t*, float*, float*, PageLayout, int, int);

#define OSCAR_INSTANTIATE_D(T, D)                                                             \
  OSCAR_INSTANTIATE(T, D, 2)                                                                  \
  OSCAR_INSTANTIATE(T, D, 4)                                                                  \
  template __global__ void merge_kernel<T, D>(const float*, const float*, const float*, T*,   \
                                              int64_t, int64_t, int, int, int, float*,        \
                                              int64_t, int64_t);                              \
  template __global__ void fwht_rows_kernel<T, D>(const T*, float*, int64_t);

// -DOSCAR_CHECK_D=128 limits the check to one head_dim (the quick CI variant).
#if !defined(OSCAR_CHECK_D) || OSCAR_CHECK_D == 64
OSCAR_INSTANTIATE_D(__nv_bfloat16, 64)
#endif
#if !defined(OSCAR_CHECK_D) || OSCAR_CHECK_D == 128
OSCAR_INSTANTIATE_D(__nv_bfloat16, 128)
#endif
#if !defined(OSCAR_CHECK_D) || OSCAR_CHECK_D == 256
OSCAR_INSTANTIATE_D(__nv_bfloat16, 256)
#endif

}  // namespace oscar
