// Paged KV-cache block allocator with prefix caching.
//
// The cache is split into fixed-size blocks of `block_size` token slots. Each live sequence owns a block
// table (block ids in token order). Full blocks whose KV has been computed get a 64-bit hash chained from
// their parent block's hash and their token ids; a hash -> block map lets a new prompt reuse them.
// Freed blocks keep their contents and stay findable until the allocator needs them again: the free list
// is ordered least-recently-freed first, and uncached free blocks are handed out before cached ones.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace nanovllm {

// Raised when an operation needs more free blocks than there are; the caller should have asked first
// (can_allocate / can_append) and preempted.
class OutOfBlocksError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct AllocatorStats {
  int64_t query_tokens = 0;  // prompt tokens looked up in the prefix cache
  int64_t hit_tokens = 0;    // of those, tokens whose KV was found cached
  int64_t evictions = 0;     // cached blocks whose contents were dropped to be reused
};

class BlockAllocator {
 public:
  static constexpr uint64_t kRootHash = 0;

  // hash_bits < 64 keeps only the low bits of every hash: a test hook that forces collisions.
  BlockAllocator(int num_blocks, int block_size, bool enable_prefix_caching = true, int hash_bits = 64);

  // Chained hash of one full block: what the prefix map is keyed by.
  static uint64_t chain_hash(uint64_t parent_hash, const int32_t* tokens, int num_tokens);

  // True if a prompt of these tokens could be allocated now (cache hits counted).
  bool can_allocate(const std::vector<int32_t>& tokens) const;
  // Builds the block table for a new sequence, reusing cached prefix blocks. Returns the number of prompt
  // tokens whose KV is already cached: whole blocks, at most len - 1 (the last token is always computed).
  int allocate(int64_t seq_id, const std::vector<int32_t>& tokens);
  // Declares that the KV of the first `num_tokens` tokens is computed (or scheduled in the current step):
  // the full blocks among them become findable by later prompts.
  void commit(int64_t seq_id, int num_tokens);
  // Growing by one token (the token whose KV the next step computes).
  bool can_append(int64_t seq_id) const;
  void append(int64_t seq_id, int32_t token);
  // Whole-step forms: every sequence grows by one token, or none does.
  bool can_append_all(const std::vector<int64_t>& seq_ids) const;
  void append_all(const std::vector<int64_t>& seq_ids, const std::vector<int32_t>& tokens);
  // Growing by one token whose id is not known yet (a decode step planned while the step that samples it still
  // runs): each sequence's slot is taken now, every sequence or none (as append_all); the id arrives with
  // fill_pending, and a block the token completes is hashed only then. One pending token per sequence at a time.
  void append_pending_all(const std::vector<int64_t>& seq_ids);
  void fill_pending(int64_t seq_id, int32_t token);
  bool has_pending(int64_t seq_id) const { return seq(seq_id).pending; }
  void free(int64_t seq_id);
  // Forgets every cached block (their KV may be stale, e.g. after a step that was committed but never ran).
  // Only while no sequence holds blocks.
  void reset_prefix_cache();

  bool has_sequence(int64_t seq_id) const { return seqs_.count(seq_id) != 0; }
  const std::vector<int32_t>& block_table(int64_t seq_id) const { return seq(seq_id).blocks; }
  int num_tokens(int64_t seq_id) const { return static_cast<int>(seq(seq_id).tokens.size()); }
  int num_sequences() const { return static_cast<int>(seqs_.size()); }

  int num_blocks() const { return static_cast<int>(blocks_.size()); }
  int block_size() const { return block_size_; }
  int num_free_blocks() const { return num_free_; }
  bool prefix_caching() const { return prefix_caching_; }
  int ref_count(int block_id) const { return block(block_id).ref_count; }
  // A cached block is full, computed and findable by its chained hash (block_hash throws for others).
  bool is_cached(int block_id) const { return block(block_id).hashed; }
  uint64_t block_hash(int block_id) const;
  const AllocatorStats& stats() const { return stats_; }
  // Block ids in the order they would be handed out (head first).
  std::vector<int32_t> free_list() const;

 private:
  struct Block {
    int ref_count = 0;
    bool hashed = false;      // full, computed, and entered in the prefix map
    uint64_t hash = 0;
    int parent = -1;          // previous block of the chain it was hashed in
    uint64_t parent_generation = 0;
    uint64_t generation = 0;  // bumped whenever the block is handed out for new contents
    int prev_free = -1, next_free = -1;
  };
  struct Sequence {
    std::vector<int32_t> tokens;
    std::vector<int32_t> blocks;
    int num_hashed_blocks = 0;
    bool pending = false;  // the last token's id is not known yet
  };

  const Block& block(int block_id) const;
  Sequence& seq(int64_t seq_id);
  const Sequence& seq(int64_t seq_id) const;
  uint64_t hash_of(uint64_t parent_hash, const int32_t* tokens) const;
  std::vector<int32_t> match_prefix(const std::vector<int32_t>& tokens) const;
  bool fits(const std::vector<int32_t>& hits, size_t num_tokens) const;
  // Cached blocks with this hash and tokens whose parent (id and generation) is one of `parents`.
  std::vector<int> find_cached(uint64_t hash, const std::vector<int>& parents, const int32_t* tokens) const;
  int blocks_for(size_t num_tokens) const { return static_cast<int>((num_tokens + block_size_ - 1) / block_size_); }
  void check_tokens(const int32_t* tokens, size_t n) const;
  void register_block(Sequence& s, int index);
  // One more token slot at the end of s (a new block when the last is full), holding `token`.
  void grow(int64_t seq_id, Sequence& s, int32_t token);
  void register_if_full(Sequence& s);
  int take_free_block();
  void unlink_free(int block_id);
  void push_free(int block_id, bool at_head);

  int block_size_;
  bool prefix_caching_;
  uint64_t hash_mask_;
  std::vector<Block> blocks_;
  std::vector<int32_t> block_tokens_;  // num_blocks * block_size: contents of hashed blocks, for hit checks
  int free_head_ = -1, free_tail_ = -1, num_free_ = 0;
  // A multimap: identical blocks computed by two sequences at once are both cached, and each stays findable
  // until it is itself evicted; colliding hashes of different contents also share a key.
  std::unordered_multimap<uint64_t, int> prefix_map_;
  std::unordered_map<int64_t, Sequence> seqs_;
  AllocatorStats stats_;
};

}  // namespace nanovllm
