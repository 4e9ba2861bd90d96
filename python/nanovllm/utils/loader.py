"""Load a Hugging Face safetensors checkpoint (one file or sharded) into the engine's fused layers."""

import glob
import os

import torch
from safetensors import safe_open
from torch import nn

from nanovllm.layers.parallel import check_shape


class CheckpointTensor:
    """A checkpoint tensor read lazily: its shape, and only the slice a rank asks for (narrow / indexing; [:] reads
    it all), so a tensor-parallel rank never holds more than its shard of a tensor in memory."""

    def __init__(self, safetensors_slice):
        self._slice = safetensors_slice
        self.shape = torch.Size(safetensors_slice.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self._slice[(slice(None),) * dim + (slice(start, start + length),)]

    def __getitem__(self, index) -> torch.Tensor:
        return self._slice[index]


def default_weight_loader(param: nn.Parameter, loaded: CheckpointTensor | torch.Tensor) -> None:
    check_shape(param.shape, loaded)
    param.data.copy_(loaded[:])


def _ignored(name: str, model: nn.Module) -> bool:
    # Rotary frequencies are recomputed; a tied model may still ship a copy of the embedding as lm_head.
    return name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and model.tie_word_embeddings)


def load_model(model: nn.Module, path: str) -> None:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"model folder {path!r} has no *.safetensors weights")
    params = dict(model.named_parameters())
    mapping = getattr(model, "packed_modules_mapping", {})
    loaded_params = set()
    for file in files:
        with safe_open(file, "pt", "cpu") as f:
            for name in f.keys():
                if _ignored(name, model):
                    continue
                target, shard = name, None
                for ckpt_part, (fused_part, shard_id) in mapping.items():
                    if f".{ckpt_part}." in name:
                        target, shard = name.replace(ckpt_part, fused_part), shard_id
                        break
                param = params.get(target)
                if param is None:
                    raise ValueError(f"{file}: tensor {name!r} matches no parameter of {type(model).__name__}")
                loader = getattr(param, "weight_loader", default_weight_loader)
                try:
                    if shard is None:
                        loader(param, CheckpointTensor(f.get_slice(name)))
                    else:
                        loader(param, CheckpointTensor(f.get_slice(name)), shard)
                except ValueError as e:
                    raise ValueError(f"{file}: tensor {name!r}: {e}") from None
                loaded_params.add((target, shard))
    expected = set()
    for pname in params:
        shards = [sid for fused, sid in mapping.values() if f".{fused}." in pname]
        expected.update((pname, sid) for sid in shards or [None])
    missing = sorted(f"{n}[{s}]" if s is not None else n for n, s in expected - loaded_params)
    if missing:
        raise ValueError(f"{path}: checkpoint lacks weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
