"""A step's device inputs, staged in one pinned host buffer and sent to the device with one copy.

Each field is a region of max_rows rows (block_tables rows are max_blocks_per_seq wide). The host side is a set
of numpy views that the allocator and the runner fill; the device side is a set of tensor views at fixed
addresses, which the captured CUDA graphs read. The sampling fields come first, so a prefill sends just them;
a decode sends everything up to the block-table rows it uses.
"""

import numpy as np
import torch

# (name, dtype, one element per row or a block-table row), in buffer order.
FIELDS = (("temperatures", torch.float32, False), ("keys", torch.int64, False), ("top_ks", torch.int64, False),
          ("top_ps", torch.float32, False), ("input_ids", torch.int64, False), ("input_rows", torch.int64, False),
          ("positions", torch.int64, False),
          ("slots", torch.int64, False), ("context_lens", torch.int32, False), ("block_tables", torch.int32, True))
ALIGN = 16


class StepBuffers:
    def __init__(self, max_rows: int, max_blocks: int, device: torch.device):
        self.max_rows, self.max_blocks = max_rows, max_blocks
        regions, end = [], 0  # (name, dtype, shape, byte offset)
        for name, dtype, table in FIELDS:
            shape = (max_rows, max_blocks) if table else (max_rows,)
            regions.append((name, dtype, shape, end))
            end += -(-int(np.prod(shape)) * dtype.itemsize // ALIGN) * ALIGN
        offsets = {name: start for name, _, _, start in regions}
        self.sampling_bytes = offsets["input_ids"]
        self._block_tables_offset = offsets["block_tables"]
        self.host = torch.zeros(end, dtype=torch.uint8, pin_memory=device.type == "cuda")
        self.device_bytes = torch.zeros(end, dtype=torch.uint8, device=device)
        self.h: dict[str, np.ndarray] = {}
        self.d: dict[str, torch.Tensor] = {}
        for name, dtype, shape, start in regions:
            size = int(np.prod(shape)) * dtype.itemsize
            self.h[name] = self.host[start:start + size].view(dtype).view(shape).numpy()
            self.d[name] = self.device_bytes[start:start + size].view(dtype).view(shape)

    def decode_bytes(self, rows: int) -> int:
        """Bytes to send for a decode step of `rows` rows: every field, block tables up to that row."""
        return self._block_tables_offset + rows * self.max_blocks * 4

    def send(self, nbytes: int) -> None:
        """Copies the first nbytes to the device, behind the work already queued on the current stream. The host
        side must not be rewritten until that copy is done (the runner waits for each step's tokens first)."""
        self.device_bytes[:nbytes].copy_(self.host[:nbytes], non_blocking=True)

    def load(self, staged: np.ndarray) -> None:
        """A tensor-parallel worker: take the driver's staged bytes as this rank's own."""
        self.host.numpy()[:len(staged)] = staged
