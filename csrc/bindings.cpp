// The Python module nanovllm_cpp._C: the block allocator (pybind11). The ops register themselves with the
// torch dispatcher when this library is loaded (csrc/torch_bindings.cpp).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "block_allocator.h"

namespace py = pybind11;
using nanovllm::BlockAllocator;

namespace {

// Writes each sequence's block table into a row of `out` (int32 [n, width]), padding with `pad`.
void fill_block_tables(const BlockAllocator& a, const std::vector<int64_t>& seq_ids, py::array_t<int32_t> out, int32_t pad) {
  auto view = out.mutable_unchecked<2>();
  if (view.shape(0) < static_cast<py::ssize_t>(seq_ids.size()))
    throw std::invalid_argument("fill_block_tables: out has " + std::to_string(view.shape(0)) + " rows for " +
                                std::to_string(seq_ids.size()) + " sequences");
  for (size_t i = 0; i < seq_ids.size(); ++i) {
    const auto& table = a.block_table(seq_ids[i]);
    if (static_cast<py::ssize_t>(table.size()) > view.shape(1))
      throw std::invalid_argument("fill_block_tables: sequence " + std::to_string(seq_ids[i]) + " has " +
                                  std::to_string(table.size()) + " blocks, out has " + std::to_string(view.shape(1)) + " columns");
    py::ssize_t j = 0;
    for (; j < static_cast<py::ssize_t>(table.size()); ++j) view(i, j) = table[j];
    for (; j < view.shape(1); ++j) view(i, j) = pad;
  }
}

// Cache slots of token positions [start, end) of one sequence, appended to `out` from index `offset`.
void fill_slots(const BlockAllocator& a, int64_t seq_id, int start, int end, py::array_t<int64_t> out, int64_t offset) {
  auto view = out.mutable_unchecked<1>();
  const auto& table = a.block_table(seq_id);
  const int bs = a.block_size();
  if (start < 0 || end < start || end > static_cast<int>(table.size()) * bs)
    throw std::invalid_argument("fill_slots: positions [" + std::to_string(start) + ", " + std::to_string(end) +
                                ") are outside sequence " + std::to_string(seq_id) + "'s blocks");
  if (offset < 0 || offset + (end - start) > view.shape(0)) throw std::invalid_argument("fill_slots: out is too short");
  for (int p = start; p < end; ++p) view(offset + p - start) = static_cast<int64_t>(table[p / bs]) * bs + p % bs;
}

// Per-sequence decode inputs for the token at position len - 1: its position, its cache slot and the
// context length, written into the first len(seq_ids) entries of each array.
void fill_decode_inputs(const BlockAllocator& a, const std::vector<int64_t>& seq_ids, py::array_t<int64_t> positions,
                        py::array_t<int64_t> slots, py::array_t<int32_t> context_lens) {
  auto pos = positions.mutable_unchecked<1>();
  auto slot = slots.mutable_unchecked<1>();
  auto lens = context_lens.mutable_unchecked<1>();
  const auto n = static_cast<py::ssize_t>(seq_ids.size());
  if (pos.shape(0) < n || slot.shape(0) < n || lens.shape(0) < n)
    throw std::invalid_argument("fill_decode_inputs: output arrays are shorter than the batch");
  const int bs = a.block_size();
  for (py::ssize_t i = 0; i < n; ++i) {
    const int len = a.num_tokens(seq_ids[i]);
    const auto& table = a.block_table(seq_ids[i]);
    pos(i) = len - 1;
    slot(i) = static_cast<int64_t>(table[(len - 1) / bs]) * bs + (len - 1) % bs;
    lens(i) = len;
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "nanovllm_cpp native core: block allocator; CUDA ops registered under torch.ops.nanovllm_cpp";
  m.attr("CUDA_ENABLED") = py::bool_(NANOVLLM_WITH_CUDA);

  py::register_exception<nanovllm::OutOfBlocksError>(m, "OutOfBlocksError", PyExc_RuntimeError);

  py::class_<nanovllm::AllocatorStats>(m, "AllocatorStats")
      .def_readonly("query_tokens", &nanovllm::AllocatorStats::query_tokens)
      .def_readonly("hit_tokens", &nanovllm::AllocatorStats::hit_tokens)
      .def_readonly("evictions", &nanovllm::AllocatorStats::evictions);

  py::class_<BlockAllocator>(m, "BlockAllocator")
      .def(py::init<int, int, bool, int>(), py::arg("num_blocks"), py::arg("block_size"),
           py::arg("enable_prefix_caching") = true, py::arg("hash_bits") = 64)
      .def_static("chain_hash",
                  [](uint64_t parent, const std::vector<int32_t>& tokens) {
                    return BlockAllocator::chain_hash(parent, tokens.data(), static_cast<int>(tokens.size()));
                  },
                  py::arg("parent_hash"), py::arg("tokens"))
      .def_readonly_static("ROOT_HASH", &BlockAllocator::kRootHash)
      .def("can_allocate", &BlockAllocator::can_allocate, py::arg("tokens"))
      .def("allocate", &BlockAllocator::allocate, py::arg("seq_id"), py::arg("tokens"))
      .def("commit", &BlockAllocator::commit, py::arg("seq_id"), py::arg("num_tokens"))
      .def("can_append", &BlockAllocator::can_append, py::arg("seq_id"))
      .def("append", &BlockAllocator::append, py::arg("seq_id"), py::arg("token"))
      .def("can_append_all", &BlockAllocator::can_append_all, py::arg("seq_ids"))
      .def("append_all", &BlockAllocator::append_all, py::arg("seq_ids"), py::arg("tokens"))
      .def("append_pending_all", &BlockAllocator::append_pending_all, py::arg("seq_ids"))
      .def("fill_pending", &BlockAllocator::fill_pending, py::arg("seq_id"), py::arg("token"))
      .def("has_pending", &BlockAllocator::has_pending, py::arg("seq_id"))
      .def("free", &BlockAllocator::free, py::arg("seq_id"))
      .def("reset_prefix_cache", &BlockAllocator::reset_prefix_cache)
      .def("has_sequence", &BlockAllocator::has_sequence, py::arg("seq_id"))
      .def("block_table", &BlockAllocator::block_table, py::arg("seq_id"))
      .def("num_tokens", &BlockAllocator::num_tokens, py::arg("seq_id"))
      .def("ref_count", &BlockAllocator::ref_count, py::arg("block_id"))
      .def("is_cached", &BlockAllocator::is_cached, py::arg("block_id"))
      .def("block_hash", &BlockAllocator::block_hash, py::arg("block_id"))
      .def("free_list", &BlockAllocator::free_list)
      // Output arrays are bound with noconvert(): a converted temporary would swallow the writes.
      .def("fill_block_tables", &fill_block_tables, py::arg("seq_ids"), py::arg("out").noconvert(), py::arg("pad") = -1)
      .def("fill_slots", &fill_slots, py::arg("seq_id"), py::arg("start"), py::arg("end"), py::arg("out").noconvert(),
           py::arg("offset") = 0)
      .def("fill_decode_inputs", &fill_decode_inputs, py::arg("seq_ids"), py::arg("positions").noconvert(),
           py::arg("slots").noconvert(), py::arg("context_lens").noconvert())
      .def_property_readonly("num_sequences", &BlockAllocator::num_sequences)
      .def_property_readonly("num_blocks", &BlockAllocator::num_blocks)
      .def_property_readonly("block_size", &BlockAllocator::block_size)
      .def_property_readonly("num_free_blocks", &BlockAllocator::num_free_blocks)
      .def_property_readonly("prefix_caching", &BlockAllocator::prefix_caching)
      .def_property_readonly("stats", &BlockAllocator::stats, py::return_value_policy::copy);
}
