#include "io/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

#include "core/error.h"

namespace titanax {

// ------------------------------------------------------------------------------------------ helpers
namespace {

std::string lower(std::string s) {
  for (auto& c : s) c = char(std::tolower((unsigned char)c));
  return s;
}

std::optional<int64_t> parse_int(const std::string& s) {
  if (s.empty()) return std::nullopt;
  const char* b = s.data();
  const char* e = b + s.size();
  if (*b == '+') ++b;
  int64_t v = 0;
  auto r = std::from_chars(b, e, v);
  if (r.ec != std::errc() || r.ptr != e) return std::nullopt;
  return v;
}

std::optional<double> parse_float(const std::string& s) {
  if (s.empty()) return std::nullopt;
  const std::string l = lower(s);
  if (l == ".inf" || l == "+.inf" || l == "inf" || l == "+inf") return std::numeric_limits<double>::infinity();
  if (l == "-.inf" || l == "-inf") return -std::numeric_limits<double>::infinity();
  if (l == ".nan" || l == "nan") return std::numeric_limits<double>::quiet_NaN();
  const char* b = s.data();
  const char* e = b + s.size();
  if (*b == '+') ++b;
  double v = 0;
  auto r = std::from_chars(b, e, v);  // decimal / scientific only (no hex, no "infinity" spellings)
  if (r.ec != std::errc() || r.ptr != e) return std::nullopt;
  return v;
}

std::optional<bool> parse_bool(const std::string& s) {
  const std::string l = lower(s);
  if (l == "true" || l == "yes" || l == "on") return true;
  if (l == "false" || l == "no" || l == "off") return false;
  return std::nullopt;
}

std::string format_float(double v) {
  if (std::isnan(v)) return ".nan";
  if (std::isinf(v)) return v > 0 ? ".inf" : "-.inf";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, v);
  std::string s(buf, r.ptr);
  if (s.find_first_of(".en") == std::string::npos) s += ".0";
  return s;
}

std::string quote(const std::string& s) { return "'" + s + "'"; }

std::string value_text(const ConfigValue& v) {
  struct V {
    std::string operator()(int64_t x) const { return std::to_string(x); }
    std::string operator()(double x) const { return format_float(x); }
    std::string operator()(bool x) const { return x ? "true" : "false"; }
    std::string operator()(const std::string& x) const { return "\"" + x + "\""; }
    std::string operator()(const std::vector<int64_t>& x) const {
      std::vector<std::string> p;
      for (auto e : x) p.push_back(std::to_string(e));
      return "[" + join(p) + "]";
    }
    std::string operator()(const std::vector<double>& x) const {
      std::vector<std::string> p;
      for (auto e : x) p.push_back(format_float(e));
      return "[" + join(p) + "]";
    }
    std::string operator()(const std::map<std::string, int64_t>& x) const {
      std::vector<std::string> p;
      for (const auto& [k, e] : x) p.push_back(k + ": " + std::to_string(e));
      return "{" + join(p) + "}";
    }
    std::string operator()(const std::vector<std::string>& x) const {
      std::vector<std::string> p;
      for (const auto& e : x) p.push_back((*this)(e));
      return "[" + join(p) + "]";
    }
  };
  return std::visit(V{}, v);
}

// The numbers of an int, float or list value (the values a ConfigRange bounds).
std::vector<double> numbers(const ConfigValue& v) {
  if (auto* i = std::get_if<int64_t>(&v)) return {double(*i)};
  if (auto* f = std::get_if<double>(&v)) return {*f};
  if (auto* il = std::get_if<std::vector<int64_t>>(&v)) return {il->begin(), il->end()};
  if (auto* fl = std::get_if<std::vector<double>>(&v)) return *fl;
  return {};
}

// A bound as written in messages: integers without a fraction ("1", not "1.0").
std::string bound_text(double v) {
  if (std::isfinite(v) && v == std::floor(v) && std::fabs(v) < 1e15) return std::to_string(int64_t(v));
  return format_float(v);
}

bool valid_segment(std::string_view s) {
  if (s.empty()) return false;
  for (char c : s)
    if (!(std::isalnum((unsigned char)c) || c == '_' || c == '-')) return false;
  return true;
}

bool valid_key(std::string_view key) {
  size_t start = 0;
  for (;;) {
    size_t dot = key.find('.', start);
    if (!valid_segment(key.substr(start, dot == std::string_view::npos ? std::string_view::npos : dot - start)))
      return false;
    if (dot == std::string_view::npos) return true;
    start = dot + 1;
  }
}

// ${NAME} / ${NAME:default} / $${ substitution.
std::string substitute_env(const std::string& s, const std::string& key, const std::string& where) {
  std::string out;
  for (size_t i = 0; i < s.size();) {
    if (s.compare(i, 3, "$${") == 0) {
      out += "${";
      i += 3;
    } else if (s.compare(i, 2, "${") == 0) {
      size_t end = s.find('}', i + 2);
      if (end == std::string::npos)
        throw ConfigError("unterminated ${...} in the value of '" + key + "' (" + where + ")", "${NAME} or ${NAME:default}",
                          quote(s), "close it with '}' (write $${ for a literal ${)");
      std::string inner = s.substr(i + 2, end - i - 2);
      size_t colon = inner.find(':');
      std::string name = inner.substr(0, colon);
      bool valid = !name.empty() && !std::isdigit((unsigned char)name[0]);
      for (char c : name) valid = valid && (std::isalnum((unsigned char)c) || c == '_');
      if (!valid)
        throw ConfigError("bad environment variable name in the value of '" + key + "' (" + where + ")",
                          "${NAME} with NAME of letters, digits and _", quote("${" + inner + "}"));
      const char* env = std::getenv(name.c_str());
      if (env) out += env;
      else if (colon != std::string::npos) out += inner.substr(colon + 1);
      else
        throw ConfigError("environment variable " + name + " is not set (value of '" + key + "', " + where + ")",
                          "a set variable, or a default: ${" + name + ":default}", name + " unset",
                          "export " + name + "=... or write ${" + name + ":default}");
      i = end + 1;
    } else {
      out += s[i++];
    }
  }
  return out;
}

std::string mark_text(const std::string& source, const YAML::Mark& m) {
  if (m.is_null()) return source;
  return source + ":" + std::to_string(m.line + 1) + ":" + std::to_string(m.column + 1);
}

}  // namespace

