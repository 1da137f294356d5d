// Radix-select histograms for the exact distributed top-k threshold (megafork.forking).
//
// Non-negative IEEE-754 floats order the same way as their bit patterns read as unsigned
// integers, so the k-th largest value can be found from two 2^16-bin histograms: one of the
// high 16 bits, then one of the low 16 bits among values whose high bits equal the chosen bin.
// Each histogram is one pass over the data, split across threads, each with a private
// histogram that is summed at the end. The GIL is released while counting.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int64_t kBins = 1 << 16;

// Counts bins of the values' bit patterns. `shift` picks the 16 bits (16: high, 0: low);
// when `match_high` >= 0 only values whose high 16 bits equal it are counted.
void count_range(const uint32_t* bits, const uint8_t* mask, int64_t begin, int64_t end, int shift,
                 int64_t match_high, int64_t* hist) {
  for (int64_t i = begin; i < end; ++i) {
    if (mask != nullptr && mask[i] == 0) continue;
    const uint32_t b = bits[i];
    if (match_high >= 0 && static_cast<int64_t>(b >> 16) != match_high) continue;
    ++hist[(b >> shift) & 0xFFFF];
  }
}

void histogram(const uint32_t* bits, const uint8_t* mask, int64_t n, int shift, int64_t match_high,
               int64_t* out, int num_threads) {
  std::memset(out, 0, sizeof(int64_t) * kBins);
  // Below ~256k values a thread costs more than it saves.
  const int64_t max_useful = std::max<int64_t>(1, n / (1 << 18));
  const int threads = static_cast<int>(std::min<int64_t>(std::max(1, num_threads), max_useful));
  if (threads == 1) {
    count_range(bits, mask, 0, n, shift, match_high, out);
    return;
  }
  std::vector<std::vector<int64_t>> local(threads, std::vector<int64_t>(kBins, 0));
  std::vector<std::thread> pool;
  const int64_t chunk = (n + threads - 1) / threads;
  for (int t = 0; t < threads; ++t) {
    const int64_t begin = std::min(n, t * chunk);
    const int64_t end = std::min(n, begin + chunk);
    pool.emplace_back(count_range, bits, mask, begin, end, shift, match_high, local[t].data());
  }
  for (auto& th : pool) th.join();
  for (int t = 0; t < threads; ++t) {
    const int64_t* h = local[t].data();
    for (int64_t j = 0; j < kBins; ++j) out[j] += h[j];
  }
}

py::array_t<int64_t> radix_histogram(py::array values, py::object mask, int shift, int64_t match_high,
                                     int num_threads) {
  if (shift != 0 && shift != 16) throw std::invalid_argument("shift must be 0 or 16, got " + std::to_string(shift));
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
    if (!mask_arr || mask_arr.ndim() != 1 || mask_arr.shape(0) != n || mask_arr.itemsize() != 1)
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

PYBIND11_MODULE(_C, m) {
  m.doc() = "megafork C++ kernels: radix-select histograms over float32 bit patterns";
  m.attr("NUM_BINS") = kBins;
  m.def("radix_histogram", &radix_histogram, py::arg("values"), py::arg("mask"), py::arg("shift"),
        py::arg("match_high") = -1, py::arg("num_threads") = 1,
        "2^16-bin histogram of (bits >> shift) & 0xFFFF over float32 values where mask is true; "
        "with match_high >= 0 only values whose high 16 bits equal it are counted.");
}
