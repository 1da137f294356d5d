// Radix-select histograms for the exact distributed top-k threshold (megafork.forking).
//
// Non-negative IEEE-754 floats order the same way as their bit patterns read as unsigned
// integers, so the k-th largest value can be found from two 2^16-bin histograms: one of the
// high 16 bits, then one of the low 16 bits among values whose high bits equal the chosen bin.
//
// Each histogram is one pass over the data, split across std::threads. Every thread counts
// into a private uint32 histogram (256 KiB, half the size of int64 counts, so it stays in a
// core's L2) and flushes it into the int64 result before it could overflow. The GIL is
// released while counting.
//
// -0.0 (bits 0x80000000) is counted as +0.0 so that `x >= 0` and the bit order agree. Every
// other negative value, inf and NaN lands in a high bin >= 0x7F80, where the caller detects
// it: the histogram doubles as the input check, at no extra pass.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int64_t kBins = 1 << 16;
// Elements one private uint32 histogram may count before it is flushed (no bin can overflow).
constexpr int64_t kFlushEvery = int64_t{1} << 31;
// Below this many elements per thread, starting a thread costs more than it saves.
constexpr int64_t kMinPerThread = int64_t{1} << 18;

inline uint32_t canonical(uint32_t b) { return b == 0x80000000u ? 0u : b; }

// Counts (bits >> shift) & 0xFFFF over [begin, end). Templated so that the mask and the
// high-bits filter cost nothing when absent.
template <bool kHasMask, bool kMatch>
void count_block(const uint32_t* bits, const uint8_t* mask, int64_t begin, int64_t end, int shift,
                 uint32_t match_high, uint32_t* hist) {
  if constexpr (kMatch) {
    // Few values share the chosen high bits, so this branch is rarely taken and predicts well;
    // folding the mask into it avoids a second, unpredictable branch.
    for (int64_t i = begin; i < end; ++i) {
      const uint32_t b = canonical(bits[i]);
      const bool keep = (b >> 16) == match_high && (!kHasMask || mask[i] != 0);
      if (keep) ++hist[b & 0xFFFFu];
    }
  } else {
    // Every element is counted: the mask is added (0 or 1) instead of branched on, since
    // response masks interleave padding and a branch would mispredict.
    for (int64_t i = begin; i < end; ++i) {
      const uint32_t b = canonical(bits[i]);
      hist[(b >> shift) & 0xFFFFu] += kHasMask ? static_cast<uint32_t>(mask[i] != 0) : 1u;
    }
  }
}

void count_range(const uint32_t* bits, const uint8_t* mask, int64_t begin, int64_t end, int shift,
                 int64_t match_high, int64_t* out, std::mutex* out_mutex) {
  std::vector<uint32_t> local(kBins, 0);
  const bool match = match_high >= 0;
  const auto high = static_cast<uint32_t>(match ? match_high : 0);
  for (int64_t lo = begin; lo < end; lo += kFlushEvery) {
    const int64_t hi = std::min(end, lo + kFlushEvery);
    if (mask != nullptr) {
      if (match) count_block<true, true>(bits, mask, lo, hi, shift, high, local.data());
      else count_block<true, false>(bits, mask, lo, hi, shift, high, local.data());
    } else {
      if (match) count_block<false, true>(bits, mask, lo, hi, shift, high, local.data());
      else count_block<false, false>(bits, mask, lo, hi, shift, high, local.data());
    }
    std::lock_guard<std::mutex> lock(*out_mutex);
    for (int64_t j = 0; j < kBins; ++j) out[j] += local[j];
    std::fill(local.begin(), local.end(), 0u);
  }
}

void histogram(const uint32_t* bits, const uint8_t* mask, int64_t n, int shift, int64_t match_high,
               int64_t* out, int num_threads) {
  std::memset(out, 0, sizeof(int64_t) * kBins);
  std::mutex out_mutex;
  const int64_t useful = std::max<int64_t>(1, n / kMinPerThread);
  const int threads = static_cast<int>(std::min<int64_t>(std::max(1, num_threads), useful));
  if (threads == 1) {
    count_range(bits, mask, 0, n, shift, match_high, out, &out_mutex);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads);
  const int64_t chunk = (n + threads - 1) / threads;
  for (int t = 0; t < threads; ++t) {
    const int64_t begin = std::min(n, t * chunk);
    const int64_t end = std::min(n, begin + chunk);
    pool.emplace_back(count_range, bits, mask, begin, end, shift, match_high, out, &out_mutex);
  }
  for (auto& th : pool) th.join();
}

py::array_t<int64_t> radix_histogram(py::array values, py::object mask, int shift, int64_t match_high,
                                     int num_threads) {
  if (shift != 0 && shift != 16) throw std::invalid_argument("shift must be 0 or 16, got " + std::to_string(shift));
  if (match_high >= kBins)
    throw std::invalid_argument("match_high must be < 65536 (or negative for no filter), got " +
                                std::to_string(match_high));
  if (values.ndim() != 1) throw std::invalid_argument("values must be 1-D, got ndim=" + std::to_string(values.ndim()));
  if (values.itemsize() != 4 || values.dtype().kind() != 'f')
    throw std::invalid_argument("values must be float32, got dtype kind '" + std::string(1, values.dtype().kind()) +
                                "' itemsize " + std::to_string(values.itemsize()));
  if (!(values.flags() & py::array::c_style)) throw std::invalid_argument("values must be C-contiguous");
  const int64_t n = values.shape(0);
  const uint8_t* mask_ptr = nullptr;
  py::array mask_arr;
  if (!mask.is_none()) {
    mask_arr = py::array::ensure(mask);
    if (!mask_arr || mask_arr.ndim() != 1 || mask_arr.shape(0) != n || mask_arr.itemsize() != 1 ||
        (mask_arr.dtype().kind() != 'b' && mask_arr.dtype().kind() != 'u'))
      throw std::invalid_argument("mask must be a 1-D bool/uint8 array with the same length as values");
    if (!(mask_arr.flags() & py::array::c_style)) throw std::invalid_argument("mask must be C-contiguous");
    mask_ptr = static_cast<const uint8_t*>(mask_arr.data());
  }
  py::array_t<int64_t> out(kBins);
  const auto* bits = static_cast<const uint32_t*>(values.data());
  int64_t* out_ptr = out.mutable_data();
  {
    py::gil_scoped_release release;
    histogram(bits, mask_ptr, n, shift, match_high, out_ptr, num_threads);
  }
  return out;
}

}  // namespace

void register_sglang_reply(py::module_& m);  // csrc/sglang_reply.cpp

PYBIND11_MODULE(_C, m) {
  m.doc() = "megafork C++ kernels: radix-select histograms over float32 bit patterns; SGLang reply parsing";
  m.attr("NUM_BINS") = kBins;
  m.def("radix_histogram", &radix_histogram, py::arg("values"), py::arg("mask"), py::arg("shift"),
        py::arg("match_high") = -1, py::arg("num_threads") = 1,
        "2^16-bin int64 histogram of (bits >> shift) & 0xFFFF over float32 values where mask is true; "
        "with match_high >= 0 only values whose high 16 bits equal it are counted. -0.0 counts as +0.0.");
  register_sglang_reply(m);
}
