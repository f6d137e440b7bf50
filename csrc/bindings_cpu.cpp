// covfast._C: C++/OpenMP CPU kernels. Bindings take plain pointers (as integers), sizes and strides,
// never torch types, so the extension builds without torch and survives torch upgrades.
#include <pybind11/pybind11.h>

#ifdef COVFAST_OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

static int max_threads() {
#ifdef COVFAST_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "covfast C++ CPU kernels";
  m.def("openmp_max_threads", &max_threads, "Number of OpenMP threads the kernels use (1 without OpenMP).");
}
