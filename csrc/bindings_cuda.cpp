// covfast._cuda: CUDA kernels. Bindings take plain device pointers (as integers), sizes, strides and a
// cudaStream_t handle (as an integer), never torch types.
#include <pybind11/pybind11.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace py = pybind11;

static int device_count() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

static int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "covfast CUDA kernels";
  m.def("device_count", &device_count, "Number of CUDA devices visible to the CUDA runtime (0 when none).");
  m.def("runtime_version", &runtime_version, "CUDA runtime version the extension was built with.");
}
