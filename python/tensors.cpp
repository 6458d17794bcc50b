#include "tensors.h"

#include "ballast/core/error.h"

#include <pybind11/numpy.h>

#include <algorithm>
#include <cmath>

namespace ballast::python {

std::string where(const std::vector<size_t>& idx) {
  std::string s;
  for (size_t i : idx) s += "[" + std::to_string(i) + "]";
  return s;
}

namespace {

std::string type_name(py::handle obj) { return std::string(py::str(py::type::of(obj).attr("__name__"))); }

// The first line of a Python exception's message (never its traceback).
std::string first_line(const py::error_already_set& e) {
  std::string s = py::str(e.value());
  if (auto n = s.find('\n'); n != std::string::npos) s.resize(n);
  return s;
}

bool is_torch_tensor(py::handle obj) {
  py::object mod = py::type::of(obj).attr("__module__");
  if (!py::isinstance<py::str>(mod)) return false;
  return std::string(py::str(mod)).rfind("torch", 0) == 0 && py::hasattr(obj, "detach") && py::hasattr(obj, "device");
}

// Nested lists / tuples: walks them, refusing ragged rows and non-numbers with their position.
void walk(py::handle obj, const std::string& name, std::vector<size_t>& idx, Dense& out, size_t depth) {
  bool seq = py::isinstance<py::list>(obj) || py::isinstance<py::tuple>(obj);
  if (depth < out.shape.size()) {
    check(seq, "{}{} is a number where a row of {} entries was expected (ragged array)", name, where(idx),
          out.shape[depth]);
    auto s = py::reinterpret_borrow<py::sequence>(obj);
    check(size_t(py::len(s)) == out.shape[depth], "{} is ragged: {}{} has {} entries, expected {} like the first row",
          name, name, where(idx), py::len(s), out.shape[depth]);
    for (size_t i = 0; i < out.shape[depth]; ++i) {
      idx.push_back(i);
      walk(s[i], name, idx, out, depth + 1);
      idx.pop_back();
    }
    return;
  }
  check(!seq, "{} is ragged: {}{} is a list where a number was expected", name, name, where(idx));
  check(!py::isinstance<py::str>(obj) && !py::isinstance<py::bytes>(obj) && !obj.is_none(),
        "{}{} is not a number ({})", name, where(idx), type_name(obj));
  double x;
  try {
    x = py::cast<double>(obj);
  } catch (const py::cast_error&) {
    fail("{}{} is not a number ({})", name, where(idx), type_name(obj));
  }
  out.data.push_back(x);
}

std::string ndim_text(int lo, int hi) { return lo == hi ? std::to_string(lo) : fmt::format("{} to {}", lo, hi); }

// A torch tensor as a float64 numpy array on the host (detached, contiguous).
py::object tensor_to_numpy(py::handle t, const std::string& name, Origin* origin) {
  py::object torch = py::module_::import("torch");
  py::object d = t.attr("detach")();
  const std::string dtype = py::str(d.attr("dtype"));
  check(!d.attr("dtype").is(torch.attr("bool")) && !py::cast<bool>(d.attr("is_complex")()),
        "{} must hold numbers (integer or float), got tensor dtype {}", name, dtype);
  if (origin && !origin->torch) origin->torch = true, origin->device = d.attr("device");
  try {
    return d.attr("to")(py::arg("device") = "cpu", py::arg("dtype") = torch.attr("float64"))
        .attr("contiguous")()
        .attr("numpy")();
  } catch (const py::error_already_set& e) {
    fail("{} (tensor of dtype {}) cannot be copied to the host: {}", name, dtype, first_line(e));
  }
}

}  // namespace

Dense to_dense(py::handle obj, const std::string& name, int min_ndim, int max_ndim, Origin* origin) {
  Dense d;
  if (py::isinstance<py::list>(obj) || py::isinstance<py::tuple>(obj)) {
    // Shape from the first element at each depth, then a full walk checks every row against it.
    py::handle cur = obj;
    while (py::isinstance<py::list>(cur) || py::isinstance<py::tuple>(cur)) {
      auto s = py::reinterpret_borrow<py::sequence>(cur);
      d.shape.push_back(size_t(py::len(s)));
      if (py::len(s) == 0) break;
      cur = s[0];
    }
    check(int(d.shape.size()) >= min_ndim && int(d.shape.size()) <= max_ndim, "{} must have {} dimensions, got {}",
          name, ndim_text(min_ndim, max_ndim), d.shape.size());
    size_t n = 1;
    for (size_t s : d.shape) n *= s;
    d.data.reserve(n);
    std::vector<size_t> idx;
    walk(obj, name, idx, d, 0);
  } else {
    py::object src = is_torch_tensor(obj) ? tensor_to_numpy(obj, name, origin) : py::reinterpret_borrow<py::object>(obj);
    py::array a;
    try {
      a = py::module_::import("numpy").attr("asarray")(src);
    } catch (const py::error_already_set& e) {
      fail("{} cannot be read as an array ({}): {}", name, type_name(obj), first_line(e));
    }
    char kind = a.dtype().kind();
    check(kind == 'i' || kind == 'u' || kind == 'f', "{} must hold numbers (integer or float), got numpy dtype {}",
          name, std::string(py::str(a.dtype())));
    check(a.ndim() >= min_ndim && a.ndim() <= max_ndim, "{} must have {} dimensions, got {}", name,
          ndim_text(min_ndim, max_ndim), a.ndim());
    auto c = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(a);
    check(bool(c), "{} cannot be converted to float64", name);
    for (int i = 0; i < c.ndim(); ++i) d.shape.push_back(size_t(c.shape(i)));
    d.data.assign(c.data(), c.data() + c.size());
  }
  for (size_t i = 0; i < d.shape.size(); ++i)
    check(d.shape[i] > 0, "{} has an empty dimension (shape [{}])", name, fmt::join(d.shape, ", "));
  return d;
}

void check_counts(const Dense& d, const std::string& name) {
  for (size_t i = 0; i < d.data.size(); ++i) {
    double x = d.data[i];
    if (std::isfinite(x) && x >= 0) continue;
    std::vector<size_t> idx(d.shape.size());
    size_t r = i;
    for (size_t k = d.shape.size(); k-- > 0;) idx[k] = r % d.shape[k], r /= d.shape[k];
    fail("{}{} is {}: loads must be finite and >= 0", name, where(idx), x);
  }
}

namespace {

py::object to_origin(py::array a, const Origin& origin) {
  if (!origin.torch) return std::move(a);
  py::object t = py::module_::import("torch").attr("from_numpy")(a);
  return t.attr("to")(origin.device);
}

}  // namespace

py::object int64_out(const std::vector<int64_t>& v, const std::vector<py::ssize_t>& shape, const Origin& origin) {
  py::array_t<int64_t> a(shape);
  std::copy(v.begin(), v.end(), a.mutable_data());
  return to_origin(a, origin);
}

py::object int64_out(const std::vector<int32_t>& v, const std::vector<py::ssize_t>& shape, const Origin& origin) {
  return int64_out(std::vector<int64_t>(v.begin(), v.end()), shape, origin);
}

py::object float_out(const std::vector<double>& v, const std::vector<py::ssize_t>& shape, const Origin& origin) {
  py::array_t<double> a(shape);
  std::copy(v.begin(), v.end(), a.mutable_data());
  return to_origin(a, origin);
}

void register_errors(py::module_& m) {
  py::dict ns;
  ns["__module__"] = "ballast_eplb";
  ns["__doc__"] = "Bad input to ballast_eplb: a ValueError, and an AssertionError like the asserts of "
                  "deepseek-ai/EPLB, vLLM and SGLang.";
  py::object cls = py::module_::import("builtins")
                       .attr("type")("EplbError",
                                     py::make_tuple(py::handle(PyExc_ValueError), py::handle(PyExc_AssertionError)), ns);
  m.attr("EplbError") = cls;
  // The class lives as long as the module; the translator (a plain function) finds it there.
  static PyObject* error_class = cls.release().ptr();
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ballast::Error& e) {
      std::string msg = e.what();
      std::replace(msg.begin(), msg.end(), '\n', ' ');
      PyErr_SetString(error_class, msg.c_str());
    }
  });
}

}  // namespace ballast::python
