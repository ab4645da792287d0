"""TaskSampler (scripts.training.sampling): proportional vs task-balanced draws, epoch length, ranks."""

from __future__ import annotations

from collections import Counter

import pytest

from scripts.training.sampling import TaskSampler, task_weights

# MOTS's training set sizes per task (paper, Table 2)
SIZES = {"liver": 104, "kidney": 168, "hepatic_vessel": 242, "pancreas": 224, "colon": 100, "lung": 50, "spleen": 32}
ITEMS = [{"task": t} for t, n in SIZES.items() for _ in range(n)]


def _task_counts(sampler: TaskSampler, epochs: int) -> Counter:
    counts: Counter = Counter()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        counts.update(ITEMS[i]["task"] for i in sampler)
    return counts


def test_proportional_is_plain_shuffling():
    sampler = TaskSampler(ITEMS)
    assert len(sampler) == len(ITEMS) == 920
    sampler.set_epoch(0)
    first = list(sampler)
    assert sorted(first) == list(range(920))  # a permutation: every item once per epoch
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert _task_counts(sampler, 3) == Counter({t: 3 * n for t, n in SIZES.items()})


def test_task_balanced_draws_every_task_equally_often():
    sampler = TaskSampler(ITEMS, sampling="task_balanced", num_samples=7000)
    counts = _task_counts(sampler, 2)
    assert sum(counts.values()) == 14000
    for task in SIZES:  # 2000 expected each, binomial std about 41
        assert abs(counts[task] - 2000) < 200, counts
    assert task_weights([i["task"] for i in ITEMS]).sum().item() == pytest.approx(1.0)


def test_iterations_per_epoch_fixes_the_epoch_length():
    sampler = TaskSampler(ITEMS, num_samples=10)
    assert len(list(sampler)) == len(sampler) == 10
    long = TaskSampler(ITEMS[:5], num_samples=12)
    drawn = list(long)
    assert len(drawn) == 12 and Counter(drawn[:5]) == Counter(range(5))  # passes are whole permutations


@pytest.mark.parametrize("sampling", ["proportional", "task_balanced"])
def test_ranks_split_one_global_sequence(sampling):
    ranks = [TaskSampler(ITEMS, sampling=sampling, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(5)
    drawn = [list(s) for s in ranks]
    assert len(drawn[0]) == len(drawn[1]) == 460
    if sampling == "proportional":
        assert sorted(drawn[0] + drawn[1]) == list(range(920))  # disjoint halves of one permutation
    single = TaskSampler(ITEMS, sampling=sampling, num_samples=920, seed=3)
    single.set_epoch(5)
    merged = [i for pair in zip(*drawn) for i in pair]
    assert merged == list(single)


def test_bad_arguments():
    with pytest.raises(ValueError, match="sampling must be one of"):
        TaskSampler(ITEMS, sampling="balanced")
    with pytest.raises(ValueError, match="num_samples"):
        TaskSampler(ITEMS, num_samples=0)


def test_sampler_follows_the_dataset_when_its_data_is_replaced():
    """MONAI Label trains by setting train#dataset#data to its own items: the sampler must draw from those."""
    from helpers.paths import BUNDLE_ROOT
    from monai.bundle import ConfigParser

    items = [{"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz", "task": "liver"} for i in range(3)]
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    parser.update({"bundle_root": str(BUNDLE_ROOT), "train#dataset#data": items, "cache_rate": 0.0})
    sampler = parser.get_parsed_content("train#sampler")
    assert len(sampler) == 3 and sorted(iter(sampler)) == [0, 1, 2]