bool ConfigRange::contains(double v) const {
  return (min_open ? v > min : v >= min) && (max_open ? v < max : v <= max);  // false for NaN
}

std::string ConfigRange::text() const {
  const bool lo = std::isfinite(min), hi = std::isfinite(max);
  if (lo && !hi) return (min_open ? "> " : ">= ") + bound_text(min);
  if (hi && !lo) return (max_open ? "< " : "<= ") + bound_text(max);
  if (!lo && !hi) return "any number";
  return "in " + std::string(min_open ? "(" : "[") + bound_text(min) + ", " + bound_text(max) + (max_open ? ")" : "]");
}

std::string_view config_type_name(ConfigType t) {
  switch (t) {
    case ConfigType::int_: return "int";
    case ConfigType::float_: return "float";
    case ConfigType::bool_: return "bool";
    case ConfigType::string: return "string";
    case ConfigType::int_list: return "int_list";
    case ConfigType::float_list: return "float_list";
    case ConfigType::string_int_map: return "string_int_map";
    case ConfigType::string_list: return "string_list";
  }
  return "?";
}

// ------------------------------------------------------------------------------------------ schema

ConfigSchema& ConfigSchema::add(ConfigEntry e) {
  if (!valid_key(e.key))
    throw ValueError("bad config key '" + e.key + "'", "dot-separated names of [A-Za-z0-9_-]", quote(e.key));
  if (find(e.key)) throw ValueError("config key '" + e.key + "' declared twice");
  if (is_section(e.key))
    throw ValueError("config key '" + e.key + "' is also a section of other keys", "a leaf key", quote(e.key));
  for (const auto& o : entries_)
    if (e.key.size() > o.key.size() && e.key.compare(0, o.key.size(), o.key) == 0 && e.key[o.key.size()] == '.')
      throw ValueError("config key '" + e.key + "' lies under key '" + o.key + "', which is not a section",
                       "keys that are not nested in other keys", quote(e.key));
  if (e.required && e.default_value)
    throw ValueError("config key '" + e.key + "' is required and has a default", "one of the two");
  if (e.default_value && e.default_value->index() != size_t(e.type))
    throw ValueError("default of config key '" + e.key + "' has the wrong type",
                     std::string(config_type_name(e.type)), value_text(*e.default_value));
  if (!e.allowed.empty()) {
    if (e.type != ConfigType::string && e.type != ConfigType::string_list)
      throw ValueError("allowed values are for string and string_list keys only", "a string or string_list key",
                       "'" + e.key + "' of type " + std::string(config_type_name(e.type)));
    if (e.default_value) {
      const auto* one = std::get_if<std::string>(&*e.default_value);
      for (const auto& d : one ? std::vector<std::string>{*one} : std::get<std::vector<std::string>>(*e.default_value))
        if (std::find(e.allowed.begin(), e.allowed.end(), d) == e.allowed.end())
          throw ValueError("default of config key '" + e.key + "' is not an allowed value", join(e.allowed), quote(d));
    }
  }
  if (e.range) {
    const bool numeric = e.type == ConfigType::int_ || e.type == ConfigType::float_ ||
                         e.type == ConfigType::int_list || e.type == ConfigType::float_list;
    if (!numeric)
      throw ValueError("a range is for int and float keys and their lists only", "an int, float or list key",
                       "'" + e.key + "' of type " + std::string(config_type_name(e.type)));
    if (!(e.range->min <= e.range->max))
      throw ValueError("range of config key '" + e.key + "' is empty", "min <= max", e.range->text());
    if (e.default_value)
      for (double v : numbers(*e.default_value))
        if (!e.range->contains(v))
          throw ValueError("default of config key '" + e.key + "' is outside its range", e.range->text(),
                           value_text(*e.default_value));
  }
  entries_.push_back(std::move(e));
  return *this;
}

