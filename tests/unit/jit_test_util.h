// Helpers shared by the JIT's unit tests.
#pragma once

#include <string>

#include "jit/graph.h"

namespace titanax::testing {

/// Nodes of g whose op is named `name`.
inline int count_op(const jit::Graph& g, const std::string& name) {
  int n = 0;
  for (const auto& node : g.nodes) n += name == node.op->name();
  return n;
}

}  // namespace titanax::testing
