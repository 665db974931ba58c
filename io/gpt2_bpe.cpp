#include "io/gpt2_bpe.h"

#include <queue>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>

#ifdef TITANAX_HAVE_PCRE2
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#endif

#include "core/error.h"

namespace titanax::detail {

namespace {

// GPT-2's bytes_to_unicode (encoder.py): the code point that spells each byte in vocab.json / merges.txt.
const std::vector<int>& unicode_of_byte() {
  static const std::vector<int> table = [] {
    std::vector<int> t(256, -1);
    for (int b = 0; b < 256; ++b)
      if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)) t[b] = b;
    int n = 0;
    for (int b = 0; b < 256; ++b)
      if (t[b] < 0) t[b] = 256 + n++;
    return t;
  }();
  return table;
}

std::string utf8_of(int cp) {
  std::string s;
  if (cp < 0x80) {
    s += char(cp);
  } else if (cp < 0x800) {
    s += char(0xC0 | (cp >> 6)), s += char(0x80 | (cp & 0x3F));
  } else {
    s += char(0xE0 | (cp >> 12)), s += char(0x80 | ((cp >> 6) & 0x3F)), s += char(0x80 | (cp & 0x3F));
  }
  return s;
}

// The raw bytes a vocab.json / merges.txt spelling stands for; false when a character is not one of
// bytes_to_unicode's 256.
bool raw_bytes(const std::string& spelled, std::string& out) {
  static const std::unordered_map<int, char> byte_of = [] {
    std::unordered_map<int, char> m;
    for (int b = 0; b < 256; ++b) m[unicode_of_byte()[b]] = char(b);
    return m;
  }();
  out.clear();
  for (size_t i = 0; i < spelled.size();) {
    const unsigned char c = spelled[i];
    int cp = 0, len = 0;
    if (c < 0x80) cp = c, len = 1;
    else if ((c >> 5) == 6 && i + 1 < spelled.size()) cp = ((c & 0x1F) << 6) | (spelled[i + 1] & 0x3F), len = 2;
    else return false;  // GPT-2's spellings stay below U+0144
    auto it = byte_of.find(cp);
    if (it == byte_of.end()) return false;
    out += it->second;
    i += size_t(len);
  }
  return true;
}

std::string pair_key(const std::string& a, const std::string& b) {
  return std::to_string(a.size()) + ":" + a + b;
}

constexpr const char* kEndOfText = "<|endoftext|>";

}  // namespace

struct Gpt2Bpe::Impl {
  std::vector<std::string> bytes_of;           // id -> raw bytes
  std::vector<std::string> spelled;            // id -> vocab.json's spelling
  std::unordered_map<std::string, int> id_of;  // raw bytes -> id
  std::unordered_map<std::string, int> rank;   // pair_key(a, b) -> merges.txt line order
  int eot = -1;
#ifdef TITANAX_HAVE_PCRE2
  pcre2_code* re = nullptr;
  ~Impl() { pcre2_code_free(re); }
#endif
  mutable std::mutex mu;
  mutable std::unordered_map<std::string, std::vector<int>> cache;  // pre-token -> ids

