"""causal_lm on a character corpus (byte-level vocabulary of 256), with a decoder built from a
transformers config (random init) or a pretrained one from a local path."""

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from service.spec.task import CharCorpusData, PretrainedModel, TransformerModel
from workers.tasks.base import Batch, sharded_epochs
from workers.tasks.corpus import generate_corpus

VOCAB = 256


def build_decoder(spec: TransformerModel, vocab: int, seq_len: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    max_pos = spec.max_position or seq_len
    attn: dict[str, Any] = {"attn_implementation": spec.attn_implementation}  # a PretrainedConfig kwarg
    if spec.name == "llama":
        cfg: Any = LlamaConfig(vocab_size=vocab, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                          num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads or spec.heads,
                          intermediate_size=spec.intermediate or int(8 * spec.hidden / 3 // 64 + 1) * 64,
                          max_position_embeddings=max_pos, tie_word_embeddings=False, **attn)
        model: nn.Module = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=vocab, n_embd=spec.hidden, n_layer=spec.layers, n_head=spec.heads,
                         n_inner=spec.intermediate, n_positions=max_pos, **attn)
        model = GPT2LMHeadModel(cfg)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable()  # type: ignore[operator]
    return model


class CharLMTask:
    kind = "causal_lm"

    def __init__(self, data: CharCorpusData, model: TransformerModel | PretrainedModel) -> None:
        self.model_spec = model
        self.seq_len = data.seq_len
        self.tokens_per_sample = data.seq_len
        text = Path(data.path).read_text(encoding="utf-8") if data.path else generate_corpus()
        ids = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
        if len(ids) < 4 * (self.seq_len + 1):
            raise ValueError(f"task.dataset: corpus of {len(ids)} bytes is too short for seq_len {self.seq_len}")
        n_val = max(int(len(ids) * data.val_fraction), self.seq_len + 1)
        self.train_ids, self.val_ids = ids[:-n_val], ids[-n_val:]

    def build_model(self) -> nn.Module:
        if isinstance(self.model_spec, PretrainedModel):
            from workers.tasks.pretrained import load_causal_lm

            return load_causal_lm(self.model_spec)
        return build_decoder(self.model_spec, VOCAB, self.seq_len)

    def _windows(self, ids: torch.Tensor) -> int:
        return (len(ids) - 1) // self.seq_len

    def _window(self, ids: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        offsets = idx[:, None] * self.seq_len + torch.arange(self.seq_len + 1)[None, :]
        return ids[offsets]

    def batches(self, *, rank: int, world: int, batch_size: int, seed: int,
                label_flip: bool = False) -> Iterator[Batch]:
        windows = self._windows(self.train_ids)
        for idx in sharded_epochs(windows, rank=rank, world=world, seed=seed, batch_size=batch_size):
            for start in range(0, len(idx) - batch_size + 1, batch_size):
                yield (self._window(self.train_ids, idx[start:start + batch_size]),)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        (seq,) = batch
        logits = model(input_ids=seq[:, :-1]).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), seq[:, 1:].reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, max_batches: int) -> dict[str, float]:
        was_training = model.training
        model.eval()
        n = self._windows(self.val_ids)
        idx = torch.arange(n)
        losses = []
        for b in range(min(max_batches, math.ceil(n / 16))):
            seq = self._window(self.val_ids, idx[b * 16:(b + 1) * 16]).to(device)
            losses.append(float(self.loss(model, (seq,))))
        model.train(was_training)
        loss = sum(losses) / len(losses)
        return {"eval/loss": loss, "eval/bits_per_char": loss / math.log(2)}
