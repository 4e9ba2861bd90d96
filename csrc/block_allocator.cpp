#include "block_allocator.h"

#include <algorithm>
#include <cstring>

namespace nanovllm {
namespace {

// splitmix64's finalizer: a cheap full-avalanche 64-bit mix.
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

std::string seq_name(int64_t seq_id) { return "sequence " + std::to_string(seq_id); }

}  // namespace

BlockAllocator::BlockAllocator(int num_blocks, int block_size, bool enable_prefix_caching, int hash_bits)
    : block_size_(block_size), prefix_caching_(enable_prefix_caching) {
  if (num_blocks < 1) throw std::invalid_argument("num_blocks must be >= 1, got " + std::to_string(num_blocks));
  if (block_size < 8 || (block_size & (block_size - 1)) != 0)
    throw std::invalid_argument("block_size must be a power of two >= 8, got " + std::to_string(block_size));
  if (hash_bits < 0 || hash_bits > 64)
    throw std::invalid_argument("hash_bits must be in [0, 64], got " + std::to_string(hash_bits));
  hash_mask_ = hash_bits == 64 ? ~0ULL : ((1ULL << hash_bits) - 1);
  blocks_.resize(num_blocks);
  block_tokens_.resize(static_cast<size_t>(num_blocks) * block_size);
  for (int b = 0; b < num_blocks; ++b) push_free(b, /*at_head=*/false);
}

uint64_t BlockAllocator::chain_hash(uint64_t parent_hash, const int32_t* tokens, int num_tokens) {
  uint64_t h = mix64(parent_hash ^ 0x9e3779b97f4a7c15ULL);
  for (int i = 0; i < num_tokens; ++i) h = mix64(h ^ static_cast<uint32_t>(tokens[i])) + 0x9e3779b97f4a7c15ULL;
  return h;
}

uint64_t BlockAllocator::hash_of(uint64_t parent_hash, const int32_t* tokens) const {
  return chain_hash(parent_hash, tokens, block_size_) & hash_mask_;
}

const BlockAllocator::Block& BlockAllocator::block(int block_id) const {
  if (block_id < 0 || block_id >= num_blocks())
    throw std::out_of_range("block id " + std::to_string(block_id) + " is out of range [0, " +
                            std::to_string(num_blocks()) + ")");
  return blocks_[block_id];
}

BlockAllocator::Sequence& BlockAllocator::seq(int64_t seq_id) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw std::invalid_argument(seq_name(seq_id) + " has no blocks (never allocated, or freed already)");
  return it->second;
}

const BlockAllocator::Sequence& BlockAllocator::seq(int64_t seq_id) const {
  return const_cast<BlockAllocator*>(this)->seq(seq_id);
}

uint64_t BlockAllocator::block_hash(int block_id) const {
  const Block& b = block(block_id);
  if (!b.hashed) throw std::invalid_argument("block " + std::to_string(block_id) + " is not cached");
  return b.hash;
}

std::vector<int32_t> BlockAllocator::free_list() const {
  std::vector<int32_t> out;
  out.reserve(num_free_);
  for (int b = free_head_; b != -1; b = blocks_[b].next_free) out.push_back(b);
  return out;
}

void BlockAllocator::check_tokens(const int32_t* tokens, size_t n) const {
  for (size_t i = 0; i < n; ++i)
    if (tokens[i] < 0) throw std::invalid_argument("token id " + std::to_string(tokens[i]) + " at position " +
                                                   std::to_string(i) + " is negative");
}

std::vector<int> BlockAllocator::find_cached(uint64_t hash, const std::vector<int>& parents, const int32_t* tokens) const {
  std::vector<int> found;
  auto [first, last] = prefix_map_.equal_range(hash);
  for (auto it = first; it != last; ++it) {
    const int b = it->second;
    const Block& blk = blocks_[b];
    const bool known_parent = std::any_of(parents.begin(), parents.end(), [&](int p) {
      return blk.parent == p && (p == -1 || blk.parent_generation == blocks_[p].generation);
    });
    if (known_parent && std::memcmp(block_tokens_.data() + static_cast<size_t>(b) * block_size_, tokens,
                                    sizeof(int32_t) * block_size_) == 0)
      found.push_back(b);
  }
  return found;
}

