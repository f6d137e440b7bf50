// Compiled with nvcc so the CUDA toolchain is exercised even before the op kernels exist.
#include <cuda_runtime.h>
