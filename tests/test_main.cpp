// Catch2 v2 main shared by every test executable. MPI test executables initialise the runtime
// themselves (parallel/runtime.h) on first use.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