// Longest chain of cached blocks equal to the prompt's leading full blocks, stopping before the block that
// holds the last prompt token. Every hit is confirmed against the stored token ids and against the identity
// (id and generation) of a block already confirmed for the previous position, so a hash collision never
// reuses foreign KV. Identical copies of a block (two sequences computed it at once) are all valid parents.
std::vector<int32_t> BlockAllocator::match_prefix(const std::vector<int32_t>& tokens) const {
  std::vector<int32_t> hits;
  if (!prefix_caching_ || tokens.empty()) return hits;
  const size_t max_blocks = (tokens.size() - 1) / block_size_;
  uint64_t parent_hash = kRootHash;
  std::vector<int> parents{-1};
  for (size_t i = 0; i < max_blocks; ++i) {
    const int32_t* chunk = tokens.data() + i * block_size_;
    const uint64_t h = hash_of(parent_hash, chunk);
    parents = find_cached(h, parents, chunk);
    if (parents.empty()) break;
    hits.push_back(parents.front());
    parent_hash = h;
  }
  return hits;
}

bool BlockAllocator::fits(const std::vector<int32_t>& hits, size_t num_tokens) const {
  int revived = 0;  // hits that sit on the free list stop being free once taken
  for (int b : hits) revived += blocks_[b].ref_count == 0;
  return blocks_for(num_tokens) - static_cast<int>(hits.size()) <= num_free_ - revived;
}

bool BlockAllocator::can_allocate(const std::vector<int32_t>& tokens) const {
  return fits(match_prefix(tokens), tokens.size());
}

int BlockAllocator::allocate(int64_t seq_id, const std::vector<int32_t>& tokens) {
  if (seqs_.count(seq_id)) throw std::invalid_argument(seq_name(seq_id) + " is already allocated");
  if (tokens.empty()) throw std::invalid_argument(seq_name(seq_id) + ": cannot allocate an empty prompt");
  check_tokens(tokens.data(), tokens.size());
  const int needed = blocks_for(tokens.size());
  if (needed > num_blocks())
    throw OutOfBlocksError(seq_name(seq_id) + " needs " + std::to_string(needed) + " blocks of " +
                           std::to_string(block_size_) + " tokens but the cache has only " +
                           std::to_string(num_blocks()));
  const std::vector<int32_t> hits = match_prefix(tokens);
  if (!fits(hits, tokens.size()))
    throw OutOfBlocksError(seq_name(seq_id) + " needs " + std::to_string(needed - hits.size()) +
                           " new blocks but only " + std::to_string(num_free_) + " are free");
  Sequence s;
  s.tokens = tokens;
  s.blocks.reserve(needed);
  for (int b : hits) {
    if (blocks_[b].ref_count++ == 0) unlink_free(b);
    s.blocks.push_back(b);
  }
  while (static_cast<int>(s.blocks.size()) < needed) s.blocks.push_back(take_free_block());
  s.num_hashed_blocks = static_cast<int>(hits.size());

  const int cached = static_cast<int>(hits.size()) * block_size_;
  if (prefix_caching_) {
    stats_.query_tokens += static_cast<int64_t>(tokens.size());
    stats_.hit_tokens += cached;
  }
  seqs_.emplace(seq_id, std::move(s));
  return cached;
}

void BlockAllocator::register_block(Sequence& s, int index) {
  const int b = s.blocks[index];
  Block& blk = blocks_[b];
  const int parent = index == 0 ? -1 : s.blocks[index - 1];
  const uint64_t parent_hash = parent == -1 ? kRootHash : blocks_[parent].hash;
  const int32_t* chunk = s.tokens.data() + static_cast<size_t>(index) * block_size_;
  blk.hash = hash_of(parent_hash, chunk);
  blk.parent = parent;
  blk.parent_generation = parent == -1 ? 0 : blocks_[parent].generation;
  blk.hashed = true;
  std::memcpy(block_tokens_.data() + static_cast<size_t>(b) * block_size_, chunk, sizeof(int32_t) * block_size_);
  prefix_map_.emplace(blk.hash, b);
  s.num_hashed_blocks = index + 1;
}

void BlockAllocator::commit(int64_t seq_id, int num_tokens) {
  Sequence& s = seq(seq_id);
  const int known = static_cast<int>(s.tokens.size()) - s.pending;
  if (num_tokens < 0 || num_tokens > known)
    throw std::invalid_argument(seq_name(seq_id) + ": cannot commit " + std::to_string(num_tokens) + " of " +
                                std::to_string(known) + " known tokens");
  if (!prefix_caching_) return;
  while ((s.num_hashed_blocks + 1) * block_size_ <= num_tokens) register_block(s, s.num_hashed_blocks);
}

bool BlockAllocator::can_append(int64_t seq_id) const {
  return seq(seq_id).tokens.size() % block_size_ != 0 || num_free_ > 0;
}

void BlockAllocator::grow(int64_t seq_id, Sequence& s, int32_t token) {
  if (s.pending) throw std::invalid_argument(seq_name(seq_id) + " already has a pending token");
  if (s.tokens.size() % block_size_ == 0) {
    if (num_free_ == 0) throw OutOfBlocksError(seq_name(seq_id) + " needs a new block but none is free");
    s.blocks.push_back(take_free_block());
  }
  s.tokens.push_back(token);
}