ConfigSchema& ConfigSchema::add_int(std::string key, std::optional<int64_t> d, std::string doc,
                                    std::optional<ConfigRange> range) {
  return add({std::move(key), ConfigType::int_, d ? std::optional<ConfigValue>(*d) : std::nullopt, false, std::move(doc),
              {}, range});
}
ConfigSchema& ConfigSchema::add_float(std::string key, std::optional<double> d, std::string doc,
                                      std::optional<ConfigRange> range) {
  return add({std::move(key), ConfigType::float_, d ? std::optional<ConfigValue>(*d) : std::nullopt, false,
              std::move(doc), {}, range});
}
ConfigSchema& ConfigSchema::add_bool(std::string key, std::optional<bool> d, std::string doc) {
  return add({std::move(key), ConfigType::bool_, d ? std::optional<ConfigValue>(*d) : std::nullopt, false, std::move(doc), {}});
}
ConfigSchema& ConfigSchema::add_string(std::string key, std::optional<std::string> d, std::string doc,
                                       std::vector<std::string> allowed) {
  return add({std::move(key), ConfigType::string, d ? std::optional<ConfigValue>(std::move(*d)) : std::nullopt, false,
              std::move(doc), std::move(allowed)});
}
ConfigSchema& ConfigSchema::add_int_list(std::string key, std::optional<std::vector<int64_t>> d, std::string doc,
                                         std::optional<ConfigRange> range) {
  return add({std::move(key), ConfigType::int_list, d ? std::optional<ConfigValue>(std::move(*d)) : std::nullopt, false,
              std::move(doc), {}, range});
}
ConfigSchema& ConfigSchema::add_float_list(std::string key, std::optional<std::vector<double>> d, std::string doc,
                                           std::optional<ConfigRange> range) {
  return add({std::move(key), ConfigType::float_list, d ? std::optional<ConfigValue>(std::move(*d)) : std::nullopt,
              false, std::move(doc), {}, range});
}
ConfigSchema& ConfigSchema::add_map(std::string key, std::optional<std::map<std::string, int64_t>> d, std::string doc) {
  return add({std::move(key), ConfigType::string_int_map, d ? std::optional<ConfigValue>(std::move(*d)) : std::nullopt,
              false, std::move(doc), {}});
}
ConfigSchema& ConfigSchema::add_string_list(std::string key, std::optional<std::vector<std::string>> d, std::string doc,
                                            std::vector<std::string> allowed) {
  return add({std::move(key), ConfigType::string_list, d ? std::optional<ConfigValue>(std::move(*d)) : std::nullopt,
              false, std::move(doc), std::move(allowed)});
}
ConfigSchema& ConfigSchema::add_required(std::string key, ConfigType type, std::string doc,
                                         std::vector<std::string> allowed) {
  return add({std::move(key), type, std::nullopt, true, std::move(doc), std::move(allowed)});
}

