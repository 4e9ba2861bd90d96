"""A step's device inputs, staged in one pinned host buffer and sent to the device with one copy.

Each field is a region of max_rows rows (block_tables rows are max_blocks_per_seq wide). The host side is a set
of numpy views that the allocator and the runner fill; the device side is a set of tensor views at fixed
addresses, which the captured CUDA graphs read. The first region, `sampled`, lives on the device only: the
sampler writes each step's tokens there and nothing is ever sent over it. Right behind it come the input ids,
so sampled and staged ids form one gather table (token_pool); then the sampling fields, so a prefill sends just
those; a decode sends everything up to the block-table rows it uses.
"""

import numpy as np
import torch

from nanovllm_cpp import ops

# (name, dtype, one element per row or a block-table row), in buffer order.
FIELDS = (("sampled", torch.int64, False), ("input_ids", torch.int64, False),
          ("temperatures", torch.float32, False), ("keys", torch.int64, False), ("top_ks", torch.int64, False),
          ("top_ps", torch.float32, False), ("input_rows", torch.int64, False), ("positions", torch.int64, False),
          ("slots", torch.int64, False), ("context_lens", torch.int32, False), ("block_tables", torch.int32, True))
ALIGN = 16  # copy_pinned moves 16-byte packs


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class StepBuffers:
    def __init__(self, max_rows: int, max_blocks: int, device: torch.device):
        self.max_rows, self.max_blocks = max_rows, max_blocks
        regions, end = [], 0  # (name, dtype, shape, byte offset)
        for name, dtype, table in FIELDS:
            shape = (max_rows, max_blocks) if table else (max_rows,)
            regions.append((name, dtype, shape, end))
            end += _aligned(int(np.prod(shape)) * dtype.itemsize)
        offsets = {name: start for name, _, _, start in regions}
        self._sent_from = self._sampled_bytes = offsets["input_ids"]
        self.sampling_bytes = offsets["input_rows"]
        self._block_tables_offset = offsets["block_tables"]
        self.host = torch.zeros(end, dtype=torch.uint8, pin_memory=device.type == "cuda")
        self.device_bytes = torch.zeros(end, dtype=torch.uint8, device=device)
        self.h: dict[str, np.ndarray] = {}
        self.d: dict[str, torch.Tensor] = {}
        for name, dtype, shape, start in regions:
            size = int(np.prod(shape)) * dtype.itemsize
            self.h[name] = self.host[start:start + size].view(dtype).view(shape).numpy()
            self.d[name] = self.device_bytes[start:start + size].view(dtype).view(shape)
        # Row r of token_pool: sampled[r] below staged_row0, staged input_ids[r - staged_row0] from there on.
        self._staged_row0 = self._sent_from // 8
        self.token_pool = self.device_bytes[:offsets["temperatures"]].view(torch.int64)

    def staged_rows(self, rows: int) -> np.ndarray:
        """The token_pool rows of the first `rows` staged input ids."""
        return np.arange(self._staged_row0, self._staged_row0 + rows)

    def decode_bytes(self, rows: int) -> int:
        """Bytes to send for a decode step of `rows` rows: every field, block tables up to that row."""
        return _aligned(self._block_tables_offset + rows * self.max_blocks * 4)

    def send(self, nbytes: int) -> None:
        """Copies the staged fields below byte nbytes to the device, behind the work already queued on the current
        stream. The host side must not be rewritten until that copy is done (the runner waits for each step's
        tokens first)."""
        sent = slice(self._sent_from, nbytes)
        ops.copy_pinned(self.device_bytes[sent], self.host[sent], nbytes - self._sent_from)

    def new_token_buffer(self) -> torch.Tensor:
        """A host buffer for fetch_sampled (pinned with the step buffers): view it as int64 to read the tokens."""
        return torch.zeros(self._sampled_bytes, dtype=torch.uint8, pin_memory=self.host.is_pinned())

    def fetch_sampled(self, host: torch.Tensor, rows: int) -> None:
        """Copies the first rows sampled tokens into host (from new_token_buffer), behind the work already queued on
        the current stream."""
        nbytes = _aligned(rows * 8)
        ops.copy_pinned(host[:nbytes], self.device_bytes[:nbytes], nbytes)

    def load(self, staged: np.ndarray) -> None:
        """A tensor-parallel worker: take the driver's staged bytes as this rank's own."""
        self.host.numpy()[:len(staged)] = staged
