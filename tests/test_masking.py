import pytest
import torch
from torch.utils.data import DataLoader

from bert_mlm.masking import IGNORE, MaskingCollator

PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103
SPECIAL = [PAD, UNK, CLS, SEP, MASK]
VOCAB = 1000


def make_collator(special_token_ids=SPECIAL, **kwargs) -> MaskingCollator:
    return MaskingCollator(
        mask_token_id=MASK, pad_token_id=PAD, special_token_ids=special_token_ids, vocab_size=VOCAB, **kwargs
    )


def make_examples(lengths, seed=0, unk_every=0) -> list[dict]:
    """[CLS] body [SEP] with body tokens outside the special ids; `unk_every` > 0 puts
    [UNK] at every that-many body positions, so specials also sit among normal tokens."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        body = torch.randint(MASK + 1, VOCAB, (n,), generator=g)
        if unk_every:
            body[::unk_every] = UNK
        examples.append({"input_ids": [CLS, *body.tolist(), SEP]})
    return examples


def originals(collator, examples) -> torch.Tensor:
    return collator.pad(examples)[0]


def maskable(ids: torch.Tensor) -> torch.Tensor:
    return ~torch.isin(ids, torch.tensor(SPECIAL))


@pytest.mark.parametrize("p", [0.15, 0.4])
def test_chosen_rate_matches_mlm_probability(p):
    examples = make_examples([100] * 2000)  # 200k maskable tokens
    collator = make_collator(mlm_probability=p)
    labels = collator(examples)["labels"]
    rate = (labels != IGNORE).sum().item() / maskable(originals(collator, examples)).sum().item()
    assert rate == pytest.approx(p, abs=0.005)  # ~5 standard deviations


# Padding is never chosen even when the pad id is not listed among the special ids.
@pytest.mark.parametrize("special", [SPECIAL, [UNK, CLS, SEP, MASK]])
@pytest.mark.parametrize("p", [0.5, 1.0])
def test_special_tokens_and_padding_are_never_chosen(p, special):
    examples = make_examples([3, 17, 40, 9] * 50, unk_every=4)
    collator = make_collator(special, mlm_probability=p)
    batch = collator(examples)
    ids = originals(collator, examples)
    chosen = batch["labels"] != IGNORE
    assert not chosen[~maskable(ids)].any()
    assert (batch["input_ids"][~maskable(ids)] == ids[~maskable(ids)]).all()  # specials and pads kept
    assert (batch["input_ids"][batch["attention_mask"] == 0] == PAD).all()
    if p == 1.0:
        assert chosen.equal(maskable(ids))


def replacement_shares(**kwargs) -> tuple[float, float, float]:
    """Among chosen tokens: shares that became [MASK], another token, or stayed."""
    examples = make_examples([100] * 2000)
    collator = make_collator(**kwargs)
    batch = collator(examples)
    ids = originals(collator, examples)
    chosen = batch["labels"] != IGNORE
    new, old = batch["input_ids"][chosen], ids[chosen]
    n = chosen.sum().item()
    masked = (new == MASK).sum().item() / n
    unchanged = (new == old).sum().item() / n
    return masked, 1 - masked - unchanged, unchanged


def test_80_10_10_split():
    # A random token equals the original (or [MASK]) with probability 1/VOCAB: 1e-4, far below tolerance.
    assert replacement_shares() == pytest.approx((0.8, 0.1, 0.1), abs=0.01)


def test_custom_split_is_honoured():
    shares = replacement_shares(mlm_probability=0.3, mask_prob=0.5, random_prob=0.3)
    assert shares == pytest.approx((0.5, 0.3, 0.2), abs=0.01)


def test_labels_hold_originals_only_at_chosen_positions():
    examples = make_examples([30, 50, 12, 64] * 20, unk_every=7)
    collator = make_collator()
    batch = collator(examples)
    ids = originals(collator, examples)
    chosen = batch["labels"] != IGNORE
    assert chosen.any() and (batch["input_ids"][chosen] != ids[chosen]).any()
    assert batch["labels"].equal(torch.where(chosen, ids, IGNORE))
    assert batch["input_ids"][~chosen].equal(ids[~chosen])
    # The positions the model's head predicts, found here rather than on the GPU.
    assert batch["masked_positions"].equal(chosen.flatten().nonzero().squeeze(1))


@pytest.mark.parametrize("lengths, width", [([5, 13, 9], 16), ([14], 16), ([15], 24), ([1, 2], 8)])
def test_padding_to_multiple_of_8(lengths, width):
    examples = make_examples(lengths)  # each example is 2 tokens longer: [CLS] and [SEP]
    batch = make_collator()(examples)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (len(lengths), width)
    for row, ex in zip(batch["attention_mask"], examples):
        n = len(ex["input_ids"])
        assert row[:n].eq(1).all() and row[n:].eq(0).all()
    assert batch["num_tokens"] == sum(n + 2 for n in lengths)  # counted on the host


def epochs(loader, n=2) -> list[list[dict]]:
    return [list(loader) for _ in range(n)]


def same_masks(a: list[dict], b: list[dict]) -> bool:
    return all(x["input_ids"].equal(y["input_ids"]) and x["labels"].equal(y["labels"]) for x, y in zip(a, b))


def test_new_masks_every_epoch():
    loader = DataLoader(make_examples([40] * 16), batch_size=4, collate_fn=make_collator(), shuffle=False)
    first, second = epochs(loader)
    assert all(x["attention_mask"].equal(y["attention_mask"]) for x, y in zip(first, second))
    assert not same_masks(first, second)


def test_new_masks_every_epoch_and_worker():
    examples = make_examples([40] * 8)
    # Batch 0 goes to worker 0 and batch 1, with the same tokens, to worker 1.
    loader = DataLoader(examples * 2, batch_size=8, collate_fn=make_collator(), shuffle=False, num_workers=2)
    first, second = epochs(loader)
    assert not same_masks(first, second)
    for batches in (first, second):
        assert not same_masks(batches[:1], batches[1:])


def test_same_seed_same_masks():
    examples = make_examples([20, 35, 7, 50])
    a, b, c = make_collator(seed=7)(examples), make_collator(seed=7)(examples), make_collator(seed=8)(examples)
    assert same_masks([a], [b])
    assert not same_masks([a], [c])


def test_same_torch_seed_same_masks_with_workers():
    examples = make_examples([40] * 16)

    def run():
        torch.manual_seed(1234)  # the DataLoader draws its workers' base seed from torch's RNG
        loader = DataLoader(examples, batch_size=4, collate_fn=make_collator(), shuffle=False, num_workers=2)
        return epochs(loader)

    first, second = run()
    again_first, again_second = run()
    assert same_masks(first, again_first) and same_masks(second, again_second)
    assert not same_masks(first, second)


def test_fixed_masks_repeat_for_the_same_batch():
    a, b = make_examples([60] * 4, seed=1), make_examples([60] * 4, seed=2)
    collator = make_collator(fixed_masks=True)
    first = collator(a)
    collator(b)
    assert same_masks([first], [collator(a)])
    assert same_masks([first], [make_collator(fixed_masks=True)(a)])
    assert not same_masks([first], [make_collator(fixed_masks=True, seed=1)(a)])
    # Same shape and same maskable positions, yet a different choice of positions.
    assert not collator(a)["labels"].ne(IGNORE).equal(collator(b)["labels"].ne(IGNORE))


def test_whole_word_masking_takes_all_pieces_of_a_word():
    # Ids 2000-2999 stand for "##" pieces that continue the word before them.
    g = torch.Generator().manual_seed(0)
    words, examples = [], []
    for _ in range(400):
        ids, spans = [101], []
        while len(ids) < 100:
            n = int(torch.randint(1, 4, (1,), generator=g))
            spans.append((len(ids), len(ids) + n))
            ids += [int(torch.randint(1000, 2000, (1,), generator=g))]
            ids += torch.randint(2000, 3000, (n - 1,), generator=g).tolist()
        examples.append({"input_ids": ids + [102]})
        words.append(spans)
    # [MASK] is id 4999, outside the random tokens' range [0, 4999): kinds are unambiguous.
    collator = MaskingCollator(4999, 0, [0, 100, 101, 102, 4999], 4999, mlm_probability=0.2, seed=3,
                               continuation_ids=range(2000, 3000))
    batch = collator(examples)
    original = collator.pad(examples)[0]
    chosen = batch["labels"] != -100
    kinds = torch.where(batch["input_ids"] == 4999, 0, torch.where(batch["input_ids"] == original, 2, 1))
    whole = partial = 0
    for row, spans in enumerate(words):
        for start, end in spans:
            picked = chosen[row, start:end]
            assert picked.all() or not picked.any(), "a word was split"
            if picked.all():
                whole += 1
                # The 80/10/10 decision is per word too ([MASK] for all pieces, or none).
                assert (kinds[row, start:end] == 0).all() or not (kinds[row, start:end] == 0).any()
            partial += 1
    assert abs(whole / partial - 0.2) < 0.01  # the rate counts words
    assert not chosen[:, 0].any()  # [CLS] never
