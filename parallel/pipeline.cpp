#include "parallel/pipeline.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>

#include "autodiff/autodiff.h"
#include "ops/ops.h"

namespace titanax {
namespace {

using Kind = PipelineAction::Kind;
using Clock = std::chrono::steady_clock;

double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

void check_shape(int stages, int microbatches) {
  if (stages < 1) throw PlanError("a pipeline needs at least one stage", "stages >= 1", std::to_string(stages));
  if (microbatches < 1)
    throw PlanError("a pipeline needs at least one microbatch", "microbatches >= 1", std::to_string(microbatches));
}

}  // namespace

std::string PipelineAction::str() const { return (kind == Kind::forward ? "F" : "B") + std::to_string(microbatch); }

std::vector<PipelineAction> pipeline_actions(PipelineSchedule schedule, int S, int s, int M) {
  check_shape(S, M);
  if (s < 0 || s >= S)
    throw PlanError("pipeline stage out of range", "0 <= stage < " + std::to_string(S), std::to_string(s));
  std::vector<PipelineAction> a;
  auto F = [&](int i) { a.push_back({Kind::forward, i}); };
  auto B = [&](int i) { a.push_back({Kind::backward, i}); };
  if (schedule == PipelineSchedule::gpipe) {
    for (int i = 0; i < M; ++i) F(i);
    for (int i = 0; i < M; ++i) B(i);
    return a;
  }
  const int warmup = std::min(S - s - 1, M);
  for (int i = 0; i < warmup; ++i) F(i);
  for (int i = 0; i < M - warmup; ++i) {
    F(warmup + i);
    B(i);
  }
  for (int i = M - warmup; i < M; ++i) B(i);
  return a;
}

int peak_in_flight(const std::vector<PipelineAction>& actions) {
  int now = 0, peak = 0;
  for (const auto& a : actions) {
    now += a.kind == Kind::forward ? 1 : -1;
    peak = std::max(peak, now);
  }
  return peak;
}

PipelineTimeline pipeline_timeline(PipelineSchedule schedule, int S, int M) {
  check_shape(S, M);
  std::vector<std::vector<PipelineAction>> acts;
  for (int s = 0; s < S; ++s) acts.push_back(pipeline_actions(schedule, S, s, M));
  // done[kind][s][i]: the tick an action finished (ran), or -1.
  std::vector<std::vector<std::vector<int>>> done(2, std::vector<std::vector<int>>(size_t(S), std::vector<int>(size_t(M), -1)));
  auto finished_before = [&](Kind k, int s, int i, int t) {
    const int d = done[size_t(k)][size_t(s)][size_t(i)];
    return d >= 0 && d < t;
  };
  PipelineTimeline tl{S, M, std::vector<std::vector<std::optional<PipelineAction>>>(size_t(S))};
  std::vector<size_t> next(size_t(S), 0);
  size_t left = size_t(2 * S * M);
  for (int t = 0; left > 0; ++t) {
    if (t > 4 * S * M + 4) throw InternalError("pipeline_timeline: the schedule deadlocks", "progress", "none");
    for (int s = 0; s < S; ++s) {
      std::optional<PipelineAction> run;
      if (next[size_t(s)] < acts[size_t(s)].size()) {
        const PipelineAction& a = acts[size_t(s)][next[size_t(s)]];
        const int i = a.microbatch;
        const bool ready = a.kind == Kind::forward
                               ? (s == 0 || finished_before(Kind::forward, s - 1, i, t))
                               : (s == S - 1 ? finished_before(Kind::forward, s, i, t) : finished_before(Kind::backward, s + 1, i, t));
        if (ready) run = a;
      }
      tl.grid[size_t(s)].push_back(run);
    }
    for (int s = 0; s < S; ++s)
      if (const auto& r = tl.grid[size_t(s)].back()) {
        done[size_t(r->kind)][size_t(s)][size_t(r->microbatch)] = t;
        ++next[size_t(s)];
        --left;
      }
  }
  return tl;
}

double PipelineTimeline::bubble_fraction() const {
  int64_t idle = 0, all = 0;
  for (const auto& row : grid)
    for (const auto& c : row) {
      ++all;
      idle += c ? 0 : 1;
    }
  return all ? double(idle) / double(all) : 0.0;
}

std::string PipelineTimeline::str() const {
  const int w = 1 + int(std::to_string(std::max(0, microbatches - 1)).size());
  auto cell = [&](const std::string& c) { return c + std::string(size_t(std::max(0, w - int(c.size())) + 1), ' '); };
  std::string s = "tick     ";
  for (int t = 0; t < ticks(); ++t) s += cell(std::to_string(t));
  while (!s.empty() && s.back() == ' ') s.pop_back();
  for (int st = 0; st < stages; ++st) {
    std::string row = "stage " + std::to_string(st);
    row += std::string(size_t(std::max(1, 9 - int(row.size()))), ' ');
    for (const auto& c : grid[size_t(st)]) row += cell(c ? c->str() : ".");
    while (!row.empty() && row.back() == ' ') row.pop_back();
    s += "\n" + row;
  }
  return s;
}

double ideal_bubble_fraction(int S, int M) { return double(S - 1) / double(M + S - 1); }

PipelineResult run_pipeline(Communicator& pipe, const PP& pp, const TensorList& params, const PipelineStageFns& fns) {
  const int S = pipe.size(), s = pipe.rank(), M = pp.microbatches;
  const bool first = s == 0, last = s == S - 1;
  const std::vector<PipelineAction> actions = pipeline_actions(pp.schedule, S, s, M);
  const auto t_step = Clock::now();

  // Parameters require grad for the step; their flags are restored on every exit path.
  struct Flags {
    TensorList ps;
    std::vector<bool> had;
    explicit Flags(const TensorList& p) : ps(p) {
      for (auto& t : ps) {
        had.push_back(t.requires_grad());
        t.set_requires_grad(true);
      }
    }
    ~Flags() {
      for (size_t k = 0; k < ps.size(); ++k) ps[k].set_requires_grad(had[k]);
    }
  } flags(params);
  GradModeGuard grad_on(true);

  struct Slot {
    Tensor input, output;  // what forward i received (a leaf) and returned (holds the recorded graph)
  };
  std::vector<Slot> slots(static_cast<size_t>(M));
  struct Pending {
    Tensor buf;
    std::unique_ptr<CollectiveRequest> req;
  };
  std::map<size_t, Pending> posted;  // receives in flight, by action index
  std::vector<std::unique_ptr<CollectiveRequest>> sends;
  PipelineResult res;
  res.grads.resize(params.size());

  // Posts the receive action k needs, if it needs one and its size is known (a backward's gradient has
  // the shape of this stage's forward output, so it is posted once that forward has run).
  auto post = [&](size_t k) {
    if (k >= actions.size() || posted.count(k)) return;
    const PipelineAction& a = actions[k];
    const int i = a.microbatch;
    Pending p;
    if (a.kind == Kind::forward) {
      if (first) return;
      const TensorSpec sp = fns.input_spec(i);
      p.buf = empty(sp.shape, sp.dtype, sp.device);
      p.req = pipe.irecv(p.buf, s - 1, 2 * i);
    } else {
      const Tensor& o = slots[size_t(i)].output;
      if (last || !o.defined()) return;
      p.buf = empty(o.shape(), o.dtype(), o.device());
      p.req = pipe.irecv(p.buf, s + 1, 2 * i + 1);
    }
    posted.emplace(k, std::move(p));
  };
  auto take = [&](size_t k) {
    post(k);
    auto it = posted.find(k);
    const auto t0 = Clock::now();
    it->second.req->wait();
    res.stats.wait_seconds += since(t0);
    Tensor b = it->second.buf;
    posted.erase(it);
    return b;
  };
  // Completed sends release their buffers as the schedule goes (an activation's is its forward output,
  // held anyway until its backward; a gradient's is freed here).
  auto reap = [&] {
    std::erase_if(sends, [](const std::unique_ptr<CollectiveRequest>& r) {
      if (!r->test()) return false;
      r->wait();
      return true;
    });
  };

  double loss_sum = 0;
  int in_flight = 0;
  size_t last_backward = 0;
  for (size_t k = 0; k < actions.size(); ++k)
    if (actions[k].kind == Kind::backward) last_backward = k;
  for (size_t k = 0; k < actions.size(); ++k) {
    const PipelineAction& a = actions[k];
    const int i = a.microbatch;
    Slot& slot = slots[size_t(i)];
    if (a.kind == Kind::forward) {
      Tensor x = first ? Tensor() : take(k);
      if (x.defined()) x.set_requires_grad(true);
      post(k + 1);
      const auto t0 = Clock::now();
      auto fwd = [&fns, i](const Tensor& in) { return fns.forward(i, in); };
      Tensor y = pp.recompute == Recompute::full ? checkpoint(fwd, x, params) : fwd(x);
      if (last) {
        if (y.numel() != 1)
          throw AutodiffError("the last pipeline stage must return the microbatch's scalar loss", "a tensor of one element",
                              y.shape().str(), "reduce the loss to its mean in the last stage's forward");
        loss_sum += y.item();
      }
      res.stats.compute_seconds += since(t0);
      if (!last) sends.push_back(pipe.isend(y, s + 1, 2 * i));
      slot = {x, y};
      res.stats.peak_in_flight = std::max(res.stats.peak_in_flight, ++in_flight);
    } else {
      Tensor dy = last ? full(slot.output.shape(), 1.0 / M, slot.output.dtype(), slot.output.device()) : take(k);
      post(k + 1);
      const auto t0 = Clock::now();
      TensorList wrt = params;
      if (!first) wrt.push_back(slot.input);
      BackwardOptions bo;
      bo.seed = dy;
      const bool final_backward = fns.on_grad_ready && k == last_backward;
      if (final_backward)  // each sum is final when its last term is: hand it over at once
        bo.on_grad_ready = [&](size_t p, const Tensor& gp) {
          if (p >= params.size()) return;  // the input's gradient, sent to the previous stage below
          NoGradGuard ng;
          res.grads[p] = res.grads[p].defined() ? add(res.grads[p], gp) : gp;
          fns.on_grad_ready(p, res.grads[p]);
        };
      TensorList g = grad(slot.output, wrt, bo);
      if (!final_backward) {
        NoGradGuard ng;
        for (size_t p = 0; p < params.size(); ++p) res.grads[p] = res.grads[p].defined() ? add(res.grads[p], g[p]) : g[p];
      }
      res.stats.compute_seconds += since(t0);
      if (!first) sends.push_back(pipe.isend(g.back(), s - 1, 2 * i + 1));
      slot = {};
      --in_flight;
    }
    reap();
  }
  for (auto& r : sends) r->wait();
  sends.clear();
  res.stats.step_seconds = since(t_step);

  Tensor l = scalar(last ? loss_sum / M : 0.0, DType::f64);
  pipe.broadcast(l, S - 1);
  res.loss = l.item();
  return res;
}

}  // namespace titanax
