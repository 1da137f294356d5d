// Parser for the bulk of an SGLang `/generate` reply (megafork.rollout.reply).
//
// A reply for one prompt group is a JSON list of n items; almost all of its bytes are each
// item's `"output_ids": [id, ...]` and `"meta_info": {"output_token_logprobs": [[lp, id, null],
// ...]}`. This reads those two lists straight from the received bytes into int32 ids and float32
// log-probs (std::from_chars: correctly rounded to double, then to float, exactly as
// `np.float32(json.loads(...))`), with the GIL released, and returns the byte spans of the lists
// so the caller can hand the small remainder to `json`.
//
// Two passes: the first locates every list and counts the ids (so the outputs are allocated at
// their exact size: 8 bytes per token, no growth or copy); the second parses them and checks
// that each triple's id equals the matching `output_ids` entry. Anything else in these lists
// (token texts, null log-probs, other whitespace layouts) raises ValueError, and the caller
// falls back to plain `json`, its tested pure-Python twin.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <charconv>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace py = pybind11;

namespace {

constexpr std::string_view kPrefix = "\"output_";
constexpr std::string_view kIdsKey = "\"output_ids\"";
constexpr std::string_view kLogprobsKey = "\"output_token_logprobs\"";

struct Span {
  int64_t begin;  // '[' of the list
  int64_t end;    // one past its ']'
  bool triples;   // output_token_logprobs (else output_ids)
  int64_t count;  // ids (output_ids only, from the first pass)
};

[[noreturn]] void fail(const std::string& what, int64_t at) {
  throw std::invalid_argument(what + " at byte " + std::to_string(at));
}

inline int64_t skip_ws(const char* s, int64_t i, int64_t n) {
  while (i < n && (s[i] == ' ' || s[i] == '\n' || s[i] == '\r' || s[i] == '\t')) ++i;
  return i;
}

inline int64_t expect(const char* s, int64_t i, int64_t n, char c) {
  i = skip_ws(s, i, n);
  if (i >= n || s[i] != c) fail(std::string("expected '") + c + "'", i);
  return i + 1;
}

// First pass: every `"output_ids": [...]` and `"output_token_logprobs": [...]` in document order.
std::vector<Span> locate(const char* s, int64_t n) {
  std::vector<Span> spans;
  int64_t pos = 0;
  while (pos < n) {
    const void* hit = memmem(s + pos, n - pos, kPrefix.data(), kPrefix.size());
    if (hit == nullptr) break;
    const int64_t k = static_cast<const char*>(hit) - s;
    const std::string_view rest(s + k, n - k);
    bool triples;
    if (rest.substr(0, kIdsKey.size()) == kIdsKey) {
      triples = false;
      pos = k + kIdsKey.size();
    } else if (rest.substr(0, kLogprobsKey.size()) == kLogprobsKey) {
      triples = true;
      pos = k + kLogprobsKey.size();
    } else {
      pos = k + kPrefix.size();  // another "output_..." key (output_top_logprobs, ...)
      continue;
    }
    pos = expect(s, pos, n, ':');
    pos = skip_ws(s, pos, n);
    if (pos >= n || s[pos] != '[') fail("expected a list", pos);
    Span span{pos, 0, triples, 0};
    const int64_t first = skip_ws(s, pos + 1, n);
    if (first < n && s[first] == ']') {
      span.end = first + 1;  // empty list
    } else if (!triples) {
      const void* close = std::memchr(s + pos, ']', n - pos);
      if (close == nullptr) fail("unterminated output_ids", pos);
      span.end = static_cast<const char*>(close) - s + 1;
      span.count = 1;
      for (const char* p = s + pos; p < s + span.end; ++p) span.count += *p == ',';
    } else {
      // A list of [lp, id, null] triples ends at the first "]]"; the second pass checks that
      // nothing inside could have contained one (only numbers and null are accepted).
      const void* close = memmem(s + pos, n - pos, "]]", 2);
      if (close == nullptr) fail("unterminated output_token_logprobs", pos);
      span.end = static_cast<const char*>(close) - s + 2;
    }
    spans.push_back(span);
    pos = span.end;
  }
  return spans;
}

template <typename T>
int64_t parse_number(const char* s, int64_t i, int64_t end, T* out) {
  i = skip_ws(s, i, end);
  const auto r = std::from_chars(s + i, s + end, *out);
  if (r.ec != std::errc()) fail("expected a number", i);
  return r.ptr - s;
}

// Parses `[id, id, ...]` into ids[0:count].
void parse_ids(const char* s, const Span& sp, int32_t* ids) {
  int64_t i = sp.begin + 1;
  if (sp.count == 0) i = expect(s, i, sp.end, ']');
  for (int64_t j = 0; j < sp.count; ++j) {
    int64_t v;
    i = parse_number(s, i, sp.end, &v);
    if (v < 0 || v > INT32_MAX) fail("token id out of int32 range", i);
    ids[j] = static_cast<int32_t>(v);
    i = expect(s, i, sp.end, j + 1 < sp.count ? ',' : ']');
  }
  if (i != sp.end) fail("trailing bytes in output_ids", i);
}

// Parses `[[lp, id, null], ...]` into lps[0:count], checking each id against ids[0:count].
void parse_triples(const char* s, const Span& sp, const int32_t* ids, float* lps, int64_t count) {
  int64_t i = sp.begin + 1;
  int64_t j = 0;
  if (skip_ws(s, i, sp.end) + 1 == sp.end) {
    i = sp.end;  // []
  } else {
    while (true) {
      if (j >= count) fail("more output_token_logprobs than output_ids", i);
      i = expect(s, i, sp.end, '[');
      double lp;
      i = parse_number(s, i, sp.end, &lp);
      i = expect(s, i, sp.end, ',');
      int64_t id;
      i = parse_number(s, i, sp.end, &id);
      if (id != ids[j]) fail("output_token_logprobs id differs from output_ids", i);
      i = expect(s, i, sp.end, ',');
      i = skip_ws(s, i, sp.end);
      if (sp.end - i < 4 || std::memcmp(s + i, "null", 4) != 0) fail("expected null (no token text)", i);
      i = expect(s, i + 4, sp.end, ']');
      lps[j++] = static_cast<float>(lp);
      i = skip_ws(s, i, sp.end);
      if (i < sp.end && s[i] == ',') {
        ++i;
        continue;
      }
      i = expect(s, i, sp.end, ']');
      break;
    }
  }
  if (j != count) fail(std::to_string(j) + " output_token_logprobs for " + std::to_string(count) + " output_ids", i);
  if (i != sp.end) fail("trailing bytes in output_token_logprobs", i);
}

py::tuple parse_generate_reply(py::buffer reply, int64_t n_items) {
  const py::buffer_info info = reply.request();
  if (info.ndim != 1 || info.itemsize != 1) throw std::invalid_argument("reply must be a 1-D byte buffer");
  if (info.strides[0] != 1) throw std::invalid_argument("reply must be contiguous");
  const char* s = static_cast<const char*>(info.ptr);
  const int64_t n = info.shape[0];
  std::vector<Span> spans;
  {
    py::gil_scoped_release release;
    spans = locate(s, n);
  }
  // Pair the k-th output_ids with the k-th output_token_logprobs (the caller checks with `json`
  // that each item held exactly one of each).
  std::vector<const Span*> id_spans, lp_spans;
  for (const Span& sp : spans) (sp.triples ? lp_spans : id_spans).push_back(&sp);
  if (static_cast<int64_t>(id_spans.size()) != n_items || static_cast<int64_t>(lp_spans.size()) != n_items)
    throw std::invalid_argument("expected " + std::to_string(n_items) + " output_ids and output_token_logprobs, found " +
                                std::to_string(id_spans.size()) + " and " + std::to_string(lp_spans.size()));
  py::array_t<int64_t> offsets(n_items + 1);
  int64_t* off = offsets.mutable_data();
  off[0] = 0;
  for (int64_t k = 0; k < n_items; ++k) off[k + 1] = off[k] + id_spans[k]->count;
  py::array_t<int32_t> ids(off[n_items]);
  py::array_t<float> lps(off[n_items]);
  py::array_t<int64_t> cut({static_cast<py::ssize_t>(spans.size()), static_cast<py::ssize_t>(2)});
  int32_t* ids_ptr = ids.mutable_data();
  float* lps_ptr = lps.mutable_data();
  int64_t* cut_ptr = cut.mutable_data();
  {
    py::gil_scoped_release release;
    for (int64_t k = 0; k < n_items; ++k) {
      parse_ids(s, *id_spans[k], ids_ptr + off[k]);
      parse_triples(s, *lp_spans[k], ids_ptr + off[k], lps_ptr + off[k], id_spans[k]->count);
    }
    for (size_t k = 0; k < spans.size(); ++k) {
      cut_ptr[2 * k] = spans[k].begin;
      cut_ptr[2 * k + 1] = spans[k].end;
    }
  }
  return py::make_tuple(ids, lps, offsets, cut);
}

}  // namespace

void register_sglang_reply(py::module_& m) {
  m.def("parse_generate_reply", &parse_generate_reply, py::arg("reply"), py::arg("n_items"),
        "Parse every output_ids list and output_token_logprobs triple list of an SGLang /generate reply "
        "(n_items of each) into (ids int32, logprobs float32, offsets int64 [n_items + 1], spans int64 "
        "[lists, 2] of their byte ranges in document order). Raises ValueError on anything but plain "
        "numbers and null in those lists.");
}
