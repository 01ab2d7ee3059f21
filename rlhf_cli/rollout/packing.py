"""Packing (query, response) pairs of any lengths into padded model inputs.

Every per-token tensor the PPO math sees is *response-aligned*: shape [B, T] with T the longest
response, row i holding response i's tokens left-aligned and a mask marking real tokens. The
packing below makes that a plain column slice of the model output:

* decoder-only: ``input_ids = [left-padded query | right-padded response]`` of width Lq + T, with
  explicit position ids counted from each sample's first real token, so a sample gets the same
  logits whatever its neighbours' lengths and whatever the tokenizer's padding side. The logit
  for response token t comes from input position Lq - 1 + t, i.e. the last T + 1 positions
  minus the final one, which lets the model skip the LM head over the query (``logits_to_keep``).
* encoder-decoder: the query goes to the encoder (right-padded; positions are relative), and
  the decoder reads ``[decoder_start, r_0, ..., r_{T-2}]``, so decoder position t predicts r_t.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class PackedBatch:
    """Model inputs for B (query, response) pairs plus the response-aligned targets.

    Shapes: decoder-only ``input_ids``/``attention_mask``/``position_ids`` [B, Lq + T];
    encoder-decoder ``input_ids``/``attention_mask`` [B, Lq] and ``decoder_input_ids``/
    ``decoder_attention_mask`` [B, T]; ``response_ids`` and ``response_mask`` [B, T].
    ``query_lengths``/``response_lengths`` are host-side lists so trimming needs no device sync.
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    query_lengths: list[int]
    response_lengths: list[int]
    is_encoder_decoder: bool
    position_ids: Optional[Tensor] = None
    decoder_input_ids: Optional[Tensor] = None
    decoder_attention_mask: Optional[Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.response_ids.shape[0]

    @property
    def response_width(self) -> int:
        return self.response_ids.shape[1]

    def model_inputs(self) -> dict[str, Tensor]:
        """Keyword arguments for the model's forward."""
        if self.is_encoder_decoder:
            return {
                "input_ids": self.input_ids,
                "attention_mask": self.attention_mask,
                "decoder_input_ids": self.decoder_input_ids,
                "decoder_attention_mask": self.decoder_attention_mask,
            }
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}

    def to(self, device: torch.device) -> "PackedBatch":
        """This batch on ``device`` (itself when already there): a batch packed on the host reaches a
        model on a GPU with its token ids and every index derived from them on the model's device."""
        if self.input_ids.device == device:
            return self
        fields = ("input_ids", "attention_mask", "response_ids", "response_mask", "position_ids",
                  "decoder_input_ids", "decoder_attention_mask")
        return replace(self, **{name: getattr(self, name).to(device) for name in fields if getattr(self, name) is not None})

    def select(self, indices: Sequence[int] | Tensor) -> "PackedBatch":
        """Rows ``indices``, trimmed to the longest query and response among them.

        Trimming changes no number (positions are explicit, padding is masked) but saves the
        compute spent on columns that are padding for every selected row.
        """
        index_list = [int(i) for i in (indices.tolist() if isinstance(indices, Tensor) else indices)]
        index = torch.tensor(index_list, dtype=torch.long, device=self.response_ids.device)
        query_lengths = [self.query_lengths[i] for i in index_list]
        response_lengths = [self.response_lengths[i] for i in index_list]
        keep_t = max(response_lengths)
        keep_q = max(query_lengths)
        rows = {
            "response_ids": self.response_ids[index, :keep_t],
            "response_mask": self.response_mask[index, :keep_t],
            "query_lengths": query_lengths,
            "response_lengths": response_lengths,
        }
        if self.is_encoder_decoder:
            rows.update(
                input_ids=self.input_ids[index, :keep_q],
                attention_mask=self.attention_mask[index, :keep_q],
                decoder_input_ids=self.decoder_input_ids[index, :keep_t],
                decoder_attention_mask=self.decoder_attention_mask[index, :keep_t],
            )
        else:
            width_q = self.input_ids.shape[1] - self.response_width
            columns = slice(width_q - keep_q, width_q + keep_t)
            rows.update(
                input_ids=self.input_ids[index, columns],
                attention_mask=self.attention_mask[index, columns],
                position_ids=self.position_ids[index, columns],
            )
        return replace(self, **rows)


