// Hooks: user callbacks kept in registration order and removed through a HookHandle (PyTorch's
// RemovableHandle). Tensor::register_hook (gradient hooks) and nn::Module::register_forward_hook hold
// theirs in a Hooks<F>.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <utility>
#include <vector>

namespace titanax {

/// Removes one registered hook. remove() is idempotent, and safe after the tensor or module that holds
/// the hook is gone; a default-constructed handle removes nothing. Dropping a handle keeps the hook.
class HookHandle {
 public:
  HookHandle() = default;
  explicit HookHandle(std::function<void()> remove) : remove_(std::move(remove)) {}
  void remove() {
    if (!remove_) return;
    auto r = std::move(remove_);
    remove_ = nullptr;
    r();
  }

 private:
  std::function<void()> remove_;
};

/// A registration number, increasing over the process (so hooks keyed by it run in registration order).
int64_t next_hook_id();

/// The hooks of one tensor or module, in registration order. Copies share them.
template <class F>
class Hooks {
 public:
  /// Adds f after the others; the handle removes it.
  HookHandle add(F f) {
    if (!map_) map_ = std::make_shared<std::map<int64_t, F>>();
    const int64_t id = next_hook_id();
    map_->emplace(id, std::move(f));
    std::weak_ptr<std::map<int64_t, F>> w = map_;
    return HookHandle([w, id] {
      if (auto m = w.lock()) m->erase(id);
    });
  }
  bool empty() const { return !map_ || map_->empty(); }
  /// The hooks in registration order, copied (a hook may remove itself or add others while they run).
  std::vector<F> snapshot() const {
    std::vector<F> out;
    if (map_)
      for (const auto& [id, f] : *map_) out.push_back(f);
    return out;
  }

 private:
  std::shared_ptr<std::map<int64_t, F>> map_;
};

}  // namespace titanax
