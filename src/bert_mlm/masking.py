"""Dynamic masking: every batch gets fresh masks as it is drawn (BERT's 80/10/10 rule)."""

from collections.abc import Sequence

import zlib

import torch
from torch.utils.data import get_worker_info

IGNORE = -100  # label of positions that are not predicted (PyTorch's cross-entropy default)


def masked_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (M,) flat indices of the predicted positions."""
    return (labels.flatten() != IGNORE).nonzero().squeeze(1)


class MaskingCollator:
    """Pads a list of examples into a batch and masks it.

    Of the tokens that are neither special nor padding, `mlm_probability` are chosen;
    of those, `mask_prob` become `[MASK]`, `random_prob` a random token and the rest
    stay. Labels hold the original token at chosen positions and IGNORE elsewhere.

    Where the masks come from:
    - training on a prepared corpus: each example brings a `mask_seed` (order.WithMaskSeeds:
      from the seed, the epoch and the example), so its masks are the same whatever batch,
      worker or process it lands in, and new each epoch;
    - a stream (no example indices): the collator's own generator, seeded with `seed` in
      the main process and with the DataLoader's per-worker seed in workers;
    - validation (`fixed_masks`): a batch's masks depend only on `seed` and the batch's
      tokens, so every validation pass scores the same masks.
    """

    def __init__(
        self,
        mask_token_id: int,
        pad_token_id: int,
        special_token_ids: Sequence[int],
        vocab_size: int,
        mlm_probability: float = 0.15,
        mask_prob: float = 0.8,
        random_prob: float = 0.1,
        pad_to_multiple_of: int = 8,
        seed: int = 0,
        fixed_masks: bool = False,
        continuation_ids: Sequence[int] | None = None,
    ):
        self.mask_token_id = mask_token_id
        self.pad_token_id = pad_token_id
        self.special_token_ids = torch.tensor(sorted(set(special_token_ids)))
        self.vocab_size = vocab_size
        self.mlm_probability = mlm_probability
        self.mask_prob = mask_prob
        self.random_prob = random_prob
        self.pad_to_multiple_of = pad_to_multiple_of
        self.seed = seed
        self.fixed_masks = fixed_masks
        # Whole-word masking when given: ids of the pieces that continue a word ("##ing").
        self.continuation_ids = None if continuation_ids is None else torch.tensor(sorted(continuation_ids))
        self.generator = torch.Generator()
        self.row_generator = torch.Generator()  # for rows that bring their own seed
        self._seeded_with: int | None = None

    def _rng(self, input_ids: torch.Tensor) -> torch.Generator:
        if self.fixed_masks:
            return self.generator.manual_seed(zlib.crc32(input_ids.numpy().tobytes(), self.seed & 0xFFFFFFFF))
        worker = get_worker_info()
        # A worker's seed is drawn when it starts (once a run with persistent workers: its
        # generator then runs on across epochs); mixing in `seed` keeps ranks (seed + rank) apart.
        seed = self.seed if worker is None else (worker.seed * 0x9E3779B97F4A7C15 + self.seed) % 2**64
        if seed != self._seeded_with:
            self.generator.manual_seed(seed)
            self._seeded_with = seed
        return self.generator

    def pad(self, examples: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both (B, T), T = longest example rounded up to
        `pad_to_multiple_of` (tensor cores like multiples of 8)."""
        rows = [torch.as_tensor(e["input_ids"], dtype=torch.long) for e in examples]
        longest = max(len(r) for r in rows)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = row
            attention_mask[i, : len(row)] = 1
        return input_ids, attention_mask

    def _draws(self, shape: torch.Size, rng: torch.Generator) -> tuple[torch.Tensor, ...]:
        """A uniform draw that chooses, one that decides what a chosen token becomes, and
        a random token, each of `shape`."""
        return (
            torch.rand(shape, generator=rng),
            torch.rand(shape, generator=rng),
            torch.randint(self.vocab_size, shape, generator=rng),
        )

    def mask(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, seeds: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (masked input_ids, labels), both (B, T); `input_ids` is left unchanged.
        With `seeds`, row i's masks come from seeds[i] alone: the same example gets the same
        masks whatever batch, worker or process it lands in."""
        if seeds is None:
            choose, action, random_tokens = self._draws(input_ids.shape, self._rng(input_ids))
        else:
            rows = [self._draws(input_ids.shape[1:], self.row_generator.manual_seed(s)) for s in seeds]
            choose, action, random_tokens = (torch.stack(draws) for draws in zip(*rows))
        maskable = attention_mask.bool() & ~torch.isin(input_ids, self.special_token_ids)
        if self.continuation_ids is not None:
            # Each piece takes the draws of its word's first piece: a word is chosen, and
            # becomes [MASK] / random / unchanged, as a whole.
            starts = ~torch.isin(input_ids, self.continuation_ids)
            positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
            first_piece = torch.where(starts, positions, 0).cummax(1).values  # (B, T)
            choose, action = choose.gather(1, first_piece), action.gather(1, first_piece)
        chosen = (choose < self.mlm_probability) & maskable
        labels = torch.where(chosen, input_ids, IGNORE)
        # The second draw decides what a chosen token becomes: [0, mask) -> [MASK],
        # [mask, mask + random) -> random token, the rest -> unchanged.
        to_mask = chosen & (action < self.mask_prob)
        to_random = chosen & (action >= self.mask_prob) & (action < self.mask_prob + self.random_prob)
        masked = torch.where(to_mask, self.mask_token_id, input_ids)
        masked = torch.where(to_random, random_tokens, masked)
        return masked, labels

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor | int]:
        input_ids, attention_mask = self.pad(examples)
        seeds = [e["mask_seed"] for e in examples] if "mask_seed" in examples[0] else None
        masked, labels = self.mask(input_ids, attention_mask, seeds)
        # Found here, in the DataLoader's workers, and pinned with the rest: found on a GPU
        # (boolean indexing, a sum, transformers' check for an all-ones mask) they would make the
        # host wait for it every step.
        return {"input_ids": masked, "attention_mask": attention_mask, "labels": labels,
                "masked_positions": masked_positions(labels), "num_tokens": int(attention_mask.sum())}
