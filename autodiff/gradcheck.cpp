#include <cmath>
#include <sstream>

#include "autodiff/autodiff.h"
#include "ops/ops.h"

namespace titanax {

GradcheckResult gradcheck(const std::function<Tensor(const TensorList&)>& fn, const TensorList& inputs, double eps,
                          double atol, double rtol) {
  // Fresh leaf copies so the check never touches the caller's tensors.
  TensorList xs;
  for (const auto& t : inputs) {
    if (is_floating(t.dtype()) && t.dtype() != DType::f64)
      throw DTypeError("gradcheck needs float64 inputs", "f64", std::string(dtype_name(t.dtype())),
                       "pass inputs with astype(DType::f64)");
    Tensor c = t.detach().clone().detach();
    if (is_floating(c.dtype())) c.set_requires_grad(true);
    xs.push_back(c);
  }
  Tensor y = fn(xs);
  if (y.dtype() != DType::f64) throw DTypeError("gradcheck: fn must return f64", "f64", std::string(dtype_name(y.dtype())));
  Tensor v = random_normal(RngKey::from_seed(0x9e3779b9), y.shape(), DType::f64);
  TensorList wrt;
  std::vector<size_t> idx;
  for (size_t i = 0; i < xs.size(); ++i)
    if (is_floating(xs[i].dtype())) wrt.push_back(xs[i]), idx.push_back(i);
  BackwardOptions o;
  o.seed = v;
  TensorList analytic = grad(y, wrt, o);

  auto objective = [&](const TensorList& args) {
    NoGradGuard ng;
    Tensor out = fn(args);
    return sum(mul(out, v)).item();
  };

  GradcheckResult res;
  std::ostringstream rep;
  for (size_t w = 0; w < wrt.size(); ++w) {
    TensorList args;
    for (const auto& x : xs) args.push_back(x.detach().clone().detach());
    Tensor& x = args[idx[w]];
    double* px = x.data<double>();
    std::vector<double> a = analytic[w].to_vector<double>();
    bool reported = false;
    for (int64_t k = 0; k < x.numel(); ++k) {
      double orig = px[k];
      px[k] = orig + eps;
      x.storage()->bump_version();
      double fp = objective(args);
      px[k] = orig - eps;
      double fm = objective(args);
      px[k] = orig;
      double num = (fp - fm) / (2 * eps);
      double err = std::fabs(a[size_t(k)] - num);
      res.max_abs_error = std::max(res.max_abs_error, err);
      res.max_rel_error = std::max(res.max_rel_error, err / std::max(std::fabs(num), 1e-3));
      if (err > atol + rtol * std::fabs(num)) {
        res.ok = false;
        if (!reported) {
          rep << "input " << idx[w] << " element " << k << ": analytic " << a[size_t(k)] << " numeric " << num << "\n";
          reported = true;
        }
      }
    }
  }
  res.report = rep.str();
  return res;
}

}  // namespace titanax