const ConfigEntry* ConfigSchema::find(std::string_view key) const {
  for (const auto& e : entries_)
    if (e.key == key) return &e;
  return nullptr;
}

std::vector<std::string> ConfigSchema::keys() const {
  std::vector<std::string> k;
  for (const auto& e : entries_) k.push_back(e.key);
  return k;
}

bool ConfigSchema::is_section(std::string_view prefix) const {
  for (const auto& e : entries_)
    if (e.key.size() > prefix.size() && e.key.compare(0, prefix.size(), prefix) == 0 && e.key[prefix.size()] == '.')
      return true;
  return false;
}

std::string ConfigSchema::describe() const {
  std::vector<std::array<std::string, 4>> rows{{"key", "type", "default", "description"}};
  for (const auto& e : entries_) {
    std::string def = e.required ? "(required)" : e.default_value ? value_text(*e.default_value) : "(unset)";
    std::string doc = e.doc;
    if (!e.allowed.empty()) doc += (doc.empty() ? "" : " ") + std::string("[one of: ") + join(e.allowed, ", ") + "]";
    if (e.range) doc += (doc.empty() ? "[" : " [") + e.range->text() + "]";
    rows.push_back({e.key, std::string(config_type_name(e.type)), def, doc});
  }
  size_t w[3] = {0, 0, 0};
  for (const auto& r : rows)
    for (int i = 0; i < 3; ++i) w[i] = std::max(w[i], r[size_t(i)].size());
  std::string out;
  for (const auto& r : rows) {
    std::string line;
    for (int i = 0; i < 3; ++i) line += r[size_t(i)] + std::string(w[i] - r[size_t(i)].size() + 2, ' ');
    line += r[3];
    while (!line.empty() && line.back() == ' ') line.pop_back();
    out += line + "\n";
  }
  return out;
}

// ------------------------------------------------------------------------------------------ loading

struct ConfigBuilder {
  Config& cfg;
  std::string source;  // file name for messages
  std::set<std::string> seen;
  std::string override_where;  // set while applying an override: its nodes' marks mean nothing

  std::string loc(const YAML::Node& n) const {
    return override_where.empty() ? mark_text(source, n.Mark()) : override_where;
  }

  std::vector<std::string> keys() const { return cfg.schema_.keys(); }

  std::string section_keys(const std::string& section) const {
    std::vector<std::string> k;
    for (const auto& e : cfg.schema_.entries())
      if (e.key.compare(0, section.size() + 1, section + ".") == 0) k.push_back(e.key);
    return join(k);
  }

  [[noreturn]] void unknown(const std::string& key, const std::string& where) const {
    throw ConfigError("unknown config key '" + key + "' (" + where + ")", "a key of the schema", quote(key),
                      did_you_mean(key, keys()));
  }

  [[noreturn]] void wrong(const ConfigEntry& e, const std::string& where, const std::string& found,
                          const std::string& extra = {}) const {
    throw ConfigError("expected " + std::string(config_type_name(e.type)) + " at " + e.key + ", found " + found + " (" +
                          where + ")" + extra,
                      std::string(config_type_name(e.type)), found);
  }

  std::string scalar_text(const YAML::Node& n, const std::string& key, const std::string& where) const {
    return substitute_env(n.Scalar(), key, where);
  }

  int64_t to_int(const ConfigEntry& e, const YAML::Node& n, const std::string& where) const {
    if (!n.IsScalar()) wrong(e, where, "a " + node_kind(n));
    std::string t = scalar_text(n, e.key, where);
    auto v = parse_int(t);
    if (!v) wrong(e, where, quote(t));
    check_range(e, double(*v), t, where);
    return *v;
  }
  double to_float(const ConfigEntry& e, const YAML::Node& n, const std::string& where) const {
    if (!n.IsScalar()) wrong(e, where, "a " + node_kind(n));
    std::string t = scalar_text(n, e.key, where);
    auto v = parse_float(t);
    if (!v) wrong(e, where, quote(t));
    check_range(e, *v, t, where);
    return *v;
  }