def _stack_padded(seqs: Sequence[Tensor], width: int, pad_id: int, left: bool) -> tuple[Tensor, Tensor]:
    """Pad 1-D sequences to ``width`` on one side: (ids [B, width], mask [B, width])."""
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        n = seq.shape[0]
        if n == 0:
            continue
        cols = slice(width - n, width) if left else slice(0, n)
        ids[row, cols] = seq.to(torch.long).cpu()
        mask[row, cols] = 1
    return ids, mask


def pack_batch(
    queries: Sequence[Tensor],
    responses: Sequence[Tensor],
    *,
    pad_token_id: int,
    is_encoder_decoder: bool,
    decoder_start_token_id: Optional[int] = None,
    response_masks: Optional[Sequence[Tensor]] = None,
    device: torch.device | str = "cpu",
) -> PackedBatch:
    """Pack 1-D query and response token tensors into a :class:`PackedBatch` on ``device``.

    ``response_masks`` (optional, one 1-D tensor per response, same length) marks which response
    tokens count for the loss (e.g. tool output excluded); it is multiplied into the padding mask.
    """
    query_lengths = [int(q.shape[0]) for q in queries]
    response_lengths = [int(r.shape[0]) for r in responses]
    width_q, width_t = max(query_lengths), max(response_lengths)

    response_ids, response_pad_mask = _stack_padded(responses, width_t, pad_token_id, left=False)
    response_mask = response_pad_mask.to(torch.float32)
    if response_masks is not None:
        user_mask, _ = _stack_padded(response_masks, width_t, 0, left=False)
        response_mask = response_mask * user_mask.to(torch.float32)

    if is_encoder_decoder:
        tensors = _encoder_decoder_inputs(queries, width_q, pad_token_id, decoder_start_token_id, response_ids, response_pad_mask)
    else:
        query_ids, query_mask = _stack_padded(queries, width_q, pad_token_id, left=True)
        input_ids = torch.cat([query_ids, response_ids], dim=1)
        attention_mask = torch.cat([query_mask, response_pad_mask], dim=1)
        # Positions count from each sample's first real token: left padding must not shift them.
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        tensors = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    tensors.update(response_ids=response_ids, response_mask=response_mask)
    tensors = {name: t.to(device) for name, t in tensors.items()}
    return PackedBatch(
        query_lengths=query_lengths,
        response_lengths=response_lengths,
        is_encoder_decoder=is_encoder_decoder,
        **tensors,
    )


def _encoder_decoder_inputs(
    queries: Sequence[Tensor],
    width_q: int,
    pad_token_id: int,
    decoder_start_token_id: Optional[int],
    response_ids: Tensor,
    response_pad_mask: Tensor,
) -> dict[str, Tensor]:
    """Encoder inputs (right-padded queries) and decoder inputs ``[decoder_start, r_0, ..., r_{T-2}]``."""
    if decoder_start_token_id is None:
        raise ValueError("An encoder-decoder model needs decoder_start_token_id (set it in the model config).")
    input_ids, attention_mask = _stack_padded(queries, width_q, pad_token_id, left=False)
    start = torch.full((response_ids.shape[0], 1), decoder_start_token_id, dtype=torch.long)
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        decoder_input_ids=torch.cat([start, response_ids[:, :-1]], dim=1),
        decoder_attention_mask=torch.cat([torch.ones_like(start), response_pad_mask[:, :-1]], dim=1),
    )


def real_token_index(response_lengths: Sequence[int], device: torch.device) -> tuple[Tensor, Tensor]:
    """(row, column) of every real response token of a response-aligned [B, T] tensor, row-major:
    two [N] index tensors. Built on the host from the lengths, so finding them needs no device sync."""
    lengths = torch.tensor(list(response_lengths), dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    cols = torch.arange(int(lengths.sum())) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    return rows.to(device), cols.to(device)


def cat_to_width(chunks: Sequence[Tensor], width: int) -> Tensor:
    """Row chunks of response-aligned tensors [b_i, T_i(, V)], each trimmed to its own longest
    response, zero-padded back to ``width`` columns and concatenated: -> [Σ b_i, width(, V)]."""
    padded = []
    for t in chunks:
        pad = (0, 0, 0, width - t.shape[1]) if t.dim() == 3 else (0, width - t.shape[1])
        padded.append(torch.nn.functional.pad(t, pad))
    return torch.cat(padded, dim=0)
