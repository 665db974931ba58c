// Typed YAML configuration checked against a schema.
//
// The schema lists every key as a dotted path ("optimizer.lr"), with its type, its default (or that it
// is required, or optional without a default), a one-line description and, for strings and string
// lists, the allowed values. A YAML file nests the keys as maps:
//
//   optimizer:
//     lr: ${LR:0.001}        # environment variable LR, else 0.001
//     betas: [0.9, 0.95]
//   mesh: {data: 2, model: -1}
//
// (a dotted key "optimizer.lr: 0.001" at any level is accepted too). Loading validates everything and
// throws ConfigError naming the key, the file, line and column, what was expected and what was found,
// with a suggestion: an unknown key ("did you mean 'optimizer.lr'?", nearest known key by edit
// distance over the full dotted keys), a value of the wrong type, a string outside its allowed set, a
// number outside its key's range (ints, floats, and each element of their lists; NaN is outside every
// range), a required key that is missing, a duplicate key.
//
// Substitution: inside every scalar (before typing), "${NAME}" becomes the environment variable NAME
// (unset -> ConfigError naming it) and "${NAME:default}" becomes NAME or, when unset, `default`;
// "$${" writes a literal "${". Inside flow collections ([...], {...}) quote such scalars
// ("[\"${A:1}\", 2]"): YAML reads { and } there as structure.
//
// Overrides ("a.b=value", the CLI's --set) are applied after the file, in order. The value is read as a
// YAML scalar or flow collection ("0.1", "[1, 2]", "{data: 2}") and validated like a file value; an
// entry of a map key can be set alone ("mesh.data=4"). For string keys the text is taken as is.
//
// Types and the YAML they accept:
//   int         an integer ("42", "-3")                float       a number ("1e-3", "2", ".inf", ".nan")
//   bool        true/false, yes/no, on/off (any case)  string      any scalar
//   int_list    a sequence of ints ("[1, 2]")          float_list  a sequence of numbers
//   string_int_map  a map of free-form keys to ints ("{data: 2, model: -1}")
//   string_list a sequence of scalars ("[attn/qkv, mlp/fc]"), each within the allowed values if given
// A null value ("key:" or "key: ~") unsets an optional key (one without default) and is an error for
// the others.
#pragma once

#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace titanax {

enum class ConfigType { int_, float_, bool_, string, int_list, float_list, string_int_map, string_list };

/// "int", "float", "bool", "string", "int_list", "float_list", "string_int_map", "string_list".
std::string_view config_type_name(ConfigType t);

/// A typed value; the alternative matches the ConfigType in declaration order.
using ConfigValue = std::variant<int64_t, double, bool, std::string, std::vector<int64_t>, std::vector<double>,
                                 std::map<std::string, int64_t>, std::vector<std::string>>;

/// The interval a numeric key's value must lie in: an int or float key, or each element of an int /
/// float list. Bounds are closed unless marked open; NaN lies in no range, and infinity only in a range
/// whose bound is a closed infinity (the default-constructed range: any number).
struct ConfigRange {
  double min = -std::numeric_limits<double>::infinity();
  double max = std::numeric_limits<double>::infinity();
  bool min_open = false;  ///< min itself is excluded
  bool max_open = false;  ///< max itself is excluded

  /// [m, inf), finite: ConfigRange::at_least(1) for counts, at_least(0) for "0 = off" keys.
  static ConfigRange at_least(double m) { return {m, std::numeric_limits<double>::infinity(), false, true}; }
  /// (m, inf), finite: ConfigRange::above(0) for scales and rates.
  static ConfigRange above(double m) { return {m, std::numeric_limits<double>::infinity(), true, true}; }
  /// [lo, hi], or [lo, hi) with hi_open (probabilities, betas).
  static ConfigRange between(double lo, double hi, bool hi_open = false) { return {lo, hi, false, hi_open}; }

  /// True when v lies in the range (false for NaN).
  bool contains(double v) const;
  /// The range as a reader writes it: ">= 1", "> 0", "in [0, 1)", "in [1, 1024]".
  std::string text() const;
};

struct ConfigEntry {
  std::string key;                           ///< dotted path, segments of [A-Za-z0-9_-]
  ConfigType type = ConfigType::string;
  std::optional<ConfigValue> default_value;  ///< used when the key is not set
  bool required = false;                     ///< the config must set it (no default then)
  std::string doc;                           ///< one line, for describe()
  std::vector<std::string> allowed;          ///< string and string_list keys only: the values accepted (empty = any)
  std::optional<ConfigRange> range;          ///< int, float, int_list, float_list keys only: the bounds
};