  static std::string node_kind(const YAML::Node& n) {
    if (n.IsMap()) return "mapping";
    if (n.IsSequence()) return "sequence";
    if (n.IsNull()) return "null";
    return "scalar";
  }

  // Types `n` as entry e's value.
  ConfigValue typed(const ConfigEntry& e, const YAML::Node& n, const std::string& where) const {
    switch (e.type) {
      case ConfigType::int_: return to_int(e, n, where);
      case ConfigType::float_: return to_float(e, n, where);
      case ConfigType::bool_: {
        if (!n.IsScalar()) wrong(e, where, "a " + node_kind(n));
        std::string t = scalar_text(n, e.key, where);
        auto v = parse_bool(t);
        if (!v) wrong(e, where, quote(t), "; use true or false");
        return *v;
      }
      case ConfigType::string: {
        if (!n.IsScalar()) wrong(e, where, "a " + node_kind(n));
        std::string t = scalar_text(n, e.key, where);
        check_allowed(e, t, where);
        return t;
      }
      case ConfigType::int_list: {
        if (!n.IsSequence()) wrong(e, where, n.IsScalar() ? quote(n.Scalar()) : "a " + node_kind(n), "; write [1, 2]");
        std::vector<int64_t> v;
        for (const auto& item : n) v.push_back(to_int(e, item, loc(item)));
        return v;
      }
      case ConfigType::float_list: {
        if (!n.IsSequence()) wrong(e, where, n.IsScalar() ? quote(n.Scalar()) : "a " + node_kind(n), "; write [0.9, 0.95]");
        std::vector<double> v;
        for (const auto& item : n) v.push_back(to_float(e, item, loc(item)));
        return v;
      }
      case ConfigType::string_list: {
        if (!n.IsSequence()) wrong(e, where, n.IsScalar() ? quote(n.Scalar()) : "a " + node_kind(n), "; write [a, b]");
        std::vector<std::string> v;
        for (const auto& item : n) {
          if (!item.IsScalar()) wrong(e, loc(item), "a " + node_kind(item) + " in the list");
          v.push_back(scalar_text(item, e.key, loc(item)));
          check_allowed(e, v.back(), loc(item));
        }
        return v;
      }
      case ConfigType::string_int_map: {
        if (!n.IsMap()) wrong(e, where, n.IsScalar() ? quote(n.Scalar()) : "a " + node_kind(n), "; write {name: 1}");
        std::map<std::string, int64_t> m;
        for (const auto& kv : n) {
          if (!kv.first.IsScalar()) wrong(e, where, "a non-scalar map key");
          const std::string k = kv.first.Scalar();
          if (m.count(k))
            throw ConfigError("duplicate entry '" + k + "' in " + e.key + " (" + loc(kv.first) + ")",
                              "each name once", quote(k));
          ConfigEntry item = e;
          item.key = e.key + "." + k;
          item.type = ConfigType::int_;
          m[k] = to_int(item, kv.second, loc(kv.second));
        }
        return m;
      }
    }
    throw InternalError("unhandled config type");
  }

  // A list's elements are checked one by one: `text` is the element's.
  static void check_range(const ConfigEntry& e, double v, const std::string& text, const std::string& where) {
    if (!e.range || e.range->contains(v)) return;
    throw ConfigError("value " + quote(text) + " is out of range for " + e.key + " (" + where + ")",
                      "a value " + e.range->text() + " (" + e.doc + ")", quote(text),
                      "set " + e.key + " to a value " + e.range->text());
  }

  void check_allowed(const ConfigEntry& e, const std::string& v, const std::string& where) const {
    if (e.allowed.empty() || std::find(e.allowed.begin(), e.allowed.end(), v) != e.allowed.end()) return;
    throw ConfigError("value " + quote(v) + " is not allowed for " + e.key + " (" + where + ")",
                      "one of: " + join(e.allowed), quote(v), did_you_mean(v, e.allowed));
  }