  // encoder.py's bpe(): merge the lowest-ranked adjacent pair, every occurrence left to right, until none
  // has a rank. As Hugging Face's tokenizers, with a heap of (rank, position) over a linked list of
  // symbols, O(n log n) where encoder.py rescans the word per merge (a long unspaced run, CJK text, is
  // one pre-token). The same merges wherever a merge's parts come from earlier merges (BPE training
  // writes them so: GPT-2's merges.txt): a merge then never makes a pair ranked before it.
  std::vector<int> bpe(const std::string& token) const {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (auto it = cache.find(token); it != cache.end()) return it->second;
    }
    const int n = int(token.size());
    std::vector<std::string> sym(token.size());  // a merged-away symbol is left empty
    std::vector<int> prev(token.size()), next(token.size());
    for (int i = 0; i < n; ++i) sym[size_t(i)] = token.substr(size_t(i), 1), prev[size_t(i)] = i - 1, next[size_t(i)] = i + 1 < n ? i + 1 : -1;
    auto rank_at = [&](int i) {  // the rank of the pair starting at symbol i, or -1
      const int j = next[size_t(i)];
      if (j < 0) return -1;
      auto it = rank.find(pair_key(sym[size_t(i)], sym[size_t(j)]));
      return it == rank.end() ? -1 : it->second;
    };
    std::priority_queue<std::pair<int, int>, std::vector<std::pair<int, int>>, std::greater<>> heap;  // lowest rank, leftmost
    auto push = [&](int i) {
      if (int r = i >= 0 ? rank_at(i) : -1; r >= 0) heap.push({r, i});
    };
    for (int i = 0; i + 1 < n; ++i) push(i);
    while (!heap.empty()) {
      const auto [r, i] = heap.top();
      heap.pop();
      if (sym[size_t(i)].empty() || rank_at(i) != r) continue;  // merged away, or its right neighbour changed
      const int j = next[size_t(i)];
      sym[size_t(i)] += sym[size_t(j)];
      sym[size_t(j)].clear();
      next[size_t(i)] = next[size_t(j)];
      if (next[size_t(j)] >= 0) prev[size_t(next[size_t(j)])] = i;
      push(prev[size_t(i)]);
      push(i);
    }
    std::vector<int> ids;
    for (int i = 0; i >= 0 && i < n; i = next[size_t(i)]) ids.push_back(id_of.at(sym[size_t(i)]));  // load checked every merge
    std::lock_guard<std::mutex> lock(mu);
    if (cache.size() < (1u << 16)) cache.emplace(token, ids);
    return ids;
  }

  // GPT-2's pre-tokenizer over `text` (no end-of-text markers in it), appending each pre-token's ids.
  void encode_span(const std::string& text, size_t base, std::vector<int>& ids) const {
#ifdef TITANAX_HAVE_PCRE2
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(re, nullptr);
    struct Free {
      pcre2_match_data* m;
      ~Free() { pcre2_match_data_free(m); }
    } free_md{md};
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    uint32_t options = 0;  // the first match checks the whole subject's UTF-8; later ones need not
    for (size_t start = 0; start < text.size(); options = PCRE2_NO_UTF_CHECK) {
      const int rc = pcre2_match(re, subject, text.size(), start, options, md, nullptr);
      if (rc <= PCRE2_ERROR_UTF8_ERR1 && rc >= PCRE2_ERROR_UTF8_ERR21)
        throw DataError("GPT-2 tokenizer: the text is not valid UTF-8 at byte " +
                            std::to_string(base + pcre2_get_startchar(md)),
                        "UTF-8 text", "an invalid byte sequence", "decode the text to UTF-8 first");
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      if (rc < 0 || ov[0] != start || ov[1] <= start)  // the pattern matches every non-empty text at its start
        throw InternalError("GPT-2 tokenizer: the pre-tokenizer pattern did not match at byte " + std::to_string(base + start));
      for (int id : bpe(text.substr(start, ov[1] - start))) ids.push_back(id);
      start = ov[1];
    }
#else
    (void)text, (void)base, (void)ids;
    throw ValueError("GPT-2 tokenizer: this Titanax was built without PCRE2, which GPT-2's pre-tokenizer needs",
                     "a build with TITANAX_PCRE2=ON", "TITANAX_PCRE2=OFF",
                     "apt-get install libpcre2-dev and configure again (scripts/install-deps.sh installs it)");
#endif
  }
};