class ConfigSchema {
 public:
  /// Adds an entry. Throws ValueError: malformed or duplicate key, a key that is also a section of
  /// another key ("a" and "a.b"), a default of the wrong type, both a default and required, `allowed`
  /// on a key that is not a string or string list, a default (or an element of one) outside `allowed`, `range` on a key that is not int, float or a
  /// list of them, a range with min > max, a default outside `range`.
  ConfigSchema& add(ConfigEntry entry);
  /// Typed shorthands. A std::nullopt default makes the key optional (has() is false until set).
  ConfigSchema& add_int(std::string key, std::optional<int64_t> default_value, std::string doc,
                        std::optional<ConfigRange> range = std::nullopt);
  ConfigSchema& add_float(std::string key, std::optional<double> default_value, std::string doc,
                          std::optional<ConfigRange> range = std::nullopt);
  ConfigSchema& add_bool(std::string key, std::optional<bool> default_value, std::string doc);
  ConfigSchema& add_string(std::string key, std::optional<std::string> default_value, std::string doc,
                           std::vector<std::string> allowed = {});
  ConfigSchema& add_int_list(std::string key, std::optional<std::vector<int64_t>> default_value, std::string doc,
                             std::optional<ConfigRange> range = std::nullopt);
  ConfigSchema& add_float_list(std::string key, std::optional<std::vector<double>> default_value, std::string doc,
                               std::optional<ConfigRange> range = std::nullopt);
  ConfigSchema& add_map(std::string key, std::optional<std::map<std::string, int64_t>> default_value,
                        std::string doc);
  ConfigSchema& add_string_list(std::string key, std::optional<std::vector<std::string>> default_value, std::string doc,
                                std::vector<std::string> allowed = {});
  /// A key the config must set.
  ConfigSchema& add_required(std::string key, ConfigType type, std::string doc, std::vector<std::string> allowed = {});

  const std::vector<ConfigEntry>& entries() const { return entries_; }
  /// The entry of `key`, or nullptr.
  const ConfigEntry* find(std::string_view key) const;
  /// All keys in declaration order.
  std::vector<std::string> keys() const;
  /// True when `prefix` is a section, i.e. some key starts with prefix + ".".
  bool is_section(std::string_view prefix) const;
  /// The schema as documentation: one line per key with type, default ("required" / "unset") and doc,
  /// then the allowed values or the range, e.g. "optimizer.lr   float   0.001   peak learning rate [>= 0]".
  std::string describe() const;

 private:
  std::vector<ConfigEntry> entries_;
};

/// A loaded, validated configuration: every schema key has a value except unset optional ones.
class Config {
 public:
  /// An empty config over an empty schema.
  Config() = default;

  /// Reads the YAML file `path`, applies `overrides` ("key=value"), validates against `schema`.
  /// Throws IOError when the file cannot be read, ConfigError for a YAML syntax error (file, line,
  /// column) and every check listed at the top of this header.
  static Config load(const std::string& path, const std::vector<std::string>& overrides, const ConfigSchema& schema);
  /// Same from YAML text; `source_name` stands for the file name in messages.
  static Config from_string(const std::string& yaml_text, const std::vector<std::string>& overrides,
                            const ConfigSchema& schema, const std::string& source_name = "<string>");

  /// True when the key has a value (set, or defaulted). ConfigError for a key not in the schema.
  bool has(const std::string& key) const;
  /// Typed getters: ConfigError when the key is not in the schema (with a suggestion), is of another
  /// type (naming it), or is an optional key that is not set.
  int64_t get_int(const std::string& key) const;
  double get_float(const std::string& key) const;
  bool get_bool(const std::string& key) const;
  const std::string& get_string(const std::string& key) const;
  const std::vector<int64_t>& get_int_list(const std::string& key) const;
  const std::vector<double>& get_float_list(const std::string& key) const;
  const std::map<std::string, int64_t>& get_map(const std::string& key) const;
  const std::vector<std::string>& get_string_list(const std::string& key) const;
  /// The value of any type (same errors as the getters).
  const ConfigValue& get(const std::string& key) const;
  /// Where a value came from: "default", "<file>:<line>:<column>" or "--set <override>".
  std::string source(const std::string& key) const;

  /// The resolved config as YAML (nested maps in schema order, unset optional keys left out, floats
  /// in shortest round-trip form). Loading the dump with the same schema gives the same values.
  std::string dump() const;
  const ConfigSchema& schema() const { return schema_; }

 private:
  const ConfigValue& value_of(const std::string& key, ConfigType want) const;
  friend struct ConfigBuilder;
  ConfigSchema schema_;
  std::map<std::string, ConfigValue> values_;
  std::map<std::string, std::string> sources_;
};

}  // namespace titanax