void BlockAllocator::register_if_full(Sequence& s) {
  const int full_blocks = static_cast<int>(s.tokens.size() / block_size_);
  if (prefix_caching_ && s.num_hashed_blocks == full_blocks - 1) register_block(s, full_blocks - 1);
}

void BlockAllocator::append(int64_t seq_id, int32_t token) {
  Sequence& s = seq(seq_id);
  check_tokens(&token, 1);
  grow(seq_id, s, token);
  register_if_full(s);
}

bool BlockAllocator::can_append_all(const std::vector<int64_t>& seq_ids) const {
  int needed = 0;
  for (int64_t id : seq_ids) needed += seq(id).tokens.size() % block_size_ == 0;
  return needed <= num_free_;
}

void BlockAllocator::append_all(const std::vector<int64_t>& seq_ids, const std::vector<int32_t>& tokens) {
  if (seq_ids.size() != tokens.size())
    throw std::invalid_argument("append_all: " + std::to_string(seq_ids.size()) + " sequences but " +
                                std::to_string(tokens.size()) + " tokens");
  check_tokens(tokens.data(), tokens.size());
  if (!can_append_all(seq_ids))
    throw OutOfBlocksError("append_all: not enough free blocks for " + std::to_string(seq_ids.size()) + " sequences");
  for (size_t i = 0; i < seq_ids.size(); ++i) append(seq_ids[i], tokens[i]);
}

void BlockAllocator::append_pending_all(const std::vector<int64_t>& seq_ids) {
  for (int64_t id : seq_ids)
    if (seq(id).pending) throw std::invalid_argument(seq_name(id) + " already has a pending token");
  if (!can_append_all(seq_ids))
    throw OutOfBlocksError("append_pending_all: not enough free blocks for " + std::to_string(seq_ids.size()) +
                           " sequences");
  for (int64_t id : seq_ids) {
    Sequence& s = seq(id);
    grow(id, s, 0);  // a placeholder: no block holding it is hashed before fill_pending
    s.pending = true;
  }
}

void BlockAllocator::fill_pending(int64_t seq_id, int32_t token) {
  Sequence& s = seq(seq_id);
  if (!s.pending) throw std::invalid_argument(seq_name(seq_id) + " has no pending token");
  check_tokens(&token, 1);
  s.tokens.back() = token;
  s.pending = false;
  register_if_full(s);
}

void BlockAllocator::free(int64_t seq_id) {
  Sequence& s = seq(seq_id);
  // Tail first: a prefix's head blocks are the most shareable, so they should be the last evicted.
  for (auto it = s.blocks.rbegin(); it != s.blocks.rend(); ++it) {
    Block& blk = blocks_[*it];
    if (--blk.ref_count == 0) push_free(*it, /*at_head=*/!blk.hashed);
  }
  seqs_.erase(seq_id);
}

void BlockAllocator::reset_prefix_cache() {
  if (!seqs_.empty())
    throw std::invalid_argument("reset_prefix_cache: " + std::to_string(seqs_.size()) +
                                " sequences still hold blocks; free them first");
  for (Block& blk : blocks_) blk.hashed = false;
  prefix_map_.clear();
}

int BlockAllocator::take_free_block() {
  const int b = free_head_;
  unlink_free(b);
  Block& blk = blocks_[b];
  if (blk.hashed) {
    auto [first, last] = prefix_map_.equal_range(blk.hash);
    for (auto it = first; it != last; ++it)
      if (it->second == b) {
        prefix_map_.erase(it);
        break;
      }
    blk.hashed = false;
    ++stats_.evictions;
  }
  ++blk.generation;
  blk.parent = -1;
  blk.ref_count = 1;
  return b;
}

void BlockAllocator::unlink_free(int b) {
  Block& blk = blocks_[b];
  (blk.prev_free == -1 ? free_head_ : blocks_[blk.prev_free].next_free) = blk.next_free;
  (blk.next_free == -1 ? free_tail_ : blocks_[blk.next_free].prev_free) = blk.prev_free;
  blk.prev_free = blk.next_free = -1;
  --num_free_;
}

void BlockAllocator::push_free(int b, bool at_head) {
  Block& blk = blocks_[b];
  if (at_head) {
    blk.prev_free = -1;
    blk.next_free = free_head_;
    (free_head_ == -1 ? free_tail_ : blocks_[free_head_].prev_free) = b;
    free_head_ = b;
  } else {
    blk.next_free = -1;
    blk.prev_free = free_tail_;
    (free_tail_ == -1 ? free_head_ : blocks_[free_tail_].next_free) = b;
    free_tail_ = b;
  }
  ++num_free_;
}

}  // namespace nanovllm