  void assign(const ConfigEntry& e, const YAML::Node& n, const std::string& where) {
    if (n.IsNull()) {
      if (!e.required && !e.default_value) {  // optional: null unsets
        cfg.values_.erase(e.key);
        cfg.sources_[e.key] = where;
        return;
      }
      wrong(e, where, "null", "; remove the key to use the default");
    }
    cfg.values_[e.key] = typed(e, n, where);
    cfg.sources_[e.key] = where;
  }

  // The map-typed key that `key` is an entry of ("mesh.data" -> mesh), or nullptr.
  const ConfigEntry* map_parent(const std::string& key) const {
    size_t dot = key.rfind('.');
    if (dot == std::string::npos) return nullptr;
    const ConfigEntry* p = cfg.schema_.find(std::string_view(key).substr(0, dot));
    return p && p->type == ConfigType::string_int_map ? p : nullptr;
  }

  void assign_map_item(const ConfigEntry& parent, const std::string& key, const YAML::Node& n, const std::string& where) {
    ConfigEntry item = parent;
    item.key = key;
    item.type = ConfigType::int_;
    int64_t v = to_int(item, n, where);
    auto it = cfg.values_.find(parent.key);
    std::map<std::string, int64_t> m;
    if (it != cfg.values_.end()) m = std::get<std::map<std::string, int64_t>>(it->second);
    m[key.substr(parent.key.size() + 1)] = v;
    cfg.values_[parent.key] = m;
    cfg.sources_[parent.key] = where;
  }

  void walk(const YAML::Node& node, const std::string& prefix) {
    for (const auto& kv : node) {
      const std::string where = mark_text(source, kv.first.Mark());
      if (!kv.first.IsScalar())
        throw ConfigError("a config key must be a plain name (" + where + ")", "a scalar key", "a " + node_kind(kv.first));
      const std::string name = kv.first.Scalar();
      const std::string key = prefix.empty() ? name : prefix + "." + name;
      if (!seen.insert(key).second)
        throw ConfigError("duplicate config key '" + key + "' (" + where + ")", "each key once", quote(key),
                          "remove one of the two");
      const YAML::Node& v = kv.second;
      if (const ConfigEntry* e = cfg.schema_.find(key)) {
        assign(*e, v, where);
      } else if (cfg.schema_.is_section(key)) {
        if (v.IsMap()) walk(v, key);
        else if (!v.IsNull())
          throw ConfigError("'" + key + "' is a section, not a value (" + where + ")",
                            "a mapping of its keys", node_kind(v) + (v.IsScalar() ? " " + quote(v.Scalar()) : ""),
                            "set its keys: " + section_keys(key));
      } else if (const ConfigEntry* p = map_parent(key)) {
        assign_map_item(*p, key, v, where);
      } else if (v.IsMap() && v.size() > 0) {
        walk(v, key);  // report the full dotted key of the first leaf: a better suggestion
      } else {
        unknown(key, where);
      }
    }
  }

  void apply_override(const std::string& ov) {
    const std::string where = "--set " + ov;
    size_t eq = ov.find('=');
    if (eq == std::string::npos)
      throw ConfigError("override without '=' (" + where + ")", "key=value (e.g. optimizer.lr=0.1)", quote(ov));
    auto trim = [](std::string s) {
      size_t b = s.find_first_not_of(" \t"), e = s.find_last_not_of(" \t");
      return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
    };
    const std::string key = trim(ov.substr(0, eq));
    const std::string text = ov.substr(eq + 1);
    override_where = where;
    struct Reset {
      std::string& s;
      ~Reset() { s.clear(); }
    } reset{override_where};
    const ConfigEntry* e = cfg.schema_.find(key);
    const ConfigEntry* parent = e ? nullptr : map_parent(key);
    if (!e && !parent) unknown(key, where);
    YAML::Node n;
    bool parsed = true;
    try {
      n = YAML::Load(text);
    } catch (const YAML::Exception&) {
      parsed = false;
    }
    if (e && e->type == ConfigType::string) {
      // Strings: the text itself, unquoted when written as a quoted YAML scalar.
      std::string t = (parsed && n.IsScalar()) ? n.Scalar() : text;
      if (parsed && n.IsNull() && !text.empty() && !e->required && !e->default_value) {
        assign(*e, n, where);
        return;
      }
      YAML::Node s(t);
      assign(*e, s, where);
      return;
    }
    if (!parsed)
      throw ConfigError("override value is not valid YAML (" + where + ")", "a scalar, [list] or {map}", quote(text));
    if (parent) assign_map_item(*parent, key, n, where);
    else assign(*e, n, where);
  }

