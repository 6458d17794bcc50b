#pragma once
// Arrays in and out of the `ballast_eplb` module. In: numpy arrays of any integer or float dtype,
// nested lists / tuples, or torch tensors of any device, dtype (bf16 and f16 included), layout and
// autograd state (planning copies them to the host as float64, exact for every integer < 2^53).
// Out: numpy arrays, or, when an argument was a torch tensor, torch tensors on that tensor's
// device. torch is imported only when a tensor is seen: the module works without it.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

namespace ballast::python {

namespace py = pybind11;

// A dense array of doubles, row-major.
struct Dense {
  std::vector<double> data;
  std::vector<size_t> shape;
  size_t dim(int i) const { return shape[size_t(i)]; }
};

// Where results go: numpy (default), or torch on the device of the first tensor argument read.
struct Origin {
  bool torch = false;
  py::object device;
};

// Reads obj as an array of min_ndim..max_ndim dimensions, none empty; notes a torch tensor in
// origin. Refuses ragged rows, non-numbers, bool / complex / string dtypes with their position.
Dense to_dense(py::handle obj, const std::string& name, int min_ndim, int max_ndim, Origin* origin = nullptr);

// Every entry finite and >= 0 (load counts), else an error naming the first bad position.
void check_counts(const Dense& d, const std::string& name);
std::string where(const std::vector<size_t>& idx);

// int64 and float64 results of the given shape, as origin says.
py::object int64_out(const std::vector<int64_t>& v, const std::vector<py::ssize_t>& shape, const Origin& origin);
py::object int64_out(const std::vector<int32_t>& v, const std::vector<py::ssize_t>& shape, const Origin& origin);
py::object float_out(const std::vector<double>& v, const std::vector<py::ssize_t>& shape, const Origin& origin);

// ballast_eplb.EplbError: both a ValueError and an AssertionError (code written against
// deepseek-ai/EPLB, vLLM or SGLang catches the AssertionError their asserts raise). ballast::Error
// thrown by the library reaches Python as it, its message on one line.
void register_errors(py::module_& m);

}  // namespace ballast::python
