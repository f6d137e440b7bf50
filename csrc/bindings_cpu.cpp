// covfast._C: C++/OpenMP CPU kernels. Bindings take plain pointers (as integers), sizes and strides,
// never torch types, so the extension builds without torch and survives torch upgrades.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>

#include "cpu/infection_ratio.h"

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

using Strides = std::array<int64_t, 3>;

static covfast::Volume3d volume(uintptr_t ptr, const Strides& strides) {
  return {reinterpret_cast<const void*>(ptr), strides[0], strides[1], strides[2]};
}

// Returns false when uint8 class input holds a value greater than 2.
static bool infection_ratio(uintptr_t lung_ptr, const Strides& lung_strides, uintptr_t infection_ptr,
                            const Strides& infection_strides, int infection_type, int64_t depth, int64_t height,
                            int64_t width, double threshold, uintptr_t lung_voxels_ptr,
                            uintptr_t infected_voxels_ptr, uintptr_t soft_sum_ptr) {
  if (depth < 0 || height < 0 || width < 0) throw std::invalid_argument("infection_ratio: negative size");
  if (infection_type < 0 || infection_type > 3) throw std::invalid_argument("infection_ratio: unknown infection type");
  covfast::InfectionRatioParams p{volume(lung_ptr, lung_strides),
                                  volume(infection_ptr, infection_strides),
                                  static_cast<covfast::InfectionType>(infection_type),
                                  depth,
                                  height,
                                  width,
                                  threshold,
                                  reinterpret_cast<int64_t*>(lung_voxels_ptr),
                                  reinterpret_cast<int64_t*>(infected_voxels_ptr),
                                  reinterpret_cast<double*>(soft_sum_ptr)};
  if (depth == 0) return true;
  py::gil_scoped_release release;
  return covfast::infection_ratio_cpu(p);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "covfast C++ CPU kernels";
  m.def("openmp_max_threads", &max_threads, "Number of OpenMP threads the kernels use (1 without OpenMP).");
  m.def("infection_ratio", &infection_ratio, py::arg("lung_ptr"), py::arg("lung_strides"), py::arg("infection_ptr"),
        py::arg("infection_strides"), py::arg("infection_type"), py::arg("depth"), py::arg("height"),
        py::arg("width"), py::arg("threshold"), py::arg("lung_voxels_ptr"), py::arg("infected_voxels_ptr"),
        py::arg("soft_sum_ptr"),
        "Per-slice lung/infection counts of [D,H,W] volumes given as data pointers and element strides. "
        "infection_type: 0 uint8 classes, 1 float16, 2 float32, 3 float64. Outputs: int64 [D,2], int64 [D,2,2], "
        "float64 [D,2], written through the given pointers. Returns False if a class value exceeds 2.");
}