  void finish() {
    for (const auto& e : cfg.schema_.entries()) {
      if (cfg.values_.count(e.key)) {
        if (!cfg.sources_.count(e.key)) cfg.sources_[e.key] = "default";  // an untouched default map
        continue;
      }
      if (e.required)
        throw ConfigError("required config key '" + e.key + "' is not set (" + source + ")",
                          std::string(config_type_name(e.type)) + " value: " + e.doc, "no value",
                          "add it to the config file or pass --set " + e.key + "=...");
      if (e.default_value && !cfg.sources_.count(e.key)) {
        cfg.values_[e.key] = *e.default_value;
        cfg.sources_[e.key] = "default";
      }
    }
  }
};


Config Config::from_string(const std::string& yaml_text, const std::vector<std::string>& overrides,
                           const ConfigSchema& schema, const std::string& source_name) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::ParserException& e) {
    throw ConfigError("YAML syntax error in " + mark_text(source_name, e.mark), "valid YAML", e.msg);
  } catch (const YAML::Exception& e) {
    throw ConfigError("cannot read the YAML of " + source_name, "valid YAML", e.what());
  }
  if (root && !root.IsNull() && !root.IsMap())
    throw ConfigError("the config " + source_name + " is not a mapping of keys", "key: value lines",
                      "a " + ConfigBuilder::node_kind(root));
  Config cfg;
  cfg.schema_ = schema;
  ConfigBuilder b{cfg, source_name, {}, {}};
  // Map defaults first, so "mesh.data: 4" in the file or an override refines the default map.
  for (const auto& e : schema.entries())
    if (e.type == ConfigType::string_int_map && e.default_value) cfg.values_[e.key] = *e.default_value;
  try {
    if (root && root.IsMap()) b.walk(root, "");
    for (const auto& ov : overrides) b.apply_override(ov);
  } catch (const YAML::Exception& e) {
    throw ConfigError("cannot read the YAML of " + mark_text(source_name, e.mark), "valid YAML", e.msg);
  }
  b.finish();
  return cfg;
}

Config Config::load(const std::string& path, const std::vector<std::string>& overrides, const ConfigSchema& schema) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IOError("cannot read config file '" + path + "'", "a readable YAML file", "cannot open it");
  std::stringstream ss;
  ss << in.rdbuf();
  return from_string(ss.str(), overrides, schema, path);
}

// ------------------------------------------------------------------------------------------ access

const ConfigValue& Config::value_of(const std::string& key, ConfigType want) const {
  const ConfigEntry* e = schema_.find(key);
  if (!e)
    throw ConfigError("unknown config key '" + key + "'", "a key of the schema", quote(key),
                      did_you_mean(key, schema_.keys()));
  if (e->type != want)
    throw ConfigError("config key '" + key + "' is of type " + std::string(config_type_name(e->type)),
                      std::string(config_type_name(e->type)), "a get_" + std::string(config_type_name(want)) + " call",
                      "read it with the getter of its type");
  auto it = values_.find(key);
  if (it == values_.end())
    throw ConfigError("config key '" + key + "' is not set", "a value (it has no default)", "unset",
                      "check has(\"" + key + "\") first, or set it in the config");
  return it->second;
}

bool Config::has(const std::string& key) const {
  if (!schema_.find(key))
    throw ConfigError("unknown config key '" + key + "'", "a key of the schema", quote(key),
                      did_you_mean(key, schema_.keys()));
  return values_.count(key) > 0;
}

