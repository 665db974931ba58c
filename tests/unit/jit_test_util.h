// Helpers shared by the JIT's unit tests.
#pragma once

#include <string>
#include <vector>

#include "jit/graph.h"

namespace titanax::testing {

/// Nodes of g whose op is named `name`.
inline int count_op(const jit::Graph& g, const std::string& name) {
  int n = 0;
  for (const auto& node : g.nodes) n += name == node.op->name();
  return n;
}

/// For each value of g, the index of the node that outputs it (-1: an input, a constant or state).
inline std::vector<int> producers(const jit::Graph& g) {
  std::vector<int> producer(g.values.size(), -1);
  for (size_t i = 0; i < g.nodes.size(); ++i)
    for (int v : g.nodes[i].outputs) producer[size_t(v)] = int(i);
  return producer;
}

}  // namespace titanax::testing
