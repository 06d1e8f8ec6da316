"""kdcli.data: synthetic data, CIFAR and ImageFolder loading, splits, batch augmentation, the batch loader."""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from kdcli.data.augment import BatchAugment, EpochAugmentation, crop_flip, crop_padded, normalize, rotate
from kdcli.data.bundle import DataBundle, ImageSplit, split_train_val
from kdcli.data.loader import BatchLoader
from kdcli.data.loading import training_epochs
from kdcli.data.recipes import TrainRecipe, replayable
from kdcli.data.synthetic import bayes_accuracy, make_synthetic
from kdcli.data.vision import load_cifar, load_imagefolder
from kdcli.config import DataConfig
from kdcli.errors import KdcliError
from kdcli.jobs.common import load_data

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CPU = torch.device("cpu")


def random_images(count: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


# --- synthetic -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic() -> DataBundle:
    return make_synthetic()


def test_synthetic_is_deterministic_per_seed() -> None:
    first, again, other = (make_synthetic(num_train=300, num_test=100, seed=seed) for seed in (0, 0, 1))
    for split in ("train", "test"):
        a, b, c = (getattr(bundle, split) for bundle in (first, again, other))
        assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
        assert torch.equal(a.p_star, b.p_star)
        assert not torch.equal(a.images, c.images) and not torch.equal(a.p_star, c.p_star)


def test_synthetic_shapes_and_p_star_rows_are_distributions(synthetic: DataBundle) -> None:
    assert synthetic.input_size == (3, 16, 16) and len(synthetic.mean) == len(synthetic.std) == 3
    for split in (synthetic.train, synthetic.test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 16, 16)
        assert split.targets.dtype == torch.int64
        assert split.p_star.shape == (len(split), synthetic.num_classes)
        assert (split.p_star >= 0).all()
        torch.testing.assert_close(split.p_star.sum(dim=1), torch.ones(len(split)))


def test_synthetic_labels_are_drawn_from_p_star(synthetic: DataBundle) -> None:
    train = synthetic.train
    label_frequencies = torch.bincount(train.targets, minlength=synthetic.num_classes) / len(train)
    torch.testing.assert_close(label_frequencies, train.p_star.mean(dim=0), atol=0.015, rtol=0)
    # Per input, not only on average: labels hit argmax p*(x) as often as the Bayes classifier does.
    hits = (train.targets == train.p_star.argmax(dim=1)).float().mean().item()
    assert hits == pytest.approx(bayes_accuracy(train.p_star), abs=0.02)


def test_synthetic_bayes_accuracy_in_range(synthetic: DataBundle) -> None:
    assert bayes_accuracy(torch.tensor([[0.1, 0.9], [0.6, 0.4]])) == pytest.approx(0.75)
    assert 0.6 <= bayes_accuracy(synthetic.test.p_star) <= 0.85


def test_synthetic_rejects_features_that_do_not_fit() -> None:
    with pytest.raises(KdcliError, match="do not fit"):
        make_synthetic(features_per_input=17)


# --- splits ----------------------------------------------------------------------------------------


def test_split_train_val_is_disjoint_complete_and_seeded() -> None:
    split = ImageSplit(random_images(50), torch.arange(50), torch.rand(50, 4))
    train, val = split_train_val(split, 0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    positions = torch.cat([train.targets, val.targets])  # targets double as original positions
    assert torch.equal(positions.sort().values, torch.arange(50))
    assert torch.equal(val.p_star, split.p_star[val.targets])
    assert torch.equal(split_train_val(split, 0.2, seed=3)[1].targets, val.targets)
    assert not torch.equal(split_train_val(split, 0.2, seed=4)[1].targets, val.targets)
    assert split_train_val(split, 0.0, seed=3) == (split, None)


# --- CIFAR -----------------------------------------------------------------------------------------


class Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str``, as in the real CIFAR pickles (made with Python 2).

    Such keys load as ``b"data"`` under ``encoding="bytes"`` (the CIFAR page's
    recipe) and as ``"data"`` under torchvision's ``encoding="latin1"``.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_str(self, obj: bytes) -> None:
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def write_cifar_file(path: Path, content: dict[bytes, object]) -> str:
    """Write one CIFAR pickle; return its md5."""
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(content)
    path.write_bytes(buffer.getvalue())
    return hashlib.md5(buffer.getvalue()).hexdigest()


def write_cifar(
    root: Path, dataset_class: type[datasets.CIFAR10], files: dict[str, int], label_key: bytes, monkeypatch
) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write ``files`` (name -> image count) in CIFAR format and point torchvision's md5 lists at them."""
    folder = root / dataset_class.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written, md5 = {}, {}
    for name, count in files.items():
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)  # rows: R plane, G plane, B plane
        labels = rng.integers(0, 10, count).tolist()
        md5[name] = write_cifar_file(folder / name, {b"data": data, label_key: labels})
        written[name] = (data, labels)
    meta_name, meta_key = dataset_class.meta["filename"], dataset_class.meta["key"]
    meta_md5 = write_cifar_file(folder / meta_name, {meta_key.encode(): [f"class{i}" for i in range(10)]})
    monkeypatch.setattr(dataset_class, "train_list", [[n, md5[n]] for n, _ in dataset_class.train_list])
    monkeypatch.setattr(dataset_class, "test_list", [[n, md5[n]] for n, _ in dataset_class.test_list])
    monkeypatch.setattr(dataset_class, "meta", {**dataset_class.meta, "md5": meta_md5})
    return written


def as_split(parts: list[tuple[np.ndarray, list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.concatenate([data for data, _ in parts])).view(-1, 3, 32, 32)
    return images, torch.tensor([label for _, labels in parts for label in labels])


def test_load_cifar10_round_trips_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {f"data_batch_{i}": 2 for i in range(1, 6)} | {"test_batch": 3}
    written = write_cifar(tmp_path, datasets.CIFAR10, files, b"labels", monkeypatch)
    bundle = load_cifar(tmp_path, num_classes=10, download=False)
    train_images, train_targets = as_split([written[f"data_batch_{i}"] for i in range(1, 6)])
    test_images, test_targets = as_split([written["test_batch"]])
    assert torch.equal(bundle.train.images, train_images) and torch.equal(bundle.train.targets, train_targets)
    assert torch.equal(bundle.test.images, test_images) and torch.equal(bundle.test.targets, test_targets)
    assert bundle.train.images.is_contiguous() and bundle.train.p_star is None
    assert (bundle.name, bundle.num_classes, bundle.input_size) == ("cifar10", 10, (3, 32, 32))
    assert (bundle.crop_padding, bundle.hflip, bundle.mean[0]) == (4, True, 0.4914)


def test_load_cifar100_reads_fine_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = write_cifar(tmp_path, datasets.CIFAR100, {"train": 4, "test": 3}, b"fine_labels", monkeypatch)
    bundle = load_cifar(tmp_path, num_classes=100, download=False)
    train_images, train_targets = as_split([written["train"]])
    assert torch.equal(bundle.train.images, train_images) and torch.equal(bundle.train.targets, train_targets)
    assert torch.equal(bundle.test.images, as_split([written["test"]])[0])
    assert (bundle.name, bundle.num_classes, bundle.std[2]) == ("cifar100", 100, 0.2762)


def test_load_cifar_missing_root_is_one_clear_line(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(KdcliError) as caught:
        load_data(DataConfig(name="cifar100", root=root))  # the job words the missing data set's fix as a flag
    message = str(caught.value)
    assert str(root) in message and "--download" in message and "\n" not in message


# --- ImageFolder -----------------------------------------------------------------------------------

COLORS = {"cat": (255, 0, 0), "dog": (0, 64, 255)}


def write_image_tree(root: Path, per_class: dict[str, int]) -> None:
    for split, count in per_class.items():
        for name, color in COLORS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (20, 12), color).save(root / split / name / f"{i}.png")


def test_load_imagefolder_resizes_and_labels(tmp_path: Path) -> None:
    write_image_tree(tmp_path, {"train": 2, "val": 1})
    bundle = load_imagefolder(tmp_path, image_size=8)
    assert bundle.num_classes == 2 and bundle.input_size == (3, 8, 8)
    assert bundle.train.images.shape == (4, 3, 8, 8) and bundle.train.images.dtype == torch.uint8
    assert bundle.train.targets.tolist() == [0, 0, 1, 1] and bundle.test.targets.tolist() == [0, 1]
    for split in (bundle.train, bundle.test):
        for image, target in zip(split.images, split.targets):
            expected = torch.tensor(COLORS[["cat", "dog"][target]], dtype=torch.uint8)
            assert torch.equal(image, expected.view(3, 1, 1).expand(3, 8, 8))


def test_load_imagefolder_needs_train_and_val(tmp_path: Path) -> None:
    write_image_tree(tmp_path, {"train": 1})
    with pytest.raises(KdcliError, match="no val/ sub-folder"):
        load_imagefolder(tmp_path, image_size=8)
    (tmp_path / "val" / "cat").mkdir(parents=True)
    with pytest.raises(KdcliError, match="no images found"):
        load_imagefolder(tmp_path, image_size=8)
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "cat" / "0.png")
    with pytest.raises(KdcliError, match="other class folders"):
        load_imagefolder(tmp_path, image_size=8)


# --- augmentation ----------------------------------------------------------------------------------


def test_normalize_matches_the_formula() -> None:
    images = random_images(4)
    expected = (images.float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(normalize(images, MEAN, STD), expected)


def test_augment_without_randomness_is_normalize() -> None:
    images = random_images(8)
    plain = BatchAugment(MEAN, STD, crop_padding=0, hflip=False)
    assert torch.equal(plain(images, torch.Generator().manual_seed(0)), normalize(images, MEAN, STD))


def test_crop_padded_matches_torchvision_crop() -> None:
    images, padding = random_images(5), 3
    top, left = torch.tensor([0, 6, 2, 3, 6]), torch.tensor([0, 6, 5, 1, 0])
    cropped = crop_padded(images, padding, top, left)
    for i in range(len(images)):
        expected = TF.crop(TF.pad(images[i], [padding]), int(top[i]), int(left[i]), 8, 8)
        assert torch.equal(cropped[i], expected)


def test_crop_flip_is_crop_then_flip_per_sample() -> None:
    images, padding = random_images(6), 2
    top, left = torch.tensor([0, 4, 1, 2, 4, 3]), torch.tensor([4, 0, 2, 3, 1, 0])
    flip = torch.tensor([True, False, True, True, False, False])
    out = crop_flip(images, padding, top, left, flip)
    for i in range(len(images)):
        expected = TF.crop(TF.pad(images[i], [padding]), int(top[i]), int(left[i]), 8, 8)
        assert torch.equal(out[i], TF.horizontal_flip(expected) if flip[i] else expected)
    assert torch.equal(crop_flip(images, 0, None, None, flip), torch.where(flip[:, None, None, None], images.flip(-1), images))


def test_epoch_augmentation_depends_on_sample_not_on_batching() -> None:
    """Sample i's view is the same whatever batch, order or shard it comes in: replayable."""
    images = random_images(40)
    augment = BatchAugment(MEAN, STD, crop_padding=2, hflip=True, rotation=10.0)
    whole = EpochAugmentation(augment, 40, seed=7, device=CPU)(images, torch.arange(40))
    order = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    for batch_size in (3, 16):
        replay = EpochAugmentation(augment, 40, seed=7, device=CPU)
        for index in order.split(batch_size):
            assert torch.equal(replay(images[index], index), whole[index])
    other_seed = EpochAugmentation(augment, 40, seed=8, device=CPU)(images, torch.arange(40))
    assert not torch.equal(other_seed, whole)


def test_augment_crops_each_sample_at_its_own_offset() -> None:
    images, padding = random_images(32), 2
    out = BatchAugment(MEAN, STD, crop_padding=padding, hflip=False)(images, torch.Generator().manual_seed(0))
    offsets = [(top, left) for top in range(2 * padding + 1) for left in range(2 * padding + 1)]
    found = []
    for i in range(len(images)):
        sample = images[i : i + 1]
        crops = [crop_padded(sample, padding, torch.tensor([t]), torch.tensor([l])) for t, l in offsets]
        matches = [o for o, crop in zip(offsets, crops) if torch.equal(normalize(crop, MEAN, STD)[0], out[i])]
        assert matches, f"sample {i} is no padded crop of its input"
        found.append(matches[0])
    assert len(set(found)) > 5


def test_augment_flips_per_sample() -> None:
    images = random_images(64)
    out = BatchAugment(MEAN, STD, crop_padding=0, hflip=True)(images, torch.Generator().manual_seed(0))
    kept = [torch.equal(o, n) for o, n in zip(out, normalize(images, MEAN, STD))]
    flipped = [torch.equal(o, n) for o, n in zip(out, normalize(images.flip(-1), MEAN, STD))]
    assert all(k != f for k, f in zip(kept, flipped))
    assert 10 < sum(flipped) < 54


def test_rotate_matches_torchvision() -> None:
    images = random_images(3)
    assert torch.equal(rotate(images, torch.zeros(3)), images)
    expected = TF.rotate(images, 90.0, interpolation=InterpolationMode.NEAREST)
    assert torch.equal(rotate(images, torch.full((3,), 90.0)), expected)


def test_augment_rotates_per_sample() -> None:
    images = random_images(1).expand(16, -1, -1, -1)
    augment = BatchAugment(MEAN, STD, crop_padding=0, hflip=False, rotation=30.0)
    out = augment(images, torch.Generator().manual_seed(0))
    assert len({tuple(o.flatten().tolist()) for o in out}) > 8


@pytest.mark.parametrize("device", DEVICES)
def test_augment_is_seeded_and_keeps_shape_and_device(device: str) -> None:
    images = random_images(16).to(device)
    augment = BatchAugment(MEAN, STD, crop_padding=4, hflip=True, rotation=15.0)
    first, again, other = (augment(images, torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.dtype == torch.float32 and first.shape == images.shape and first.device == images.device
    assert augment(images).shape == images.shape  # no generator: the global RNG


# --- loader ----------------------------------------------------------------------------------------


def epoch_order(loader: BatchLoader, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    return [i for _, _, index in loader for i in index.tolist()]


def make_split(count: int) -> ImageSplit:
    return ImageSplit(random_images(count, size=4), torch.arange(count))


@pytest.mark.parametrize("shuffle", [False, True])
def test_loader_covers_every_index_once(shuffle: bool) -> None:
    split = make_split(130)
    loader = BatchLoader(split, batch_size=32, shuffle=shuffle, device=CPU)
    batches = list(loader)
    assert len(batches) == len(loader) == 5
    assert sorted(i for _, _, index in batches for i in index.tolist()) == list(range(130))
    for images, targets, index in batches:
        assert index.dtype == torch.int64
        assert torch.equal(images, split.images[index]) and torch.equal(targets, split.targets[index])


def test_loader_drops_a_final_single_sample_only_when_shuffling() -> None:
    split = make_split(65)
    shuffled = BatchLoader(split, batch_size=32, shuffle=True, device=CPU)
    in_order = BatchLoader(split, batch_size=32, shuffle=False, device=CPU)
    assert len(shuffled) == 2 and [len(index) for _, _, index in shuffled] == [32, 32]
    assert len(in_order) == 3 and [len(index) for _, _, index in in_order] == [32, 32, 1]


def test_loader_order_is_a_function_of_seed_and_epoch() -> None:
    def loader(seed: int) -> BatchLoader:
        return BatchLoader(make_split(100), batch_size=16, shuffle=True, device=CPU, seed=seed)

    assert epoch_order(loader(0), 0) != epoch_order(loader(0), 1)
    assert epoch_order(loader(0), 3) == epoch_order(loader(0), 3)  # a resumed run sees the same epoch
    assert epoch_order(loader(0), 0) != epoch_order(loader(1), 0)


def test_two_replicas_partition_an_epoch() -> None:
    replicas = [
        BatchLoader(make_split(100), batch_size=16, shuffle=True, device=CPU, num_replicas=2, rank=rank)
        for rank in (0, 1)
    ]
    shards = [epoch_order(replica, epoch=2) for replica in replicas]
    assert len(shards[0]) == len(shards[1]) == 50
    assert sorted(shards[0] + shards[1]) == list(range(100))


def in_memory_views(split: ImageSplit, epoch: int, *, batch_size: int) -> dict[int, torch.Tensor]:
    epochs = training_epochs(split, BatchAugment(MEAN, STD, crop_padding=2, hflip=True), batch_size=batch_size, device=CPU, seed=0)
    return {int(i): view for inputs, _, index in epochs.batches(epoch, 0) for i, view in zip(index, inputs)}


def test_in_memory_views_depend_on_seed_epoch_and_index_only() -> None:
    """The in-memory twin of the streamed path's test: an epoch replays whatever the batching, the next one differs."""
    split = ImageSplit(random_images(40), torch.arange(40) % 4)
    one = in_memory_views(split, 1, batch_size=8)
    other = in_memory_views(split, 1, batch_size=5)
    assert one.keys() == other.keys() and all(torch.equal(one[i], other[i]) for i in one)
    later = in_memory_views(split, 2, batch_size=8)
    assert sum(not torch.equal(one[i], later[i]) for i in one) > len(one) // 2  # a new epoch, new crops and flips


@pytest.mark.parametrize("auto_augment", ["none", "trivial"])
def test_a_replayable_view_is_the_transform_after_torch_manual_seed(auto_augment: str) -> None:
    """Seeding only the CPU generator (the fast way) gives the views torch.manual_seed gives, and leaves torch's state alone."""
    image = Image.fromarray(random_images(1, size=40)[0].permute(1, 2, 0).numpy())
    transform = TrainRecipe(24, MEAN, STD, auto_augment=auto_augment).transform()
    state = torch.get_rng_state()
    views = [replayable(transform, image, seed) for seed in range(8)]
    assert torch.equal(torch.get_rng_state(), state)
    for seed, view in enumerate(views):
        torch.manual_seed(seed)
        assert torch.equal(view, transform(image))
    torch.set_rng_state(state)