int64_t Config::get_int(const std::string& key) const { return std::get<int64_t>(value_of(key, ConfigType::int_)); }
double Config::get_float(const std::string& key) const { return std::get<double>(value_of(key, ConfigType::float_)); }
bool Config::get_bool(const std::string& key) const { return std::get<bool>(value_of(key, ConfigType::bool_)); }
const std::string& Config::get_string(const std::string& key) const {
  return std::get<std::string>(value_of(key, ConfigType::string));
}
const std::vector<int64_t>& Config::get_int_list(const std::string& key) const {
  return std::get<std::vector<int64_t>>(value_of(key, ConfigType::int_list));
}
const std::vector<double>& Config::get_float_list(const std::string& key) const {
  return std::get<std::vector<double>>(value_of(key, ConfigType::float_list));
}
const std::vector<std::string>& Config::get_string_list(const std::string& key) const {
  return std::get<std::vector<std::string>>(value_of(key, ConfigType::string_list));
}
const std::map<std::string, int64_t>& Config::get_map(const std::string& key) const {
  return std::get<std::map<std::string, int64_t>>(value_of(key, ConfigType::string_int_map));
}
const ConfigValue& Config::get(const std::string& key) const {
  const ConfigEntry* e = schema_.find(key);
  return value_of(key, e ? e->type : ConfigType::string);
}

std::string Config::source(const std::string& key) const {
  (void)has(key);  // unknown-key check
  auto it = sources_.find(key);
  return it == sources_.end() ? "unset" : it->second;
}

// ------------------------------------------------------------------------------------------ dump

namespace {

bool needs_quotes(const std::string& s) {
  if (s.empty()) return true;
  if (parse_bool(s) || parse_float(s)) return true;
  const std::string l = lower(s);
  if (l == "null" || l == "~") return true;
  if (s.find("${") != std::string::npos) return true;  // would be substituted again on reload
  return false;
}

struct DumpNode {
  std::vector<std::pair<std::string, DumpNode>> children;
  const ConfigValue* value = nullptr;
  DumpNode& child(const std::string& name) {
    for (auto& c : children)
      if (c.first == name) return c.second;
    children.emplace_back(name, DumpNode{});
    return children.back().second;
  }
};

void emit_value(YAML::Emitter& out, const ConfigValue& v) {
  struct V {
    YAML::Emitter& out;
    void operator()(int64_t x) const { out << (long long)x; }
    void operator()(double x) const { out << format_float(x); }
    void operator()(bool x) const { out << x; }
    void operator()(const std::string& x) const {
      // "$${" keeps a literal "${" literal through a reload.
      std::string s;
      for (size_t i = 0; i < x.size(); ++i) {
        if (x.compare(i, 2, "${") == 0) s += "$";
        s += x[i];
      }
      if (needs_quotes(x)) out << YAML::DoubleQuoted << s;
      else out << s;
    }
    void operator()(const std::vector<int64_t>& x) const {
      out << YAML::Flow << YAML::BeginSeq;
      for (auto e : x) out << (long long)e;
      out << YAML::EndSeq;
    }
    void operator()(const std::vector<double>& x) const {
      out << YAML::Flow << YAML::BeginSeq;
      for (auto e : x) out << format_float(e);
      out << YAML::EndSeq;
    }
    void operator()(const std::map<std::string, int64_t>& x) const {
      out << YAML::Flow << YAML::BeginMap;
      for (const auto& [k, e] : x) out << YAML::Key << k << YAML::Value << (long long)e;
      out << YAML::EndMap;
    }
    void operator()(const std::vector<std::string>& x) const {
      out << YAML::Flow << YAML::BeginSeq;
      for (const auto& e : x) (*this)(e);
      out << YAML::EndSeq;
    }
  };
  std::visit(V{out}, v);
}

void emit_node(YAML::Emitter& out, const DumpNode& n) {
  out << YAML::BeginMap;
  for (const auto& [name, c] : n.children) {
    out << YAML::Key << name << YAML::Value;
    if (c.value) emit_value(out, *c.value);
    else emit_node(out, c);
  }
  out << YAML::EndMap;
}

}  // namespace

std::string Config::dump() const {
  DumpNode root;
  for (const auto& e : schema_.entries()) {
    auto it = values_.find(e.key);
    if (it == values_.end()) continue;
    DumpNode* n = &root;
    size_t start = 0;
    for (;;) {
      size_t dot = e.key.find('.', start);
      n = &n->child(e.key.substr(start, dot == std::string::npos ? std::string::npos : dot - start));
      if (dot == std::string::npos) break;
      start = dot + 1;
    }
    n->value = &it->second;
  }
  if (root.children.empty()) return "{}\n";
  YAML::Emitter out;
  emit_node(out, root);
  return std::string(out.c_str()) + "\n";
}

}  // namespace titanax