Gpt2Bpe::Gpt2Bpe(const std::string& vocab_json, const std::string& merges, const std::string& vocab_path,
                 const std::string& merges_path)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  nlohmann::json v;
  try {
    v = nlohmann::json::parse(vocab_json);
  } catch (const std::exception& e) {
    throw DataError("GPT-2 vocabulary '" + vocab_path + "' is not JSON", "vocab.json: {\"token\": id, ...}", e.what());
  }
  if (!v.is_object() || v.empty())
    throw DataError("GPT-2 vocabulary '" + vocab_path + "' is not a JSON object of ids", "{\"token\": id, ...}",
                    std::string(v.type_name()));
  m.bytes_of.resize(v.size()), m.spelled.resize(v.size());
  std::vector<bool> seen(v.size(), false);
  for (const auto& [spelling, id] : v.items()) {
    const int64_t i = id.is_number_integer() ? id.get<int64_t>() : -1;
    if (i < 0 || i >= int64_t(v.size()) || seen[size_t(i)])
      throw DataError("GPT-2 vocabulary '" + vocab_path + "': the ids are not 0.." + std::to_string(v.size() - 1) + " once each",
                      "a distinct id below " + std::to_string(v.size()), "'" + spelling + "': " + id.dump());
    seen[size_t(i)] = true;
    m.spelled[size_t(i)] = spelling;
    if (spelling == kEndOfText) {
      m.eot = int(i), m.bytes_of[size_t(i)] = spelling;  // a special token: decodes to its text, never merged into
      continue;
    }
    if (!raw_bytes(spelling, m.bytes_of[size_t(i)]))
      throw DataError("GPT-2 vocabulary '" + vocab_path + "': '" + spelling + "' is not spelled in GPT-2's byte alphabet",
                      "characters of bytes_to_unicode (encoder.py)", "'" + spelling + "'");
    m.id_of[m.bytes_of[size_t(i)]] = int(i);
  }
  for (int b = 0; b < 256; ++b)
    if (!m.id_of.count(std::string(1, char(b))))
      throw DataError("GPT-2 vocabulary '" + vocab_path + "' lacks the single byte " + std::to_string(b),
                      "an entry for each of the 256 bytes", "'" + utf8_of(unicode_of_byte()[b]) + "' missing");
  std::istringstream in(merges);
  std::string line;
  for (int n = 1, r = 0; std::getline(in, line); ++n) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || (n == 1 && line.rfind("#version", 0) == 0)) continue;
    const size_t sp = line.find(' ');
    std::string a, b;
    if (sp == std::string::npos || line.find(' ', sp + 1) != std::string::npos || !raw_bytes(line.substr(0, sp), a) ||
        !raw_bytes(line.substr(sp + 1), b) || !m.id_of.count(a) || !m.id_of.count(b) || !m.id_of.count(a + b))
      throw DataError("GPT-2 merges '" + merges_path + "', line " + std::to_string(n) + ": not a merge of two vocabulary entries",
                      "\"a b\" with a, b and ab in vocab.json", "'" + line + "'");
    m.rank.emplace(pair_key(a, b), r++);  // a repeated pair keeps its first (highest) rank
  }
#ifdef TITANAX_HAVE_PCRE2
  static const char* kPattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
  int err = 0;
  PCRE2_SIZE off = 0;
  m.re = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(kPattern), PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &err, &off,
                       nullptr);
  if (!m.re) throw InternalError("GPT-2 tokenizer: PCRE2 refused the pre-tokenizer pattern (error " + std::to_string(err) + ")");
#endif
}

Gpt2Bpe::Gpt2Bpe(Gpt2Bpe&&) noexcept = default;
Gpt2Bpe::~Gpt2Bpe() = default;

std::vector<int> Gpt2Bpe::encode(const std::string& text) const {
  std::vector<int> ids;
  size_t start = 0;
  while (start < text.size()) {
    const size_t at = impl_->eot >= 0 ? text.find(kEndOfText, start) : std::string::npos;
    const size_t end = at == std::string::npos ? text.size() : at;
    if (end > start) impl_->encode_span(text.substr(start, end - start), start, ids);
    if (at == std::string::npos) break;
    ids.push_back(impl_->eot);
    start = at + std::char_traits<char>::length(kEndOfText);
  }
  return ids;
}

std::string Gpt2Bpe::decode(const std::vector<int>& ids) const {
  std::string out;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab_size())
      throw ValueError("GPT-2 tokenizer: id " + std::to_string(ids[i]) + " at position " + std::to_string(i) + " is out of range",
                       "0 <= id < " + std::to_string(vocab_size()), std::to_string(ids[i]));
    out += impl_->bytes_of[size_t(ids[i])];
  }
  return out;
}

int Gpt2Bpe::vocab_size() const { return int(impl_->bytes_of.size()); }
int Gpt2Bpe::eot_id() const { return impl_->eot; }

std::string Gpt2Bpe::piece(int id) const {
  if (id < 0 || id >= vocab_size())
    throw ValueError("GPT-2 tokenizer: id out of range", "0 <= id < " + std::to_string(vocab_size()), std::to_string(id));
  return impl_->spelled[size_t(id)];
}

}  // namespace titanax::detail
