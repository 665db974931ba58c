// Titanax error hierarchy.
//
// Every user-facing failure is a titanax::Error subclass carrying:
//   - the call site (std::source_location of the user's call where the API takes one),
//   - what was expected and what was found,
//   - a suggestion for the fix, where one exists.
// what() renders all of it, e.g.
//   MeshError: axis 'dat' is not in the mesh
//     expected: one of [data, model]
//     found:    'dat'
//     at:       train.cpp:42 (main)
//     fix:      did you mean 'data'?
#pragma once

#include <source_location>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace titanax {

using Loc = std::source_location;

/// Base of every error Titanax throws on bad input or a failed external call.
class Error : public std::runtime_error {
 public:
  /// kind: class name shown first ("ShapeError"); message: one line saying what went wrong;
  /// expected / found: the two sides of the check (may be empty); suggestion: the fix (may be empty).
  Error(std::string kind, std::string message, std::string expected = {}, std::string found = {},
        std::string suggestion = {}, Loc loc = Loc::current());

  const std::string& kind() const noexcept { return kind_; }
  const std::string& message() const noexcept { return message_; }
  const std::string& expected() const noexcept { return expected_; }
  const std::string& found() const noexcept { return found_; }
  const std::string& suggestion() const noexcept { return suggestion_; }
  const Loc& location() const noexcept { return loc_; }

 private:
  std::string kind_, message_, expected_, found_, suggestion_;
  Loc loc_;
};

#define TITANAX_DEFINE_ERROR(Name)                                                             \
  class Name : public Error {                                                                  \
   public:                                                                                     \
    explicit Name(std::string message, std::string expected = {}, std::string found = {},      \
                  std::string suggestion = {}, Loc loc = Loc::current())                       \
        : Error(#Name, std::move(message), std::move(expected), std::move(found),              \
                std::move(suggestion), loc) {}                                                 \
  };

TITANAX_DEFINE_ERROR(ShapeError)        // incompatible shapes, bad axes, rank limits
TITANAX_DEFINE_ERROR(DTypeError)        // dtype not supported by an op, or mismatched
TITANAX_DEFINE_ERROR(DeviceError)       // wrong device, missing backend, no kernel for a device
TITANAX_DEFINE_ERROR(ValueError)        // a bad argument value (negative size, p outside [0, 1), ...)
TITANAX_DEFINE_ERROR(AutodiffError)     // gradient of a non-scalar, in-place change of a saved tensor
TITANAX_DEFINE_ERROR(MeshError)         // mesh does not divide the ranks, unknown axis
TITANAX_DEFINE_ERROR(PlanError)         // plan inconsistent with mesh or model
TITANAX_DEFINE_ERROR(CollectiveError)   // collective misuse or a failed MPI / NCCL call
TITANAX_DEFINE_ERROR(CheckpointError)   // unreadable, corrupt or foreign checkpoint
TITANAX_DEFINE_ERROR(ConfigError)       // bad YAML config: unknown key, wrong type, bad value
TITANAX_DEFINE_ERROR(DataError)         // malformed or truncated data file
TITANAX_DEFINE_ERROR(IOError)           // a file could not be opened, read or written
TITANAX_DEFINE_ERROR(OutOfMemoryError)  // an allocator could not satisfy a request
TITANAX_DEFINE_ERROR(FloatingPointError) // anomaly detection found a NaN / inf in an op's output (autodiff/anomaly.h)
TITANAX_DEFINE_ERROR(TraceError)        // a traced function did what a graph cannot replay (host read of a traced value)
TITANAX_DEFINE_ERROR(InternalError)     // a broken invariant inside Titanax: please report

#undef TITANAX_DEFINE_ERROR

/// Levenshtein edit distance between two strings (for "did you mean" suggestions).
size_t edit_distance(std::string_view a, std::string_view b);

/// The candidate nearest to `name` by edit distance, or "" if none is within max(2, |name|/3) edits.
std::string nearest(std::string_view name, const std::vector<std::string>& candidates);

/// "did you mean 'x'?" when a near candidate exists, else "known: a, b, c".
std::string did_you_mean(std::string_view name, const std::vector<std::string>& candidates);

/// Joins items with a separator: join({"a","b"}, ", ") == "a, b".
std::string join(const std::vector<std::string>& items, std::string_view sep = ", ");

}  // namespace titanax
