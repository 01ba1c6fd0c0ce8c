"""Sampling: exact resume, rank sharding with exactly-once epochs, mixture weights, held-out order."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from upcycle.data import DataConfig, HeldoutBatches, MixtureSampler, TrainBatches, prepare_data
from upcycle.data.synthetic import synthetic_documents, train_byte_level_bpe
from upcycle.errors import UpcycleError

SEQ_LEN = 16


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    tokenizer = train_byte_level_bpe(synthetic_documents(100, seed=11), 300, root / "tok")
    domains = {}
    for name, count, weight in (("code", 5, 1.0), ("math", 30, 2.0)):
        path = root / f"{name}.jsonl"
        documents = synthetic_documents(count, seed=len(name) + count, mean_words=40)
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
        domains[name] = {"paths": [str(path)], "weight": weight}
    config = DataConfig(domains=domains, tokenizer=tokenizer, heldout={"fraction": 0.2})
    return prepare_data(config, root / "out", quiet=True)


def take(batches, count: int) -> list:
    return [next(batches) for _ in range(count)]


def assert_batches_equal(first, second) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.input_ids_BS, b.input_ids_BS)
        assert torch.equal(a.labels_BS, b.labels_BS)
        assert torch.equal(a.domain_ids_B, b.domain_ids_B)


def test_resume_after_40_batches_matches_an_uninterrupted_run(manifest):
    seq_len = 48  # the code domain then has ~12 windows: the resumed 8 batches cross its epochs
    uninterrupted = take(TrainBatches(manifest, seq_len, 8), 48)
    interrupted = TrainBatches(manifest, seq_len, 8)
    take(interrupted, 40)
    state = json.loads(json.dumps(interrupted.state_dict()))  # what a checkpoint would hold
    assert len(json.dumps(state)) < 400
    resumed = TrainBatches(manifest, seq_len, 8)
    resumed.load_state_dict(state)
    epochs_at_40 = resumed.sampler.epochs_completed()
    assert_batches_equal(take(resumed, 8), uninterrupted[40:])
    assert resumed.sampler.epochs_completed()["code"] > epochs_at_40["code"]


def test_batches_are_inputs_and_labels_of_consecutive_windows(manifest):
    batch = next(TrainBatches(manifest, SEQ_LEN, 4))
    assert batch.input_ids_BS.shape == batch.labels_BS.shape == (4, SEQ_LEN)
    assert batch.input_ids_BS.dtype == torch.int64
    assert torch.equal(batch.input_ids_BS[:, 1:], batch.labels_BS[:, :-1])
    batches = TrainBatches(manifest, SEQ_LEN, 4)
    domain_index, window_index = TrainBatches(manifest, SEQ_LEN, 4).sampler.next_picks()
    batch = next(batches)
    for row, (d, w) in enumerate(zip(domain_index, window_index, strict=True)):
        stream = manifest.token_stream(batches.domains[d], "train")
        window = stream.read(w * SEQ_LEN, w * SEQ_LEN + SEQ_LEN + 1).astype(np.int64)
        assert batch.input_ids_BS[row].tolist() == window[:-1].tolist()
        assert batch.labels_BS[row].tolist() == window[1:].tolist()


def test_two_ranks_split_each_global_batch_of_one_rank(manifest):
    single = take(TrainBatches(manifest, SEQ_LEN, 6), 20)
    ranks = [take(TrainBatches(manifest, SEQ_LEN, 6, rank=r, world_size=2), 20) for r in range(2)]
    for step, whole in enumerate(single):
        halves = [ranks[r][step] for r in range(2)]
        assert all(h.input_ids_BS.shape[0] == 3 for h in halves)
        assert torch.equal(torch.cat([h.input_ids_BS for h in halves]), whole.input_ids_BS)
        assert torch.equal(torch.cat([h.domain_ids_B for h in halves]), whole.domain_ids_B)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_window_once_per_epoch_across_ranks(world_size):
    windows = {"a": 17, "b": 40}
    samplers = [
        MixtureSampler(
            windows, {"a": 1.0, "b": 1.0}, global_batch_size=6, seed=4, rank=r, world_size=world_size
        )
        for r in range(world_size)
    ]
    picks: dict[str, list[int]] = {"a": [], "b": []}
    for _ in range(60):
        for sampler in samplers:
            domain_index, window_index = sampler.next_picks()
            for d, w in zip(domain_index, window_index, strict=True):
                picks[sampler.domains[d]].append(int(w))
    for domain, count in windows.items():
        seen = picks[domain]
        epochs = len(seen) // count
        assert epochs >= 2
        for epoch in range(epochs):
            assert sorted(seen[epoch * count : (epoch + 1) * count]) == list(range(count))
        assert seen[:count] != seen[count : 2 * count]  # each epoch is shuffled anew


def test_mixture_follows_weights_within_a_binomial_bound_and_per_seed():
    windows = {"a": 50, "b": 70, "c": 30}
    weights = {"a": 1.0, "b": 3.0, "c": 0.0}

    def domain_counts(seed: int) -> tuple[np.ndarray, np.ndarray]:
        sampler = MixtureSampler(windows, weights, global_batch_size=8, seed=seed)
        picks = np.concatenate([sampler.next_picks()[0] for _ in range(500)])
        return np.bincount(picks, minlength=3), picks

    counts, picks = domain_counts(seed=0)
    draws, p_b = counts.sum(), 0.75
    sigma = np.sqrt(draws * p_b * (1 - p_b))
    assert abs(counts[1] - draws * p_b) < 5 * sigma  # 5σ: fails with probability ~6e-7 per seed
    assert counts[2] == 0
    assert np.array_equal(domain_counts(seed=0)[1], picks)
    assert not np.array_equal(domain_counts(seed=1)[1], picks)


def test_resume_with_another_world_size_continues_the_same_stream():
    windows, weights = {"a": 23, "b": 9}, {"a": 2.0, "b": 1.0}
    reference = MixtureSampler(windows, weights, global_batch_size=4, seed=3)
    expected = [reference.next_picks() for _ in range(30)]
    first = MixtureSampler(windows, weights, global_batch_size=4, seed=3)
    for _ in range(10):
        first.next_picks()
    resumed = [
        MixtureSampler(windows, weights, global_batch_size=8, seed=3, rank=r, world_size=2) for r in (0, 1)
    ]
    for sampler in resumed:
        sampler.load_state_dict(first.state_dict())
    for step in range(10):
        parts = [sampler.next_picks() for sampler in resumed]
        for column in (0, 1):
            combined = np.concatenate([part[column] for part in parts])
            wanted = np.concatenate([expected[10 + 2 * step][column], expected[11 + 2 * step][column]])
            assert np.array_equal(combined, wanted)


def test_resume_refuses_a_state_from_another_stream(manifest):
    batches = TrainBatches(manifest, SEQ_LEN, 4)
    next(batches)
    state = batches.state_dict()
    with pytest.raises(UpcycleError, match="weights"):
        TrainBatches(manifest, SEQ_LEN, 4, weights={"code": 1.0}).load_state_dict(state)
    with pytest.raises(UpcycleError, match="seed"):
        TrainBatches(manifest, SEQ_LEN, 4, seed=99).load_state_dict(state)
    with pytest.raises(UpcycleError, match="seq_len"):
        TrainBatches(manifest, SEQ_LEN * 2, 4).load_state_dict(state)


def test_heldout_batches_are_identical_on_every_pass_and_across_ranks(manifest):
    evaluation = HeldoutBatches(manifest, "math", SEQ_LEN, batch_size=5)
    first, second = list(evaluation), list(evaluation)
    assert_batches_equal(first, second)
    stream = manifest.token_stream("math", "heldout")
    expected = stream.read(0, evaluation.num_sequences * SEQ_LEN + 1).astype(np.int64)
    inputs = torch.cat([b.input_ids_BS for b in first]).reshape(-1)
    assert inputs.tolist() == expected[:-1].tolist()  # file order, no token skipped
    assert evaluation.num_sequences == (stream.num_tokens - 1) // SEQ_LEN
    assert evaluation.num_predicted_tokens == evaluation.num_sequences * SEQ_LEN
    assert all(len(b.input_ids_BS) == 5 for b in first[:-1])
    assert (torch.cat([b.domain_ids_B for b in first]) == sorted(manifest.domains).index("math")).all()
    shares = [HeldoutBatches(manifest, "math", SEQ_LEN, 5, rank=r, world_size=3) for r in range(3)]
    joined = torch.cat([b.input_ids_BS for share in shares for b in share])
    assert torch.equal(joined, torch.cat([b.input_ids_BS for b in first]))
    capped = HeldoutBatches(manifest, "math", SEQ_LEN, 5, max_sequences=7)
    assert torch.equal(torch.cat([b.input_ids_BS for b in capped]), joined[:7])


def test_training_refuses_a_domain_too_short_for_one_sequence(manifest):
    too_long = manifest.domains["code"].train.tokens
    with pytest.raises(UpcycleError, match="lower seq_len"):
        TrainBatches(manifest, too_long, 2)
    TrainBatches(manifest, too_long, 2, weights={"math": 1.0})  # weight 0: not needed, accepted
    with pytest.raises(UpcycleError, match="unknown domains"):
        TrainBatches(manifest, SEQ_LEN, 2, weights={"poetry": 1.0})
    with pytest.raises(UpcycleError, match="multiple of the world size"):
        TrainBatches(manifest, SEQ_LEN, 5, world_size=2)
    with pytest.raises(UpcycleError, match="held-out tokens"):
        HeldoutBatches(manifest, "code", manifest.domains["code"].heldout.tokens, 2)
