// Small helpers shared by the Catch2 test files.
#pragma once

#include <catch2/catch.hpp>

#include <stdexcept>

namespace titanax::testing {

/// Runs f and returns the exception of type E it throws (to inspect its message and fields); the test
/// fails when f throws nothing.
template <class E, class F>
E catch_error(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e;
  }
  FAIL("expected an exception");
  throw std::logic_error("unreachable");
}

}  // namespace titanax::testing
